"""The side of ``stackctl upgrade`` that runs in the server image, next to the database: the
host sends this file's text as ``python -c SOURCE MODE [NAME]`` (standard library only: the
server image has none of our code). stdout: one JSON line; stderr: one line on failure.

Modes:

- ``inspect``: the database's schema revision (null: no MLflow tables yet), the database's
  bytes (with its WAL), the artifacts' bytes, the free bytes of the database's volume, the
  names of the server's pre-upgrade copies (server/schema.py writes them to ``pre-upgrade/``),
  and the backend ``store`` the server's settings name ("sqlite", "postgresql" for the bundled
  one, "external"); for any but SQLite the revision is null and the bytes 0 (the host asks
  PostgreSQL: mlflowstack/pgstore.py), as the file here is not the server's database.
- ``put-back NAME``: with the server stopped, replace the database by the pre-upgrade copy
  NAME: checked by SQLite's integrity check, copied by its backup API to a temporary name in
  the same directory (mode 0600), the old database's WAL files removed (they belong to it),
  then renamed over it. Answers the revision it now has.
"""

import json
import os
import re
import sqlite3
import sys

DB = os.environ.get("MLFLOW_BACKEND_STORE_URI", "sqlite:////var/lib/mlflow/db/mlflow.db")
DB = DB.removeprefix("sqlite:///")
ARTIFACTS = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "/var/lib/mlflow/artifacts")
COPIES = os.path.join(os.path.dirname(DB), "pre-upgrade")
COPY_NAME = re.compile(r"pre-upgrade-[0-9a-f]{1,64}-\d{8}T\d{6}Z\.db")


def revision() -> str | None:
    path = DB
    if not os.path.exists(path):
        return None
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
        if not connection.execute(found).fetchone():
            return None
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    finally:
        connection.close()


def store_kind(environ=os.environ) -> str:
    """volumeagent.store_kind, written out: this script is sent alone."""
    profiles = {name.strip() for name in environ.get("COMPOSE_PROFILES", "").split(",")}
    if environ.get("DATABASE_URI", "").strip():
        return "external"
    return "postgresql" if "postgres" in profiles else "sqlite"


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def inspect() -> dict:
    stored = 0
    for directory, _, files in os.walk(ARTIFACTS):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                stored += _size(path)
    disk = os.statvfs(os.path.dirname(DB))
    sqlite = store_kind() == "sqlite"
    return {
        "store": store_kind(),
        "revision": revision() if sqlite else None,
        "db_bytes": _size(DB) + _size(DB + "-wal") if sqlite else 0,
        "artifact_bytes": stored,
        "db_free": disk.f_bavail * disk.f_frsize,
        "copies": sorted(os.listdir(COPIES)) if os.path.isdir(COPIES) else [],
    }


def put_back(name: str) -> dict:
    if not COPY_NAME.fullmatch(name):
        raise ValueError(f"not a pre-upgrade copy's name: {name[:100]!r}")
    source = sqlite3.connect(f"file:{os.path.join(COPIES, name)}?mode=ro", uri=True)
    stage = DB + ".stackctl-put-back"
    try:
        if source.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise ValueError(f"{name} fails SQLite's integrity check")
        descriptor = os.open(stage, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(descriptor)
        target = sqlite3.connect(stage)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    for suffix in ("-wal", "-shm", "-journal"):
        if os.path.exists(DB + suffix):
            os.unlink(DB + suffix)
    os.replace(stage, DB)
    return {"revision": revision()}


def main(argv: list[str]) -> int:
    try:
        if argv == ["inspect"]:
            answer = inspect()
        elif len(argv) == 2 and argv[0] == "put-back":
            answer = put_back(argv[1])
        else:
            print("upgradeagent: usage: inspect | put-back NAME", file=sys.stderr)
            return 2
    except Exception as error:  # one line for the host, whatever failed
        print(f"upgradeagent: {' '.join(str(error).split())[:300]}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
