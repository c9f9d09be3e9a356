"""stackctl migrate-to-postgres on a real stack (scripts/mlflowstack/pgmove.py, pgmoveagent.py).

A second stack, on SQLite, gets from the real MLflow client experiments (one deleted), runs with
params, tags, metric histories and a dataset input, a logged artifact, a trace, registered models
with versions, an alias, a legacy stage and tags; all of it is read back through the client.
Then ``scripts/stackctl migrate-to-postgres`` runs as an operator runs it (host python3, the
stack's bundle: here a directory of links to this checkout with a ``.env`` of its own, so the
switch it writes stays there): first it fails at the copy on a tag value PostgreSQL cannot hold
(a NUL character), and the SQLite stack serves everything again; with that tag deleted it
succeeds, and the client must read back exactly the same; psql shows the
rows; new experiments, runs, model versions and traces get fresh ids; a second run refuses (the
stack is on PostgreSQL already); and after the README's rollback (postgres out of ``.env``, ``up``)
the SQLite data is served as it was, and a third run refuses the non-empty PostgreSQL. The tests
run in this order on one stack (module scope).
"""

import contextlib
import json
import os
import subprocess
import time
import warnings
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, SecondStack
from mlflow import MlflowClient
from mlflow.entities import ViewType

BUNDLE_ENV = b"# the test's bundle: its own settings file\nGATE_WORKERS=1\n"
MODEL, OTHER_MODEL = "mv-model", "mv-other"
NUL_TAG = "mv-nul"


class SqliteStack(SecondStack):
    """A SecondStack on SQLite, with a bundle directory of its own (links to this checkout's
    files, its own ``.env``) for stackctl; its postgres image, which the command builds, and
    the profile's containers go at the end."""

    def __init__(self, bundle):
        super().__init__("pgmove")
        self.bundle = bundle
        for entry in ROOT.iterdir():
            if entry.name not in (".env", ".git", ".venv", "backups"):
                (bundle / entry.name).symlink_to(entry)
        (bundle / ".env").write_bytes(BUNDLE_ENV)
        # As an operator's shell: compose reads the bundle's .env; the stack's own settings
        # (project, port, hosts) come from the environment, as for every SecondStack.
        self.operator_env = {
            key: value
            for key, value in self.env.items()
            if key not in ("COMPOSE_ENV_FILES", "COMPOSE_PROFILES")
        }

    def __exit__(self, *exc) -> None:
        self.compose("--profile", "serve", "--profile", "postgres", "down", "-v", check=False)
        super().__exit__(*exc)
        subprocess.run(["docker", "rmi", f"{self.project}-postgres"], capture_output=True)

    def stackctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["python3", str(ROOT / "scripts" / "stackctl"), "--project-dir", str(self.bundle),
             *args],
            capture_output=True, text=True, env=self.operator_env, check=False, timeout=600,
        )  # fmt: skip

    def bundle_compose(self, *args: str) -> str:
        """docker compose as the operator runs it in the bundle (its .env read)."""
        command = ["docker", "compose", "--project-directory", str(self.bundle), *args]
        result = subprocess.run(command, capture_output=True, text=True,
                                env=self.operator_env, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def psql(self, sql: str) -> list[str]:
        out = self.bundle_compose("exec", "-T", "postgres", "psql", "-U", "mlflow", "-d",
                                  "mlflow", "-v", "ON_ERROR_STOP=1", "-Atc", sql)  # fmt: skip
        return out.splitlines()


@contextlib.contextmanager
def client_of(stack: SqliteStack):
    """An MLflow client of the stack as admin (the process-wide URI too, for fluent calls)."""
    user, password = stack.admin()
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    mlflow.set_tracking_uri(stack.url)
    try:
        yield MlflowClient(stack.url, registry_uri=stack.url)
    finally:
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_everything(client: MlflowClient) -> None:
    experiment = client.create_experiment("mv-exp", tags={"team": "vision"})
    gone = client.create_experiment("mv-gone")
    client.create_run(gone)
    client.delete_experiment(gone)
    mlflow.set_experiment(experiment_id=experiment)
    with mlflow.start_run(run_name="mv-train") as run:
        mlflow.log_params({"alpha": 0.5, "layers": 3})
        mlflow.set_tags({"stage": "dev", "owner": "ana"})
        for step in range(6):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metric("accuracy", 0.93)
        mlflow.log_metric("unstable", float("nan"))
        frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
        mlflow.log_input(mlflow.data.from_pandas(frame, name="mv-data"), context="training")
        mlflow.log_text("first notes", "notes/readme.txt")
    with mlflow.start_run(run_name="mv-failed") as failed:
        mlflow.log_param("seed", 7)
    client.set_terminated(failed.info.run_id, "FAILED")
    with mlflow.start_span("mv-outer") as outer:
        outer.set_inputs({"question": "why"})
        with mlflow.start_span("mv-inner") as inner:
            inner.set_outputs({"answer": 42})
        outer.set_outputs({"answer": "because"})
    mlflow.flush_trace_async_logging()
    client.create_registered_model(MODEL, tags={"domain": "vision"}, description="moved")
    client.create_registered_model(OTHER_MODEL)
    source = f"runs:/{run.info.run_id}/model"
    first = client.create_model_version(MODEL, source, run.info.run_id, tags={"k": "v"})
    second = client.create_model_version(MODEL, source, run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", first.version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(MODEL, second.version, "Staging")


def everything(client: MlflowClient) -> dict:
    """What the stack serves, as comparable data."""
    state = {"experiments": {}, "runs": {}, "traces": {}, "models": {}}
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        state["experiments"][experiment.experiment_id] = (
            experiment.name, experiment.lifecycle_stage, experiment.tags,
            experiment.artifact_location, experiment.creation_time,
        )  # fmt: skip
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
            run_id = run.info.run_id
            history = {
                key: [(m.step, m.timestamp, repr(m.value))
                      for m in client.get_metric_history(run_id, key)]
                for key in run.data.metrics
            }  # fmt: skip
            inputs = [
                (d.dataset.name, d.dataset.digest, d.dataset.source, [(t.key, t.value)
                                                                      for t in d.tags])
                for d in run.inputs.dataset_inputs
            ]  # fmt: skip
            artifacts = {}
            if run.info.lifecycle_stage != "deleted" and experiment.name == "mv-exp":
                for item in client.list_artifacts(run_id, "notes"):
                    artifacts[item.path] = mlflow.artifacts.load_text(f"runs:/{run_id}/{item.path}")
            state["runs"][run_id] = (
                run.info.run_name, run.info.status, run.info.start_time, run.info.end_time,
                run.info.artifact_uri, run.info.lifecycle_stage, run.data.params, run.data.tags,
                history, inputs, artifacts,
            )  # fmt: skip
        for trace in client.search_traces(locations=[experiment.experiment_id]):
            spans = sorted(
                (s.name, s.span_id, s.parent_id, json.dumps(s.inputs), json.dumps(s.outputs),
                 s.start_time_ns, s.end_time_ns)
                for s in trace.data.spans
            )  # fmt: skip
            info = trace.info
            state["traces"][info.trace_id] = (
                info.request_time, info.execution_duration, str(info.state), info.tags,
                info.trace_metadata, spans,
            )  # fmt: skip
    for model in client.search_registered_models():
        versions = {
            v.version: (v.current_stage, v.source, v.run_id, v.status, v.tags, v.aliases)
            for v in client.search_model_versions(f"name = '{model.name}'")
        }
        state["models"][model.name] = (model.description, model.tags, model.aliases, versions)
    return state


@pytest.fixture(scope="module")
def moved(stack, tmp_path_factory):
    """The stack with everything logged on SQLite and a tag PostgreSQL cannot hold (a NUL
    character), read back; and its dry run's answer."""
    with SqliteStack(tmp_path_factory.mktemp("bundle")) as second:
        with client_of(second) as client:
            log_everything(client)
            run = client.search_runs([client.get_experiment_by_name("mv-exp").experiment_id])[0]
            client.set_tag(run.info.run_id, NUL_TAG, "a\x00b")
            before = everything(client)
        dry = second.stackctl("migrate-to-postgres", "--dry-run", "--json")
        yield SimpleNamespace(stack=second, before=before, dry=dry, run_id=run.info.run_id)


def test_dry_run_prints_plan_and_row_counts_changes_nothing(moved):
    second, before, dry = moved.stack, moved.before, moved.dry
    assert dry.returncode == 0, dry.stderr
    answer = json.loads(dry.stdout)
    assert answer["row_counts"]["experiments"] == len(before["experiments"])
    assert answer["row_counts"]["runs"] == len(before["runs"])
    assert any("COMPOSE_PROFILES=postgres" in step for step in answer["plan"])
    assert (second.bundle / ".env").read_bytes() == BUNDLE_ENV
    labels = [f"label=com.docker.compose.project={second.project}",
              "label=com.docker.compose.volume=postgres-data"]  # fmt: skip
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", labels[0], "--filter",
                              labels[1]], capture_output=True, text=True, check=True)  # fmt: skip
    assert volumes.stdout.strip() == ""


def test_copy_failure_starts_sqlite_stack_again_unchanged(moved):
    """PostgreSQL refuses the NUL character in a text value (SQLite holds it): the copy's
    transaction fails, nothing is switched, and the SQLite stack serves everything again."""
    second = moved.stack
    result = second.stackctl("migrate-to-postgres", "--no-backup")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("stackctl: migrate-to-postgres failed at copy (")
    assert "0x00" in line and line.endswith(
        "nothing switched: the SQLite stack runs again, unchanged"
    )
    assert (second.bundle / ".env").read_bytes() == BUNDLE_ENV
    assert not (second.bundle / "backups").exists()
    with client_of(second) as client:
        assert everything(client) == moved.before
        # What the operator does about it: that value goes; the next run copies the rest.
        client.delete_tag(moved.run_id, NUL_TAG)
        moved.before = everything(client)


def test_migrate_keeps_everything_the_client_reads(moved):
    second, before = moved.stack, moved.before
    started = time.monotonic()
    result = second.stackctl("migrate-to-postgres")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    print(f"migrate-to-postgres took {seconds:.1f} s: {result.stderr.strip().splitlines()[-1]}")
    assert (second.bundle / ".env").read_bytes() == BUNDLE_ENV + (
        b"# The bundled PostgreSQL holds the data since stackctl migrate-to-postgres; the SQLite\n"
        b"# file stays in the mlflow-db volume: without postgres here, the stack uses it again.\n"
        b"COMPOSE_PROFILES=postgres\n"
    )
    assert list((second.bundle / "backups").glob("pre-postgres-*.tar"))
    with client_of(second) as client:
        assert everything(client) == before


def test_psql_shows_the_copied_rows(moved):
    second, before = moved.stack, moved.before
    assert set(second.psql("SELECT name FROM experiments")) == {
        name for name, *_ in before["experiments"].values()
    }
    assert second.psql("SELECT count(*) FROM runs") == [str(len(before["runs"]))]
    assert second.psql("SELECT step FROM metrics WHERE key = 'loss' ORDER BY step") == [
        str(step) for step in range(6)
    ]
    assert second.psql(f"SELECT alias FROM registered_model_aliases WHERE name = '{MODEL}'") == [
        "champion"
    ]
    assert second.psql("SELECT count(*) FROM spans") == ["2"]
    # The server's own settings name PostgreSQL now (the running server's environment).
    server_env = second.bundle_compose("exec", "-T", "server", "printenv", "COMPOSE_PROFILES")
    assert server_env.strip() == "postgres"


def test_new_writes_get_fresh_ids_after_migration(moved):
    second, before = moved.stack, moved.before
    old_ids = {int(i) for i in before["experiments"]}
    with client_of(second) as client:
        new_ids = [int(client.create_experiment(f"mv-new-{n}")) for n in range(3)]
        assert len(set(new_ids)) == 3 and min(new_ids) > max(old_ids)
        with mlflow.start_run(experiment_id=str(new_ids[0])) as run:
            mlflow.log_metric("loss", 0.1, step=1)
        assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.1}
        source = f"runs:/{run.info.run_id}/model"
        versions = [client.create_model_version(MODEL, source, run.info.run_id).version
                    for _ in range(2)]  # fmt: skip
        assert [int(v) for v in versions] == [3, 4]
        client.create_registered_model("mv-after")
        assert int(client.create_model_version("mv-after", source, run.info.run_id).version) == 1
        with mlflow.start_span("mv-after-span"):
            pass
        mlflow.flush_trace_async_logging()
    assert second.psql("SELECT count(*) FROM spans") == ["3"]


def test_second_run_refuses_stack_already_on_postgres(moved):
    second = moved.stack
    env_before = (second.bundle / ".env").read_bytes()
    result = second.stackctl("migrate-to-postgres")
    assert result.returncode == 1
    assert "the stack is set to the bundled PostgreSQL already" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (second.bundle / ".env").read_bytes() == env_before


def test_rollback_serves_sqlite_as_it_was_then_non_empty_target_refused(moved):
    """The README's rollback: postgres out of COMPOSE_PROFILES, up. The SQLite file was only
    read, so the stack serves what it held; PostgreSQL (still running) holds rows now, so
    another migration refuses it."""
    second, before = moved.stack, moved.before
    (second.bundle / ".env").write_bytes(BUNDLE_ENV)
    second.bundle_compose("up", "-d", "--wait", "--no-build")
    with client_of(second) as client:
        assert everything(client) == before
    result = second.stackctl("migrate-to-postgres")
    assert result.returncode == 1
    assert "the PostgreSQL database is not empty" in result.stderr
    assert (second.bundle / ".env").read_bytes() == BUNDLE_ENV
