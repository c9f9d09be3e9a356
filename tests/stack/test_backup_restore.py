"""stackctl backup, restore and gc on real stacks (scripts/mlflowstack/backup.py, restore.py,
gc.py).

A backup of the test stack is taken while an MLflow client keeps logging metrics; it is
restored onto a second, empty stack (its own compose project, started here with ``up -d
--wait`` and removed with ``down -v``), which must then hold the same experiments, runs,
params, metrics (every step), tags, registered models, versions, aliases and artifact bytes,
and let the same users log in. A corrupted copy of the archive is refused first and changes
nothing there. Last, gc runs on the restored stack (it is ours to delete from).
"""

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import PROJECT, ROOT, SecondStack
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

USER, PASSWORD = "bk-alice", "bk-alice-Secret-5t7u"
MODEL = "bk-model"


def compose_env(project: str) -> dict[str, str]:
    return {**os.environ, "COMPOSE_PROJECT_NAME": project}


def host_stackctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """scripts/stackctl as an operator runs it (stock python3, Docker underneath)."""
    return subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), *args],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip


@contextlib.contextmanager
def client_as(url: str, user: str, password: str):
    """An MLflow client of ``url`` as ``user`` (MLflow reads credentials from the env)."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    try:
        yield MlflowClient(tracking_uri=url, registry_uri=url)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_sums(client: MlflowClient, run_id: str, where: Path) -> dict[str, str]:
    local = Path(client.download_artifacts(run_id, "", str(where)))
    return {
        str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(local.rglob("*"))
        if p.is_file()
    }


def everything(client: MlflowClient, where: Path, artifacts_of: str) -> dict:
    """What the stack holds, as comparable data: every experiment, run (every metric step),
    registered model and version; the sha256 of every artifact of the experiment named
    ``artifacts_of`` (other tests' artifacts would only make this slower)."""
    state = {"experiments": {}, "runs": {}, "models": {}}
    for experiment in client.search_experiments():
        state["experiments"][experiment.experiment_id] = (experiment.name, experiment.tags)
        for run in client.search_runs([experiment.experiment_id]):
            run_id = run.info.run_id
            history = {
                key: [
                    (m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)
                ]
                for key in run.data.metrics
            }
            state["runs"][run_id] = {
                "name": run.info.run_name,
                "status": run.info.status,
                "params": run.data.params,
                "tags": run.data.tags,
                "metrics": history,
                "artifacts": artifact_sums(client, run_id, where / run_id)
                if experiment.name == artifacts_of
                else None,
            }
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        state["models"][model.name] = {
            "tags": model.tags,
            "aliases": model.aliases,
            "versions": sorted(
                (v.version, v.source, v.run_id, v.tags, v.description) for v in versions
            ),
        }
    return state


@pytest.fixture(scope="module")
def second_stack(stack):
    """An empty stack of its own project; removed with its volumes at the end."""
    with SecondStack("restored") as second:
        yield {
            "url": second.url,
            "env": second.env,
            "admin": second.admin()[1],
            "cmd": second.command,
        }


@pytest.fixture(scope="module")
def backup_made_while_writing(stack, admin, tmp_path_factory):
    """Data of every kind on the test stack, then a backup taken while a client logs a metric
    every few milliseconds. Returns (archive, the writer's run id, steps logged around it)."""
    where = tmp_path_factory.mktemp("backup")
    stack.add_user(USER, PASSWORD, "editor")
    with client_as(stack.url, *admin) as client:
        experiment = client.create_experiment("bk-exp", tags={"team": "vision"})
        run = client.create_run(experiment, run_name="bk-train", tags={"stage": "test"})
        run_id = run.info.run_id
        client.log_param(run_id, "depth", "3")
        for step in range(60):
            client.log_metric(run_id, "loss", 1 / (step + 1), step=step)
        (where / "small.txt").write_text("kept\n")
        (where / "weights.bin").write_bytes(os.urandom(3 << 20))
        client.log_artifact(run_id, str(where / "small.txt"))
        client.log_artifact(run_id, str(where / "weights.bin"), "model")
        client.set_terminated(run_id)
        client.create_registered_model(MODEL, tags={"owner": "bk"})
        for _ in range(2):
            client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id)
        client.set_registered_model_alias(MODEL, "production", "2")
        client.set_model_version_tag(MODEL, "2", "validated", "true")
        writer = client.create_run(experiment, run_name="bk-writer").info.run_id

        steps, stop, errors = [], threading.Event(), []

        def write():
            try:
                while not stop.is_set():
                    client.log_metric(writer, "live", float(len(steps)), step=len(steps))
                    steps.append(time.monotonic())
            except Exception as error:  # reported by the test
                errors.append(error)

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(1)
        started = time.monotonic()
        result = host_stackctl(
            compose_env(PROJECT), "backup", "--output", str(where / "b.tar"), "--json"
        )
        ended = time.monotonic()
        time.sleep(1)
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert not errors, errors
    # The client really wrote while the backup ran.
    assert any(started < t < ended for t in steps), (started, ended, steps[-3:])
    return Path(json.loads(result.stdout)["archive"]), writer, len(steps)


def test_backup_archive_private_and_complete(backup_made_while_writing):
    path, _, _ = backup_made_while_writing
    assert path.stat().st_mode & 0o777 == 0o600
    manifest = json.loads(
        subprocess.run(["tar", "-xOf", str(path), "manifest.json"], capture_output=True).stdout
    )
    assert manifest["mlflow_version"] == mlflow.__version__
    members = {f["member"] for f in manifest["files"]}
    assert {"users/htpasswd", "secrets/proxy-secret", "server-secrets/mlflow-kek-passphrase"} <= (
        members
    )
    assert "secrets/mlflow-kek-passphrase" not in members
    assert any(a["path"].endswith("model/weights.bin") for a in manifest["artifacts"])


def test_restore_corrupted_archive_refused_second_stack_unchanged(
    backup_made_while_writing, second_stack, tmp_path
):
    path, _, _ = backup_made_while_writing
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55  # inside weights.bin's random bytes
    corrupted = tmp_path / "corrupted.tar"
    corrupted.write_bytes(bytes(data))
    started = subprocess.run(
        [*second_stack["cmd"], "ps", "--format", "{{.Name}} {{.RunningFor}}"],
        env=second_stack["env"], capture_output=True, text=True,
    ).stdout  # fmt: skip
    result = host_stackctl(second_stack["env"], "restore", str(corrupted))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "checksum differs" in result.stderr, result.stderr
    # Nothing was stopped, nothing written: the fresh stack's admin still logs in, no data.
    with client_as(second_stack["url"], "admin", second_stack["admin"]) as client:
        assert [e.name for e in client.search_experiments()] == ["Default"]
    names = lambda text: sorted(line.split()[0] for line in text.splitlines())  # noqa: E731
    after = subprocess.run(
        [*second_stack["cmd"], "ps", "--format", "{{.Name}} {{.RunningFor}}"],
        env=second_stack["env"], capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert names(after) == names(started)


def test_restore_onto_empty_stack_same_data_same_logins(
    backup_made_while_writing, second_stack, stack, admin, tmp_path
):
    path, writer, logged = backup_made_while_writing
    result = host_stackctl(second_stack["env"], "restore", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["archive"] == str(path)

    with client_as(stack.url, *admin) as client:
        source = everything(client, tmp_path / "source", "bk-exp")
    with client_as(second_stack["url"], *admin) as client:
        restored = everything(client, tmp_path / "restored", "bk-exp")

    # The writer's run went on after the snapshot: the copy holds a prefix of its history.
    live_source = source["runs"][writer].pop("metrics")["live"]
    live_restored = restored["runs"][writer].pop("metrics")["live"]
    assert 0 < len(live_restored) < logged and live_restored == live_source[: len(live_restored)]
    assert restored == source
    assert restored["models"][MODEL]["aliases"] == {"production": "2"}
    assert source["runs"][writer]["artifacts"] == {} and len(source["runs"]) >= 2
    assert any(r["artifacts"] for r in source["runs"].values())

    # The same users log in; the fresh stack's own first admin password is gone with its file.
    url = second_stack["url"] + "/api/2.0/mlflow/experiments/search"
    for user, password, status in ((USER, PASSWORD, 200), (*admin, 200)):
        assert requests.get(url, auth=(user, password), params={"max_results": 1}).status_code \
            == status  # fmt: skip
    if second_stack["admin"] != admin[1]:
        answer = requests.get(url, auth=("admin", second_stack["admin"]))
        assert answer.status_code == 401

    # MLflow's key-encryption passphrase came along, into the server's own volume: the AI
    # gateway's stored secrets in the restored database can be decrypted there.
    kek = "/var/lib/mlflow-stack/server-secrets/mlflow-kek-passphrase"
    restored_kek = subprocess.run(
        [*second_stack["cmd"], "exec", "-T", "server", "cat", kek],
        env=second_stack["env"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert restored_kek == stack.compose("exec", "-T", "server", "cat", kek)


def test_gc_on_restored_stack_dry_run_then_delete(second_stack, admin, tmp_path):
    """stackctl gc in the real server container (its MLflow, its volumes)."""
    (tmp_path / "old.txt").write_text("old\n")
    with client_as(second_stack["url"], *admin) as client:
        run = client.create_run("0", run_name="bk-gc")
        client.log_artifact(run.info.run_id, str(tmp_path / "old.txt"))
        client.delete_run(run.info.run_id)
    artifacts = f"/var/lib/mlflow/artifacts/0/{run.info.run_id}/artifacts"
    exists = [*second_stack["cmd"], "exec", "-T", "server", "test", "-d", artifacts]

    dry = host_stackctl(second_stack["env"], "gc", "--older-than", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert run.info.run_id in [r["run_id"] for r in json.loads(dry.stdout)["runs"]]
    assert subprocess.run(exists, env=second_stack["env"]).returncode == 0

    kept = host_stackctl(second_stack["env"], "gc", "--older-than", "1")
    assert kept.returncode == 0 and "deleted 0 experiments, 0 runs" in kept.stderr, kept.stderr

    done = host_stackctl(second_stack["env"], "gc", "--older-than", "0")
    assert done.returncode == 0, done.stderr
    assert f"run {run.info.run_id} 'bk-gc'" in done.stdout
    assert subprocess.run(exists, env=second_stack["env"]).returncode == 1
    with client_as(second_stack["url"], *admin) as client, pytest.raises(MlflowException):
        client.get_run(run.info.run_id)
