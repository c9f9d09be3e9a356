"""stackctl migrate-to-postgres without Docker: the pure parts of pgmove.py (the .env switch,
the refusals, the plan) and of pgmoveagent.py (the table order, the comparison of rows read from
SQLite and PostgreSQL, SQLite's side of the schema check). The whole command runs against real
stacks in tests/stack/test_migrate_to_postgres.py."""

import contextlib
import datetime
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflowstack import cli, pgmove, pgmoveagent
from mlflowstack.files import BundleError
from mlflowstack.pgmoveagent import AgentError, Digest, canonical, dependency_order, row_key

ROOT = Path(__file__).resolve().parents[2]
CURRENT = {"store": "sqlite", "revision": "abc", "head": "abc", "state": "current",
           "mlflow_version": "3.17.2", "row_counts": {}}  # fmt: skip

# pgmoveagent: the order tables are loaded in


def test_dependency_order_referenced_tables_first_ties_alphabetical():
    references = {
        "metrics": {"runs"},
        "runs": {"experiments"},
        "experiments": set(),
        "tags": {"runs"},
        "workspaces": set(),
        "params": {"runs"},
    }
    order = dependency_order(references)
    assert order == ["experiments", "workspaces", "runs", "metrics", "params", "tags"]


def test_dependency_order_self_and_unknown_references_ignored():
    order = dependency_order({"spans": {"spans", "trace_info"}, "trace_info": {"gone"}})
    assert order == ["trace_info", "spans"]


def test_dependency_order_cycle_refused_naming_the_tables():
    with pytest.raises(AgentError, match="cycle among: a, b"):
        dependency_order({"a": {"b"}, "b": {"a"}, "c": set()})


# pgmoveagent: rows compared across the two databases


@pytest.mark.parametrize(
    ("sqlite_value", "postgres_value", "kind"),
    [
        (1, True, "boolean"),
        (0, False, "boolean"),
        ('{"b": 1, "a": [1, 2]}', '{"a":[1,2],"b":1}', "json"),
        (5, "5", "json"),  # SQLite's NUMERIC affinity stores a JSON number as a number
        (0.1, 0.1, "double precision"),
        (float("nan"), float("nan"), "double precision"),
        (12, 12, "bigint"),
        (b"\x00\xff", memoryview(b"\x00\xff"), "bytea"),
        ("2026-11-28", "2026-11-28", "date"),
    ],
)
def test_canonical_same_value_from_either_side_compares_equal(sqlite_value, postgres_value, kind):
    assert canonical(sqlite_value, kind) == canonical(postgres_value, kind)


def test_canonical_sql_null_differs_from_json_null_and_empty_text():
    assert canonical(None, "json") is None
    assert canonical("null", "json") == "null"
    assert canonical(None, "text") != canonical("", "text")


def test_digest_order_free_but_any_changed_value_differs():
    kinds = ["text", "bigint", "double precision"]
    rows = [("loss", 1, 0.5), ("loss", 2, 0.25), ("acc", 1, 0.9)]
    one, other, changed = Digest(), Digest(), Digest()
    for row in rows:
        one.add(row_key(row, kinds))
    for row in reversed(rows):
        other.add(row_key(row, kinds))
    for row in [*rows[:2], ("acc", 1, 0.9000001)]:
        changed.add(row_key(row, kinds))
    assert one == other
    assert one != changed
    missing = Digest()
    for row in rows[:2]:
        missing.add(row_key(row, kinds))
    assert missing != one


def test_prepare_turns_sqlite_booleans_into_bool_keeps_the_rest():
    row = pgmoveagent.prepare((1, 0, None, 1), ["boolean", "boolean", "boolean", "integer"])
    assert row == (True, False, None, 1)


def test_sqlite_columns_include_generated_ones(tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "x.db")) as db:
        db.execute("CREATE TABLE spans (a INTEGER, b INTEGER, d INTEGER GENERATED ALWAYS AS "
                   "(b - a) STORED)")  # fmt: skip
        assert pgmoveagent.sqlite_columns(db, "spans") == ["a", "b", "d"]


def test_check_same_schema_refuses_other_tables_or_columns(tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "x.db")) as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT, name TEXT)")
        pgmoveagent.check_same_schema(db, {"runs": [("run_uuid", "text", False),
                                                    ("name", "text", False)]})  # fmt: skip
        with pytest.raises(AgentError, match="only in PostgreSQL: \\['experiments'\\]"):
            pgmoveagent.check_same_schema(db, {"runs": [], "experiments": []})
        with pytest.raises(AgentError, match="columns of table runs"):
            pgmoveagent.check_same_schema(db, {"runs": [("run_uuid", "text", False)]})


# pgmove: the switch written to .env


def test_env_with_profile_no_assignment_appended_with_comment_rest_unchanged():
    example = (ROOT / ".env.example").read_bytes()
    changed = pgmove.env_with_profile(example)
    assert changed.startswith(example)
    assert changed.endswith(pgmove.APPENDED + b"COMPOSE_PROFILES=postgres\n")
    # The commented examples stay as they are.
    assert changed.count(b"# COMPOSE_PROFILES=serve\n") == example.count(
        b"# COMPOSE_PROFILES=serve\n"
    )


def test_env_with_profile_no_file_gives_new_content():
    assert pgmove.env_with_profile(None) == pgmove.APPENDED + b"COMPOSE_PROFILES=postgres\n"


def test_env_with_profile_missing_final_newline_added_before_the_line():
    assert pgmove.env_with_profile(b"HTTP_PORT=80").startswith(b"HTTP_PORT=80\n# ")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"A=1\nCOMPOSE_PROFILES=serve\nB=2\n", b"A=1\nCOMPOSE_PROFILES=serve,postgres\nB=2\n"),
        (b'COMPOSE_PROFILES="serve"\n', b'COMPOSE_PROFILES="serve,postgres"\n'),
        (b"COMPOSE_PROFILES='serve'\n", b"COMPOSE_PROFILES='serve,postgres'\n"),
        (b"COMPOSE_PROFILES=serve # models\n", b"COMPOSE_PROFILES=serve,postgres # models\n"),
        (b"COMPOSE_PROFILES=serve, tools\n", b"COMPOSE_PROFILES=serve,tools,postgres\n"),
        (b"COMPOSE_PROFILES=\n", b"COMPOSE_PROFILES=postgres\n"),
        (b"export COMPOSE_PROFILES=serve\n", b"export COMPOSE_PROFILES=serve,postgres\n"),
        (b"COMPOSE_PROFILES=serve\r\nX=1\r\n", b"COMPOSE_PROFILES=serve,postgres\r\nX=1\r\n"),
        # compose uses the last assignment: that one changes.
        (b"COMPOSE_PROFILES=a\nCOMPOSE_PROFILES=b\n",
         b"COMPOSE_PROFILES=a\nCOMPOSE_PROFILES=b,postgres\n"),
        (b"COMPOSE_PROFILES=serve,postgres\n", b"COMPOSE_PROFILES=serve,postgres\n"),
    ],
)  # fmt: skip
def test_env_with_profile_assignment_gets_postgres_keeping_its_form(before, after):
    assert pgmove.env_with_profile(before) == after


# pgmove: refusals


def test_shell_refusal_profiles_or_env_files_in_shell_refused():
    assert "COMPOSE_PROFILES is set in this shell" in pgmove.shell_refusal({"COMPOSE_PROFILES": ""})
    assert "COMPOSE_ENV_FILES is set" in pgmove.shell_refusal({"COMPOSE_ENV_FILES": "/dev/null"})
    assert pgmove.shell_refusal({"PATH": "/bin"}) is None


@pytest.mark.parametrize(
    ("configured", "source", "expected"),
    [
        ({"DATABASE_URI": "postgresql://m@db/m"}, CURRENT, "uses an external database"),
        ({"COMPOSE_PROFILES": "serve, postgres"}, CURRENT, "bundled PostgreSQL already"),
        ({}, {**CURRENT, "store": "postgresql"}, "the running server uses postgresql"),
        ({}, {**CURRENT, "state": "fresh", "revision": None}, "no MLflow tables yet"),
        ({}, {**CURRENT, "state": "older", "revision": "old"}, "stackctl upgrade"),
        ({}, {**CURRENT, "state": "newer", "revision": "new"}, "is newer than this image's"),
    ],
)
def test_source_refusal_names_why(configured, source, expected):
    refusal = pgmove.source_refusal(configured, source)
    assert expected in refusal and "\n" not in refusal


def test_source_refusal_sqlite_at_head_accepted():
    assert pgmove.source_refusal({"COMPOSE_PROFILES": "serve", "DATABASE_URI": ""}, CURRENT) is None


def test_target_refusal_rows_beyond_migrations_refused_with_counts():
    refusal = pgmove.target_refusal({"extra_rows": {"runs": 2, "experiments": 3}})
    assert "not empty (5 MLflow rows: experiments 3, runs 2)" in refusal
    assert pgmove.target_refusal({"extra_rows": {}}) is None
    assert pgmove.target_refusal(None) is None


def test_command_refuses_shell_profiles_before_running_docker(monkeypatch, capsys):
    monkeypatch.setenv("COMPOSE_PROFILES", "serve")
    # The stack tier's session sets it for every compose call (tests/stack/conftest.py), and
    # it is refused too: this test is about the profiles.
    monkeypatch.delenv("COMPOSE_ENV_FILES", raising=False)

    def no_docker(*args, **kwargs):
        raise AssertionError(f"docker ran: {args}")

    monkeypatch.setattr(subprocess, "run", no_docker)
    monkeypatch.setattr(subprocess, "Popen", no_docker)
    assert cli.main(["migrate-to-postgres"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("stackctl: COMPOSE_PROFILES is set") and error.count("\n") == 1


def test_cli_output_and_no_backup_exclusive(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["migrate-to-postgres", "--no-backup", "--output", "x.tar"])
    assert stop.value.code == 2


# pgmove: the plan


def test_plan_counts_rows_without_alembic_version_names_backup_and_env(tmp_path):
    counts = {"alembic_version": 1, "experiments": 2, "runs": 5, "metrics": 0}
    steps = pgmove.plan(counts, tmp_path / "b.tar", tmp_path / ".env", True, "serve,postgres",
                        "empty")  # fmt: skip
    text = "\n".join(steps)
    assert "copy 7 rows of 3 tables" in text
    assert f"stackctl backup --output {tmp_path / 'b.tar'}" in text
    assert "COMPOSE_PROFILES=serve,postgres set in" in text and "other lines kept" in text
    steps = pgmove.plan(counts, None, tmp_path / ".env", False, "postgres", "empty")
    assert "no backup (--no-backup)" in steps[1] and "created" in steps[5]


def test_env_with_profile_unreadable_line_refused():
    with pytest.raises(BundleError, match="not UTF-8"):
        pgmove.env_with_profile(b"COMPOSE_PROFILES=\xff\n")


def test_backup_path_for_directory_gets_new_name_file_kept(tmp_path):
    now = datetime.datetime(2026, 11, 28, 18, 0, 0)
    args = SimpleNamespace(output=str(tmp_path), project_dir=str(tmp_path / "bundle"))
    assert pgmove.backup_path_for(args, now) == tmp_path / "pre-postgres-20261128T180000Z.tar"
    args.output = str(tmp_path / "mine.tar")
    assert pgmove.backup_path_for(args, now) == tmp_path / "mine.tar"
    args.output = None
    assert pgmove.backup_path_for(args, now).parent == tmp_path / "bundle" / "backups"
