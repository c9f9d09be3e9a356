"""The server opens artifacts only in its own artifact store, whatever a run or a model version
names (server/artifactstore.py, confine). From the far side: no client, whatever role, reads a
file of the server's container outside the artifact store through MLflow's artifact routes.

The attacker review's two ways in: a run's ``artifact_uri`` pointing at the server's secrets
(a restored archive sets it; here the test writes it into the database, as such an archive
would), and a model version whose ``source`` (free text in the API) names another location.
"""

import mlflow
import pytest
import requests

CONFINED = "this server opens artifacts only in its own artifact store"
DB = "/var/lib/mlflow/db/mlflow.db"
SET_URI = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
    "c.execute('UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?', sys.argv[2:4]); c.commit()"
)


def _set_artifact_uri(stack, run_id: str, uri: str) -> None:
    stack.compose("exec", "-T", "server", "python", "-c", SET_URI, DB, uri, run_id)


@pytest.fixture
def run_id(mlflow_env, tmp_path):
    mlflow.set_experiment("artifact-confinement")
    note = tmp_path / "note.txt"
    note.write_text("inside the store\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(note))
    return run.info.run_id


def test_run_artifact_uri_outside_store_listed_and_read_refused(stack, admin, run_id):
    own = requests.get(
        f"{stack.url}/get-artifact", params={"run_id": run_id, "path": "note.txt"},
        auth=admin, timeout=30,
    )  # fmt: skip
    assert own.status_code == 200 and own.text == "inside the store\n"
    original = mlflow.get_run(run_id).info.artifact_uri
    try:
        _set_artifact_uri(stack, run_id, "file:///var/lib/mlflow-stack")
        listed = requests.get(
            f"{stack.url}/api/2.0/mlflow/artifacts/list",
            params={"run_id": run_id, "path": "secrets"}, auth=admin, timeout=30,
        )  # fmt: skip
        assert listed.status_code == 403, listed.text[:300]
        assert CONFINED in listed.json()["message"]
        _set_artifact_uri(stack, run_id, "file:///etc")
        read = requests.get(
            f"{stack.url}/get-artifact", params={"run_id": run_id, "path": "hostname"},
            auth=admin, timeout=30,
        )  # fmt: skip
        assert read.status_code == 403, read.text[:300]
    finally:
        _set_artifact_uri(stack, run_id, original)
    again = requests.get(
        f"{stack.url}/get-artifact", params={"run_id": run_id, "path": "note.txt"},
        auth=admin, timeout=30,
    )  # fmt: skip
    assert again.status_code == 200


@pytest.mark.parametrize(
    "source", ["s3://another-bucket/other-team/model", "file:///etc", "/run/secrets"]
)
def test_model_version_source_outside_store_not_read(stack, admin, mlflow_env, source):
    """An editor registers a version whose source is somewhere else: the version may exist
    (MLflow keeps the text), but its files are never read from there."""
    api = f"{stack.url}/api/2.0/mlflow"
    name = f"confinement-{abs(hash(source))}"
    requests.post(f"{api}/registered-models/create", json={"name": name}, auth=admin, timeout=30)
    created = requests.post(
        f"{api}/model-versions/create", json={"name": name, "source": source},
        auth=admin, timeout=30,
    )  # fmt: skip
    try:
        if created.status_code != 200:
            # MLflow refused the source itself (its local-path check): a clean 400, nothing read.
            assert created.status_code == 400, created.text[:300]
            return
        version = created.json()["model_version"]["version"]
        for path in ("MLmodel", "hostname", "database_password"):
            answer = requests.get(
                f"{stack.url}/model-versions/get-artifact",
                params={"name": name, "version": version, "path": path},
                auth=admin, timeout=30,
            )  # fmt: skip
            assert answer.status_code == 403, (path, answer.status_code, answer.text[:300])
            assert CONFINED in answer.text
    finally:
        requests.delete(
            f"{api}/registered-models/delete", json={"name": name}, auth=admin, timeout=30
        )
