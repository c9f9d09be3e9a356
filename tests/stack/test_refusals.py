"""Refusals say why: MLflow's JSON error shape on API paths (the client and the UI show its
message), plain text on pages, and a 421 that names the server's names (nginx/njs/refusals.js)."""

import socket

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from test_roles import use

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@pytest.fixture(scope="module")
def viewer(stack):
    stack.add_user("why-vera", "vera-password-2", "viewer")
    return ("why-vera", "vera-password-2")


@pytest.fixture(scope="module")
def editor(stack):
    stack.add_user("why-ed", "ed-password-2", "editor")
    return ("why-ed", "ed-password-2")


def test_viewer_write_client_exception_names_role(stack, viewer, monkeypatch):
    use(monkeypatch, stack, *viewer)
    with pytest.raises(MlflowException) as refused:
        MlflowClient().create_experiment("why-not")
    assert refused.value.error_code == "PERMISSION_DENIED"
    message = str(refused.value)
    assert "why-vera" in message and "'viewer'" in message and "'editor'" in message


def test_viewer_write_api_403_json_ui_page_plain_text(stack, viewer):
    api = requests.post(stack.url + "/ajax-api/2.0/mlflow/experiments/create", json={}, auth=viewer)
    assert api.status_code == 403 and api.headers["Content-Type"] == "application/json"
    assert api.json()["error_code"] == "PERMISSION_DENIED"
    page = requests.post(stack.url + "/", auth=viewer)
    assert page.status_code == 403 and page.headers["Content-Type"].startswith("text/plain")
    assert "'viewer'" in page.text


def test_editor_admin_call_403_says_admin_needed(stack, editor):
    response = requests.get(stack.url + "/api/2.0/mlflow/webhooks", auth=editor)
    assert response.status_code == 403
    assert "'admin'" in response.json()["message"] and "'editor'" in response.json()["message"]


@pytest.mark.parametrize("auth", [None, ("nobody", "wrong"), ("why-ed", "wrong")])
def test_unauthenticated_api_401_json_with_challenge(stack, editor, auth):
    response = requests.get(stack.url + SEARCH, auth=auth)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.json()["error_code"] == "UNAUTHENTICATED"
    assert "MLFLOW_TRACKING_USERNAME" in response.json()["message"]


def test_unauthenticated_client_exception_explains(stack, monkeypatch):
    use(monkeypatch, stack, "nobody", "wrong")
    with pytest.raises(MlflowException) as refused:
        mlflow.search_experiments()
    assert "MLFLOW_TRACKING_PASSWORD" in str(refused.value)


def test_unauthenticated_page_plain_text_with_challenge(stack):
    response = requests.get(stack.url + "/", headers={"Accept": "text/html"})
    assert response.status_code == 401 and "WWW-Authenticate" in response.headers
    assert response.headers["Content-Type"].startswith("text/plain")


def test_foreign_host_421_names_public_names_plain_and_html(stack):
    port = stack.url.rsplit(":", 1)[1]
    plain = requests.get(stack.url + SEARCH, headers={"Host": "evil.example"})
    assert plain.status_code == 421 and plain.headers["Content-Type"].startswith("text/plain")
    assert f"127.0.0.1:{port}" in plain.text and "localhost" in plain.text
    html = requests.get(stack.url + "/", headers={"Host": "evil.example", "Accept": "text/html"})
    assert html.status_code == 421 and html.headers["Content-Type"].startswith("text/html")
    assert "<li>localhost</li>" in html.text and "evil.example" not in html.text
    secret = stack.compose(
        "exec", "-T", "nginx", "cat", "/var/lib/mlflow-stack/secrets/proxy-secret"
    ).strip()
    assert secret and secret not in plain.text + html.text


def test_json_body_past_limit_413_names_limit(stack, editor):
    response = requests.post(
        stack.url + "/api/2.0/mlflow/runs/log-batch", data=b" " * (33 << 20), auth=editor
    )
    assert response.status_code == 413
    assert response.json()["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert (
        "32m" in response.json()["message"] and "REQUEST_BODY_LIMIT" in response.json()["message"]
    )


def test_refusal_of_unauthenticated_upload_never_buffers_its_body(stack):
    """A refusal answers without reading the body: nothing of a stranger's upload lands in
    nginx's temporary files (js_content would buffer it whole, unbounded on upload paths)."""
    address = stack.container_ip("nginx")
    with socket.create_connection((address, 8080), timeout=10) as sock:
        sock.sendall(
            b"PUT /api/2.0/mlflow-artifacts/artifacts/1/x.bin HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        status_line = sock.recv(64)
        try:
            for _ in range(64):
                sock.sendall(b"x" * (1024 * 1024))
        except OSError:
            pass  # nginx may close the connection: what matters is what it kept
        open_bodies = stack.compose(
            "exec", "-T", "nginx", "sh", "-c",
            "ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c /var/lib/nginx/body || true",
        )  # fmt: skip
    assert status_line.startswith(b"HTTP/1.1 401")
    assert open_bodies.strip() == "0"
