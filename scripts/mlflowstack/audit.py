"""``stackctl audit``: who called which route when, read from nginx's JSON access log.

The log (nginx/nginx.conf, ``log_format access_json``) holds one JSON object per request,
written by nginx to its stdout, so ``docker compose logs nginx`` has it::

    {"time":"2026-11-28T01:07:34+00:00","client":"172.18.0.1","user":"alice",
     "kind":"password","method":"POST","path":"/api/2.0/mlflow/experiments/delete",
     "status":200,"bytes_in":312,"bytes_out":188,"duration":0.012,"verdict":"checked"}

(one line in the log). ``user`` is the gate's ``X-Gate-User``, percent-encoded (empty when
nobody was authenticated); ``verdict`` is cached, checked, refused, throttled, error or empty
(the gate was not asked). The log never holds a query string, a header or a body: it shows who
called which route when, not which object the call named (MLflow's delete names the experiment
in the body). MLflow's own records hold the rest, e.g. a run's ``mlflow.user`` tag.

Contract of this module:

- :func:`parse_line` turns one log line into an :class:`Entry`, or None for anything that is
  not such an object (nginx's error log shares the stream): such lines are skipped, never an
  error. The user name is percent-decoded.
- :func:`parse_when` and :func:`make_filters` raise :class:`AuditError` for bad input (the
  command prints it as one line and exits 2); filters match by exact user name, method (any
  case), a substring of the path, and ``since <= time <= until`` (since taken to the whole
  second, as the log's times are).
- :func:`format_table` and :func:`format_json` never put a control character, a bidi control
  or any other unprintable character from the log on the terminal: the table escapes them
  (``\\n``, ``\\x1b``, ``\\u202e``; a backslash is doubled, so an escape cannot be forged),
  and JSON output is ASCII with JSON's escapes.
- :func:`audit` is the command: reads ``docker compose logs nginx`` of the bundle, filters,
  prints; a failure of docker raises BundleError (exit 1).
"""

import dataclasses
import datetime
import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable, Iterator

from mlflowstack import commands
from mlflowstack.files import BundleError

UTC = datetime.UTC
# "2h", "30m", "1d", "45s", "2w": that long before now.
_RELATIVE = re.compile(r"(\d{1,9})([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_METHOD = re.compile(r"[A-Za-z]{1,32}")
_STRING_FIELDS = ("time", "client", "user", "kind", "method", "path", "verdict")
_INT_FIELDS = ("status", "bytes_in", "bytes_out")


class AuditError(ValueError):
    """Bad input on the command line: the message is the one line to show."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One request as nginx logged it (``user`` decoded; empty when nobody logged in)."""

    time: datetime.datetime
    client: str
    user: str
    kind: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration: float
    verdict: str

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["time"] = self.time.isoformat()
        return record


@dataclasses.dataclass(frozen=True)
class Filters:
    """What ``stackctl audit`` keeps; None matches everything."""

    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    user: str | None = None
    method: str | None = None
    path_contains: str | None = None


def parse_when(text: str, now: datetime.datetime) -> datetime.datetime:
    """An aware time from ``text``: ``2h``, ``30m``, ``1d``, ``45s``, ``2w`` before ``now``, or
    an ISO 8601 time (``2026-11-28T09:00``, ``2026-11-28``, ``...+01:00``, ``...Z``); one
    without an offset is UTC, as the log's times are. Raises AuditError otherwise."""
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = int(relative[1]), _UNITS[relative[2]]
        return now - datetime.timedelta(**{unit: amount})
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise AuditError(
            f"{text!r} is not a time: use an ISO time (2026-11-28T09:00, UTC unless it has an "
            "offset) or a time before now (30m, 2h, 1d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def make_filters(
    since: str | None,
    until: str | None,
    user: str | None,
    method: str | None,
    path_contains: str | None,
    now: datetime.datetime,
) -> Filters:
    """The command line's filters, checked; raises AuditError naming the bad option."""
    try:
        start = parse_when(since, now) if since is not None else None
    except AuditError as error:
        raise AuditError(f"--since: {error}") from None
    try:
        end = parse_when(until, now) if until is not None else None
    except AuditError as error:
        raise AuditError(f"--until: {error}") from None
    if start and end and start > end:
        raise AuditError(f"--since ({start.isoformat()}) is after --until ({end.isoformat()})")
    if user is not None and not user:
        raise AuditError("--user: the name is empty")
    if method is not None and not _METHOD.fullmatch(method):
        raise AuditError(f"--method: {method!r} is not an HTTP method (e.g. GET, POST)")
    if path_contains is not None and not path_contains:
        raise AuditError("--path-contains: the text is empty")
    # The log's times are whole seconds: a request logged at 10:00:00 happened during it, so
    # --since 10:00:00.5 keeps it.
    if start:
        start = start.replace(microsecond=0)
    return Filters(start, end, user, method.upper() if method else None, path_contains)


def parse_line(line: str) -> Entry | None:
    """The request a log line records, or None when the line is not one of them."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if not all(isinstance(record.get(name), str) for name in _STRING_FIELDS):
        return None
    if not all(type(record.get(name)) is int for name in _INT_FIELDS):
        return None
    duration = record.get("duration")
    if type(duration) not in (int, float):
        return None
    try:
        moment = datetime.datetime.fromisoformat(record["time"])
    except ValueError:
        return None
    return Entry(
        time=moment if moment.tzinfo else moment.replace(tzinfo=UTC),
        client=record["client"],
        user=urllib.parse.unquote(record["user"], errors="replace"),
        kind=record["kind"],
        method=record["method"],
        path=record["path"],
        status=record["status"],
        bytes_in=record["bytes_in"],
        bytes_out=record["bytes_out"],
        duration=float(duration),
        verdict=record["verdict"],
    )


def parse_log(text: str) -> Iterator[Entry]:
    """The requests of a log, in its order; other lines are skipped."""
    for line in text.splitlines():
        entry = parse_line(line)
        if entry is not None:
            yield entry


def matches(entry: Entry, filters: Filters) -> bool:
    """Whether ``entry`` passes every filter that is set."""
    return (
        (filters.since is None or entry.time >= filters.since)
        and (filters.until is None or entry.time <= filters.until)
        and (filters.user is None or entry.user == filters.user)
        and (filters.method is None or entry.method.upper() == filters.method)
        and (filters.path_contains is None or filters.path_contains in entry.path)
    )


def select(entries: Iterable[Entry], filters: Filters) -> list[Entry]:
    return [entry for entry in entries if matches(entry, filters)]


def printable(text: str) -> str:
    """``text`` safe for a terminal: unprintable characters (control characters, ANSI escapes,
    bidi controls, line separators) escaped as ``\\n``, ``\\x1b``, ``\\u202e``; backslashes
    doubled, so the output cannot pass for an escape that was not there."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


_COLUMNS = ("TIME", "USER", "KIND", "CLIENT", "METHOD", "STATUS", "VERDICT", "SECONDS", "IN",
            "OUT", "PATH")  # fmt: skip


def _row(entry: Entry) -> tuple[str, ...]:
    return (
        entry.time.isoformat(),
        entry.user or "-",
        entry.kind or "-",
        entry.client,
        entry.method,
        str(entry.status),
        entry.verdict or "-",
        f"{entry.duration:.3f}",
        str(entry.bytes_in),
        str(entry.bytes_out),
        entry.path,
    )


def format_table(entries: Iterable[Entry]) -> str:
    """A header line and a line per request, columns aligned, every value escaped by
    :func:`printable`; the path comes last (it may be long)."""
    rows = [_COLUMNS] + [tuple(printable(value) for value in _row(entry)) for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [value.ljust(width) for value, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines) + "\n"


def format_json(entry: Entry) -> str:
    """One JSON object (ASCII only, so nothing in it acts on a terminal), no newline."""
    return json.dumps(entry.as_dict(), ensure_ascii=True)


def _docker_time(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_nginx_log(args, filters: Filters) -> str:
    """``docker compose logs nginx --no-log-prefix`` of the bundle (as the other stackctl
    commands run compose: ``--project-directory``), narrowed by docker to the time range with a
    second to spare (the filters decide). Raises BundleError when docker fails."""
    command = commands.compose_command(args, "logs", "--no-log-prefix", "--no-color")
    if filters.since:
        command += ["--since", _docker_time(filters.since - datetime.timedelta(seconds=1))]
    if filters.until:
        command += ["--until", _docker_time(filters.until + datetime.timedelta(seconds=1))]
    command.append("nginx")
    try:
        completed = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except FileNotFoundError:
        raise BundleError("docker is not installed here (audit reads nginx's log)") from None
    if completed.returncode:
        errors = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = printable(errors[-1]) if errors else f"exit status {completed.returncode}"
        raise BundleError(f"docker compose logs nginx failed: {reason}")
    # nginx's JSON escaping leaves bytes above 0x7f as they came (a path may hold any).
    return completed.stdout.decode("utf-8", "replace")


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def audit(args) -> int:
    """``stackctl audit``: 2 for bad input (one line on stderr), else 0 with the matching
    requests as a table (or JSON lines with ``--json``) on stdout."""
    try:
        filters = make_filters(
            args.since,
            args.until,
            args.user,
            args.method,
            args.path_contains,
            _now(),
        )
    except AuditError as error:
        print(f"stackctl: audit: {error}", file=sys.stderr)
        return 2
    entries = select(parse_log(read_nginx_log(args, filters)), filters)
    if args.json:
        sys.stdout.writelines(format_json(entry) + "\n" for entry in entries)
    elif entries:
        sys.stdout.write(format_table(entries))
    else:
        print("stackctl: audit: no request in nginx's log matches", file=sys.stderr)
    return 0
