"""``stackctl gc --older-than DAYS [--dry-run] [--json]``: MLflow's garbage collection.

Contract: runs MLflow's ``mlflow gc`` (mlflowstack/gcagent.py) in the running server container
against the backend store: runs, experiments (with all their runs) and logged models deleted
(MLflow's ``deleted`` lifecycle stage) more than DAYS days ago, and their artifacts (in the
artifacts volume, or the object store of ARTIFACTS_DESTINATION), go for good. ``--dry-run``
makes the same selection with the same code and deletes nothing. Prints a line per object on
stdout and a summary on stderr (``--json``: one JSON object). MLflow's refusal is one line, exit
1. The server keeps running (SQLite serialises the writes).
"""

import json
import sys
from pathlib import Path

from mlflowstack import stackio
from mlflowstack.files import BundleError

AGENT = Path(__file__).with_name("gcagent.py")


def gc(args) -> int:
    if args.older_than < 0:
        raise BundleError("--older-than: DAYS must be 0 or more")
    stackio.require_running(args)
    mode = "dry-run" if args.dry_run else "delete"
    try:
        report = stackio.agent_json(args, "server", mode, str(args.older_than), script=AGENT)
    except BundleError as error:
        raise BundleError(f"gc failed, nothing more was deleted: {error}") from None
    if args.json:
        print(json.dumps(report))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for experiment in report["experiments"]:
        print(f"experiment {experiment['experiment_id']} {experiment['name']!r}")
    for run in report["runs"]:
        print(f"run {run['run_id']} {run['name']!r} (experiment {run['experiment_id']})")
    for model in report["logged_models"]:
        print(f"logged model {model['model_id']}")
    for uri in report["unresolved"]:
        print(f"gc: warning: {uri!r} is not in the artifacts volume; left alone", file=sys.stderr)
    store = report.get("artifact_store", "volume")
    if store == "volume":
        artifacts = f"{stackio.human(report['artifact_bytes'])} of artifacts"
    else:
        artifacts = f"{len(report['artifact_dirs'])} artifact folders in {store}"
    print(
        f"gc: {verb} {len(report['experiments'])} experiments, {len(report['runs'])} runs, "
        f"{len(report['logged_models'])} logged models and {artifacts} deleted more "
        f"than {args.older_than} days ago",
        file=sys.stderr,
    )
    return 0
