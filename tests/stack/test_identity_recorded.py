"""MLflow knows who you are: runs, model versions and the UI's current-user call carry the
user the gate verified, whatever the client claims (server/identity.py)."""

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from test_roles import use

SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture(scope="module")
def people(stack):
    stack.add_user("id-alice", "alice-password-1", "editor")
    stack.add_user("id-bob", "bob-password-1", "editor")
    stack.add_user("id-vera", "vera-password-1", "viewer")
    token = stack.stackctl("token", "add", "id-ci-nightly", "--role", "editor")
    secret = next(word for word in token.split() if word.startswith("mlst_"))
    return {
        "alice": ("id-alice", "alice-password-1"),
        "bob": ("id-bob", "bob-password-1"),
        "vera": ("id-vera", "vera-password-1"),
        "token": secret,
    }


def test_run_by_alice_with_other_os_user_recorded_as_alice(stack, people, monkeypatch):
    use(monkeypatch, stack, *people["alice"])
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.info.user_id == "id-alice"
    assert stored.data.tags["mlflow.user"] == "id-alice"


def test_run_with_token_recorded_as_token_name(stack, people, monkeypatch):
    use(monkeypatch, stack, token=people["token"])
    monkeypatch.setenv("USER", "root")
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.info.user_id == "id-ci-nightly"
    assert stored.data.tags["mlflow.user"] == "id-ci-nightly"


def test_creator_tag_cannot_be_rewritten_by_another_user(stack, people, monkeypatch):
    use(monkeypatch, stack, *people["alice"])
    with mlflow.start_run() as run:
        pass
    use(monkeypatch, stack, *people["bob"])
    client = MlflowClient()
    client.set_tag(run.info.run_id, "mlflow.user", "id-bob")
    client.log_batch(run.info.run_id, tags=[mlflow.entities.RunTag("mlflow.user", "x")])
    assert client.get_run(run.info.run_id).data.tags["mlflow.user"] == "id-alice"


def test_identity_headers_sent_by_client_ignored(stack, people):
    forged = {"X-Stack-User": "admin", "X-Stack-Role": "admin", "X-Stack-Auth": "token"}
    # Without credentials the forged identity gets nobody in.
    assert requests.get(stack.url + SEARCH, headers=forged).status_code == 401
    created = requests.post(
        stack.url + "/api/2.0/mlflow/runs/create",
        json={
            "experiment_id": "0",
            "user_id": "admin",
            "tags": [{"key": "mlflow.user", "value": "admin"}],
        },
        headers=forged,
        auth=people["alice"],
    )
    assert created.status_code == 200, created.text
    run = created.json()["run"]
    assert run["info"]["user_id"] == "id-alice"
    assert {"key": "mlflow.user", "value": "id-alice"} in run["data"]["tags"]
    current = requests.get(
        stack.url + "/ajax-api/2.0/mlflow/users/current", headers=forged, auth=people["alice"]
    ).json()
    assert current["user"]["username"] == "id-alice" and current["user"]["is_admin"] is False


@pytest.mark.parametrize(("who", "role"), [("alice", "editor"), ("vera", "viewer")])
def test_current_user_call_answers_verified_user(stack, people, who, role):
    name = people[who][0]
    for prefix in ("/ajax-api", "/api"):
        response = requests.get(stack.url + f"{prefix}/2.0/mlflow/users/current", auth=people[who])
        assert response.status_code == 200, response.text
        assert response.json()["user"] == {
            "id": 0,
            "username": name,
            "is_admin": False,
            "role": role,
            "auth": "password",
        }


def test_model_version_and_registered_model_carry_creator(stack, people, monkeypatch):
    use(monkeypatch, stack, *people["alice"])
    monkeypatch.setenv("USER", "mallory")
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/weights.txt")
    client = MlflowClient()
    client.create_registered_model("id-iris", tags={"mlflow.user": "mallory"})
    version = client.create_model_version(
        "id-iris", f"runs:/{run.info.run_id}/model", run.info.run_id
    )
    assert client.get_model_version("id-iris", version.version).user_id == "id-alice"
    assert client.get_registered_model("id-iris").tags["mlflow.user"] == "id-alice"


def test_ui_page_calls_answer_viewer(stack, people):
    for path in (
        "/ajax-api/2.0/mlflow/users/current",
        "/ajax-api/3.0/mlflow/assistant/config",
        "/ajax-api/3.0/mlflow/assistant/providers",
    ):
        response = requests.get(stack.url + path, auth=people["vera"])
        assert response.status_code == 200, (path, response.status_code, response.text)
        assert '"api_key"' not in response.text  # ("has_api_key" is a flag)


def test_creator_tag_cannot_be_deleted_or_claimed_twice_in_a_batch(stack, people, monkeypatch):
    use(monkeypatch, stack, *people["alice"])
    with mlflow.start_run() as run:
        pass
    use(monkeypatch, stack, *people["bob"])
    client = MlflowClient()
    with pytest.raises(mlflow.exceptions.MlflowException) as refused:
        client.delete_tag(run.info.run_id, "mlflow.user")
    assert refused.value.error_code == "PERMISSION_DENIED"
    claims = [
        mlflow.entities.RunTag("mlflow.user", "x"),
        mlflow.entities.RunTag("mlflow.user", "admin"),
    ]
    client.log_batch(run.info.run_id, tags=claims)
    assert client.get_run(run.info.run_id).data.tags["mlflow.user"] == "id-alice"
