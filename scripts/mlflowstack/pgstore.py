"""The bundled PostgreSQL (the postgres profile) in ``stackctl backup``, ``restore`` and
``upgrade``: a consistent dump, its check, and its load, through ``psql`` and ``pg_dump`` in the
postgres container (``docker compose exec -T postgres``; the image is ours, Debian's
postgresql-17, and has no Python).

Contract:

- :func:`dump` writes the database into an archive as ``db/mlflow.sql``, a plain ``pg_dump``
  script (``--no-owner --no-privileges``), while the stack serves. One psql session opens a
  REPEATABLE READ, READ ONLY transaction, exports its snapshot, counts the rows of every table
  in it, and runs ``pg_dump --snapshot`` on that snapshot before it commits: the counts and the
  dump are of the same instant. The host checks, as the dump streams past, that it is complete
  (pg_dump's closing line) and that its COPY blocks hold exactly those counts; the manifest
  gets the counts, the sha256, the size and PostgreSQL's version.
- :func:`check_dump` (restore's verification, on the host, before anything changes): the dump
  is complete and its COPY blocks hold the manifest's row counts.
- :func:`load` replaces the database's ``public`` schema by the dump in one transaction: drop
  and recreate the schema, the dump, a check that every table holds the manifest's row count,
  and ``COMMIT`` sent only when the bytes streamed had the manifest's sha256. Any error, a
  differing count or a differing byte: no COMMIT, PostgreSQL rolls everything back, the
  database is as it was.
- :func:`kind_from_settings` tells the three backend stores apart as server/backendstore.py
  does; an external one (``DATABASE_URI``) is refused with :data:`EXTERNAL_REFUSAL`.

Why a plain script, not the custom format: the host (stock python3, no PostgreSQL tools) can
read it to check the row counts before a restore, psql runs it inside a transaction of ours,
and the archive stays readable without our tools. Client data cannot end a COPY block early:
COPY's text format writes a backslash in a value as ``\\\\`` and a newline as ``\\n``, so no row
is ever the terminating line ``\\.``.

The dump names no role (``--no-owner``): restored objects belong to the target's role, and the
target keeps its own password (the postgres-secret volume is not archived, README "Back up and
restore").
"""

import contextlib
import hashlib
import json
import re
import secrets
import tarfile
import tempfile
from pathlib import Path

from mlflowstack import stackio
from mlflowstack.files import BundleError

SQLITE, POSTGRES, EXTERNAL = "sqlite", "postgresql", "external"
DUMP_MEMBER = "db/mlflow.sql"
DUMP_FORMAT = "plain"
EXTERNAL_REFUSAL = (
    "the backend store is an external database (DATABASE_URI): back it up with its own tools "
    "(e.g. pg_dump, your provider's snapshots) and the mlflow-artifacts volume; stackctl "
    "backup, restore and upgrade cover SQLite and the bundled PostgreSQL (README, 'PostgreSQL')"
)
CHUNK = 1 << 20
_HEADER_LIMIT = 1 << 20
# psql in the postgres container, as the role mlflow over its local socket (peer): no
# password, no ~/.psqlrc, stop at the first error, errors on one line.
PSQL = ("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=terse",
        "-U", "mlflow", "-d", "mlflow")  # fmt: skip
# psql for a restore: unable to start any process (its own user's count is over a limit of
# one), so no backtick or shell escape in what it reads runs, whatever got past the checks.
# The container's user is not root, so the kernel enforces it; psql itself never forks.
PSQL_NO_PROCESSES = ("prlimit", "--nproc=1", "--", *PSQL)
# Rows of every table outside PostgreSQL's own schemas, as JSON {table: rows} (tables of a
# schema other than public as "schema.table"). Unqualified names resolve in pg_catalog even
# under the dump's empty search_path.
COUNTS_SQL = (
    "SELECT coalesce(json_object_agg(CASE WHEN schemaname = 'public' THEN tablename::text "
    "ELSE schemaname || '.' || tablename END, (xpath('/row/n/text()', query_to_xml("
    "format('SELECT count(*) AS n FROM %I.%I', schemaname, tablename), false, true, '')))[1]"
    "::text::bigint ORDER BY schemaname, tablename), '{}') FROM pg_catalog.pg_tables "
    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
)
DUMP_TARGET = "-U mlflow -d mlflow"
# One session: the snapshot, the counts in it (the first line of stdout), then pg_dump on the
# same snapshot (psql flushes its output before it runs a \! command), then COMMIT.
DUMP_SCRIPT = f"""BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
SELECT pg_export_snapshot() AS stackctl_snapshot \\gset
\\setenv STACKCTL_SNAPSHOT :stackctl_snapshot
SELECT json_build_object('server_version_num', current_setting('server_version_num')::int,
  'server_version', current_setting('server_version'), 'row_counts', ({COUNTS_SQL}));
\\! pg_dump --format=plain --no-owner --no-privileges --snapshot="$STACKCTL_SNAPSHOT" {DUMP_TARGET}
COMMIT;
"""
# What the target holds (restore's "is it empty", upgrade's schema revision and sizes).
INSPECT_SQL = (
    "SELECT json_build_object('server_version_num', current_setting('server_version_num')::int, "
    "'database_bytes', pg_database_size(current_database()), "
    "'revision', (SELECT max(version_num) FROM alembic_version), "
    "'experiments', (SELECT count(*) FROM experiments WHERE experiment_id <> 0), "
    "'runs', (SELECT count(*) FROM runs), "
    "'registered_models', (SELECT count(*) FROM registered_models))"
)
# Session defaults a dump may have set on the role or the database (ALTER ROLE/DATABASE ...
# SET): a read-only default, a search_path that hands a superuser's session to the role's
# functions. pg_dump --no-owner writes none; reset before and after every load.
RESET_SETTINGS = b"""ALTER ROLE CURRENT_USER RESET ALL;
DO $stackctl$ BEGIN
  EXECUTE format('ALTER DATABASE %I RESET ALL', current_database());
  EXECUTE format('ALTER ROLE CURRENT_USER IN DATABASE %I RESET ALL', current_database());
  EXECUTE format('ALTER DATABASE %I CONNECTION LIMIT -1', current_database());
END $stackctl$;
"""
# The load's own session, whatever defaults an earlier load left on the role or database.
SESSION_SETTINGS = b"""SET default_transaction_read_only = off;
SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET transaction_timeout = 0;
"""
# Before the dump, in the load's transaction: an empty public schema as a new database has it
# (owner pg_database_owner, USAGE for everyone), whatever the target held, and no other schema
# of the loading role (MLflow uses public only; another one left behind, by a hand-made dump
# for instance, would otherwise outlive the restore with its functions, into later backups).
RESTORE_BEGIN = (
    b"""SET client_min_messages = warning;
"""
    + SESSION_SETTINGS
    + b"""BEGIN;
"""
    + RESET_SETTINGS
    + b"""DO $stackctl$ DECLARE name text; BEGIN
  FOR name IN SELECT nspname FROM pg_catalog.pg_namespace
      WHERE nspowner = current_user::regrole AND nspname <> 'public'
        AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  LOOP EXECUTE format('DROP SCHEMA %I CASCADE', name); END LOOP;
END $stackctl$;
SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata
  WHERE lomowner = current_user::regrole;
DROP SCHEMA public CASCADE;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
"""
)
_COMPLETE = b"-- PostgreSQL database dump complete"
_STARTS = b"-- PostgreSQL database dump"


def kind_from_settings(environ: dict) -> str:
    """SQLITE, POSTGRES (the postgres profile) or EXTERNAL (DATABASE_URI, which wins), by the
    rules of server/backendstore.py."""
    profiles = {name.strip() for name in environ.get("COMPOSE_PROFILES", "").split(",")}
    if environ.get("DATABASE_URI", "").strip():
        return EXTERNAL
    return POSTGRES if "postgres" in profiles else SQLITE


def require_same_store(archived: str, target: str) -> None:
    """An archive's database goes only into a store of its own kind (one line otherwise)."""
    if target == EXTERNAL:
        raise BundleError(EXTERNAL_REFUSAL)
    if archived == target:
        return
    if archived == SQLITE:
        raise BundleError(
            "the archive holds a SQLite database and this stack's store is the bundled "
            "PostgreSQL: restore it onto a stack without the postgres profile, then move it "
            "with stackctl migrate-to-postgres"
        )
    raise BundleError(
        "the archive holds a PostgreSQL dump and this stack's store is SQLite: restore it "
        "onto a stack with the postgres profile (COMPOSE_PROFILES=postgres in .env)"
    )


def require_major(archived: int, target: int) -> None:
    """A plain dump loads into its own PostgreSQL major version or a newer one."""
    if target < archived:
        raise BundleError(
            f"the archive's dump is from PostgreSQL {archived}, this stack runs {target}: "
            "restore it onto a stack of that version or newer"
        )


def _identifier(text: bytes, start: int) -> tuple[str, int]:
    """An SQL identifier at ``start`` (quoted, with "" inside, or plain); it and the end."""
    if text[start : start + 1] == b'"':
        end = start + 1
        while True:
            end = text.index(b'"', end)
            if text[end + 1 : end + 2] != b'"':
                break
            end += 2
        return text[start + 1 : end].replace(b'""', b'"').decode(), end + 1
    match = re.compile(rb"[^\s.\"(]+").match(text, start)
    if not match:
        raise ValueError("no identifier")
    return match[0].decode(), match.end()


def copy_table(line: bytes) -> str | None:
    """The table a ``COPY name (...) FROM stdin;`` line of pg_dump names, as COUNTS_SQL names
    it; None for any other line."""
    if not line.startswith(b"COPY ") or not line.endswith(b" FROM stdin;"):
        return None
    try:
        schema, end = _identifier(line, 5)
        if line[end : end + 1] != b".":
            raise ValueError("not schema-qualified")
        table, _ = _identifier(line, end + 1)
    except ValueError:
        raise BundleError(f"the dump has a COPY line not of pg_dump: {line[:200]!r}") from None
    return table if schema == "public" else f"{schema}.{table}"


# pg_dump 17.6+ brackets its script with these (a random key); no other backslash line.
_RESTRICT = re.compile(rb"\\(un)?restrict ([A-Za-z0-9]{1,128})")
# A backslash and what follows it in COPY data. COPY TO writes only these escapes (a value's
# own backslash doubled, the control characters \b \f \n \r \t \v, and \N for NULL): a row
# with any other (\u of \unrestrict, \. before a CR, a backslash ending a line) is not
# pg_dump's, and psql could read it as a command where this reader's view and psql's differ.
_COPY_ESCAPE = re.compile(rb"\\(.)", re.S)
_COPY_ESCAPES = frozenset(b"\\bfnrtvN")


class DumpReader:
    """Reads a plain pg_dump script in chunks (:meth:`feed`) and counts the rows of each COPY
    block; :meth:`finish` returns them, or raises BundleError for a dump that does not start
    and end as pg_dump's do (one cut short, or not a dump).

    Why psql can be given it: pg_dump 17.6+ opens its script with ``\\restrict KEY``, which
    makes psql refuse every meta-command (``\\!`` runs a shell in the postgres container) until
    ``\\unrestrict KEY``. This reader's own view of the script may be fooled (a dollar-quoted
    string spanning lines that look like a COPY block), psql's is not; so the reader demands
    that pair around every statement: ``\\restrict`` before the first one, ``\\unrestrict``
    with the same key only after the end mark and as the very last line, no backslash outside
    COPY data but these, in COPY data only the escapes COPY writes, and no NUL byte (psql ends
    a line there). load() then runs psql restricted under a key of its own anyway, and unable
    to start a process (a backtick in ``\\unrestrict``'s argument runs one before the key is
    compared)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._table: str | None = None
        self._rest = b""
        self._started = self._complete = False
        self._key: bytes | None = None
        self._unrestricted = False

    def feed(self, chunk: bytes) -> None:
        if b"\0" in chunk:
            raise BundleError("the dump holds a NUL byte, which pg_dump never writes")
        data, start = self._rest + chunk, 0
        while True:
            if self._table is not None:
                # In a COPY block: whole lines are rows, up to the line "\.".
                if data.startswith(b"\\.\n", start):
                    end = start
                else:
                    end = data.find(b"\n\\.\n", start)
                    end = end + 1 if end >= 0 else -1
                if end < 0:
                    cut = data.rfind(b"\n", start) + 1 or start
                    self._rows(data, start, cut)
                    start = cut
                    break
                self._rows(data, start, end)
                self._table, start = None, end + 3
                continue
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            self._line(data[start:newline])
            start = newline + 1
        self._rest = data[start:]

    def _rows(self, data: bytes, start: int, end: int) -> None:
        """Whole lines ``data[start:end]`` of the current COPY block."""
        for escape in _COPY_ESCAPE.finditer(data, start, end):
            if escape[1][0] not in _COPY_ESCAPES:
                raise BundleError(
                    f"the dump's COPY data holds an escape COPY does not write: {escape[0]!r}"
                )
        self.counts[self._table] += data.count(b"\n", start, end)

    def _line(self, line: bytes) -> None:
        restrict = _RESTRICT.fullmatch(line)
        if (b"\\" in line and not restrict) or (self._unrestricted and line.strip()):
            # psql runs a backslash outside quotes anywhere in a line as its own command (\!
            # runs a shell): pg_dump writes none outside COPY data but its \restrict pair, so a
            # dump with one was not made by pg_dump, and restore never feeds it to psql.
            raise BundleError(
                f"the dump holds a psql command pg_dump does not write: {line[:120]!r}"
            )
        if restrict:
            self._bracket(line.startswith(b"\\unrestrict"), restrict[2])
            return
        if line.strip() and not line.startswith(b"--") and self._key is None:
            if not self._started:
                raise BundleError("the database dump is not a pg_dump script")
            raise BundleError(
                "the dump does not open with pg_dump's \\restrict line (pg_dump 17.6 or "
                "later makes it): restore loads no other"
            )
        if not self._started:
            self._started = line == _STARTS
            return
        if line == _COMPLETE:
            self._complete = True
        table = copy_table(line)
        if table is not None:
            if table in self.counts:
                raise BundleError(f"the dump holds the rows of {table!r} twice")
            self._table, self.counts[table] = table, 0

    def _bracket(self, closing: bool, key: bytes) -> None:
        if not closing and self._key is not None:
            raise BundleError("the dump holds a second \\restrict line")
        if closing and (key != self._key or not self._complete or self._unrestricted):
            raise BundleError("the dump's \\unrestrict line is not pg_dump's last line")
        if closing:
            self._unrestricted = True
        else:
            self._key = key

    def finish(self) -> dict[str, int]:
        if self._rest and self._table is None:
            self._line(self._rest)
        if not self._started:
            raise BundleError("the database dump is not a pg_dump script")
        if self._table is not None or not self._complete or not self._unrestricted:
            raise BundleError("the database dump is incomplete (pg_dump did not finish it)")
        return dict(sorted(self.counts.items()))


def dump(args, out: tarfile.TarFile, spool_dir: Path, progress: stackio.Progress) -> dict:
    """See the module's contract: the dump as member DUMP_MEMBER of ``out``; the manifest's
    database entry. The dump passes through an unlinked temporary file in ``spool_dir`` (the
    archive's directory): a tar member's size comes before its bytes."""
    reader, digest, size = DumpReader(), hashlib.sha256(), 0
    with tempfile.TemporaryFile(dir=spool_dir, prefix=".stackctl-dump-") as spool:
        with stackio.agent(args, "postgres", *PSQL, "-At") as psql:
            psql.stdin.write(DUMP_SCRIPT.encode())
            psql.stdin.close()
            header = psql.stdout.readline(_HEADER_LIMIT)
            while chunk := psql.stdout.read(CHUNK):
                reader.feed(chunk)
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
                progress.update(f"backup: database dump, {stackio.human(size)}")
        try:
            header = json.loads(header)
            counts = {str(k): int(v) for k, v in header["row_counts"].items()}
            major = int(header["server_version_num"]) // 10000
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BundleError(f"psql in the postgres container answered {header[:200]!r}") from None
        if reader.finish() != counts:
            raise BundleError(
                "the dump's rows differ from its snapshot's counts; run the backup again"
            )
        spool.seek(0)
        if stackio.copy_member(out, DUMP_MEMBER, size, spool) != digest.hexdigest():
            raise BundleError("the database dump changed on its way into the archive")
    return {
        "kind": POSTGRES,
        "member": DUMP_MEMBER,
        "format": DUMP_FORMAT,
        "size": size,
        "sha256": digest.hexdigest(),
        "row_counts": counts,
        "postgres_major": major,
        "postgres_version": str(header.get("server_version", ""))[:200],
    }


def check_dump(handle) -> dict[str, int]:
    """The row counts of the complete dump read from ``handle``; BundleError otherwise."""
    reader = DumpReader()
    while chunk := handle.read(CHUNK):
        reader.feed(chunk)
    return reader.finish()


def restore_check(expected: dict[str, int]) -> bytes:
    """The load's last statement before COMMIT: every table holds ``expected`` rows, or the
    transaction fails. The JSON is written with no quote or dollar sign (JSON escapes), so no
    table name from a manifest can leave the literal."""
    literal = json.dumps(expected, sort_keys=True).replace("'", "\\u0027").replace("$", "\\u0024")
    return (
        "DO $stackctl$ DECLARE expected jsonb := '" + literal + "'; found jsonb; BEGIN "
        f"found := ({COUNTS_SQL})::jsonb; IF found <> expected THEN RAISE EXCEPTION "
        "'stackctl: the restored row counts % differ from the manifest', found; END IF; "
        "END $stackctl$;\n"
    ).encode()


def own_restrict_line() -> bytes:
    """psql's restricted mode under a key of our own, never sent again: the dump's key is the
    dump's author's, so a line the reader misread (a dollar-quoted string, a CR before a COPY
    end mark) could say ``\\unrestrict`` with it; ours nobody knows, and psql stays restricted
    to the end of its input."""
    return b"\\restrict " + secrets.token_hex(32).encode() + b"\n"


class _WithoutBrackets:
    """The dump's lines as they go to psql, less its own ``\\restrict``/``\\unrestrict``
    lines (psql, restricted already under our key, would refuse them); any other line as is."""

    def __init__(self):
        self._rest = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._rest + chunk
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        return self._filter(data[:cut])

    def end(self) -> bytes:
        rest, self._rest = self._rest, b""
        return self._filter(rest)

    @staticmethod
    def _filter(lines: bytes) -> bytes:
        if b"restrict " not in lines:
            return lines
        return b"".join(
            line
            for line in lines.splitlines(keepends=True)
            if not _RESTRICT.fullmatch(line.rstrip(b"\n"))
        )


def load(args, piece, expected: dict[str, int], progress: stackio.Progress) -> None:
    """See the module's contract. ``piece`` (archive.Piece) names the dump in its archive."""
    digest, sent, lines, reader = hashlib.sha256(), 0, _WithoutBrackets(), DumpReader()
    # Broken pipe: psql stopped at an error (its exit status and line say which).
    with (
        stackio.agent(args, "postgres", *PSQL_NO_PROCESSES, "-o", "/dev/null") as psql,
        contextlib.suppress(BrokenPipeError),
    ):
        psql.stdin.write(own_restrict_line() + RESTORE_BEGIN)
        with tarfile.open(piece.archive, "r:") as source:
            member = source.extractfile(piece.member)
            while chunk := member.read(CHUNK):
                digest.update(chunk)
                # Checked again as it goes: the file verified before may have changed since.
                reader.feed(chunk)
                psql.stdin.write(lines.feed(chunk))
                sent += len(chunk)
                progress.update(f"restore: database, {stackio.human(sent)} loaded")
        psql.stdin.write(lines.end() + RESET_SETTINGS + restore_check(expected))
        if digest.hexdigest() == piece.sha256:
            psql.stdin.write(b"COMMIT;\n")
        psql.stdin.close()
    if digest.hexdigest() != piece.sha256:
        # psql saw its input end inside the transaction: nothing was committed.
        raise BundleError("the dump changed since it was verified; the database is unchanged")


def inspect(args) -> dict:
    """INSPECT_SQL's answer from the running postgres container."""
    return stackio.agent_json(args, "postgres", *PSQL, "-At", "-c", INSPECT_SQL)
