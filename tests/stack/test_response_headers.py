"""Every answer of the stack carries the security headers and names no software version
(nginx/snippets/security-headers.conf), MLflow's error bodies pass through unchanged, and
MLflow's key-encryption passphrase is the installation's own, from a file, not a setting."""

import json
import re
import socket
import subprocess

import pytest
import requests
from conftest import MISSING_MODEL, PORT
from mlflow import MlflowClient

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
MISSING_EXPERIMENT = "/api/2.0/mlflow/experiments/get?experiment_id=987654321"
KEK_FILE = "/var/lib/mlflow-stack/server-secrets/mlflow-kek-passphrase"


@pytest.fixture(scope="module")
def viewer(stack):
    stack.add_user("hdr-vic", "vic-password-3", "viewer")
    return ("hdr-vic", "vic-password-3")


@pytest.fixture(scope="module")
def artifact_url(stack, admin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("headers")
    (folder / "page.html").write_text("<script>alert(1)</script>")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        client = MlflowClient(stack.url)
        experiment = client.create_experiment("response-headers")
        run = client.create_run(experiment)
        client.log_artifact(run.info.run_id, str(folder / "page.html"))
    path = f"{experiment}/{run.info.run_id}/artifacts/page.html"
    return f"{stack.url}/api/2.0/mlflow-artifacts/artifacts/{path}"


def _raw_answer(request: bytes) -> tuple[int, dict[str, list[str]]]:
    """Status and headers (each name's values, lower-case names) of a request sent as bytes."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
        sock.sendall(request)
        head = sock.makefile("rb").read(65536).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split()[1]), headers


def _answers(stack, admin, viewer, artifact_url):
    """(what, status, headers as a name -> [values] dict) of a representative set of answers."""
    port = stack.url.rsplit(":", 1)[1]

    def get(what, url, expected, method="GET", **kwargs):
        answer = requests.request(method, url, allow_redirects=False, **kwargs)
        assert answer.status_code == expected, (what, answer.status_code, answer.text[:200])
        # requests joins repeated headers with ", ": a header sent twice shows as such.
        headers = {name.lower(): [value] for name, value in answer.headers.items()}
        return what, answer.status_code, headers

    big = (
        f"POST /api/2.0/mlflow/runs/log-batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 40000000\r\nConnection: close\r\n\r\n"
    ).encode()
    status, big_headers = _raw_answer(big)
    assert status == 413
    bad = b"GET /%00 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    bad_status, bad_headers = _raw_answer(bad)
    assert bad_status == 400
    return [
        get("UI page", stack.url + "/", 200, auth=admin),
        get("UI static file", stack.url + "/static-files/favicon.ico", 200, auth=admin),
        get("API 200", stack.url + SEARCH, 200, auth=admin),
        get("MLflow's API 404", stack.url + MISSING_EXPERIMENT, 404, auth=admin),
        get("missing route", stack.url + "/api/2.0/mlflow/no-such-route", 404, auth=admin),
        get("401 without credentials", stack.url + SEARCH, 401),
        get("401 page", stack.url + "/", 401, headers={"Accept": "text/html"}),
        get(
            "403 viewer write",
            stack.url + "/api/2.0/mlflow/experiments/create",
            403,
            method="POST",
            json={"name": "nope"},
            auth=viewer,
        ),
        get("421 foreign host", stack.url + SEARCH, 421, headers={"Host": "evil.example"}),
        ("413 body past the limit", 413, big_headers),
        ("400 control character", 400, bad_headers),
        get("artifact download", artifact_url, 200, auth=admin),
        get("healthz", stack.url + "/healthz", 200),
        get("serving: name not served", stack.url + "/serving/unlisted/ping", 404, auth=admin),
        get("serving: not loaded", stack.url + f"/serving/{MISSING_MODEL}/ping", 503, auth=admin),
    ]


@pytest.fixture(scope="module")
def answers(stack, admin, viewer, artifact_url):
    return _answers(stack, admin, viewer, artifact_url)


def test_every_answer_security_headers_once_each(answers):
    for what, status, headers in answers:
        assert headers.get("x-content-type-options") == ["nosniff"], (what, status, headers)
        assert headers.get("x-frame-options") in (["SAMEORIGIN"], ["DENY"]), (what, headers)
        csp = headers.get("content-security-policy", [])
        assert len(csp) == 1 and "frame-ancestors" in csp[0], (what, headers)
        assert headers.get("referrer-policy") == ["same-origin"], (what, headers)


def test_every_answer_has_no_server_header(answers):
    """No software name at all: nginx clears its own Server header (headers-more, nginx.conf)
    and never passes on the gate's, MLflow's or a model's."""
    for what, status, headers in answers:
        assert "server" not in headers, (what, status, headers["server"])
        assert "x-powered-by" not in headers, what


def test_mlflow_api_404_body_passes_unchanged(stack, admin):
    """Byte for byte what MLflow answers when asked directly (with nginx's proxy secret)."""
    secret = stack.compose(
        "exec", "-T", "nginx", "cat", "/var/lib/mlflow-stack/secrets/proxy-secret"
    ).strip()
    direct = stack.backend_request(
        "server", 5000, MISSING_EXPERIMENT,
        headers={"X-Stack-Proxy-Secret": secret, "X-Stack-User": "admin", "Host": "localhost"},
    )  # fmt: skip
    through = requests.get(stack.url + MISSING_EXPERIMENT, auth=admin)
    assert direct.status_code == through.status_code == 404
    assert through.content == direct.content
    assert through.headers["Content-Type"] == direct.headers["Content-Type"]
    assert through.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_server_direct_answer_has_no_server_banner(stack):
    answer = stack.backend_request("server", 5000, "/health")
    assert answer.status_code == 200
    assert "server" not in {name.lower() for name in answer.headers}


def test_gate_direct_answer_server_header_names_no_version(stack):
    """The gate's answers only ever reach nginx (auth_request), whose clients never see its
    headers; its own address (from the backend network) answers with gunicorn's bare name
    (no version setting)."""
    answer = stack.backend_request("auth", 8000, "/health")
    assert not re.search(r"[0-9/]", answer.headers.get("Server", ""))


def test_kek_passphrase_file_mode_0600_in_server_container(stack):
    mode = stack.compose("exec", "-T", "server", "stat", "-c", "%a %s", KEK_FILE).split()
    assert mode[0] == "600" and int(mode[1]) == 65


def test_kek_passphrase_not_in_docker_inspect_environment(stack):
    passphrase = stack.compose("exec", "-T", "server", "cat", KEK_FILE).strip()
    assert len(passphrase) == 64
    for service in ("server", "init", "auth", "nginx"):
        containers = stack.compose("ps", "-a", "-q", service).split()
        assert containers, service
        inspected = subprocess.run(
            ["docker", "inspect", containers[0]], capture_output=True, text=True, check=True
        ).stdout
        environment = json.loads(inspected)[0]["Config"]["Env"]
        assert not any("MLFLOW_CRYPTO_KEK" in entry for entry in environment), service
        assert passphrase not in inspected, service
        assert passphrase not in stack.logs(service), service


def test_kek_passphrase_mlflow_uses_it_not_its_default(stack, admin):
    """MLflow's own report of whether it runs with its built-in passphrase."""
    answer = requests.get(stack.url + "/ajax-api/3.0/mlflow/gateway/secrets/config", auth=admin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["using_default_passphrase"] is False


def test_ui_pages_one_date_header_no_nginx_warning(stack, viewer):
    """MLflow's pages came with two Date headers (uvicorn's and the app's): nginx warned about
    each in its log, a quarter of its lines on a UI visit."""
    since = stack.now()
    page = requests.get(stack.url + "/", auth=viewer)
    assert page.status_code == 200
    script = re.search(r'src="([^"]+\.js)"', page.text)
    assert script, page.text[:300]
    asset = requests.get(stack.url + "/" + script.group(1).lstrip("./"), auth=viewer)
    assert asset.status_code == 200
    assert "duplicate header" not in stack.logs("nginx", since)
