"""Issue 9, medium findings, on the running stack: what reaches the server and the gate, body
sizes, origins, artifact locations, host names, telemetry."""

import json
import os

import mlflow
import pytest
import requests


# The server's and the gate's own addresses, reached from another container on the backend
# network (the Docker host has no address there): only nginx's proxy secret opens them.
@pytest.mark.parametrize("forged", [{}, {"X-Stack-User": "admin"}])
def test_server_bridge_address_without_proxy_secret_403(stack, forged):
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    response = stack.backend_request("server", 5000, path, headers=forged)
    assert response.status_code == 403 and b"experiments" not in response.content


def test_gate_bridge_address_without_proxy_secret_400(stack, admin):
    headers = {
        "Authorization": requests.auth._basic_auth_str(*admin),
        "X-Original-Method": "GET",
        "X-Original-Path": "/api/2.0/mlflow/experiments/search",
        "X-Gate-Nonce": "0" * 32,
        "X-Client-Address": "127.0.0.1",
    }
    response = stack.backend_request("auth", 8000, "/auth", headers=headers)
    assert response.status_code == 400 and "X-Gate-User" not in response.headers


def test_viewer_huge_json_body_413_before_the_server(stack):
    stack.add_user("big-viewer", "big-viewer-pw", role="viewer")
    auth = ("big-viewer", "big-viewer-pw")
    stack.wait_for_status(200, auth)
    url = stack.url + "/api/2.0/mlflow/runs/search"
    response = requests.post(url, data=b" " * (64 << 20), auth=auth)
    assert response.status_code == 413

    def chunks():
        for _ in range(64):
            yield b" " * (1 << 20)

    try:
        status = requests.post(url, data=chunks(), auth=auth).status_code
    except requests.ConnectionError:
        status = 413  # nginx may close the connection while the body is still coming
    assert status == 413


def test_viewer_huge_body_on_uncapped_artifact_location_413(stack):
    # nginx lifts its cap for artifact uploads by location; the server refuses a large body
    # on every other method there (the listing GET reaches MLflow's Flask app, which would
    # hold it in memory).
    stack.add_user("big-viewer2", "big-viewer2-pw", role="viewer")
    auth = ("big-viewer2", "big-viewer2-pw")
    stack.wait_for_status(200, auth)
    for prefix in ("/api", "/ajax-api"):
        url = stack.url + prefix + "/2.0/mlflow-artifacts/artifacts?path="
        response = requests.get(url, data=b"\0" * (64 << 20), auth=auth)
        assert response.status_code == 413


def test_double_encoded_experiment_location_refused(stack, admin):
    inner = json.dumps({"name": "double-encoded", "artifact_location": "file:///tmp/x"})
    response = requests.post(
        stack.url + "/api/2.0/mlflow/experiments/create",
        data=json.dumps(inner),
        headers={"Content-Type": "application/json"},
        auth=admin,
    )
    assert response.status_code == 400 and "INVALID_PARAMETER_VALUE" in response.text


def test_largest_legitimate_calls_pass_the_body_cap(mlflow_env):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("big-calls")
    run = client.create_run(experiment)
    metrics = [mlflow.entities.Metric(f"m{i}", float(i), 0, 0) for i in range(1000)]
    params = [mlflow.entities.Param(f"p{i}", "v" * 6000) for i in range(100)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    profile = json.dumps({"x": "y" * (10 << 20)})
    dataset = mlflow.entities.Dataset("big", "d" * 32, "local", "{}", profile=profile)
    client.log_inputs(run.info.run_id, [mlflow.entities.DatasetInput(dataset)])
    assert len(client.get_run(run.info.run_id).data.metrics) == 1000


def test_foreign_origin_write_403_own_origin_200(stack, admin):
    url = stack.url + "/api/2.0/mlflow-artifacts/artifacts/0/origin/artifacts/a.txt"
    evil = requests.put(url, data=b"x", auth=admin, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    own = requests.put(url, data=b"x", auth=admin, headers={"Origin": stack.url})
    assert own.status_code == 200


@pytest.mark.parametrize(
    "location", ["/var/lib/mlflow/db/evil", "file:///tmp/x", "mlflow-artifacts:/../db"]
)
def test_experiment_artifact_location_outside_root_refused(mlflow_env, location):
    with pytest.raises(mlflow.exceptions.MlflowException, match="artifact_location"):
        mlflow.MlflowClient().create_experiment(f"evil-{abs(hash(location))}", location)


def test_mixed_case_host_accepted_by_nginx_and_mlflow(stack, admin):
    url = stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    response = requests.get(url, auth=admin, headers={"Host": "LocalHost"})
    assert response.status_code == 200


def test_server_telemetry_off_by_default(stack):
    # gunicorn's environment (process 1 is the container's init, which start.py never sees);
    # "gunicor[n]" matches gunicorn's command line, never this script's own.
    script = (
        "for p in /proc/[0-9]*; do"
        " if grep -q 'gunicor[n]' $p/cmdline 2>/dev/null; then cat $p/environ; exit; fi; done"
    )
    environ = stack.compose("exec", "-T", "server", "sh", "-c", script)
    assert "_MLFLOW_SERVER_FILE_STORE=" in environ  # start.py's environment, not the init's
    assert "MLFLOW_DISABLE_TELEMETRY=true" in environ.split("\0")


def test_model_version_from_runs_uri_file_served_not_500(mlflow_env, stack, admin):
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    client.create_registered_model("from-runs-uri")
    version = client.create_model_version(
        "from-runs-uri", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    response = requests.get(
        stack.url + "/model-versions/get-artifact",
        params={"name": "from-runs-uri", "version": version.version, "path": "MLmodel"},
        auth=admin,
    )
    assert response.status_code == 200 and response.text == "flavors: {}\n"
    missing = requests.get(
        stack.url + "/model-versions/get-artifact",
        params={"name": "from-runs-uri", "version": version.version, "path": "nope"},
        auth=admin,
    )
    assert missing.status_code == 404 and "sqlite" not in missing.text
    local = mlflow.artifacts.download_artifacts(f"models:/from-runs-uri/{version.version}")
    assert "MLmodel" in os.listdir(local)


@pytest.mark.parametrize("character", ["a", "("])  # "(": percent-encoded for the gate, 3 bytes
def test_long_url_answered_after_login_never_500(stack, admin, character):
    """Session 7's attacker review: a path over about 4 KB made the gate's gunicorn refuse
    nginx's question (500, and 10 KB of error log per request)."""
    path = "/x/" + character * 8000  # nginx reads request lines up to 8 KiB
    assert requests.get(stack.url + path, timeout=10).status_code == 401
    assert requests.get(stack.url + path, auth=admin, timeout=10).status_code == 404
