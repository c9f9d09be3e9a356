"""Roles and tokens, managed with scripts/stackctl on the host, enforced on the live stack."""

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import PROJECT, ROOT
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def host_stackctl(*args: str, input: str | None = None) -> str:
    """scripts/stackctl as an operator runs it: stock python3, Docker underneath."""
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT}
    env.pop("USERS_DIR", None)
    result = subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def use(monkeypatch, stack, username=None, password=None, token=None):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
    for name, value in [
        ("MLFLOW_TRACKING_USERNAME", username),
        ("MLFLOW_TRACKING_PASSWORD", password),
        ("MLFLOW_TRACKING_TOKEN", token),
    ]:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return MlflowClient()


@pytest.fixture(scope="module")
def seeded_run(stack, admin):
    os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    mlflow.set_tracking_uri(stack.url)
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin
    try:
        experiment_id = mlflow.create_experiment("roles-seed")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_metric("m", 1.0)
            mlflow.log_text("hello", "hello.txt")
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        mlflow.set_tracking_uri(None)
    return experiment_id, run.info.run_id


def assert_forbidden(call):
    """Refused by the gate for the role, and the client's exception says so (403 in MLflow's
    error shape: PERMISSION_DENIED with the reason; an artifact upload's HTTP error keeps
    the status)."""
    with pytest.raises(MlflowException) as raised:
        call()
    text = str(raised.value)
    assert "PERMISSION_DENIED" in text or "403" in text, text


def test_viewer_reads_everything_and_writes_nothing(stack, seeded_run, monkeypatch, tmp_path):
    host_stackctl("user", "add", "vic", "--role", "viewer", "--password-stdin", input="vic-pw\n")
    stack.wait_for_status(200, ("vic", "vic-pw"))
    experiment_id, run_id = seeded_run
    client = use(monkeypatch, stack, "vic", "vic-pw")
    assert client.get_run(run_id).data.metrics == {"m": 1.0}
    assert client.search_runs([experiment_id])
    downloaded = client.download_artifacts(run_id, "hello.txt", str(tmp_path))
    assert Path(downloaded).read_text() == "hello"
    client.search_registered_models()
    assert_forbidden(lambda: client.create_experiment("viewer-made"))
    assert_forbidden(lambda: client.log_metric(run_id, "m", 2.0))
    assert_forbidden(lambda: client.create_registered_model("viewer-model"))
    graphql = requests.post(
        stack.url + "/graphql", auth=("vic", "vic-pw"), json={"query": "{ __typename }"}
    )
    assert graphql.status_code == 200
    otlp = requests.post(stack.url + "/v1/traces", auth=("vic", "vic-pw"), data=b"")
    assert otlp.status_code == 403


def test_editor_writes_but_admin_routes_forbidden(stack, admin, monkeypatch):
    host_stackctl("user", "add", "eddie", "--password-stdin", input="eddie-pw\n")
    stack.wait_for_status(200, ("eddie", "eddie-pw"))
    client = use(monkeypatch, stack, "eddie", "eddie-pw")
    experiment_id = client.create_experiment("editor-made")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.1)
    webhook = {"name": "hook", "url": "http://127.0.0.1:9/x", "events": []}
    path = "/api/2.0/mlflow/webhooks"
    assert (
        requests.post(stack.url + path, auth=("eddie", "eddie-pw"), json=webhook).status_code == 403
    )
    assert requests.get(stack.url + path, auth=admin).status_code == 200


def test_disable_enable_remove_take_effect_within_5_seconds(stack):
    auth = ("dora", "dora-pw")
    host_stackctl("user", "add", "dora", "--role", "viewer", "--password-stdin", input="dora-pw\n")
    assert stack.wait_for_status(200, auth) < 5
    host_stackctl("user", "disable", "dora")
    assert stack.wait_for_status(401, auth) < 5
    host_stackctl("user", "enable", "dora")
    assert stack.wait_for_status(200, auth) < 5
    host_stackctl("user", "role", "dora", "editor")
    host_stackctl("user", "remove", "dora")
    assert stack.wait_for_status(401, auth) < 5
    listing = host_stackctl("user", "list", "--json")
    assert "dora" not in [row["name"] for row in json.loads(listing)]
    assert "$2y$12$" not in listing


def test_changed_password_refused_within_5_seconds(stack):
    host_stackctl("user", "add", "pat", "--password-stdin", input="first-pw\n")
    assert stack.wait_for_status(200, ("pat", "first-pw")) < 5
    host_stackctl("user", "passwd", "pat", "--password-stdin", input="second-pw\n")
    assert stack.wait_for_status(401, ("pat", "first-pw")) < 5
    assert stack.wait_for_status(200, ("pat", "second-pw")) < 5


def test_token_reads_with_mlflow_client_until_revoked(stack, seeded_run, monkeypatch):
    token = host_stackctl("token", "add", "ci-reader", "--role", "viewer").strip()
    assert token.startswith("mlst_")
    experiment_id, run_id = seeded_run
    client = use(monkeypatch, stack, token=token)
    assert client.get_run(run_id).info.run_id == run_id
    assert_forbidden(lambda: client.create_experiment("token-made"))
    assert "ci-reader" in host_stackctl("token", "list")
    host_stackctl("token", "remove", "ci-reader")
    assert stack.wait_for_status(401, f"Bearer {token}") < 5


def test_config_check_valid_settings_pass(stack):
    host_stackctl("config", "check")
    assert "map $http_host $mlflow_host_allowed" in host_stackctl("config", "render")


def test_config_check_bad_public_hostname_fails_with_one_line(stack):
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT, "PUBLIC_HOSTNAME": "http://bad/"}
    result = subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), "config", "check"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "PUBLIC_HOSTNAME: 'http://bad/' is not host[:port]" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "stackctl: nginx -t failed (see above)"
