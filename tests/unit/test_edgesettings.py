"""PUBLIC_PATH and TRUSTED_PROXIES: what ``stackctl config check`` (edgesettings.py) and nginx's
entrypoint accept, what they refuse with one line, and what the entrypoint renders.
tests/stack/test_public_path.py checks nginx's answers."""

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflowstack import edgesettings
from mlflowstack.files import BundleError

NGINX = Path(__file__).resolve().parents[2] / "nginx"
GOOD_PATHS = ["", "/mlflow", "/team-a/ml.flow~1", "/a_b"]
BAD_PATHS = [
    "mlflow", "/mlflow/", "/", "//mlflow", "/a//b", "/a/../b", "/..", "/a/.", "/_auth",
    "/_artifact_files", "/ml flow", "/ml;flow", "/ml{flow}", "/ml$uri", "/a\n/b", "/é",
    "/" + "a" * 200, "/a%2Fb", "/a?b",
]  # fmt: skip
GOOD_PROXIES = ["", "10.0.0.0/8", "172.16.0.0/12, 192.168.1.7", "fd00::/8 ::1", "10.0.0.5/32"]
BAD_PROXIES = [
    "10.0.0.0/33", "256.1.1.1", "10.0.0.1/8", "a.example", "1.2.3.4;evil", "unix:",
    "10.0.0.0/255.0.0.0", "fe80::1%eth0", "1.2.3.4/8/8", "fd00::/129", "10.0.0.0/8\n}",
]  # fmt: skip


@pytest.mark.parametrize("value", GOOD_PATHS)
def test_public_path_problem_good_value_none(value):
    assert edgesettings.public_path_problem(value) is None


@pytest.mark.parametrize("value", BAD_PATHS)
def test_public_path_problem_bad_value_one_line(value):
    problem = edgesettings.public_path_problem(value)
    assert problem and problem.startswith("PUBLIC_PATH: ") and "\n" not in problem


@pytest.mark.parametrize("value", GOOD_PROXIES)
def test_trusted_proxies_good_value_networks(value):
    networks = edgesettings.trusted_proxies(value)
    assert all(isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) for n in networks)


@pytest.mark.parametrize("value", BAD_PROXIES)
def test_trusted_proxies_bad_value_raises_one_line(value):
    with pytest.raises(BundleError) as raised:
        edgesettings.trusted_proxies(value)
    assert str(raised.value).startswith("TRUSTED_PROXIES: ") and "\n" not in str(raised.value)


def test_check_bad_public_path_raises():
    with pytest.raises(BundleError, match="PUBLIC_PATH"):
        edgesettings.check({"PUBLIC_PATH": "/mlflow/", "TRUSTED_PROXIES": ""})


needs_envsubst = pytest.mark.skipif(
    not shutil.which("envsubst"), reason="needs envsubst (apt-get install gettext-base)"
)


@pytest.fixture
def nginx_dir(tmp_path) -> Path:
    directory = tmp_path / "etc-nginx"
    for part in ("templates", "tls"):
        shutil.copytree(NGINX / part, directory / part)
    (directory / "conf.d").mkdir()
    (directory / "private").mkdir()
    return directory


def _entrypoint(nginx_dir: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "NGINX_DIR": str(nginx_dir),
        "PROXY_SECRET_FILE": str(nginx_dir / "no-secret"),
        "SERVING_SECRET_FILE": str(nginx_dir / "no-secret"),
        "AUTH_CACHE_TTL": "2s",
        "REQUEST_BODY_LIMIT": "32m",
        "SERVING_BODY_LIMIT": "4m",
        "BIND_ADDRESS": "127.0.0.1",
        **settings,
    }
    return subprocess.run(
        ["sh", str(NGINX / "docker-entrypoint.sh"), "true"],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "no proxy secret" not in line]


@needs_envsubst
@pytest.mark.parametrize("value", BAD_PATHS)
def test_entrypoint_bad_public_path_stops_with_one_line(nginx_dir, value):
    result = _entrypoint(nginx_dir, PUBLIC_PATH=value)
    assert result.returncode != 0
    (line,) = _errors(result)
    assert line.startswith("docker-entrypoint: PUBLIC_PATH: ")
    assert not (nginx_dir / "conf.d" / "mlflow.conf").exists()


@needs_envsubst
# (Host bits, "10.0.0.1/8": only config check refuses them; nginx warns and ignores them.)
@pytest.mark.parametrize("value", [v for v in BAD_PROXIES if v != "10.0.0.1/8"])
def test_entrypoint_bad_trusted_proxies_stops_with_one_line(nginx_dir, value):
    result = _entrypoint(nginx_dir, TRUSTED_PROXIES=value)
    assert result.returncode != 0
    (line,) = _errors(result)
    assert line.startswith("docker-entrypoint: TRUSTED_PROXIES: ")


@needs_envsubst
def test_entrypoint_public_path_prefixes_every_mlflow_location(nginx_dir):
    assert _entrypoint(nginx_dir, PUBLIC_PATH="/team.a/mlflow").returncode == 0
    site = (nginx_dir / "conf.d" / "mlflow.conf").read_text()
    assert "location /team.a/mlflow/ {" in site
    assert "location /team.a/mlflow/api/2.0/mlflow-artifacts/artifacts {" in site
    assert "location ~ ^/team\\.a/mlflow/serving/(?<serving_model>" in site
    assert "location = /team.a/mlflow/invocations {" in site
    assert "location / {" not in site
    rest = (nginx_dir / "conf.d" / "00-public-path.conf").read_text()
    assert '"~(?s)^/team\\.a/mlflow(?<public_path_tail>/.*)$" $public_path_tail;' in rest
    outside = (nginx_dir / "conf.d" / "site" / "outside-prefix.conf").read_text()
    assert 'location / {\n    return 404 "Not found\\n";\n}' in outside
    assert "return 301 /team.a/mlflow/;" in outside


@needs_envsubst
def test_entrypoint_empty_public_path_site_at_root(nginx_dir):
    assert _entrypoint(nginx_dir).returncode == 0
    site = (nginx_dir / "conf.d" / "mlflow.conf").read_text()
    assert "location / {" in site and "location = /invocations {" in site
    assert "default $uri;" in (nginx_dir / "conf.d" / "00-public-path.conf").read_text()
    assert "location" not in (nginx_dir / "conf.d" / "site" / "outside-prefix.conf").read_text()


@needs_envsubst
def test_entrypoint_trusted_proxies_rendered_as_real_ip(nginx_dir):
    assert _entrypoint(nginx_dir, TRUSTED_PROXIES="172.16.0.0/12, fd00::/8").returncode == 0
    real_ip = (nginx_dir / "conf.d" / "00-real-ip.conf").read_text()
    assert real_ip == (
        "real_ip_header X-Forwarded-For;\nreal_ip_recursive on;\n"
        "set_real_ip_from 172.16.0.0/12;\nset_real_ip_from fd00::/8;\n"
    )


@needs_envsubst
def test_entrypoint_empty_trusted_proxies_no_real_ip(nginx_dir):
    assert _entrypoint(nginx_dir).returncode == 0
    real_ip = (nginx_dir / "conf.d" / "00-real-ip.conf").read_text()
    assert all(line.startswith("#") for line in real_ip.splitlines())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REQUEST_BODY_LIMIT", "4m\n}\nserver { listen 9999; }"),
        ("SERVING_BODY_LIMIT", "4m\r\nx"),
        ("PUBLIC_HOSTNAME", "mlflow.example.com\nevil.example.com;"),
        ("SERVE_MODELS", "iris@production\n}"),
        ("AUTH_CACHE_TTL", "2s\n;"),
        ("PROXY_TIMEOUT", "60s\x1b[2J"),
        ("TRUSTED_PROXIES", "10.0.0.0/8\n0.0.0.0/0"),
    ],
)
def test_entrypoint_setting_with_line_break_stops_before_rendering(nginx_dir, name, value):
    """grep judges line by line: a second line must never ride into nginx's config."""
    result = _entrypoint(nginx_dir, **{name: value})
    assert result.returncode != 0
    assert _errors(result) == [
        f"docker-entrypoint: {name}: holds a line break or another control character"
    ]


@pytest.mark.parametrize("value", ["60s; include /etc/passwd", "1d", "0s", "fast", "60 s"])
def test_entrypoint_bad_proxy_timeout_stops_with_one_line(nginx_dir, value):
    result = _entrypoint(nginx_dir, PROXY_TIMEOUT=value)
    assert result.returncode != 0
    assert _errors(result) == [
        f"docker-entrypoint: PROXY_TIMEOUT: '{value}' is not a time such as 3600s"
    ]


@needs_envsubst
@pytest.mark.parametrize("value", ["3600s", "90", "500ms", "2h"])
def test_entrypoint_good_proxy_timeout_renders(nginx_dir, value):
    assert _entrypoint(nginx_dir, PROXY_TIMEOUT=value).returncode == 0


@pytest.mark.parametrize("value", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2000::/3", "fc00::/7"])
def test_trusted_proxies_wider_than_a_proxy_network_refused(value):
    with pytest.raises(BundleError, match="trusts too much of the Internet"):
        edgesettings.trusted_proxies(value)


@needs_envsubst
@pytest.mark.parametrize("value", ["0.0.0.0/0", "1.0.0.0/7", "::/0", "fc00::/7"])
def test_entrypoint_trusted_proxies_too_wide_stops(nginx_dir, value):
    assert _entrypoint(nginx_dir, TRUSTED_PROXIES=value).returncode != 0
