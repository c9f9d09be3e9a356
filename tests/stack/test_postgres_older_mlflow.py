"""Upgrades with PostgreSQL (issue 14): data an older MLflow 3.x wrote into the bundled
PostgreSQL, then the stack started with the pinned MLflow.

The older MLflow (test_upgrade.OLDER, the same package set test_upgrade.py installs) runs in a
one-off container of the migrate service, so it reaches PostgreSQL on the backend network and
reads the generated password there; it writes into an emptied database and so creates its own,
older schema. Then `docker compose up`.

Invariants: the migrate service upgrades the older schema once, logging the pending revisions,
before the server starts; everything the older MLflow wrote reads back through the stack; the
pinned MLflow writes into the upgraded database; the schema is at the pinned head.
"""

import uuid

import pytest
import test_postgres
import test_upgrade
from mlflow import MlflowClient

WRITE_OLDER_DATA = test_upgrade.WRITE_OLDER_DATA.replace(
    'uri = "sqlite:///" + sys.argv[1]',
    "password = open(sys.argv[1]).read().strip()\n"
    'uri = f"postgresql+psycopg://mlflow:{password}@postgres:5432/mlflow"',
)


@pytest.fixture(scope="module")
def upgraded(stack):
    assert "sqlite" not in WRITE_OLDER_DATA
    site = next((test_upgrade._older_python().parents[1] / "lib").glob("python3*/site-packages"))
    with test_postgres.PostgresStack("pgup") as second:
        head = second.psql("SELECT version_num FROM alembic_version")
        second.compose("stop", "server")
        second.psql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        written = second.compose(
            "run", "--rm", "--no-deps", "-T", "-v", f"{site}:/older:ro",
            "-e", "PYTHONPATH=/older", "--entrypoint", "python", "migrate",
            "-c", WRITE_OLDER_DATA, test_postgres.PASSWORD_FILE,
        ).split()  # fmt: skip
        assert written[-2] == test_upgrade.OLDER, written
        older = second.psql("SELECT version_num FROM alembic_version")
        assert older != head
        second.compose("up", "-d", "--wait", "--no-build")
        yield second, written[-1], older[0], head[0]


@pytest.fixture
def client(upgraded, monkeypatch):
    second, *_ = upgraded
    name, password = second.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=second.url, registry_uri=second.url)


def test_migrate_upgraded_older_schema_once_before_server(upgraded):
    second, _, older, head = upgraded
    logs = second.compose("logs", "--no-color", "migrate")
    # (The container's log holds its first run too: the tables it created for a fresh stack.)
    assert logs.count(f"migrate: schema at {older}; applying") == 1, logs[-2000:]
    upgrade = logs.split(f"migrate: schema at {older}; applying")[1]
    assert upgrade.count(f"migrate: schema now at {head}") == 1
    assert second.psql("SELECT version_num FROM alembic_version") == [head]
    state = second.inspect("migrate")["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)


def test_older_mlflow_data_reads_back_and_takes_new_writes(upgraded, client):
    _, run_id, *_ = upgraded
    run = client.get_run(run_id)
    assert run.info.run_name == "older-run" and run.info.status == "FINISHED"
    assert run.data.params == {"depth": "3"} and run.data.tags["team"] == "vision"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    model = client.get_registered_model("older-model")
    assert model.description == "registered by the older MLflow"
    assert client.get_model_version_by_alias("older-model", "production").run_id == run_id
    new_run = client.create_run(run.info.experiment_id, run_name=f"after-{uuid.uuid4().hex[:6]}")
    client.log_metric(new_run.info.run_id, "loss", 0.1)
    version = client.create_model_version("older-model", f"{run.info.artifact_uri}/model", run_id)
    assert version.version == "2"
