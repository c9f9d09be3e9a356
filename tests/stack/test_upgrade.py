"""Upgrades (issue 14): data an older MLflow wrote, opened by the pinned one, on a second stack.

An older MLflow 3.x (OLDER, installed without its dependencies into a venv beside the test
venv, whose packages it borrows) writes a team's data into a SQLite file: an experiment, a run
with a parameter, a tag and a metric history, a registered model with a version, its
description and an alias. The file becomes the second stack's database, and the server starts.

Invariants: the server migrates an older schema by itself, once, after a complete copy of the
database as it was (server/schema.py); everything the older MLflow wrote reads back through
the stack and the UI loads; a schema newer than the pinned MLflow knows stops the server with
a message that says so, and the server starts again once the database is what it knows.
"""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SecondStack
from mlflow import MlflowClient

OLDER = "3.10.1"
VENVS = ROOT / "test-output" / "venvs"
DB = "/var/lib/mlflow/db/mlflow.db"
COPIES = "/var/lib/mlflow/db/pre-upgrade"

WRITE_OLDER_DATA = """
import sys
import mlflow
from mlflow import MlflowClient

uri = "sqlite:///" + sys.argv[1]
mlflow.set_tracking_uri(uri)
mlflow.set_registry_uri(uri)
client = MlflowClient()
experiment_id = client.create_experiment(
    "from-older-mlflow", artifact_location="mlflow-artifacts:/older"
)
run = client.create_run(experiment_id, tags={"team": "vision"}, run_name="older-run")
client.log_param(run.info.run_id, "depth", "3")
for step in range(5):
    client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
client.set_terminated(run.info.run_id)
client.create_registered_model("older-model", description="registered by the older MLflow")
version = client.create_model_version(
    "older-model", run.info.artifact_uri + "/model", run_id=run.info.run_id
)
client.set_registered_model_alias("older-model", "production", version.version)
print(mlflow.__version__, run.info.run_id)
"""


def _older_python() -> Path:
    """A venv with MLflow OLDER (made once; the test venv's packages serve as its deps)."""
    venv = VENVS / f"mlflow-{OLDER}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        borrowed = [path for path in sys.path if path.endswith("site-packages")]
        (site / "zz-test-venv.pth").write_text("\n".join(borrowed) + "\n")
        packages = [f"{name}=={OLDER}" for name in ("mlflow", "mlflow-skinny", "mlflow-tracing")]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", str(site), *packages],
            check=True,
        )  # fmt: skip
    return python


@pytest.fixture(scope="module")
def older_data(tmp_path_factory):
    """The SQLite file the older MLflow wrote, and the run it logged."""
    path = tmp_path_factory.mktemp("older") / "mlflow.db"
    written = subprocess.run(
        [str(_older_python()), "-c", WRITE_OLDER_DATA, str(path)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert written[0] == OLDER, written
    return path, written[1]


@pytest.fixture(scope="module")
def upgraded(stack, older_data):
    """A second stack whose server starts on the older MLflow's database."""
    path, run_id = older_data
    with SecondStack("upgrade") as second:
        second.compose("stop", "server")
        clear = f"rm -f {DB}-wal {DB}-shm"
        second.compose("run", "--rm", "--no-deps", "--entrypoint", "sh", "server", "-c", clear)
        second.write_file("server", DB, path.read_bytes())
        second.compose("up", "-d", "--wait", "--no-build", "server")
        yield second, run_id


@pytest.fixture
def client(upgraded, monkeypatch):
    second, _ = upgraded
    name, password = second.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=second.url, registry_uri=second.url)


def test_older_mlflow_data_migrated_once_after_a_copy(upgraded, client):
    second, run_id = upgraded
    logs = second.compose("logs", "--no-color", "server")
    assert logs.count("copied the database") == 1, logs[-2000:]
    listing = second.compose("exec", "-T", "server", "sh", "-c", f"ls -l {COPIES}")
    assert "pre-upgrade-" in listing and "-rw-------" in listing, listing

    run = client.get_run(run_id)
    assert run.info.run_name == "older-run" and run.info.status == "FINISHED"
    assert run.data.params == {"depth": "3"} and run.data.tags["team"] == "vision"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    model = client.get_registered_model("older-model")
    assert model.description == "registered by the older MLflow"
    assert client.get_model_version_by_alias("older-model", "production").run_id == run_id
    # The pinned MLflow writes into the migrated database too.
    new_run = client.create_run(run.info.experiment_id, run_name=f"after-{uuid.uuid4().hex[:6]}")
    client.log_metric(new_run.info.run_id, "loss", 0.1)


def test_older_mlflow_data_ui_loads(upgraded):
    second, _ = upgraded
    auth = second.admin()
    assert requests.get(second.url + "/", auth=auth, timeout=10).status_code == 200
    found = requests.get(
        second.url + "/ajax-api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "from-older-mlflow"},
        auth=auth,
        timeout=10,
    )
    assert found.status_code == 200, found.text


def _set_revision(second, revision: str) -> None:
    script = (
        "import sqlite3, sys\n"
        f"connection = sqlite3.connect('{DB}')\n"
        "connection.execute('UPDATE alembic_version SET version_num = ?', (sys.argv[1],))\n"
        "connection.commit()\n"
    )
    second.compose(
        "run", "--rm", "--no-deps", "--entrypoint", "python", "server", "-c", script, revision
    )


def test_newer_schema_stops_the_server_until_the_database_is_known(upgraded, client):
    second, run_id = upgraded
    head = second.compose(
        "exec", "-T", "server", "python", "-c",
        f"import sqlite3; print(sqlite3.connect('{DB}').execute("
        "'SELECT version_num FROM alembic_version').fetchone()[0])",
    ).strip()  # fmt: skip
    second.compose("stop", "server")
    _set_revision(second, "f00dcafe1234")
    second.compose("up", "-d", "--no-build", "server")
    deadline = time.monotonic() + 90
    while "newer than this server's MLflow" not in second.compose("logs", "server"):
        assert time.monotonic() < deadline, second.compose("logs", "server")[-2000:]
        time.sleep(2)
    status = requests.get(second.url + "/", auth=second.admin(), timeout=10).status_code
    assert status >= 500, status

    second.compose("stop", "server")
    _set_revision(second, head)
    second.compose("up", "-d", "--wait", "--no-build", "server")
    assert client.get_run(run_id).data.params == {"depth": "3"}
