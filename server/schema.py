"""The database's schema against this MLflow's, settled once before any worker starts.

Contract: ``settle(uri, copies_dir)`` compares the backend store's schema revision with the
head of the pinned MLflow's migrations and returns what it did:

- ``"fresh"``: no MLflow tables yet (MLflow creates them at its head);
- ``"current"``: already at this MLflow's head; nothing written;
- ``"upgraded"``: an older revision of this MLflow's own history (data of an older MLflow, or
  a restored backup). A SQLite database is first copied whole with SQLite's online backup API
  to ``copies_dir/pre-upgrade-<revision>-<UTC time>.db`` (mode 0600, written under a temporary
  name and renamed, so a copy that exists is complete), then migrated with MLflow's own
  migrations. Other databases are not copied here, so they are refused instead, with the
  command to run once they are backed up.
- A revision this MLflow does not know (a newer MLflow migrated the database) raises
  ``SchemaError``: the pinned MLflow would misread a newer schema, so the server must not
  start. The message names both revisions and the way back.

``require_current(uri)`` is the server's check of any other database (PostgreSQL): the migrate
service (migrate.py) settles those before the server starts, so anything but ``"current"``
raises ``SchemaError`` here instead of letting the server's workers create or migrate tables.

Why: MLflow's server refuses an older schema ("Detected out-of-date database schema") and
leaves the upgrade to a manual ``mlflow db upgrade``, so changing the pinned MLflow stopped
the stack on its own data; and migrations are not guaranteed to be transactional, so a copy
comes first. This runs in ``start.py`` before gunicorn starts, so one process migrates.
"""

import datetime
import os
import sqlite3
from pathlib import Path

import sqlalchemy
from alembic.script import ScriptDirectory
from mlflow.store.db import utils as db_utils
from mlflow.version import VERSION as MLFLOW_VERSION


class SchemaError(RuntimeError):
    """The server must not start on this database; the message says why and what to do."""


def _migrations() -> ScriptDirectory:
    return ScriptDirectory.from_config(db_utils._get_alembic_config(db_url=""))


def database_revision(engine) -> str | None:
    """The database's schema revision; None when it has no MLflow tables."""
    if "experiments" not in sqlalchemy.inspect(engine).get_table_names():
        return None
    return db_utils._get_schema_version(engine)


def classify(revision: str | None, migrations: ScriptDirectory | None = None) -> str:
    """ "fresh", "current" or "older"; SchemaError for a revision this MLflow does not know."""
    if revision is None:
        return "fresh"
    migrations = migrations or _migrations()
    head = migrations.get_current_head()
    if revision == head:
        return "current"
    known = {script.revision for script in migrations.walk_revisions()}
    if revision not in known:
        raise SchemaError(
            f"the database's schema (revision {revision}) is newer than this server's MLflow "
            f"{MLFLOW_VERSION} knows (its newest: {head}): a newer MLflow migrated it. Start "
            "the newer version again, or restore the copy taken before that upgrade (README, "
            "'Upgrade')"
        )
    return "older"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI; None for any other database."""
    url = sqlalchemy.engine.make_url(uri)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def copy_sqlite(database: Path, copies_dir: Path, revision: str) -> Path:
    """A consistent copy of a live SQLite database (its online backup API), complete or absent."""
    copies_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = copies_dir / f"pre-upgrade-{revision}-{stamp}.db"
    partial = target.with_name(target.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(descriptor)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        destination = sqlite3.connect(partial)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
    os.replace(partial, target)
    return target


def settle(uri: str, copies_dir: Path, log=print) -> str:
    """See the module's contract."""
    engine = sqlalchemy.create_engine(uri)
    try:
        revision = database_revision(engine)
        state = classify(revision)
        if state != "older":
            return state
        database = sqlite_path(uri)
        if database is None:
            raise SchemaError(
                f"the database's schema (revision {revision}) is older than this server's "
                f"MLflow {MLFLOW_VERSION}: back the database up, then run 'mlflow db upgrade' "
                "on it with this image (only SQLite is copied and migrated automatically)"
            )
        copy = copy_sqlite(database, copies_dir, revision)
        log(f"schema: revision {revision} is older than MLflow {MLFLOW_VERSION}'s; copied the "
            f"database to {copy}, migrating")  # fmt: skip
        db_utils._upgrade_db(engine)
        log(f"schema: migrated to {db_utils._get_schema_version(engine)}")
        return "upgraded"
    finally:
        engine.dispose()


def require_current(uri: str) -> None:
    """See the module's contract: SchemaError unless the database is at this MLflow's head."""
    engine = sqlalchemy.create_engine(uri)
    try:
        revision = database_revision(engine)
    finally:
        engine.dispose()
    state = classify(revision)
    if state == "fresh":
        raise SchemaError(
            "the database has no MLflow tables: the migrate service creates them before the "
            "server starts (docker compose logs migrate)"
        )
    if state == "older":
        raise SchemaError(
            f"the database's schema (revision {revision}) is older than this server's MLflow "
            f"{MLFLOW_VERSION}: the migrate service upgrades it before the server starts "
            "(docker compose logs migrate)"
        )
