"""The one-shot migrate service: the backend store's schema brought to this MLflow's, once.

Contract: run as ``python migrate.py`` by the ``migrate`` service of compose.yaml, which the
server waits for (``service_completed_successfully``). Reads the database like the server does
(backendstore.py) and exits:

- 0 with a SQLite store, touching nothing: the server settles a SQLite file's schema itself,
  copying it first (schema.py); it is the only process that opens that file;
- 0 once any other database is at this MLflow's head: an empty one gets MLflow's tables; an
  older schema is upgraded, its pending revisions logged first;
- 1 when the schema cannot be settled (a revision newer than this MLflow knows, a failed
  migration, an unreachable database), with the reason on stderr; the server then does not
  start; 2 on an unusable setting.

The upgrade is ``mlflow db upgrade`` itself (its command's function, called in this process so
that the URI and its password never appear in a command line). MLflow 3.17.2 has no ``mlflow db
check-upgrade``: the check before it is schema.classify, which refuses a newer revision.

Why a service of its own: MLflow's stores create or check tables when they open, so servers
started together (gunicorn's workers, several replicas) race on a fresh or older database.
Here one process migrates, before any server starts. On PostgreSQL, MLflow runs the whole
upgrade in one transaction, so a failed migration leaves the previous schema in place.
"""

import os
import sys

import backendstore  # beside this file


def pending_revisions(engine, migrations) -> list[str]:
    """The revisions an upgrade applies to this database, oldest first."""
    import schema

    current = schema.database_revision(engine)
    head = migrations.get_current_head()
    if current is None or current == head:
        return []
    steps = migrations.iterate_revisions(head, current)
    return [script.revision for script in reversed(list(steps))]


def migrate(uri: str, log=print) -> str:
    """Settle a non-SQLite database's schema; "created", "current" or "upgraded"."""
    import schema
    import sqlalchemy
    from mlflow.db import upgrade

    engine = sqlalchemy.create_engine(uri)
    try:
        migrations = schema._migrations()
        revision = schema.database_revision(engine)
        state = schema.classify(revision, migrations)
        if state == "current":
            log(f"migrate: schema already at {revision}; nothing to do")
            return "current"
        pending = pending_revisions(engine, migrations)
    finally:
        engine.dispose()
    if state == "fresh":
        log("migrate: no MLflow tables yet; creating them")
    else:
        log(f"migrate: schema at {revision}; applying {len(pending)} revisions: "
            + ", ".join(pending))  # fmt: skip
    upgrade.callback(uri)
    engine = sqlalchemy.create_engine(uri)
    try:
        reached = schema.database_revision(engine)
    finally:
        engine.dispose()
    log(f"migrate: schema now at {reached}")
    return "created" if state == "fresh" else "upgraded"


def main(environ=os.environ) -> int:
    try:
        uri = backendstore.backend_store_uri(dict(environ))
    except backendstore.SettingError as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 2
    if backendstore.is_sqlite(uri):
        print("migrate: SQLite store: the server settles its schema at start; nothing to do")
        return 0
    import schema

    print(f"migrate: database {backendstore.redacted(uri)}")
    try:
        migrate(uri)
    except schema.SchemaError as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 1
    # Anything else (an unreachable database, a failed migration) ends in a traceback and exit
    # status 1: the server does not start either way.
    return 0


if __name__ == "__main__":
    sys.exit(main())
