"""The side of ``stackctl gc`` that runs in the server container: MLflow's own ``mlflow gc``
against the backend store, with its artifact deletions pointed at the artifacts volume.

Run by the host as ``python -c SOURCE delete|dry-run DAYS`` (``docker compose exec server``).
Prints one JSON object: the runs, experiments and logged models MLflow's gc chose (those in the
``deleted`` lifecycle stage for more than DAYS days, and the runs of such experiments), the
artifact directories and their bytes. With ``dry-run`` the same selection is made by the same
code, and nothing is deleted. Exit 1 with one line on stderr when MLflow refuses.

Why patched: behind this stack's server, runs' artifact URIs are ``mlflow-artifacts:/PATH``,
which ``mlflow gc`` can only delete through the HTTP server (MLFLOW_TRACKING_URI), and the
server accepts only requests from nginx with a verified user. Here such a URI names
``DESTINATION/PATH`` directly, as the server itself resolves it: a directory of the artifacts
volume, or a prefix in the object store (ARTIFACTS_DESTINATION, deleted through MLflow's own
artifact repository with the store's credentials). A URI that resolves outside the destination
is reported, never deleted. The database and the destination are the ones the server's start
computes (server/backendstore.py and artifactstore.py, beside it in the image), not the image's
defaults: with PostgreSQL or an object store those would name an unused SQLite file and an
empty volume.
"""

import contextlib
import io
import json
import os
import posixpath
import shutil
import sys
import urllib.parse

# The server image's own modules (backendstore.py, artifactstore.py).
SERVER_MODULES = "/opt/mlflow-stack"


def local_path(uri: str, root: str) -> str | None:
    """The directory below ``root`` that an artifact URI names, or None (not below it)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "mlflow-artifacts":
        path = os.path.join(root, urllib.parse.unquote(parsed.path).lstrip("/"))
    elif parsed.scheme in ("", "file"):
        path = urllib.parse.unquote(parsed.path)
    else:
        return None
    path = os.path.realpath(path)
    inside = os.path.commonpath([path, root]) == root and path != root
    return path if inside else None


def remote_location(uri: str, destination: str) -> str | None:
    """The object store URI below ``destination`` that an ``mlflow-artifacts:`` URI names, or
    None (another scheme, or a path that climbs out of the destination)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "mlflow-artifacts":
        return None
    path = posixpath.normpath(urllib.parse.unquote(parsed.path).lstrip("/"))
    if path in (".", "") or path == ".." or path.startswith("../"):
        return None
    return f"{destination.rstrip('/')}/{path}"


def stores(environ: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The backend store's URI (password included) and the artifact store's variables, as the
    server's start computes them from the same environment."""
    if os.path.isdir(SERVER_MODULES) and SERVER_MODULES not in sys.path:
        sys.path.insert(0, SERVER_MODULES)
    import artifactstore
    import backendstore

    return (
        backendstore.backend_store_uri(environ),
        artifactstore.artifact_store_environment(environ),
    )


def _size(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def run(days: int, dry_run: bool) -> dict:
    import mlflow.cli as mlflow_cli
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store_uri, artifact_store = stores(dict(os.environ))
    destination = artifact_store["MLFLOW_ARTIFACTS_DESTINATION"]
    remote = "://" in destination
    if remote:
        # The SDK's credentials (and an Azure connection string): this process only.
        os.environ.update(artifact_store)
    root = destination if remote else os.path.realpath(destination)
    mlflow_repository = mlflow_cli.get_artifact_repository
    report = {"dry_run": dry_run, "older_than_days": days, "artifact_bytes": 0}
    report["artifact_store"] = destination if remote else "volume"
    for key in ("runs", "experiments", "logged_models", "artifact_dirs", "unresolved"):
        report[key] = []

    class Repository:
        """Stands in for MLflow's artifact repository of one run or logged model."""

        def __init__(self, uri: str):
            self.uri = uri

        def delete_artifacts(self, artifact_path=None):
            if remote:
                location = remote_location(self.uri, root)
                if location is None:
                    report["unresolved"].append(self.uri)
                    return
                report["artifact_dirs"].append(location)
                if not dry_run:
                    mlflow_repository(location).delete_artifacts()
                return
            path = local_path(self.uri, root)
            if path is None:
                report["unresolved"].append(self.uri)
            elif os.path.isdir(path):
                report["artifact_dirs"].append(os.path.relpath(path, root))
                report["artifact_bytes"] += _size(path)
                if not dry_run:
                    shutil.rmtree(path)

    originals = {
        name: getattr(SqlAlchemyStore, name)
        for name in ("_hard_delete_run", "_hard_delete_experiment", "_hard_delete_logged_model")
    }

    def hard_delete_run(store, run_id):
        info = store.get_run(run_id).info
        report["runs"].append(
            {"run_id": run_id, "experiment_id": info.experiment_id, "name": info.run_name}
        )
        if not dry_run:
            originals["_hard_delete_run"](store, run_id)

    def hard_delete_experiment(store, experiment_id):
        name = store.get_experiment(experiment_id).name
        report["experiments"].append({"experiment_id": experiment_id, "name": name})
        if not dry_run:
            originals["_hard_delete_experiment"](store, experiment_id)

    def hard_delete_logged_model(store, model_id):
        report["logged_models"].append({"model_id": model_id})
        if not dry_run:
            originals["_hard_delete_logged_model"](store, model_id)

    SqlAlchemyStore._hard_delete_run = hard_delete_run
    SqlAlchemyStore._hard_delete_experiment = hard_delete_experiment
    SqlAlchemyStore._hard_delete_logged_model = hard_delete_logged_model
    mlflow_cli.get_artifact_repository = Repository
    # MLflow's own lines say "permanently deleted" even in a dry run: ours replace them.
    with contextlib.redirect_stdout(io.StringIO()):
        mlflow_cli.gc.main(
            ["--older-than", f"{days}d", "--backend-store-uri", store_uri,
             "--tracking-uri", store_uri],
            standalone_mode=False,
        )  # fmt: skip
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("delete", "dry-run") or not argv[1].isdigit():
        print("gcagent: usage: delete|dry-run DAYS", file=sys.stderr)
        return 2
    try:
        report = run(int(argv[1]), argv[0] == "dry-run")
    except Exception as error:  # MLflow's refusals and store errors: one line for the host
        message = " ".join(str(error).split())[:300]
        print(f"gcagent: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
