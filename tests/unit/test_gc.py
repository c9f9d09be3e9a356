"""stackctl gc's side in the server container (scripts/mlflowstack/gcagent.py): MLflow's own
``mlflow gc`` on MLflow's own SQLAlchemy store (the pinned version, a SQLite file), its
artifact deletions pointed at a local artifacts directory as in the stack."""

import mlflow.cli
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflowstack import gcagent

PATCHED = ("_hard_delete_run", "_hard_delete_experiment", "_hard_delete_logged_model")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store as the stack's server has it: runs' artifacts under mlflow-artifacts:/, bytes
    in ``tmp_path/artifacts``. One active run, one deleted run, one deleted experiment with a
    run; each with an artifact file."""
    # gcagent patches MLflow's classes for its one run (a process of its own in the stack).
    for name in PATCHED:
        monkeypatch.setattr(SqlAlchemyStore, name, getattr(SqlAlchemyStore, name))
    monkeypatch.setattr(mlflow.cli, "get_artifact_repository", mlflow.cli.get_artifact_repository)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "artifacts"
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root))
    tracking = SqlAlchemyStore(uri, "mlflow-artifacts:/")
    kept_experiment = tracking.create_experiment("kept")
    doomed_experiment = tracking.create_experiment("doomed")
    runs = {
        "active": tracking.create_run(kept_experiment, "u", 0, [], "active"),
        "deleted": tracking.create_run(kept_experiment, "u", 0, [], "deleted"),
        "in-doomed": tracking.create_run(doomed_experiment, "u", 0, [], "in-doomed"),
    }
    for run in runs.values():
        path = root / run.info.artifact_uri.removeprefix("mlflow-artifacts:/") / "model.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"12345")
    tracking.delete_run(runs["deleted"].info.run_id)
    tracking.delete_experiment(doomed_experiment)
    return tracking, root, {name: run.info.run_id for name, run in runs.items()}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_path_mlflow_artifacts_uri_below_root(tmp_path):
    root = str(tmp_path)
    assert gcagent.local_path("mlflow-artifacts:/1/abc/artifacts", root) == (
        f"{root}/1/abc/artifacts"
    )


@pytest.mark.parametrize(
    "uri",
    ["mlflow-artifacts:/../../etc", "mlflow-artifacts:/", "file:///etc", "s3://bucket/key",
     "mlflow-artifacts:/1/%2e%2e/%2e%2e/%2e%2e/etc"],
)  # fmt: skip
def test_local_path_outside_root_none(tmp_path, uri):
    assert gcagent.local_path(uri, str(tmp_path)) is None


def test_run_dry_run_lists_deleted_runs_and_experiments_deletes_nothing(store):
    tracking, root, ids = store
    before = files_under(root)
    report = gcagent.run(0, dry_run=True)
    assert sorted(r["name"] for r in report["runs"]) == ["deleted", "in-doomed"]
    assert [e["name"] for e in report["experiments"]] == ["doomed"]
    assert report["artifact_bytes"] == 10 and len(report["artifact_dirs"]) == 2
    assert files_under(root) == before
    assert tracking.get_run(ids["deleted"]).info.lifecycle_stage == "deleted"


def test_run_deletes_deleted_runs_their_artifacts_and_experiments_only(store):
    tracking, root, ids = store
    report = gcagent.run(0, dry_run=False)
    assert len(report["runs"]) == 2
    assert [p.split("/")[1] for p in files_under(root)] == [ids["active"]]
    assert tracking.get_run(ids["active"]).info.lifecycle_stage == "active"
    with pytest.raises(mlflow.exceptions.MlflowException):
        tracking.get_run(ids["deleted"])


def test_run_recently_deleted_kept_by_older_than(store):
    _, root, _ = store
    before = files_under(root)
    report = gcagent.run(1, dry_run=False)
    assert report["runs"] == [] and report["experiments"] == []
    assert files_under(root) == before


def test_gc_command_negative_days_refused_before_docker(monkeypatch, capsys):
    from mlflowstack import cli, stackio

    monkeypatch.setattr(stackio, "require_running", lambda args: pytest.fail("docker asked"))
    assert cli.main(["gc", "--older-than", "-1"]) == 1
    assert capsys.readouterr().err == "stackctl: --older-than: DAYS must be 0 or more\n"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mlflow-artifacts:/1/abc/artifacts", "s3://bucket/mlflow/1/abc/artifacts"),
        ("mlflow-artifacts:/1/a%20b/artifacts", "s3://bucket/mlflow/1/a b/artifacts"),
        ("mlflow-artifacts:/../../etc", None),
        ("mlflow-artifacts:/1/%2e%2e/%2e%2e/x", None),
        ("mlflow-artifacts:/", None),
        ("s3://bucket/mlflow/1", None),
    ],
)
def test_remote_location_mlflow_artifacts_uri_below_destination_only(uri, expected):
    assert gcagent.remote_location(uri, "s3://bucket/mlflow/") == expected


def test_run_object_store_deletes_through_mlflows_repository(store, monkeypatch, tmp_path):
    """With an object store the deletions go through MLflow's own artifact repository of the
    destination's URI; a file:// destination stands in for the bucket (same code path)."""
    tracking, root, ids = store
    destination = f"file://{root}"
    monkeypatch.setattr(
        gcagent, "stores", lambda env: (env["MLFLOW_BACKEND_STORE_URI"],
                                        {"MLFLOW_ARTIFACTS_DESTINATION": destination})
    )  # fmt: skip
    report = gcagent.run(0, dry_run=False)
    assert report["artifact_store"] == destination
    assert {d.removeprefix(destination).split("/")[2] for d in report["artifact_dirs"]} == {
        ids["deleted"],
        ids["in-doomed"],
    }
    assert [p.split("/")[1] for p in files_under(root)] == [ids["active"]]


def test_stores_postgres_profile_uses_bundled_database_not_image_default(tmp_path):
    """The image's MLFLOW_BACKEND_STORE_URI names a SQLite file even with PostgreSQL: gc must
    open the database the server opens."""
    password = tmp_path / "password"
    password.write_text("pw\n")
    env = {
        "MLFLOW_BACKEND_STORE_URI": "sqlite:////var/lib/mlflow/db/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": "/var/lib/mlflow/artifacts",
        "COMPOSE_PROFILES": "postgres",
        "POSTGRES_PASSWORD_FILE": str(password),
    }
    uri, artifact_store = gcagent.stores(env)
    assert uri.startswith("postgresql") and "@postgres:5432/mlflow" in uri
    assert artifact_store == {"MLFLOW_ARTIFACTS_DESTINATION": "/var/lib/mlflow/artifacts"}
