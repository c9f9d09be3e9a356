"""The side of ``stackctl migrate-to-postgres`` that runs in the server image, which has
SQLAlchemy, psycopg 3, MLflow and the server's own modules (``/opt/mlflow-stack``: backendstore
and schema decide the store and its schema as the server does). The host sends this file's text
as ``python -c SOURCE MODE``; stdout: one JSON line; stderr: one line on failure (exit 1).
Module level is standard library only, so the host's unit tests import the pure parts.

Modes:

- ``source`` (in the running server): the store its own settings name (``sqlite``,
  ``postgresql``, ...); for the SQLite file its schema revision, the pinned MLflow's head and
  classification (schema.classify), and the row count of every table.
- ``target`` (a one-off container of the server's service with the postgres profile): the
  PostgreSQL database's revision and, per table, the rows it holds beyond those MLflow's own
  migrations make in an empty database (the default workspace): any is a refusal.
- ``copy`` (likewise, the server stopped): a snapshot of the SQLite file by its online backup
  API in its own volume (removed after; the file itself is only read), then in one PostgreSQL
  transaction: the target checked empty again, the migrations' own rows removed, every table's
  rows copied (COPY, in foreign-key order), each serial column's sequence set past its largest
  value, and, before the commit, every table's row count and content compared (a multiset
  digest of each row, normalised by the PostgreSQL column's type). Any difference rolls the
  whole copy back. ``alembic_version`` is not copied: both sides must be at the same head.
"""

import collections
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time

SERVER_MODULES = "/opt/mlflow-stack"
VERSION_TABLE = "alembic_version"
OURS = ".stackctl-"
BOOLEAN = "boolean"
JSON_TYPES = ("json", "jsonb")
FLOAT_TYPES = ("double precision", "real")
INTEGER_TYPES = ("smallint", "integer", "bigint")


class AgentError(Exception):
    """The one line the host shows."""


def dependency_order(references: dict[str, set[str]]) -> list[str]:
    """Tables so that each comes after the tables it references (``references[t]``: the tables
    t's foreign keys name); ties alphabetical, so the order is stable. A reference to itself
    or to a table not listed is ignored; a cycle is an AgentError (no order can load it)."""
    waiting = {table: set(named) & set(references) - {table} for table, named in references.items()}
    order = []
    while waiting:
        ready = sorted(table for table, named in waiting.items() if not named)
        if not ready:
            raise AgentError(f"foreign keys form a cycle among: {', '.join(sorted(waiting))}")
        for table in ready:
            del waiting[table]
        for named in waiting.values():
            named.difference_update(ready)
        order.extend(ready)
    return order


def canonical(value, pg_type: str):
    """A value as a comparable string, whichever side it was read from: SQLite's raw value
    (booleans as 0/1, JSON as text or, by SQLite's type affinity, a number) or PostgreSQL's
    (json read as text); None (SQL NULL) stays None, which no string equals."""
    if value is None:
        return None
    if pg_type == BOOLEAN:
        return "t" if value else "f"
    if pg_type in INTEGER_TYPES:
        return str(int(value))
    if pg_type in FLOAT_TYPES:
        return float(value).hex()
    if pg_type in JSON_TYPES:
        parsed = json.loads(value) if isinstance(value, str) else value
        return json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def row_key(row, types: list[str]) -> str:
    return json.dumps([canonical(value, kind) for value, kind in zip(row, types, strict=True)])


class Digest:
    """Rows as a multiset: their count and the sum of their sha256 (order-free, so the two
    databases' orders, collations included, do not matter)."""

    def __init__(self):
        self.rows, self.total = 0, 0

    def add(self, key: str) -> None:
        self.rows += 1
        self.total = (self.total + int(hashlib.sha256(key.encode()).hexdigest(), 16)) % (1 << 256)

    def __eq__(self, other) -> bool:
        return (self.rows, self.total) == (other.rows, other.total)


def sqlite_store(uri: str) -> str:
    if not uri.startswith("sqlite:///"):
        raise AgentError(f"not a SQLite file: {uri[:100]!r}")
    return uri.removeprefix("sqlite:///")


def sqlite_tables(db: sqlite3.Connection) -> list[str]:
    query = "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
    return sorted(row[0] for row in db.execute(query))


def sqlite_columns(db: sqlite3.Connection, table: str) -> list[str]:
    """The table's columns, generated ones included (table_info leaves them out)."""
    return [row[1] for row in db.execute(f'PRAGMA table_xinfo("{table}")') if row[6] != 1]


def select_all(table: str, names: list[str]) -> str:
    return 'SELECT {} FROM "{}"'.format(", ".join(f'"{name}"' for name in names), table)


def sqlite_revision(db: sqlite3.Connection) -> str | None:
    if VERSION_TABLE not in sqlite_tables(db):
        return None
    row = db.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
    return row[0] if row else None


def sqlite_counts(db: sqlite3.Connection) -> dict[str, int]:
    return {
        table: db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
        for table in sqlite_tables(db)
    }


def _server_modules():
    sys.path.insert(0, SERVER_MODULES)
    import backendstore
    import schema

    return backendstore, schema


def _store(backendstore) -> tuple[str, str]:
    """(kind, URI) of the store this container's settings name."""
    try:
        uri = backendstore.backend_store_uri(dict(os.environ))
    except backendstore.SettingError as error:
        raise AgentError(str(error)) from None
    return uri.partition(":")[0].partition("+")[0], uri


def source(stdout) -> None:
    backendstore, schema = _server_modules()
    from importlib import metadata

    kind, uri = _store(backendstore)
    answer = {"store": kind, "mlflow_version": metadata.version("mlflow")}
    answer["head"] = schema._migrations().get_current_head()
    if kind == "sqlite":
        path = sqlite_store(uri)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            answer["revision"] = sqlite_revision(db)
            answer["row_counts"] = sqlite_counts(db)
        try:
            answer["state"] = schema.classify(answer["revision"])
        except schema.SchemaError:
            answer["state"] = "newer"
    stdout.write(json.dumps(answer) + "\n")


class Postgres:
    """The PostgreSQL side through one psycopg connection (one transaction until commit)."""

    def __init__(self, uri: str):
        import sqlalchemy
        from psycopg import sql

        self.sql = sql
        self.engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        self.proxy = self.engine.raw_connection()
        self.connection = self.proxy.driver_connection

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.rollback()
        self.proxy.close()
        self.engine.dispose()

    def execute(self, query, params=()) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(query, params)

    def rows(self, query, params=()) -> list[tuple]:
        with self.connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()

    def columns(self) -> dict[str, list[tuple[str, str, bool]]]:
        """table -> [(column, data type, generated)] in the table's order (a generated column
        is computed by PostgreSQL, never written: spans.duration_ns)."""
        found = collections.defaultdict(list)
        query = (
            "SELECT table_name, column_name, data_type, is_generated = 'ALWAYS' "
            "FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        )
        for table, column, kind, generated in self.rows(query):
            found[table].append((column, kind, generated))
        return dict(found)

    def references(self) -> dict[str, set[str]]:
        query = (
            "SELECT src.relname, dst.relname FROM pg_constraint k "
            "JOIN pg_class src ON src.oid = k.conrelid JOIN pg_class dst ON dst.oid = k.confrelid "
            "JOIN pg_namespace n ON n.oid = k.connamespace "
            "WHERE k.contype = 'f' AND n.nspname = current_schema()"
        )
        found = collections.defaultdict(set)
        for table, named in self.rows(query):
            found[table].add(named)
        return found

    def revision(self, tables) -> str | None:
        if VERSION_TABLE not in tables:
            return None
        row = self.rows(f"SELECT version_num FROM {VERSION_TABLE}")
        return row[0][0] if row else None

    def count(self, table: str) -> int:
        query = self.sql.SQL("SELECT count(*) FROM {}").format(self.sql.Identifier(table))
        return self.rows(query)[0][0]

    def select(self, table: str, columns: list[tuple[str, str, bool]]):
        """Every row, streamed by a server-side cursor; json columns as their text."""
        sql = self.sql
        cast = {kind: sql.SQL("{}::text") for kind in JSON_TYPES}
        fields = [
            cast.get(kind, sql.SQL("{}")).format(sql.Identifier(name)) for name, kind, _ in columns
        ]
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(fields), sql.Identifier(table)
        )
        with self.connection.cursor(name=f"stackctl_{table}") as cursor:
            cursor.itersize = 5000
            cursor.execute(query)
            yield from cursor


def baseline() -> dict[str, list[dict]]:
    """The rows MLflow's migrations make in an empty database (run on an in-memory SQLite):
    {table: [{column: value}]}."""
    import logging

    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    logging.disable(logging.WARNING)
    engine = sqlalchemy.create_engine("sqlite://", poolclass=sqlalchemy.pool.StaticPool)
    try:
        db_utils._initialize_tables(engine)
        db = engine.raw_connection().driver_connection
        made = {}
        for table, count in sqlite_counts(db).items():
            if count and table != VERSION_TABLE:
                names = sqlite_columns(db, table)
                rows = db.execute(select_all(table, names))
                made[table] = [dict(zip(names, row, strict=True)) for row in rows]
        return made
    finally:
        logging.disable(logging.NOTSET)
        engine.dispose()


def rows_beyond(pg: Postgres, columns: dict, made: dict[str, list[dict]]) -> dict[str, int]:
    """Per table, the rows of the PostgreSQL database that MLflow's migrations did not make."""
    extra = {}
    for table, cols in sorted(columns.items()):
        if table == VERSION_TABLE:
            continue
        count = pg.count(table)
        names, kinds = [c[0] for c in cols], [c[1] for c in cols]
        if count and table in made and all(set(names) == set(row) for row in made[table]):
            expected = collections.Counter(
                row_key([row[name] for name in names], kinds) for row in made[table]
            )
            found = collections.Counter(row_key(row, kinds) for row in pg.select(table, cols))
            count = sum((found - expected).values())
        if count:
            extra[table] = count
    return extra


def target(stdout) -> None:
    backendstore, _ = _server_modules()
    kind, uri = _store(backendstore)
    if kind != "postgresql":
        raise AgentError(f"this container's store is {kind}, not the bundled PostgreSQL")
    pg = Postgres(uri)
    try:
        columns = pg.columns()
        answer = {"revision": pg.revision(columns)}
        answer["extra_rows"] = rows_beyond(pg, columns, baseline()) if columns else {}
    finally:
        pg.close()
    stdout.write(json.dumps(answer) + "\n")


def snapshot(database: str) -> str:
    """A consistent copy of the SQLite file in its own directory (mode 0600); its path."""
    descriptor, path = tempfile.mkstemp(dir=os.path.dirname(database), prefix=OURS, suffix=".db")
    os.close(descriptor)
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as live,
            contextlib.closing(sqlite3.connect(path)) as copy,
        ):
            live.backup(copy)
    except BaseException:
        os.unlink(path)
        raise
    return path


def check_same_schema(db: sqlite3.Connection, columns: dict) -> None:
    """Same tables and columns on both sides, or nothing can be copied whole."""
    mine = set(sqlite_tables(db))
    theirs = set(columns)
    if mine != theirs:
        only_here, only_there = sorted(mine - theirs), sorted(theirs - mine)
        raise AgentError(
            f"the two schemas differ: tables only in SQLite: {only_here or 'none'}; only in "
            f"PostgreSQL: {only_there or 'none'}"
        )
    for table in sorted(mine):
        if set(sqlite_columns(db, table)) != {column[0] for column in columns[table]}:
            raise AgentError(f"the two schemas differ in the columns of table {table}")


def prepare(row, kinds: list[str]) -> tuple:
    """A SQLite row as PostgreSQL takes it: booleans (0/1 in SQLite) as bool."""
    return tuple(
        bool(value) if kind == BOOLEAN and value is not None else value
        for value, kind in zip(row, kinds, strict=True)
    )


def copy_table(db: sqlite3.Connection, pg: Postgres, table: str, cols) -> None:
    """COPY the table's rows, its generated columns left to PostgreSQL."""
    sql = pg.sql
    cols = [column for column in cols if not column[2]]
    names, kinds = [c[0] for c in cols], [c[1] for c in cols]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, names))
    )
    with pg.connection.cursor() as cursor, cursor.copy(statement) as stream:
        for row in db.execute(select_all(table, names)):
            stream.write_row(prepare(row, kinds))


def fix_sequences(pg: Postgres) -> dict[str, int]:
    """Each serial or identity column's sequence set to return its largest value + 1 next
    (copied ids were written as they were, which moves no sequence)."""
    sql = pg.sql
    query = (
        "SELECT table_name, column_name, pg_get_serial_sequence(quote_ident(table_name), "
        "column_name) FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND pg_get_serial_sequence(quote_ident(table_name), column_name) IS NOT NULL "
        "ORDER BY table_name, column_name"
    )
    moved = {}
    for table, column, sequence in pg.rows(query):
        statement = sql.SQL("SELECT setval(%s, COALESCE((SELECT max({}) FROM {}), 0) + 1, false)")
        statement = statement.format(sql.Identifier(column), sql.Identifier(table))
        # is_called false: setval's value is the next id handed out.
        moved[f"{table}.{column}"] = pg.rows(statement, (sequence,))[0][0]
    return moved


def compare(db: sqlite3.Connection, pg: Postgres, table: str, cols) -> int:
    """Row counts and contents (generated columns too) of one table equal on both sides; its
    rows."""
    names, kinds = [c[0] for c in cols], [c[1] for c in cols]
    mine = db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
    theirs = pg.count(table)
    if mine != theirs:
        raise AgentError(f"table {table}: {mine} rows in SQLite, {theirs} in PostgreSQL")
    here, there = Digest(), Digest()
    for row in db.execute(select_all(table, names)):
        here.add(row_key(row, kinds))
    for row in pg.select(table, cols):
        there.add(row_key(row, kinds))
    if here != there:
        raise AgentError(f"table {table}: the copied rows differ from SQLite's")
    return mine


def copy(stdout) -> None:
    started = time.monotonic()
    backendstore, schema = _server_modules()
    kind, uri = _store(backendstore)
    if kind != "postgresql":
        raise AgentError(f"this container's store is {kind}, not the bundled PostgreSQL")
    path = snapshot(sqlite_store(os.environ.get("MLFLOW_BACKEND_STORE_URI", "")))
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            pg = Postgres(uri)
            try:
                answer = copy_all(db, pg, schema._migrations().get_current_head())
            finally:
                pg.close()
    finally:
        os.unlink(path)
    answer["seconds"] = round(time.monotonic() - started, 1)
    stdout.write(json.dumps(answer) + "\n")


def copy_all(db: sqlite3.Connection, pg: Postgres, head: str) -> dict:
    """The copy mode's transaction (see the module's contract); committed only if every table
    compares equal."""
    columns = pg.columns()
    revisions = (sqlite_revision(db), pg.revision(columns))
    if revisions != (head, head):
        raise AgentError(
            f"schema revisions: SQLite {revisions[0]}, PostgreSQL {revisions[1]}; both must "
            f"be at this MLflow's head {head}"
        )
    check_same_schema(db, columns)
    extra = rows_beyond(pg, columns, baseline())
    if extra:
        raise AgentError(f"the PostgreSQL database is not empty: {extra}")
    references = dict.fromkeys(columns, set()) | pg.references()
    tables = [table for table in dependency_order(references) if table != VERSION_TABLE]
    for table in reversed(tables):
        # Only the migrations' own rows (checked above): the SQLite file has its versions.
        pg.execute(pg.sql.SQL("DELETE FROM {}").format(pg.sql.Identifier(table)))
    for table in tables:
        copy_table(db, pg, table, columns[table])
    sequences = fix_sequences(pg)
    counts = {table: compare(db, pg, table, columns[table]) for table in tables}
    pg.connection.commit()
    return {"revision": head, "row_counts": counts, "rows": sum(counts.values()),
            "sequences": sequences}  # fmt: skip


MODES = {"source": source, "target": target, "copy": copy}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in MODES:
        print(f"pgmoveagent: usage: {'|'.join(MODES)}", file=sys.stderr)
        return 2
    try:
        MODES[argv[0]](sys.stdout)
    except Exception as error:  # one line for the host, whatever failed
        message = " ".join(str(error).split())[:300] or type(error).__name__
        print(f"pgmoveagent: {argv[0]}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
