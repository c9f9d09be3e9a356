"""The postgres profile (README, "PostgreSQL"): a second stack with COMPOSE_PROFILES=postgres,
from the session's images and the bundled PostgreSQL image built here (no registry).

The real MLflow client writes an experiment, a run with params and metrics, a registered model
and an alias; they survive a restart of the server and are rows in PostgreSQL (psql in the
container). The migrate service ran once and exited 0; the database's password is in no
container's settings; the external-database path (DATABASE_URI and a password file on the host)
works against the same PostgreSQL; stackctl backup refuses (it archives the SQLite file only);
and the server does not start when migrate fails. The tests
run in this order on one stack (module scope: one PostgreSQL start for all).
"""

import json
import os
import subprocess
import time

import mlflow
import pytest
import requests
from conftest import ROOT, SecondStack
from mlflow import MlflowClient

PASSWORD_FILE = "/var/lib/mlflow-stack/postgres/password"
EXPERIMENT, MODEL = "pg-experiment", "pg-model"
# Printed by the server image's Python: the head of the pinned MLflow's migrations.
HEAD_REVISION = (
    "import sys; sys.path.insert(0, '/opt/mlflow-stack'); import schema; "
    "print(schema._migrations().get_current_head())"
)


class PostgresStack(SecondStack):
    """A SecondStack with the postgres profile on; its PostgreSQL image is built under its own
    project name (the other images come from the session's, untouched)."""

    def __init__(self, suffix: str = "pg"):
        super().__init__(suffix, env={"COMPOSE_PROFILES": "postgres"})

    def __enter__(self):
        self.compose("build", "postgres")
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        # --profile replaces COMPOSE_PROFILES: both named, or down would leave postgres behind.
        self.compose("--profile", "serve", "--profile", "postgres", "down", "-v", check=False)
        super().__exit__(*exc)
        subprocess.run(["docker", "rmi", f"{self.project}-postgres"], capture_output=True)

    def psql(self, sql: str) -> list[str]:
        """psql in the postgres container, as the role mlflow over the local socket (peer)."""
        out = self.compose("exec", "-T", "postgres", "psql", "-U", "mlflow", "-d", "mlflow",
                           "-v", "ON_ERROR_STOP=1", "-Atc", sql)  # fmt: skip
        return out.splitlines()

    def inspect(self, service: str) -> dict:
        container = self.compose("ps", "-a", "-q", service).split()[0]
        result = subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                                check=True)  # fmt: skip
        return json.loads(result.stdout)[0]

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.inspect(service)["State"].get("Health", {}).get("Status") != "healthy":
            assert time.monotonic() < deadline, f"{service} not healthy after {timeout}s"
            time.sleep(1)


@pytest.fixture(scope="module")
def pg(stack):
    with PostgresStack() as second:
        yield second


@pytest.fixture
def client(pg, monkeypatch):
    user, password = pg.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    # Set here too: mlflow.start_run follows the process-wide URI, which outranks the variable.
    mlflow.set_tracking_uri(pg.url)
    return MlflowClient(pg.url)


def test_migrate_ran_once_exited_0_and_created_the_tables(pg):
    state = pg.inspect("migrate")["State"]
    assert (state["Status"], state["ExitCode"], state["Restarting"]) == ("exited", 0, False)
    logs = pg.compose("logs", "--no-color", "migrate")
    assert logs.count("no MLflow tables yet; creating them") == 1
    assert "postgresql://mlflow:***@postgres:5432/mlflow" in logs


def test_client_data_survives_server_restart(pg, client):
    experiment_id = client.create_experiment(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("alpha", "0.5")
        for step, value in enumerate([0.1, 0.2, 0.3]):
            mlflow.log_metric("loss", value, step=step)
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", version.version)
    migrate_started = pg.inspect("migrate")["State"]["StartedAt"]

    pg.compose("restart", "server")
    pg.wait_healthy("server")

    assert client.get_experiment_by_name(EXPERIMENT).experiment_id == experiment_id
    kept = client.get_run(run.info.run_id)
    assert kept.data.params == {"alpha": "0.5"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    # A restart of the server does not run the migrations again.
    assert pg.inspect("migrate")["State"]["StartedAt"] == migrate_started


def test_psql_shows_mlflow_tables_and_rows(pg):
    tables = set(pg.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    assert {"experiments", "runs", "params", "metrics", "registered_models",
            "model_versions", "registered_model_aliases", "alembic_version"} <= tables  # fmt: skip
    assert pg.psql(f"SELECT name FROM experiments WHERE name = '{EXPERIMENT}'") == [EXPERIMENT]
    assert pg.psql(f"SELECT alias FROM registered_model_aliases WHERE name = '{MODEL}'") == [
        "champion"
    ]


def test_password_generated_private_and_in_no_container_settings(pg):
    listing = pg.compose("exec", "-T", "postgres", "stat", "-c", "%a %u", PASSWORD_FILE)
    assert listing.split() == ["600", "10001"]
    password = pg.compose("exec", "-T", "postgres", "cat", PASSWORD_FILE).strip()
    assert len(password) == 64
    for service in ("postgres", "migrate", "server", "init"):
        config = pg.inspect(service)["Config"]
        assert password not in json.dumps(config["Env"]) + json.dumps(config["Cmd"]), service
    # The server's own processes have it (in the URI they open), the container's settings not.
    assert pg.psql("SELECT count(*) > 0 FROM pg_stat_activity WHERE usename = 'mlflow' "
                   "AND client_addr IS NOT NULL") == ["t"]  # fmt: skip


def test_postgres_hardened_on_backend_network_only(pg):
    container = pg.inspect("postgres")
    host = container["HostConfig"]
    assert container["Config"]["User"] == "10001:10001"
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Memory"] > 0 and host["PidsLimit"] > 0
    assert list(container["NetworkSettings"]["Networks"]) == [f"{pg.project}_backend"]
    assert container["State"]["Health"]["Status"] == "healthy"


def test_external_database_by_uri_and_password_file(pg, client, tmp_path):
    """DATABASE_URI without a password and DATABASE_PASSWORD_FILE on the host, as for a managed
    PostgreSQL; here it names the same PostgreSQL by its address, as an outside database."""
    password = pg.compose("exec", "-T", "postgres", "cat", PASSWORD_FILE).strip()
    host_file = tmp_path / "database-password"
    host_file.write_text(password + "\n")
    # Read by uid 10001 in the containers (a real one: chown 10001, mode 0600; README).
    os.chmod(host_file, 0o644)
    address = pg.inspect("postgres")["NetworkSettings"]["Networks"][f"{pg.project}_backend"]
    uri = f"postgresql://mlflow@{address['IPAddress']}:5432/mlflow?connect_timeout=5"
    saved = dict(pg.env)
    pg.env.update(DATABASE_URI=uri, DATABASE_PASSWORD_FILE=str(host_file))
    try:
        pg.compose("up", "-d", "--wait", "--no-build")
        server_env = json.dumps(pg.inspect("server")["Config"]["Env"])
        assert uri in server_env and password not in server_env
        logs = pg.compose("logs", "--no-color", "migrate")
        assert f"mlflow:***@{address['IPAddress']}:5432" in logs
        assert client.get_experiment_by_name(EXPERIMENT) is not None
        # stackctl backs up the bundled PostgreSQL, not an external one: one line, no archive.
        backups = tmp_path / "backups"
        backups.mkdir()
        result = subprocess.run(
            ["python3", str(ROOT / "scripts" / "stackctl"), "backup", "--output", str(backups)],
            capture_output=True, text=True, env=pg.env, check=False, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "external database (DATABASE_URI): back it up with its own tools" in result.stderr
        assert list(backups.iterdir()) == []
    finally:
        # Back on the bundled database even when an assertion failed, or the next tests would
        # run against this test's settings.
        pg.env.clear()
        pg.env.update(saved)
        pg.compose("up", "-d", "--wait", "--no-build")


def _tls_files(folder, name: str) -> None:
    """A CA and a certificate for ``name`` made by it, in ``folder``: ca.pem, server.pem and
    server.key, owned by the containers' uid (PostgreSQL refuses a key others can read)."""

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test database CA",
    )
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        f"/CN={name}",
    )
    (folder / "san.cnf").write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "san.cnf")  # fmt: skip
    for path in folder.iterdir():
        os.chown(path, 10001, 10001)
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    folder.chmod(0o755)


def test_external_database_over_tls_verified_against_ca_file(pg, client, tmp_path):
    """A managed database's TLS: a second PostgreSQL (the same image) with ssl on and a
    certificate for the name pgtls; DATABASE_CA_FILE is its CA. The server connects encrypted
    and verified (pg_stat_ssl); the same database by its address (not in the certificate) is
    refused, and the server does not start."""
    _tls_files(tmp_path, "pgtls")
    password = pg.compose("exec", "-T", "postgres", "cat", PASSWORD_FILE).strip()
    (tmp_path / "password").write_text(password + "\n")
    (tmp_path / "password").chmod(0o644)
    name = f"{pg.project}-pgtls"
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", f"{pg.project}_backend",
         "--network-alias", "pgtls", "--tmpfs", "/run/postgresql:uid=10001,gid=10001",
         "--tmpfs", "/var/lib/postgresql/data:uid=10001,gid=10001",
         "-v", f"{tmp_path}:/certs:ro", "-e", "POSTGRES_PASSWORD_FILE=/certs/password",
         f"{pg.project}-postgres", "-c", "ssl=on", "-c", "ssl_cert_file=/certs/server.pem",
         "-c", "ssl_key_file=/certs/server.key"],
        capture_output=True, check=True,
    )  # fmt: skip
    saved = dict(pg.env)
    try:
        deadline = time.monotonic() + 60
        ready = ["docker", "exec", name, "pg_isready", "-q", "-h", "/run/postgresql"]
        while subprocess.run([*ready, "-d", "mlflow"], capture_output=True).returncode:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
            assert time.monotonic() < deadline, f"the TLS PostgreSQL did not start: {logs}"
            time.sleep(1)
        pg.env.update(
            DATABASE_URI="postgresql://mlflow@pgtls:5432/mlflow?connect_timeout=5",
            DATABASE_PASSWORD_FILE=str(tmp_path / "password"),
            DATABASE_CA_FILE=str(tmp_path / "ca.pem"),
        )
        pg.compose("up", "-d", "--wait", "--no-build")
        client.create_experiment("over-tls")
        encrypted = subprocess.run(
            ["docker", "exec", name, "psql", "-h", "/run/postgresql", "-U", "mlflow", "-d",
             "mlflow", "-Atc", "SELECT count(*), bool_and(ssl) FROM pg_stat_ssl JOIN "
             "pg_stat_activity USING (pid) WHERE client_addr IS NOT NULL"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        count, all_ssl = encrypted.split("|")
        assert int(count) > 0 and all_ssl == "t", encrypted

        address = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True,
                                            check=True).stdout)[0]  # fmt: skip
        ip = address["NetworkSettings"]["Networks"][f"{pg.project}_backend"]["IPAddress"]
        pg.env["DATABASE_URI"] = f"postgresql://mlflow@{ip}:5432/mlflow?connect_timeout=5"
        pg.compose("stop", "server")
        refused = subprocess.run([*pg.command, "up", "-d", "--wait", "--no-build"], env=pg.env,
                                 capture_output=True, text=True, check=False)  # fmt: skip
        assert refused.returncode != 0
        assert "does not match host name" in pg.compose("logs", "--no-color", "migrate")
        # Recreated for the new settings ("created") and never started.
        assert pg.inspect("server")["State"]["Status"] in ("created", "exited")
    finally:
        pg.env.clear()
        pg.env.update(saved)
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)
        pg.compose("up", "-d", "--wait", "--no-build")


def test_stackctl_gc_collects_in_postgres(pg, client):
    """gc opens the database the server opens (before, it collected the image's unused SQLite
    file and reported nothing)."""
    doomed = client.create_experiment("pg-gc-doomed")
    client.delete_experiment(doomed)
    result = subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), "gc", "--older-than", "0", "--json"],
        capture_output=True, text=True, env=pg.env, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {"experiment_id": doomed, "name": "pg-gc-doomed"} in json.loads(result.stdout)[
        "experiments"
    ]
    assert pg.psql(f"SELECT count(*) FROM experiments WHERE experiment_id = {int(doomed)}") == ["0"]
    assert client.get_experiment_by_name(EXPERIMENT) is not None


def test_server_does_not_start_when_migrate_fails(pg):
    """A schema newer than the pinned MLflow knows: migrate refuses (exit 1), and compose never
    starts the stopped server."""
    pg.psql("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    pg.compose("stop", "server")
    try:
        result = subprocess.run([*pg.command, "up", "-d", "--wait", "--no-build"], env=pg.env,
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode != 0
        assert 'service "migrate" didn\'t complete successfully: exit 1' in result.stderr
        assert pg.inspect("migrate")["State"]["ExitCode"] == 1
        assert "ffffffffffff" in pg.compose("logs", "--no-color", "migrate")
        assert pg.inspect("server")["State"]["Status"] == "exited"
        with pytest.raises(requests.RequestException):
            requests.get(pg.url + "/health", timeout=5).raise_for_status()
    finally:
        head = pg.compose("run", "--rm", "-T", "--no-deps", "--entrypoint", "python", "migrate",
                          "-c", HEAD_REVISION,
                          check=False).strip()  # fmt: skip
        if head:
            pg.psql(f"UPDATE alembic_version SET version_num = '{head}'")
