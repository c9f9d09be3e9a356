"""HTTPS (TLS_MODE=self-signed), from outside: a stack of its own, started here.

The shared stack (conftest.py) keeps plain HTTP, which the other tests rely on; this module
starts a second compose project (STACK_TEST_PROJECT plus "-tls") with compose.tls.yaml, its
own ports on 127.0.0.1 and a certificate made by ``stackctl tls self-signed`` in a temporary
directory, and ends with ``down -v``. Its environment goes to its own commands only.
"""

import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import mlflow
import pytest
import requests
from conftest import PROJECT, ROOT
from mlflow import MlflowClient
from mlflowstack.cabundle import compose_build_ca_bundle
from urllib3.util.retry import Retry


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TlsStack:
    def __init__(self, tls_dir):
        self.tls_dir = tls_dir
        self.ca = str(tls_dir / "ca.crt")
        self.http_port, self.https_port = _free_port(), _free_port()
        self.http = f"http://localhost:{self.http_port}"
        self.https = f"https://localhost:{self.https_port}"
        self.env = {
            **os.environ,
            "COMPOSE_ENV_FILES": os.devnull,
            "COMPOSE_PROJECT_NAME": f"{PROJECT}-tls",
            "COMPOSE_FILE": "compose.yaml:compose.tls.yaml",
            "COMPOSE_PROFILES": "",
            "HTTP_PORT": str(self.http_port),
            "HTTPS_PORT": str(self.https_port),
            "BIND_ADDRESS": "127.0.0.1",
            "PUBLIC_HOSTNAME": "localhost,127.0.0.1",
            "TLS_MODE": "self-signed",
            # Listed, never started: nginx then keeps the serving profile's way in (below).
            "SERVE_MODELS": "tls-model@production",
        }
        ca_bundle = compose_build_ca_bundle(ROOT / "compose.yaml")
        if ca_bundle:
            self.env["EXTRA_CA_BUNDLE"] = ca_bundle

    def run(self, *command: str, check: bool = True, timeout: float = 900):
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode:
            raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def compose(self, *args: str, check: bool = True):
        return self.run("docker", "compose", *args, check=check)

    def stackctl(self, *args: str, tls_dir=None, check: bool = True):
        tls_dir = str(tls_dir or self.tls_dir)
        command = [sys.executable, str(ROOT / "scripts" / "stackctl"), *args, "--tls-dir", tls_dir]
        return self.run(*command, check=check)

    def served_certificate(self) -> bytes:
        pem = ssl.get_server_certificate(("127.0.0.1", self.https_port), timeout=10)
        return ssl.PEM_cert_to_DER_cert(pem)


def _der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    stack = TlsStack(tmp_path_factory.mktemp("tls") / "tls")
    stack.compose("down", "-v", check=False)
    try:
        stack.stackctl("tls", "self-signed")
        stack.stackctl("tls", "reload")
        stack.compose("up", "--build", "-d", "--wait")
        password = stack.compose(
            "exec", "-T", "auth", "cat", "/var/lib/mlflow-stack/users/initial-admin-password"
        ).stdout.strip()
        stack.admin = ("admin", password)
        yield stack
    finally:
        stack.compose("down", "-v", check=False)


@pytest.fixture
def client_env(tls_stack, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tls_stack.https)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", tls_stack.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", tls_stack.admin[1])
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    # A refused certificate is an answer: no retries with back-off.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return tls_stack


def test_mlflow_client_with_ca_logs_run_over_https(client_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", client_env.ca)
    artifact = tmp_path / "note.txt"
    artifact.write_text("over https\n")
    client = MlflowClient(tracking_uri=client_env.https)
    experiment = client.create_experiment(f"tls-{uuid.uuid4().hex[:8]}")
    # Process-wide in MLflow: set for this test only (the session's other tests use the
    # shared stack), and no active experiment is left behind.
    mlflow.set_tracking_uri(client_env.https)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_param("transport", "https")
            mlflow.log_metric("accuracy", 0.9)
            mlflow.log_artifact(str(artifact))
    finally:
        mlflow.set_tracking_uri(None)
    data = client.get_run(run.info.run_id).data
    assert data.params == {"transport": "https"} and data.metrics == {"accuracy": 0.9}
    downloaded = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "d"))
    with open(downloaded) as handle:
        assert handle.read() == "over https\n"


def test_mlflow_client_without_ca_ssl_error(client_env, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    with pytest.raises(Exception, match=r"SSL|CERTIFICATE_VERIFY_FAILED"):
        MlflowClient(tracking_uri=client_env.https).search_experiments(max_results=1)


def _s_client(stack, *options: str):
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{stack.https_port}",
         "-servername", "localhost", "-CAfile", stack.ca, "-verify_return_error", *options],
        # errors="replace": after an h2 handshake, the server's first frame is binary.
        input="", capture_output=True, text=True, errors="replace", timeout=30,
    )  # fmt: skip


# SECLEVEL=0: this client offers the old versions, so a failure is the server's refusal.
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_old_version_refused(tls_stack, version):
    result = _s_client(tls_stack, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert result.returncode != 0
    assert "protocol version" in result.stdout + result.stderr


@pytest.mark.parametrize("version, name", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_tls_version_accepted_verified(tls_stack, version, name):
    result = _s_client(tls_stack, version)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"Protocol\s*: {re.escape(name)}\b|, {re.escape(name)}, ", result.stdout)
    assert "Verify return code: 0 (ok)" in result.stdout


def test_tls_alpn_http2_negotiated(tls_stack):
    result = _s_client(tls_stack, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: h2" in result.stdout


@pytest.mark.parametrize("path", ["/", "/api/2.0/mlflow/experiments/search?max_results=1"])
def test_http_redirects_to_https_same_path(tls_stack, path):
    response = requests.get(tls_stack.http + path, allow_redirects=False, timeout=10)
    assert response.status_code in (301, 308)
    assert response.headers["Location"] == tls_stack.https + path
    assert "Strict-Transport-Security" not in response.headers


def test_http_healthz_answered_without_redirect(tls_stack):
    response = requests.get(tls_stack.http + "/healthz", allow_redirects=False, timeout=10)
    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "evil.example:80"])
def test_http_foreign_host_no_redirect(tls_stack, host):
    response = requests.get(
        tls_stack.http + "/", headers={"Host": host}, allow_redirects=False, timeout=10
    )
    assert response.status_code == 421
    assert "Location" not in response.headers


def test_http_serving_profile_host_reaches_site_not_redirect(tls_stack):
    """The serving container fetches models from http://nginx:8080 (no certificate names it):
    that name is the site over plain HTTP, asking for a login; it is never redirected."""
    response = requests.get(
        tls_stack.http + "/api/2.0/mlflow/experiments/search",
        headers={"Host": "nginx:8080"}, allow_redirects=False, timeout=10,
    )  # fmt: skip
    assert response.status_code == 401


def test_http_redirect_raw_bytes_path_not_passed(tls_stack):
    request = b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", tls_stack.http_port), timeout=10) as sock:
        sock.sendall(request)
        head = sock.makefile("rb").read(4096).split(b"\r\n\r\n")[0]
    assert re.search(rb"\r\nLocation: https://localhost:%d/\r\n" % tls_stack.https_port, head)


def test_https_answers_carry_hsts_a_year(tls_stack):
    for path in ("/healthz", "/", "/api/2.0/mlflow/experiments/search"):
        response = requests.get(tls_stack.https + path, verify=tls_stack.ca, timeout=10)
        max_age = re.fullmatch(r"max-age=(\d+)", response.headers["Strict-Transport-Security"])
        assert int(max_age.group(1)) >= 31536000, path


def test_tls_reload_mismatched_key_refused_certificate_kept(tls_stack, tmp_path):
    served = tls_stack.served_certificate()
    bad = tmp_path / "bad"
    tls_stack.stackctl("tls", "self-signed", tls_dir=bad)
    (bad / "server.key").write_bytes((tls_stack.tls_dir / "server.key").read_bytes())
    result = tls_stack.stackctl("tls", "reload", tls_dir=bad, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not belong to" in result.stderr
    assert tls_stack.served_certificate() == served


def test_tls_reload_new_certificate_served_no_request_fails(tls_stack):
    old = tls_stack.served_certificate()
    assert old == _der(tls_stack.tls_dir / "server.crt")
    tls_stack.stackctl("tls", "self-signed", "--force")
    new = _der(tls_stack.tls_dir / "server.crt")
    assert new != old

    stop, errors, answered = threading.Event(), [], []

    def loop(session):
        while not stop.is_set():
            try:
                response = session.get(
                    tls_stack.https + "/api/2.0/mlflow/experiments/search",
                    params={"max_results": 1}, auth=tls_stack.admin,
                    verify=tls_stack.ca, timeout=10,
                )  # fmt: skip
                response.raise_for_status()
                answered.append(response.status_code)
            except requests.RequestException as error:
                errors.append(repr(error))

    # A new connection per request: none may be refused or cut. And kept-alive connections:
    # the old workers close their idle ones, which HTTP lets a client retry for a GET (as
    # browsers and the MLflow client do): one retry, and never for a status.
    kept_alive = requests.Session()
    retry = Retry(total=1, connect=0, read=1, status=0, allowed_methods={"GET"})
    kept_alive.mount("https://", requests.adapters.HTTPAdapter(max_retries=retry))
    workers = [
        threading.Thread(target=loop, args=(requests,)),
        threading.Thread(target=loop, args=(kept_alive,)),
    ]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1)
        before = len(answered)
        tls_stack.stackctl("tls", "reload")
        deadline = time.monotonic() + 15
        while tls_stack.served_certificate() != new:
            assert time.monotonic() < deadline, "the old certificate is still served"
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=20)
    assert errors == []
    assert before > 0 and len(answered) > before
