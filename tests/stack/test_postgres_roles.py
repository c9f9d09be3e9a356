"""The bundled PostgreSQL's roles (issue 12, README "PostgreSQL"): the role the MLflow server
connects as is no superuser, so an SQL injection in MLflow reaches no shell in the postgres
container; and a cluster of an older version, whose role mlflow was initdb's superuser, is
changed once at start, its data intact.

Seen from the far side: the probe runs in the server container with the server's own URI
(server/backendstore.py) and PostgreSQL's own answers (pg_roles, COPY ... TO PROGRAM, logins
over the backend network). The older layout is made by the previous entrypoint's commands
(initdb --username=mlflow), run from a compose override on the same image.
"""

import json

import pytest
import test_postgres
from mlflow import MlflowClient

# Run by the server's Python in its container: who the server is in PostgreSQL, whether it may
# run a program, and whether any superuser logs in over the network (the server's password, or
# none) to the server's database or to postgres. Prints one JSON object.
PROBE = r"""
import json, os, sys
sys.path.insert(0, "/opt/mlflow-stack")
import backendstore, psycopg, sqlalchemy
url = sqlalchemy.engine.make_url(backendstore.backend_store_uri(dict(os.environ)))

def connect(user, password):
    return psycopg.connect(host=url.host, port=url.port or 5432, dbname=url.database,
                           user=user, password=password, connect_timeout=5)

found = {}
with connect(url.username, url.password) as db:
    found["user"] = db.execute("SELECT current_user").fetchone()[0]
    found["attributes"] = list(db.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = current_user").fetchone())
    found["server_file_roles"] = [role for (role,) in db.execute(
        "SELECT rolname FROM pg_roles WHERE rolname IN ('pg_read_server_files', "
        "'pg_write_server_files', 'pg_execute_server_program') "
        "AND pg_has_role(current_user, oid, 'MEMBER')")]
    found["database_owner"] = db.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    ).fetchone()[0]
    found["foreign_owned"] = db.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relowner <> (SELECT oid FROM pg_roles "
        "WHERE rolname = current_user)").fetchone()[0]
    found["owned"] = db.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public'").fetchone()[0]
    found["superusers"] = [role for (role,) in db.execute(
        "SELECT rolname FROM pg_roles WHERE rolsuper")]
    try:
        db.execute("COPY (SELECT 1) TO PROGRAM 'id'")
        found["copy"] = "ran"
    except psycopg.Error as error:
        found["copy"] = f"{type(error).__name__}: {error}"
found["logins"] = {}
for role in found["superusers"]:
    for label, password in (("server's password", url.password), ("no password", "")):
        for database in (url.database, "postgres"):
            try:
                connect(role, password).close()
                outcome = "connected"
            except psycopg.Error as error:
                outcome = str(error)
            found["logins"][f"{role} to {database} with {label}"] = outcome
print(json.dumps(found))
"""

# The first start of the previous postgres/entrypoint.sh (before issue 12): initdb makes the
# role mlflow the cluster's superuser; then the same server command as now.
OLDER_ENTRYPOINT = r"""
set -euo pipefail
data=$PGDATA
if [ ! -e "$data/.mlflow-stack-initialized" ]; then
    initdb --pgdata="$data" --username=mlflow --pwfile="$POSTGRES_PASSWORD_FILE" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
        --data-checksums >/dev/null
    echo "CREATE DATABASE mlflow OWNER mlflow" | postgres --single -D "$data" postgres >/dev/null
    touch "$data/.mlflow-stack-initialized"
fi
exec postgres -D "$data" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql \
    -c hba_file=/etc/mlflow-postgres/pg_hba.conf \
    -c ident_file=/etc/mlflow-postgres/pg_ident.conf -c password_encryption=scram-sha-256
"""
CHANGING = "postgres: the role mlflow is this cluster's superuser (made by an older version)"
CHANGED = "postgres: done: the role mlflow owns the database mlflow and is no superuser"


def probe(pg) -> dict:
    return json.loads(pg.compose("exec", "-T", "server", "python", "-c", PROBE))


def assert_unprivileged(found: dict) -> None:
    """The server's role as the README states it, and no superuser reachable over the network."""
    assert found["user"] == "mlflow"
    assert found["attributes"] == [False] * 5, found
    assert found["server_file_roles"] == []
    assert found["database_owner"] == "mlflow"
    assert found["copy"].startswith("InsufficientPrivilege: permission denied to COPY to or from "
                                    "an external program"), found["copy"]  # fmt: skip
    assert found["superusers"] == ["postgres"]
    assert len(found["logins"]) == 4
    for attempt, outcome in found["logins"].items():
        assert "pg_hba.conf rejects connection" in outcome, (attempt, outcome)


@pytest.fixture(scope="module")
def pg(stack):
    with test_postgres.PostgresStack("pgroles") as second:
        yield second


def test_server_role_fresh_cluster_no_superuser_nor_program(pg):
    found = probe(pg)
    assert_unprivileged(found)
    # migrate, as the same role, created MLflow's tables: they are the role's.
    assert found["owned"] > 0 and found["foreign_owned"] == 0
    assert CHANGING not in pg.compose("logs", "--no-color", "postgres")


def test_entrypoint_older_cluster_changed_once_data_intact(stack, tmp_path, monkeypatch):
    override = tmp_path / "compose.older-postgres.yaml"
    # JSON is YAML; $$ keeps compose's interpolation away from the script's variables.
    entrypoint = ["bash", "-c", OLDER_ENTRYPOINT.replace("$", "$$"), "older-entrypoint"]
    override.write_text(json.dumps({"services": {"postgres": {"entrypoint": entrypoint}}}))
    older = test_postgres.PostgresStack("pgolder")
    current_command = list(older.command)
    older.command += ["-f", str(override)]
    with older:
        found = probe(older)
        # The layout of the previous version, or this test would prove nothing.
        assert found["attributes"][0] is True and found["superusers"] == ["mlflow"], found
        name, password = older.admin()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        client = MlflowClient(tracking_uri=older.url, registry_uri=older.url)
        experiment_id = client.create_experiment("older-layout")
        run = client.create_run(experiment_id, run_name="before")
        client.log_param(run.info.run_id, "depth", "3")
        client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        client.create_registered_model("older-layout-model")

        # The image's own entrypoint from here on (the override dropped): the upgrade.
        older.command = current_command
        older.compose("up", "-d", "--wait", "--no-build")
        logs = older.compose("logs", "--no-color", "postgres")
        assert logs.count(CHANGING) == 1 and logs.count(CHANGED) == 1, logs[-3000:]
        found = probe(older)
        assert_unprivileged(found)
        assert found["owned"] > 0 and found["foreign_owned"] == 0, found

        kept = client.get_run(run.info.run_id)
        assert kept.data.params == {"depth": "3"} and kept.info.run_name == "before"
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
            (1, 0.5)
        ]
        assert client.get_registered_model("older-layout-model").name == "older-layout-model"
        after = client.create_run(experiment_id, run_name="after")
        client.log_metric(after.info.run_id, "loss", 0.25)
        client.create_model_version(
            "older-layout-model", f"runs:/{run.info.run_id}/model", run.info.run_id
        )

        # A second start changes nothing: no second change in the log, the same layout.
        older.compose("restart", "postgres")
        older.wait_healthy("postgres")
        logs = older.compose("logs", "--no-color", "postgres")
        assert logs.count(CHANGING) == 1 and logs.count(CHANGED) == 1, logs[-3000:]
        assert older.psql("SELECT count(*) FROM runs") == ["2"]
        assert older.psql("SELECT rolname FROM pg_roles WHERE rolsuper") == ["postgres"]
