"""``stackctl upgrade`` on a second stack (scripts/mlflowstack/upgrade.py), run on the host as an
operator runs it.

Invariants: on an unchanged tree the upgrade succeeds (backup written, stack healthy, the data
there); an upgrade whose new server never becomes healthy exits non-zero with one line saying
it rolled back, and afterwards the stack runs the images it ran before, is healthy, and holds
every run and artifact written before. The broken "new version" is the cheapest real one: a
compose file (COMPOSE_FILE, as an operator's override would be) whose server build is the
current server image with a health check that always fails; the rollback starts the previous
image under the same compose files, as it would after a real bad pin.
"""

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SecondStack
from mlflow import MlflowClient

UNHEALTHY = """\
FROM {image}
HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD ["false"]
"""
# A new server that migrates (as server/schema.py does: its copy first, then a revision this
# MLflow does not know) and then fails to start.
MIGRATES_THEN_FAILS = """\
FROM {image}
COPY migrate-then-fail.py /opt/
ENTRYPOINT ["python", "/opt/migrate-then-fail.py"]
"""
MIGRATE_THEN_FAIL = """\
import sqlite3, sys
from pathlib import Path
sys.path.insert(0, "/opt/mlflow-stack")
import schema
db = Path("/var/lib/mlflow/db/mlflow.db")
with sqlite3.connect(db) as connection:
    revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]
if revision != "f00dcafe1234":
    schema.copy_sqlite(db, db.parent / "pre-upgrade", revision)
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dcafe1234'")
sys.exit("migrated, then failed")
"""
DB = "/var/lib/mlflow/db/mlflow.db"


def stackctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), *args],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def second(stack):
    with SecondStack("upgcmd") as second:
        try:
            yield second
        finally:
            # The tags the upgrades made, and the broken build the rollback untagged.
            tags = [f"{second.project}-{image}:pre-upgrade" for image in SecondStack.IMAGES]
            dangling = subprocess.run(
                ["docker", "images", "-q", "--filter", "dangling=true", "--filter",
                 f"label=com.docker.compose.project={second.project}"],
                capture_output=True, text=True, check=False,
            ).stdout.split()  # fmt: skip
            subprocess.run(["docker", "rmi", *tags, *dangling], capture_output=True, check=False)


@pytest.fixture
def client(second, monkeypatch):
    name, password = second.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    return MlflowClient(tracking_uri=second.url, registry_uri=second.url)


def write_run(client: MlflowClient, tmp_path) -> str:
    experiment = client.create_experiment(f"upgrade-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    note = tmp_path / "note.txt"
    note.write_text(run.info.run_id)
    client.log_artifact(run.info.run_id, str(note))
    return run.info.run_id


def assert_run_intact(client: MlflowClient, run_id: str, tmp_path) -> None:
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(3)]
    where = tmp_path / f"check-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    local = client.download_artifacts(run_id, "note.txt", str(where))
    assert Path(local).read_text() == run_id


def running_image(second: SecondStack, service: str) -> str:
    container = second.compose("ps", "-q", service).split()[0]
    return subprocess.run(
        ["docker", "inspect", "-f", "{{.Image}}", container],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_upgrade_unchanged_tree_succeeds_data_kept(second, client, tmp_path):
    run_id = write_run(client, tmp_path)
    backups = tmp_path / "backups"
    planned = stackctl(second.env, "upgrade", "--backup-dir", str(backups), "--dry-run")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "(passed)" in planned.stdout and f"{second.project}-server" in planned.stdout
    assert not backups.exists()
    result = stackctl(second.env, "upgrade", "--backup-dir", str(backups), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert os.path.isfile(report["backup"]) and report["backup"].startswith(str(backups))
    assert report["revision_before"] == report["revision_after"]
    assert requests.get(second.url + "/healthz", timeout=10).status_code == 200
    assert_run_intact(client, run_id, tmp_path)


def revision(second: SecondStack) -> str:
    return second.compose(
        "exec", "-T", "server", "python", "-c",
        f"import sqlite3; print(sqlite3.connect('{DB}').execute("
        "'SELECT version_num FROM alembic_version').fetchone()[0])",
    ).strip()  # fmt: skip


def failing_upgrade(second, tmp_path, dockerfile: str, **files: str):
    """stackctl upgrade with a compose file whose server build is ``dockerfile`` over the
    server image running now (by name: BuildKit takes a local image by its tag)."""
    build = tmp_path / "broken-server"
    build.mkdir()
    (build / "Dockerfile").write_text(dockerfile.format(image=f"{second.project}-server"))
    for name, text in files.items():
        (build / name).write_text(text)
    override = tmp_path / "broken.yaml"
    override.write_text(f"services:\n  server:\n    build:\n      context: {build}\n")
    env = {**second.env, "COMPOSE_FILE": f"{ROOT / 'compose.yaml'}:{override}"}
    backups = str(tmp_path / "backups")
    return stackctl(env, "upgrade", "--backup-dir", backups, "--timeout", "60")


def assert_rolled_back(second, result, before: dict[str, str], phrase: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stackctl: upgrade failed at start") and "rolled back" in last, last
    assert phrase in last, last
    assert {service: running_image(second, service) for service in before} == before
    assert requests.get(second.url + "/healthz", timeout=10).status_code == 200


def test_upgrade_new_server_unhealthy_rolls_back(second, client, tmp_path):
    run_id = write_run(client, tmp_path)
    before = {service: running_image(second, service) for service in SecondStack.IMAGES}
    result = failing_upgrade(second, tmp_path, UNHEALTHY)
    assert_rolled_back(second, result, before, "database kept (not migrated)")
    assert_run_intact(client, run_id, tmp_path)


def test_upgrade_new_server_migrates_then_fails_database_put_back(second, client, tmp_path):
    run_id = write_run(client, tmp_path)
    before = {service: running_image(second, service) for service in SecondStack.IMAGES}
    head = revision(second)
    result = failing_upgrade(
        second, tmp_path, MIGRATES_THEN_FAILS, **{"migrate-then-fail.py": MIGRATE_THEN_FAIL}
    )
    assert_rolled_back(second, result, before, f"put back from pre-upgrade/pre-upgrade-{head}-")
    assert revision(second) == head
    assert_run_intact(client, run_id, tmp_path)
