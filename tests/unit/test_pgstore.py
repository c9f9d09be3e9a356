"""The bundled PostgreSQL in stackctl backup and restore (scripts/mlflowstack/pgstore.py, and
its use by backup.py, restore.py and archive.py), without Docker: the dump's reader and checks
on pg_dump-shaped text, and backup and restore of a postgres-profile "stack" whose server agent
runs locally (test_backup.py's fake stack) and whose psql is a fake that prints a canned dump
or records what it was sent. The real psql and pg_dump: tests/stack/test_postgres_backup.py."""

import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
import test_backup
from mlflowstack import archive, pgstore, stackio
from mlflowstack.archive import ArchiveError
from mlflowstack.files import BundleError
from test_backup import backup_to, snapshot, stackctl, target

# test_backup.py's fake stack (a fixture), shared.
stack = test_backup.stack

# As pg_dump 17 writes it (trimmed): a quoted name, another schema, an escaped row.
DUMP = b'''--
-- PostgreSQL database dump
--

\\restrict abc

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.experiments (
    experiment_id integer NOT NULL,
    name character varying(256) NOT NULL
);

COPY public.experiments (experiment_id, name) FROM stdin;
0\tDefault
1\tweird \\\\.\\nname
\\.


COPY public."Odd ""T""" (a) FROM stdin;
\\.


COPY audit.log (a) FROM stdin;
1
2
3
\\.


--
-- PostgreSQL database dump complete
--

\\unrestrict abc

'''
COUNTS = {'Odd "T"': 0, "audit.log": 3, "experiments": 2}


def read(data: bytes, size: int) -> dict[str, int]:
    reader = pgstore.DumpReader()
    for start in range(0, len(data), size):
        reader.feed(data[start : start + size])
    return reader.finish()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_dump_reader_any_chunking_same_counts(size):
    assert read(DUMP, size) == COUNTS


def test_dump_reader_cut_inside_copy_block_refused():
    with pytest.raises(BundleError, match="incomplete"):
        read(DUMP[: DUMP.index(b"2\n3\n")], 5)


def test_dump_reader_without_closing_line_refused():
    with pytest.raises(BundleError, match="incomplete"):
        read(DUMP[: DUMP.index(b"-- PostgreSQL database dump complete")], 64)


def test_dump_reader_not_a_dump_refused():
    with pytest.raises(BundleError, match="not a pg_dump script"):
        read(b"COPY public.x (a) FROM stdin;\n1\n", 64)


def test_dump_reader_table_twice_refused():
    twice = DUMP.replace(b"COPY audit.log", b"COPY public.experiments")
    with pytest.raises(BundleError, match="twice"):
        read(twice, 64)


@pytest.mark.parametrize(
    ("line", "table"),
    [
        (b"COPY public.runs (run_uuid, name) FROM stdin;", "runs"),
        (b'COPY public."a.b ""c""" (x) FROM stdin;', 'a.b "c"'),
        (b"COPY other.t (x) FROM stdin;", "other.t"),
        (b"CREATE TABLE public.runs (", None),
        (b"-- COPY public.runs (x) FROM stdin", None),
    ],
)
def test_copy_table_pg_dump_names_read(line, table):
    assert pgstore.copy_table(line) == table


def test_copy_table_unqualified_refused():
    with pytest.raises(BundleError, match="COPY line"):
        pgstore.copy_table(b"COPY runs (x) FROM stdin;")


def test_restore_check_hostile_table_name_stays_in_its_literal():
    sql = pgstore.restore_check({"x'; DROP TABLE runs; --": 1, "$stackctl$": 2}).decode()
    literal = sql.split("expected jsonb := '", 1)[1].split("'; found jsonb", 1)[0]
    assert "'" not in literal and "$" not in literal
    assert json.loads(literal) == {"$stackctl$": 2, "x'; DROP TABLE runs; --": 1}
    assert pgstore.COUNTS_SQL in sql and sql.endswith("END $stackctl$;\n")


@pytest.mark.parametrize(
    ("archived", "target", "words"),
    [
        ("sqlite", "postgresql", "stackctl migrate-to-postgres"),
        ("postgresql", "sqlite", "COMPOSE_PROFILES=postgres"),
        ("postgresql", "external", "back it up with its own tools"),
    ],
)
def test_require_same_store_other_kind_refused_naming_the_way(archived, target, words):
    with pytest.raises(BundleError, match=words):
        pgstore.require_same_store(archived, target)


def test_require_same_store_and_major_same_or_newer_pass():
    pgstore.require_same_store("postgresql", "postgresql")
    pgstore.require_same_store("sqlite", "sqlite")
    pgstore.require_major(17, 18)
    with pytest.raises(BundleError, match="from PostgreSQL 18, this stack runs 17"):
        pgstore.require_major(18, 17)


def test_dump_script_counts_and_dumps_one_exported_snapshot():
    script = pgstore.DUMP_SCRIPT
    assert script.startswith("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\n")
    assert script.index(pgstore.COUNTS_SQL) < script.index('--snapshot="$STACKCTL_SNAPSHOT"')
    assert "--format=plain --no-owner --no-privileges" in script
    assert script.rstrip().endswith("COMMIT;")


# backup and restore with the postgres profile (a fake psql)

FAKE_PSQL = """
import json, sys
words, answer = sys.argv[1:], json.load(open(sys.argv[0] + ".json"))
sent = sys.stdin.buffer.read() if "-c" not in words else b""
open(sys.argv[0] + ".stdin", "ab").write(sent)
if "-c" in words:
    print(json.dumps(answer["inspect"]))
elif "-o" not in words:
    sys.stdout.buffer.write(json.dumps(answer["header"]).encode() + b"\\n")
    sys.stdout.buffer.write(open(answer["dump"], "rb").read())
"""


@pytest.fixture
def psql(stack, tmp_path, monkeypatch):
    """The postgres profile on (the local server agent reads it) and a fake psql; returns the
    file of what it was sent and its answers (to change)."""
    script = tmp_path / "psql.py"
    script.write_text(FAKE_PSQL)
    (tmp_path / "dump.sql").write_bytes(DUMP)
    answers = {
        "header": {"server_version_num": 170012, "server_version": "17.12",
                   "row_counts": COUNTS},
        "dump": str(tmp_path / "dump.sql"),
        "inspect": {"server_version_num": 170012, "experiments": 0, "runs": 0,
                    "registered_models": 0},
    }  # fmt: skip

    def save() -> None:
        Path(str(script) + ".json").write_text(json.dumps(answers))

    save()
    real = stackio._agent_command

    def command(args, place, words, agent_script):
        if place == "postgres":
            save()
            return [sys.executable, str(script), *words[1:]]
        return real(args, place, words, agent_script)

    monkeypatch.setattr(stackio, "_agent_command", command)
    monkeypatch.setenv("COMPOSE_PROFILES", "postgres")
    return {"sent": Path(str(script) + ".stdin"), "answers": answers}


def test_backup_postgres_store_dump_in_archive_no_sqlite_file(stack, psql, tmp_path):
    report = backup_to(stack, tmp_path / "backups")
    path = Path(report["archive"])
    manifest = archive.read_manifest(path)
    database = manifest["database"]
    assert (database["kind"], database["member"], database["postgres_major"]) == (
        "postgresql", "db/mlflow.sql", 17)  # fmt: skip
    assert database["row_counts"] == COUNTS and report["database"] == "postgresql"
    with tarfile.open(path) as tar:
        assert "db/mlflow.db" not in tar.getnames()
        assert tar.extractfile("db/mlflow.sql").read() == DUMP
    assert psql["sent"].read_bytes() == pgstore.DUMP_SCRIPT.encode()
    assert archive.verify_backup(path).database.member == "db/mlflow.sql"


def test_backup_dump_rows_differ_from_snapshot_counts_refused_no_archive(stack, psql, tmp_path):
    psql["answers"]["header"]["row_counts"] = {**COUNTS, "experiments": 3}
    (tmp_path / "backups").mkdir()
    status, _, err = stackctl(stack, "backup", "--output", str(tmp_path / "backups"))
    assert status == 1 and "differ from its snapshot's counts" in err
    assert list((tmp_path / "backups").iterdir()) == []


def test_backup_external_database_refused_no_archive(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URI", "postgresql://mlflow@db.example/mlflow")
    (tmp_path / "backups").mkdir()
    status, _, err = stackctl(stack, "backup", "--output", str(tmp_path / "backups"))
    assert status == 1 and err.count("\n") == 1 and "external database (DATABASE_URI)" in err
    assert list((tmp_path / "backups").iterdir()) == []


def test_verify_backup_dump_counts_differ_from_manifest_refused(stack, psql, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    manifest = archive.read_manifest(path)
    manifest["database"]["row_counts"]["experiments"] = 5
    rewrite_manifest(path, manifest)
    with pytest.raises(ArchiveError, match="dump's row counts differ from the manifest"):
        archive.verify_backup(path)


def rewrite_manifest(path: Path, manifest: dict) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if member.name == "manifest.json":
                data = json.dumps(manifest).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"kind": "mysql"}, "unknown database kind"),
        ({"member": "db/mlflow.db"}, "database member"),
        ({"format": "custom"}, "dump format"),
        ({"postgres_major": "17"}, "postgres_major"),
    ],
)
def test_validate_manifest_postgres_database_entry_checked(stack, psql, tmp_path, change, problem):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    manifest = archive.read_manifest(path)
    manifest["database"].update(change)
    with pytest.raises(ArchiveError, match=problem):
        archive.validate_manifest(manifest)


def test_restore_postgres_archive_one_transaction_commit_last(stack, psql, tmp_path, monkeypatch):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    fresh = target(stack, monkeypatch)
    psql["sent"].unlink()
    status, out, err = stackctl(stack, "restore", path, "--json")
    assert status == 0, err
    assert json.loads(out)["database"] == "postgresql"
    sent = psql["sent"].read_bytes()
    # psql restricted under a key of stackctl's own, the dump without its own bracket lines.
    own, rest = sent.split(b"\n", 1)
    assert re.fullmatch(rb"\\restrict [0-9a-f]{64}", own) and own != b"\\restrict abc"
    dump = DUMP.replace(b"\\restrict abc\n", b"").replace(b"\\unrestrict abc\n", b"")
    assert rest == (
        pgstore.RESTORE_BEGIN + dump + pgstore.RESET_SETTINGS + pgstore.restore_check(COUNTS)
        + b"COMMIT;\n"
    )  # fmt: skip
    assert own not in rest and b"unrestrict" not in sent
    assert snapshot(fresh["artifacts"]) == snapshot(stack["artifacts"])
    # The SQLite file of a postgres-profile stack is not the database: left as it was.
    assert (fresh["db"] / "mlflow.db").read_bytes() != (stack["db"] / "mlflow.db").read_bytes()
    assert stack["steps"] == [
        ("stop", "nginx", "auth", "server"),
        ("up", "-d", "--wait", "--no-build", "nginx", "auth", "server"),
    ]


def test_restore_postgres_archive_onto_sqlite_stack_refused(stack, psql, tmp_path, monkeypatch):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    fresh = target(stack, monkeypatch)
    monkeypatch.delenv("COMPOSE_PROFILES")
    before = snapshot(fresh["root"])
    status, _, err = stackctl(stack, "restore", path)
    assert status == 1 and err.count("\n") == 1 and "holds a PostgreSQL dump" in err
    assert snapshot(fresh["root"]) == before and stack["steps"] == []


def test_restore_sqlite_archive_onto_postgres_stack_refused(stack, tmp_path, monkeypatch):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    fresh = target(stack, monkeypatch)
    monkeypatch.setenv("COMPOSE_PROFILES", "postgres")
    before = snapshot(fresh["root"])
    status, _, err = stackctl(stack, "restore", path)
    assert status == 1 and "stackctl migrate-to-postgres" in err
    assert snapshot(fresh["root"]) == before and stack["steps"] == []


def test_restore_postgres_target_not_empty_refused_before_anything(
    stack, psql, tmp_path, monkeypatch
):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    target(stack, monkeypatch)
    psql["answers"]["inspect"]["runs"] = 4
    psql["sent"].unlink()
    status, _, err = stackctl(stack, "restore", path)
    assert status == 1 and "not empty (4 runs" in err
    assert not psql["sent"].exists() or psql["sent"].read_bytes() == b""
    assert stack["steps"] == []


def test_restore_postgres_older_major_target_refused(stack, psql, tmp_path, monkeypatch):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    target(stack, monkeypatch)
    psql["answers"]["inspect"]["server_version_num"] = 160004
    status, _, err = stackctl(stack, "restore", path)
    assert status == 1 and "from PostgreSQL 17, this stack runs 16" in err
    assert stack["steps"] == []


def test_load_bytes_differ_from_verified_sha256_no_commit_sent(stack, psql, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    plan = archive.verify_backup(path)
    changed = archive.Piece(path, plan.database.member, plan.database.size, "0" * 64)
    psql["sent"].unlink()
    with pytest.raises(BundleError, match="changed since it was verified; the database is unch"):
        pgstore.load(None, changed, COUNTS, stackio.Progress(False))
    sent = psql["sent"].read_bytes()
    assert sent.split(b"\n", 1)[1].startswith(pgstore.RESTORE_BEGIN)
    assert b"COMMIT;" not in sent


@pytest.mark.parametrize(
    "hostile",
    [
        (b"\\restrict abc\n", b"\\! sh -c id\n\\restrict abc\n"),
        (b"SET statement_timeout = 0;\n", b"SET statement_timeout = 0; \\! id\n"),
        (b"--\n-- PostgreSQL database dump\n", b"\\! id\n--\n-- PostgreSQL database dump\n"),
        (b"\\unrestrict abc\n", b"\\unrestrict abc\n\\copy x to program 'id'\n"),
        (b"\\restrict abc\n", b"\\restrict abc; \\! id\n"),
    ],
)
def test_dump_reader_psql_command_outside_copy_data_refused(hostile):
    """A crafted archive's dump must never reach psql with a meta-command (\\! runs a shell
    in the postgres container): the attacker review's restore of such an archive."""
    original, replacement = hostile
    assert original in DUMP
    with pytest.raises(BundleError, match="psql command pg_dump does not write"):
        read(DUMP.replace(original, replacement, 1), 64)


def test_dump_reader_backslashes_inside_copy_data_accepted():
    assert read(DUMP, 7) == COUNTS


# The attacker review's bypass: psql reads a dollar-quoted string across these lines, so what
# this reader took for COPY rows ends the string, and psql ran "\! id" as a command.
DOLLAR_BYPASS = b"SELECT $$\nCOPY public.zz (a) FROM stdin;\n$$;\n\\! id > /tmp/pwned\n\\.\n"


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
@pytest.mark.parametrize(
    ("original", "replacement", "reason"),
    [
        # Without the \restrict pair psql would obey the \! the reader counted as a row.
        (b"\\restrict abc\n", DOLLAR_BYPASS, "does not open with pg_dump's \\\\restrict"),
        (b"\\restrict abc\n", b"SELECT 1;\n\\restrict abc\n", "does not open with"),
        (b"\\unrestrict abc\n", b"", "incomplete"),
        # An early \unrestrict, where the reader sees COPY data and psql a command.
        (b"3\n\\.\n", b"3\n\\unrestrict abc\n\\.\n", "an escape COPY does not write"),
        (b"\\unrestrict abc\n", b"\\unrestrict xyz\n", "not pg_dump's last line"),
        (b"\\unrestrict abc\n", b"\\unrestrict abc\nSELECT 1;\n", "does not write"),
        (b"SET statement_timeout", b"\\unrestrict abc\nSET statement_timeout", "last line"),
        (b"SET statement_timeout", b"\\restrict abc\nSET statement_timeout", "second"),
    ],
)
def test_dump_reader_restrict_pair_missing_or_moved_refused(original, replacement, reason, size):
    """Only psql's restricted mode is sure to refuse a meta-command the reader misread."""
    assert original in DUMP
    with pytest.raises(BundleError, match=reason):
        read(DUMP.replace(original, replacement, 1), size)


def test_own_restrict_line_fresh_key_each_load():
    first, second = pgstore.own_restrict_line(), pgstore.own_restrict_line()
    assert re.fullmatch(rb"\\restrict [0-9a-f]{64}\n", first) and first != second


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
def test_without_brackets_drops_only_whole_bracket_lines(size):
    """The attacker re-review's ways out of restricted mode carried the dump's own key; psql
    now runs under stackctl's key, and the dump's bracket lines go (any other stays, for psql
    to refuse: " \\unrestrict abc" is not a bracket line)."""
    data = DUMP + b"x \\unrestrict abc\n \\unrestrict abc\n\\unrestrict abc"
    lines, out = pgstore._WithoutBrackets(), b""
    for start in range(0, len(data), size):
        out += lines.feed(data[start : start + size])
    out += lines.end()
    expected = DUMP.replace(b"\\restrict abc\n", b"").replace(b"\\unrestrict abc\n", b"")
    assert out == expected + b"x \\unrestrict abc\n \\unrestrict abc\n"


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
@pytest.mark.parametrize(
    "inserted",
    [
        # The third review: psql runs a backtick in \unrestrict's argument before it compares
        # the key, so the reader's view and psql's may never differ on a backslash.
        b"SELECT $x$\nCOPY public.t (a) FROM stdin;\n$x$;\nSELECT 1 \\unrestrict `id`\n\\.\n",
        b"COPY public.t (a) FROM stdin;\n\\.\r\n \\unrestrict `id`\n\\.\n",
        b"COPY public.t (a) FROM stdin;\nx \\\\\\u\n\\.\n",
        b"COPY public.t (a) FROM stdin;\nends in a backslash \\\n\\.\n",
        b"COPY public.t (a) FROM stdin;\na\0b\n\\.\n",
    ],
)
def test_dump_reader_copy_data_escape_not_of_copy_refused(inserted, size):
    end = DUMP.index(b"--\n-- PostgreSQL database dump complete")
    with pytest.raises(BundleError, match="COPY does not write|NUL byte"):
        read(DUMP[:end] + inserted + DUMP[end:], size)


def test_dump_reader_every_escape_copy_writes_accepted():
    rows = b"\\\\u \\b\\f\\n\\r\\t\\v \\N\n\\\\\\\\unrestrict\n"
    end = DUMP.index(b"--\n-- PostgreSQL database dump complete")
    dump = DUMP[:end] + b"COPY public.t (a) FROM stdin;\n" + rows + b"\\.\n" + DUMP[end:]
    assert read(dump, 3)["t"] == 2
