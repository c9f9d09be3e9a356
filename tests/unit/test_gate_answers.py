"""The gate's answer tells nginx who was verified and, on a refusal, what the call needed."""

import pytest
from mlflowstack.gate import Gate, credential_kind, make_app
from mlflowstack.users import UserStore
from test_gate import SECRET, basic, call, no_sleep


@pytest.fixture
def store(tmp_path, bcrypt_hash):
    directory = tmp_path / "users"
    directory.mkdir()
    (directory / "htpasswd").write_text(
        f"#role vera viewer\nvera:{bcrypt_hash('right')}\n"
        f"#role ed editor\ned:{bcrypt_hash('right')}\n"
    )
    return UserStore(directory)


@pytest.fixture
def app(store, bcrypt_verify):
    gate = Gate(store, bcrypt_slots=1, verify=bcrypt_verify, sleep=no_sleep)
    return make_app(gate, SECRET)


def test_app_allowed_answer_names_user_role_and_password_kind(app):
    status, headers = call(app, basic("ed", "right"), "POST", "/api/2.0/mlflow/runs/create")
    assert status == "204"
    assert (headers["X-Gate-User"], headers["X-Gate-Role"], headers["X-Gate-Kind"]) == (
        "ed",
        "editor",
        "password",
    )
    assert "X-Gate-Needs" not in headers


def test_app_token_answer_kind_token(app, store):
    secret = store.add_token("ci-nightly", "viewer", None)
    status, headers = call(app, f"Bearer {secret}", "GET", "/api/2.0/mlflow/runs/get")
    assert status == "204" and headers["X-Gate-User"] == "ci-nightly"
    assert headers["X-Gate-Kind"] == "token" and headers["X-Gate-Role"] == "viewer"


@pytest.mark.parametrize(
    ("user", "method", "path", "needs"),
    [
        ("vera", "POST", "/api/2.0/mlflow/runs/create", "write"),
        ("ed", "POST", "/api/2.0/mlflow/webhooks", "admin"),
    ],
)
def test_app_role_refusal_403_says_what_call_needs(app, user, method, path, needs):
    status, headers = call(app, basic(user, "right"), method, path)
    assert status == "403" and headers["X-Gate-Needs"] == needs
    assert headers["X-Gate-User"] == user and "X-Gate-Reason" not in headers


def test_app_wrong_password_401_names_nobody(app):
    status, headers = call(app, basic("ed", "wrong"))
    assert status == "401"
    assert not {"X-Gate-User", "X-Gate-Role", "X-Gate-Kind"} & set(headers)


@pytest.mark.parametrize(
    ("authorization", "kind"),
    [("Bearer abc", "token"), ("bearer abc", "token"), ("Basic eDp5", "password")],
)
def test_credential_kind_by_scheme(authorization, kind):
    assert credential_kind(authorization) == kind
