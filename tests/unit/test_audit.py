"""stackctl audit (scripts/mlflowstack/audit.py): nginx's JSON access log parsed, filtered and
printed; docker stands in as a fake subprocess.run."""

import contextlib
import datetime
import io
import json
import subprocess

import pytest
from mlflowstack import audit, cli
from mlflowstack.files import BundleError

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def line(**fields) -> str:
    """A log line as nginx.conf's access_json writes it (escape=json), with ``fields`` changed."""
    record = {
        "time": "2026-11-28T11:00:00+00:00",
        "client": "172.18.0.1",
        "user": "alice",
        "kind": "password",
        "method": "GET",
        "path": "/api/2.0/mlflow/experiments/search",
        "status": 200,
        "bytes_in": 200,
        "bytes_out": 600,
        "duration": 0.012,
        "verdict": "checked",
    }
    record.update(fields)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


# The same shape as a line nginx wrote (copied from a running stack, escapes as nginx makes them).
NGINX_LINE = (
    '{"time":"2026-11-28T01:11:43+00:00","client":"172.24.0.1","user":"","kind":"",'
    '"method":"GET","path":"/api/\\u001B[31mred","status":400,"bytes_in":95,"bytes_out":176,'
    '"duration":0.000,"verdict":""}'
)

LOG = "\n".join(
    [
        "2026/11/28 10:00:00 [notice] 1#1: js vm init njs: 000055A11828BC00",
        line(time="2026-11-28T09:00:00+00:00", user="bob"),
        line(time="2026-11-28T10:30:00+00:00", method="POST",
             path="/api/2.0/mlflow/experiments/delete"),
        line(time="2026-11-28T11:30:00+00:00", user="ci-nightly", kind="token", verdict="cached"),
        line(time="2026-11-28T11:45:00+00:00", user="", kind="", status=401, verdict="refused"),
        '2026/11/28 11:50:00 [error] 30#30: *1 gate answered 200 without this nonce; refused',
    ]
)  # fmt: skip


def entries(**filters):
    defaults = dict(since=None, until=None, user=None, method=None, path_contains=None)
    chosen = audit.make_filters(**{**defaults, **filters}, now=NOW)
    return audit.select(audit.parse_log(LOG), chosen)


# parse_when


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2h", NOW - datetime.timedelta(hours=2)),
        ("30m", NOW - datetime.timedelta(minutes=30)),
        ("1d", NOW - datetime.timedelta(days=1)),
        ("45s", NOW - datetime.timedelta(seconds=45)),
        ("2w", NOW - datetime.timedelta(weeks=2)),
        ("0m", NOW),
    ],
)
def test_parse_when_relative_value_is_that_long_before_now(text, expected):
    assert audit.parse_when(text, NOW) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-28T09:30:00+00:00", datetime.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)),
        ("2026-11-28T09:30:00Z", datetime.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)),
        ("2026-11-28T10:30+01:00", datetime.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)),
        ("2026-11-28", datetime.datetime(2026, 11, 28, tzinfo=UTC)),
    ],
)
def test_parse_when_iso_time_is_that_moment(text, expected):
    assert audit.parse_when(text, NOW) == expected


def test_parse_when_iso_time_without_offset_is_utc():
    assert audit.parse_when("2026-11-28T09:30", NOW).utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "2 h", "-2h", "2x", "h", "2026-13-01", "1e3s"])
def test_parse_when_bad_value_raises_audit_error(text):
    with pytest.raises(audit.AuditError, match="is not a time"):
        audit.parse_when(text, NOW)


# make_filters


@pytest.mark.parametrize(
    "options, message",
    [
        ({"since": "soon"}, "--since: 'soon' is not a time"),
        ({"until": "later"}, "--until: 'later' is not a time"),
        ({"since": "1h", "until": "2h"}, "--since .* is after --until"),
        ({"user": ""}, "--user: the name is empty"),
        ({"method": "GE T"}, "--method: 'GE T' is not an HTTP method"),
        ({"method": "GET\n"}, "--method: 'GET\\\\n' is not an HTTP method"),
        ({"path_contains": ""}, "--path-contains: the text is empty"),
    ],
)
def test_make_filters_bad_option_raises_naming_it(options, message):
    defaults = dict(since=None, until=None, user=None, method=None, path_contains=None)
    with pytest.raises(audit.AuditError, match=message):
        audit.make_filters(**{**defaults, **options}, now=NOW)


def test_make_filters_method_any_case_is_upper_case():
    filters = audit.make_filters(None, None, None, "post", None, now=NOW)
    assert filters.method == "POST"


# parse_line and parse_log


def test_parse_line_nginx_line_gives_entry_with_every_field():
    entry = audit.parse_line(NGINX_LINE)
    assert entry == audit.Entry(
        time=datetime.datetime(2026, 11, 28, 1, 11, 43, tzinfo=UTC),
        client="172.24.0.1",
        user="",
        kind="",
        method="GET",
        path="/api/\x1b[31mred",
        status=400,
        bytes_in=95,
        bytes_out=176,
        duration=0.0,
        verdict="",
    )


def test_parse_line_percent_encoded_user_is_decoded():
    # The gate's X-Gate-User: UTF-8, percent-encoded (scripts/mlflowstack/gate.py).
    assert audit.parse_line(line(user="caf%C3%A9%25")).user == "café%"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026/11/28 10:00:00 [error] 30#30: *1 something {with braces}",
        "{not json",
        "[1, 2]",
        '"a string"',
        line()[:-1],
        json.dumps({"time": "2026-11-28T11:00:00+00:00"}),
        line(status="200"),
        line(status=True),
        line(duration="0.1"),
        line(user=None),
        line(time="not a time"),
    ],
)
def test_parse_line_anything_else_is_none(text):
    assert audit.parse_line(text) is None


def test_parse_log_skips_error_log_lines_keeps_order():
    users = [entry.user for entry in audit.parse_log(LOG)]
    assert users == ["bob", "alice", "ci-nightly", ""]


# select (the filters)


def test_select_no_filter_keeps_every_request():
    assert len(entries()) == 4


def test_select_user_matches_exact_name_only():
    assert [entry.user for entry in entries(user="ci-nightly")] == ["ci-nightly"]
    assert entries(user="ci") == []


def test_select_method_matches_any_case():
    assert [entry.path for entry in entries(method="post")] == [
        "/api/2.0/mlflow/experiments/delete"
    ]


def test_select_path_contains_matches_substring():
    assert [entry.method for entry in entries(path_contains="experiments/del")] == ["POST"]


def test_select_since_relative_keeps_later_requests():
    assert [entry.user for entry in entries(since="1h")] == ["ci-nightly", ""]


def test_select_since_until_range_is_inclusive():
    chosen = entries(since="2026-11-28T10:30:00Z", until="2026-11-28T11:30:00+00:00")
    assert [entry.user for entry in chosen] == ["alice", "ci-nightly"]


def test_select_since_within_the_logged_second_keeps_that_request():
    assert [entry.user for entry in entries(since="2026-11-28T11:30:00.700Z")] == ["ci-nightly", ""]


def test_select_filters_combine_as_and():
    assert entries(user="alice", method="GET") == []
    assert len(entries(user="alice", method="POST", since="2h")) == 1


# printing


def test_printable_control_and_bidi_characters_are_escaped():
    assert audit.printable("a\nb\r\t\x1b[31m\x00\x7f\u202e\u2028\U000e0001") == (
        "a\\nb\\r\\t\\x1b[31m\\x00\\x7f\\u202e\\u2028\\U000e0001"
    )


def test_printable_backslash_is_doubled_so_escapes_cannot_be_forged():
    assert audit.printable("a\\nb") == "a\\\\nb"


def test_printable_plain_and_non_ascii_text_unchanged():
    assert audit.printable("/api/2.0/mlflow/runs/get café ü") == "/api/2.0/mlflow/runs/get café ü"


def test_format_table_hostile_user_and_path_printed_escaped_never_raw():
    hostile = audit.parse_line(
        line(user="eve%0A2026-11-28%20admin%1B[2J", path="/api/\x1b]0;pwned\x07\n\u202eevil")
    )
    table = audit.format_table([hostile])
    assert "\x1b" not in table and "\x07" not in table and "\u202e" not in table
    assert table.count("\n") == 2  # the header and one row, each ended by a newline
    assert "eve\\n2026-11-28 admin\\x1b[2J" in table
    assert "/api/\\x1b]0;pwned\\x07\\n\\u202eevil" in table


def test_format_table_header_then_aligned_rows_path_last():
    table = audit.format_table(entries(user="alice") + entries(user="ci-nightly"))
    header, first, second = table.splitlines()
    assert header.split() == [
        "TIME", "USER", "KIND", "CLIENT", "METHOD", "STATUS", "VERDICT", "SECONDS", "IN", "OUT",
        "PATH",
    ]  # fmt: skip
    assert first.split()[1:] == [
        "alice", "password", "172.18.0.1", "POST", "200", "checked", "0.012", "200", "600",
        "/api/2.0/mlflow/experiments/delete",
    ]  # fmt: skip
    assert header.index("PATH") == first.index("/api") == second.index("/api")


def test_format_table_no_user_or_verdict_shows_dash():
    row = audit.format_table(entries(since="20m")).splitlines()[1].split()
    assert row[1:3] == ["-", "-"] and row[5:7] == ["401", "refused"]


def test_format_json_hostile_values_ascii_only_and_round_trip():
    hostile = audit.parse_line(line(user="eve%1B", path="/a\nb\u202e"))
    text = audit.format_json(hostile)
    assert text.isascii() and "\n" not in text and "\x1b" not in text
    assert json.loads(text) == {**json.loads(line()), "user": "eve\x1b", "path": "/a\nb\u202e"}


# the command


class FakeDocker:
    """subprocess.run for ``docker compose logs``: records the command, answers ``stdout``."""

    def __init__(self, stdout: bytes = LOG.encode(), returncode: int = 0, stderr: bytes = b""):
        self.stdout, self.returncode, self.stderr = stdout, returncode, stderr
        self.commands = []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        return subprocess.CompletedProcess(command, self.returncode, self.stdout, self.stderr)


def run(monkeypatch, *argv, docker=None):
    """stackctl in-process with a fake docker; (status, stdout, stderr, docker)."""
    docker = docker or FakeDocker()
    monkeypatch.setattr(audit.subprocess, "run", docker)
    monkeypatch.setattr(audit, "_now", lambda: NOW)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue(), docker


def test_audit_user_json_prints_matching_requests_as_json_lines(monkeypatch):
    status, out, err, docker = run(monkeypatch, "audit", "--user", "alice", "--json")
    assert status == 0 and err == ""
    records = [json.loads(text) for text in out.splitlines()]
    assert [(record["method"], record["path"]) for record in records] == [
        ("POST", "/api/2.0/mlflow/experiments/delete")
    ]
    command = docker.commands[0]
    assert command[:4] == ["docker", "compose", "--project-directory", str(cli.commands.REPO_ROOT)]
    assert command[4:] == ["logs", "--no-log-prefix", "--no-color", "nginx"]


def test_audit_since_until_passed_to_docker_with_a_second_to_spare(monkeypatch):
    status, out, _, docker = run(
        monkeypatch, "audit", "--since", "2h", "--until", "2026-11-28T11:30:00Z"
    )
    assert status == 0
    assert docker.commands[0][-5:] == [
        "--since", "2026-11-28T09:59:59Z", "--until", "2026-11-28T11:30:01Z", "nginx",
    ]  # fmt: skip
    assert [row.split()[1] for row in out.splitlines()[1:]] == ["alice", "ci-nightly"]


def test_audit_path_contains_names_who_called_the_route(monkeypatch):
    status, out, _, _ = run(monkeypatch, "audit", "--path-contains", "experiments/delete")
    assert status == 0
    assert [row.split()[1] for row in out.splitlines()[1:]] == ["alice"]


def test_audit_nothing_matches_says_so_on_stderr_exit_0(monkeypatch):
    status, out, err, _ = run(monkeypatch, "audit", "--user", "nobody")
    assert (status, out) == (0, "")
    assert err == "stackctl: audit: no request in nginx's log matches\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--since", "yesterday"],
        ["--until", "\x1b[2Jsoon"],
        ["--since", "1h", "--until", "3h"],
        ["--method", "GET /"],
        ["--user", ""],
    ],
)
def test_audit_bad_input_one_line_on_stderr_exit_2_docker_not_run(monkeypatch, argv):
    status, out, err, docker = run(monkeypatch, "audit", *argv)
    assert (status, out, docker.commands) == (2, "", [])
    assert err.startswith("stackctl: audit: --") and err.count("\n") == 1
    assert "\x1b" not in err


def test_audit_docker_fails_one_line_error_exit_1(monkeypatch):
    failing = FakeDocker(stdout=b"", returncode=1, stderr=b"warning\nno such service: nginx\x1b\n")
    status, out, err, _ = run(monkeypatch, "audit", docker=failing)
    assert (status, out) == (1, "")
    assert err == "stackctl: docker compose logs nginx failed: no such service: nginx\\x1b\n"


def test_audit_docker_missing_one_line_error_exit_1(monkeypatch):
    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    status, _, err, _ = run(monkeypatch, "audit", docker=missing)
    assert status == 1 and err.startswith("stackctl: docker is not installed here")


def test_read_nginx_log_invalid_utf8_replaced_not_raised(monkeypatch):
    docker = FakeDocker(stdout=line(path="/x\udcff").encode("utf-8", "surrogateescape"))
    monkeypatch.setattr(audit.subprocess, "run", docker)
    text = audit.read_nginx_log(cli.build_parser().parse_args(["audit"]), audit.Filters())
    assert audit.parse_line(text).path == "/x\ufffd"


def test_read_nginx_log_missing_docker_raises_bundle_error(monkeypatch):
    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    monkeypatch.setattr(audit.subprocess, "run", missing)
    with pytest.raises(BundleError, match="docker is not installed"):
        audit.read_nginx_log(cli.build_parser().parse_args(["audit"]), audit.Filters())
