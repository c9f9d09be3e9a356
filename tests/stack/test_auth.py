"""Nobody without a valid password gets anything; the edge answers what it must."""

import base64

import pytest
import requests

PROTECTED = [
    ("GET", "/"),
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1"),
    ("POST", "/api/2.0/mlflow/runs/search"),
    ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=1"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/data/ten.bin"),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/evil.bin"),
    ("GET", "/api/2.0/mlflow/registered-models/search"),
    ("GET", "/ajax-api/2.0/mlflow/registered-models/search"),
    ("POST", "/graphql"),
]


def _basic(raw: bytes) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


BAD_CREDENTIALS = {
    "none": {},
    "wrong-password": _basic(b"admin:wrong"),
    "unknown-user": _basic(b"nobody:whatever"),
    "malformed": {"Authorization": "Basic not-base64!!"},
    "no-colon": _basic(b"admin"),
    "other-scheme": {"Authorization": "Digest username=admin"},
}


@pytest.mark.parametrize("method,path", PROTECTED)
@pytest.mark.parametrize("credential", sorted(BAD_CREDENTIALS))
def test_protected_path_without_valid_user_401_with_challenge(stack, method, path, credential):
    response = requests.request(
        method, stack.url + path, headers=BAD_CREDENTIALS[credential], data=b"{}"
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    # Only nginx's fixed refusal, nothing of MLflow's: no data, no MLflow error.
    assert response.content.startswith((b"Authentication required", b'{"error_code":"UNAUTH'))
    assert (
        b"experiment" not in response.content and b"RESOURCE_DOES_NOT_EXIST" not in response.content
    )


def test_healthz_without_user_200(stack):
    response = requests.get(stack.url + "/healthz")
    assert response.status_code == 200
    assert len(response.content) < 10


def test_healthz_foreign_host_200(stack):
    assert requests.get(stack.url + "/healthz", headers={"Host": "evil.example"}).ok


def test_healthz_names_no_host_or_origin(stack):
    for headers in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}, {}):
        response = requests.get(stack.url + "/healthz", headers=headers)
        leaked = [k for k in response.headers if k.lower().startswith("access-control-")]
        assert response.ok and leaked == []


def test_valid_user_reaches_ui_and_api(stack, admin):
    assert requests.get(stack.url + "/", auth=admin).status_code == 200
    response = requests.get(
        stack.url + "/api/2.0/mlflow/experiments/search?max_results=5", auth=admin
    )
    assert response.status_code == 200 and "experiments" in response.json()


def test_password_with_bytes_after_nul_refused(stack):
    stack.add_user("nul-user", "exactpass")
    assert stack.wait_for_status(200, ("nul-user", "exactpass")) < 5
    raw = b"nul-user:exactpass\0extra"
    response = requests.get(stack.url + "/api/2.0/mlflow/experiments/search", headers=_basic(raw))
    assert response.status_code == 401


def test_password_past_72_bytes_refused(stack):
    password = "é" * 36  # 72 bytes in UTF-8
    stack.add_user("long-user", password)
    assert stack.wait_for_status(200, ("long-user", password)) < 5
    for extra in ("x", "é", "more-bytes"):
        raw = f"long-user:{password}{extra}".encode()
        url = stack.url + "/api/2.0/mlflow/experiments/search"
        assert requests.get(url, headers=_basic(raw)).status_code == 401


def test_plaintext_line_never_authenticates(stack):
    line = "plain-user:plaintext-secret\n"
    stack.append_users_line(line)
    auth = ("plain-user", "plaintext-secret")
    listing = stack.stackctl("user", "list", "--json")
    assert '"plaintext"' in listing
    for _ in range(3):
        assert requests.get(stack.url + "/", auth=auth).status_code == 401


def test_user_added_then_removed_within_5_seconds(stack):
    auth = ("late-user", "late-password")
    assert requests.get(stack.url + "/", auth=auth).status_code == 401
    stack.add_user(*auth)
    assert stack.wait_for_status(200, auth) < 5
    stack.stackctl("user", "remove", "late-user")
    assert stack.wait_for_status(401, auth) < 5


def test_hand_added_htpasswd_line_logs_in_within_5_seconds(stack, bcrypt_hash):
    line = f"hand-user:{bcrypt_hash('hand-password')}\n"
    stack.append_users_line(line)
    assert stack.wait_for_status(200, ("hand-user", "hand-password")) < 5


def test_wrong_password_after_right_one_refused(stack, admin):
    url = stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    with requests.Session() as session:
        assert session.get(url, auth=admin).status_code == 200
        assert session.get(url, auth=(admin[0], admin[1] + "x")).status_code == 401
        assert session.get(url, auth=(admin[0], admin[1][:-1])).status_code == 401
        assert session.get(url, auth=admin).status_code == 200
