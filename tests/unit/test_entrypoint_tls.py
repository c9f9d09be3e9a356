"""nginx/docker-entrypoint.sh's TLS part, run on the host against a copy of nginx's files
(NGINX_DIR), without Docker: what it renders per TLS_MODE and what it refuses or warns.
tests/stack/test_tls_stack.py checks nginx's answers."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NGINX = Path(__file__).resolve().parents[2] / "nginx"

pytestmark = pytest.mark.skipif(
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
    pem = nginx_dir.parent / "server.pem"
    pem.write_text("stand-in: the entrypoint only checks that nginx can read it\n")
    env = {
        "PATH": os.environ["PATH"],
        "NGINX_DIR": str(nginx_dir),
        "TLS_PEM": str(pem),
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


def _tls_on(**settings: str) -> dict[str, str]:
    return {"TLS_MODE": "self-signed", "TLS_COMPOSE_FILE": "1", **settings}


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "no proxy secret" not in line]


def test_entrypoint_tls_off_site_on_8080_no_redirect_server(nginx_dir):
    result = _entrypoint(nginx_dir, TLS_MODE="off")
    assert result.returncode == 0, result.stderr
    listen = (nginx_dir / "conf.d" / "site" / "listen.conf").read_text()
    assert listen == "listen 8080 default_server;\n"
    assert not (nginx_dir / "conf.d" / "02-http-redirect.conf").exists()
    assert _stderr_lines(result) == []


def test_entrypoint_tls_on_site_on_8443_redirect_names_from_public_hostname(nginx_dir):
    result = _entrypoint(
        nginx_dir, **_tls_on(PUBLIC_HOSTNAME="MLflow.Example.com:8080,10.0.0.5", HTTPS_PORT="8443")
    )
    assert result.returncode == 0, result.stderr
    conf = nginx_dir / "conf.d"
    assert (conf / "site" / "listen.conf").read_text() == (
        "listen 8443 ssl default_server;\ninclude /etc/nginx/tls/tls.conf;\n"
    )
    assert (conf / "02-http-redirect.conf").read_text() == (
        nginx_dir / "tls" / "http-redirect.conf"
    ).read_text()
    names = (conf / "02-tls-redirect-names.conf").read_text()
    assert '"host:mlflow.example.com" "mlflow.example.com";' in names
    assert '"host:10.0.0.5" "10.0.0.5";' in names
    assert 'default ":8443";' in names
    assert names.count('"host:') == 2


def test_entrypoint_tls_on_port_443_redirect_without_port(nginx_dir):
    assert _entrypoint(nginx_dir, **_tls_on(HTTPS_PORT="443")).returncode == 0
    names = (nginx_dir / "conf.d" / "02-tls-redirect-names.conf").read_text()
    assert 'default "";\n}' in names.split("$tls_redirect_port")[1]


def test_entrypoint_tls_on_empty_public_hostname_redirects_to_certificate_names(nginx_dir):
    assert _entrypoint(nginx_dir, **_tls_on(PUBLIC_HOSTNAME="")).returncode == 0
    names = (nginx_dir / "conf.d" / "02-tls-redirect-names.conf").read_text()
    assert '"host:localhost" "localhost";' in names and '"host:127.0.0.1" "127.0.0.1";' in names
    assert names.count('"host:') == 2


def test_entrypoint_tls_on_serving_keeps_nginx_name_on_8080(nginx_dir):
    assert _entrypoint(nginx_dir, **_tls_on(SERVE_MODELS="iris@production")).returncode == 0
    listen = (nginx_dir / "conf.d" / "site" / "listen.conf").read_text()
    assert listen.endswith("listen 8080;\nserver_name nginx;\n")


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.0.5", "::"])
def test_entrypoint_tls_off_public_address_warns_one_line(nginx_dir, address):
    result = _entrypoint(nginx_dir, TLS_MODE="off", BIND_ADDRESS=address)
    assert result.returncode == 0
    (line,) = _stderr_lines(result)
    assert "warning" in line and "in the clear" in line


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1"])
def test_entrypoint_tls_off_loopback_no_warning(nginx_dir, address):
    result = _entrypoint(nginx_dir, TLS_MODE="off", BIND_ADDRESS=address)
    assert result.returncode == 0 and _stderr_lines(result) == []


def test_entrypoint_tls_on_public_address_no_warning(nginx_dir):
    result = _entrypoint(nginx_dir, **_tls_on(BIND_ADDRESS="0.0.0.0"))
    assert result.returncode == 0 and _stderr_lines(result) == []


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"TLS_MODE": "on"}, "TLS_MODE: 'on' is not off, self-signed or files"),
        (_tls_on(HTTPS_PORT="44x"), "HTTPS_PORT: '44x' is not a port number"),
        ({"TLS_MODE": "files"}, "needs compose.tls.yaml"),
        ({"TLS_MODE": "off", "TLS_COMPOSE_FILE": "1"}, "but TLS_MODE is off"),
    ],
)
def test_entrypoint_bad_tls_setting_refused_one_line(nginx_dir, settings, message):
    result = _entrypoint(nginx_dir, **settings)
    assert result.returncode != 0
    (line,) = _stderr_lines(result)
    assert line.startswith("docker-entrypoint: ") and message in line
    assert not (nginx_dir / "conf.d" / "site").exists()


def test_entrypoint_tls_on_without_certificate_refused_one_line(nginx_dir):
    result = _entrypoint(nginx_dir, **_tls_on(TLS_PEM=str(nginx_dir / "missing.pem")))
    assert result.returncode != 0
    (line,) = _stderr_lines(result)
    assert "no certificate in the tls volume" in line and "stackctl tls reload" in line
