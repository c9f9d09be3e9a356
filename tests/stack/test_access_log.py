"""Every request is accounted for: nginx logs one JSON line per request (nginx/nginx.conf) with
who, what, the outcome and the gate's verdict, and never a credential or a query string;
``scripts/stackctl audit`` finds the requests in it (scripts/mlflowstack/audit.py)."""

import base64
import ipaddress
import json
import os
import re
import subprocess
import time

import pytest
import requests
from conftest import PROJECT, ROOT

SEARCH = "/api/2.0/mlflow/experiments/search"
FIELDS = {
    "time", "client", "user", "kind", "method", "path", "status", "bytes_in", "bytes_out",
    "duration", "verdict",
}  # fmt: skip
# nginx's error log shares the container's output: "2026/11/28 01:11:34 [notice] ...".
ERROR_LOG_LINE = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} \[[a-z]+\] ")
USER, PASSWORD = "acct-alice", "acct-alice-Secret-9f3k"
WRONG_PASSWORD = "acct-wrong-Secret-7q2z"
TOKEN = "acct-ci"
COOKIE_SECRET = "acct-cookie-Secret-4m8n"
QUERY_SECRET = "hunter2"


def host_stackctl(*args: str) -> subprocess.CompletedProcess:
    """scripts/stackctl as an operator runs it (stock python3, Docker underneath)."""
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT}
    return subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


LONG_PATH = "/api/2.0/mlflow/experiments/" + "long" * 1000


@pytest.fixture(scope="module")
def traffic(stack):
    """Requests as a user, a token, with a wrong password, with secrets in a query string, a
    cookie and a header; then nginx's log since they began. Returns (log, secrets, since)."""
    since = stack.now()
    stack.add_user(USER, PASSWORD, "editor")
    added = stack.stackctl("token", "add", TOKEN, "--role", "viewer")
    token = next(word for word in added.split() if word.startswith("mlst_"))
    alice, url = (USER, PASSWORD), stack.url
    bearer = {"Authorization": f"Bearer {token}"}

    def expect(status, method, path, **kwargs):
        response = requests.request(method, url + path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        return response

    # The same call twice within AUTH_CACHE_TTL (2 s): the gate checks it, nginx remembers.
    query = {"max_results": 1, "password": QUERY_SECRET}
    expect(200, "GET", SEARCH, auth=alice, params=query, cookies={"session": COOKIE_SECRET})
    expect(200, "GET", SEARCH, auth=alice, params=query, headers={"X-Api-Key": COOKIE_SECRET})
    expect(200, "GET", SEARCH, headers=bearer, params={"max_results": 1})
    expect(401, "GET", SEARCH, auth=(USER, WRONG_PASSWORD), params=query)
    # A viewer token's write: refused for the role, with the token's name.
    expect(403, "POST", "/api/2.0/mlflow/experiments/create", headers=bearer, json={"name": "x"})
    # "Who deleted experiment N": the route and the caller are in the log, the id is not.
    created = expect(
        200, "POST", "/api/2.0/mlflow/experiments/create", auth=alice, json={"name": "acct-exp"}
    )
    experiment = created.json()["experiment_id"]
    expect(200, "POST", "/api/2.0/mlflow/experiments/delete", auth=alice,
           json={"experiment_id": experiment})  # fmt: skip
    # An artifact download reaches nginx's file location by an internal redirect: the line
    # still names the user and the public path.
    artifact = "/api/2.0/mlflow-artifacts/artifacts/0/acct/artifacts/a.txt"
    expect(200, "PUT", artifact, auth=alice, data=b"accounted")
    expect(200, "GET", artifact, auth=alice)
    # A long path without credentials: logged cut to 512 characters (a flood of them must not
    # rotate the log's 30 MB away in a few thousand requests).
    expect(401, "GET", LONG_PATH)
    # A hostile path (ESC, an ANSI colour): refused, logged escaped.
    assert stack.raw(b"GET /api/%1b[31mred HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 400

    secrets = {
        "password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "token": token,
        "cookie": COOKIE_SECRET,
        "query secret": QUERY_SECRET,
        "Basic credentials": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        "wrong Basic credentials": base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode(),
    }
    deadline = time.monotonic() + 10
    while True:
        log = stack.compose("logs", "--no-color", "--no-log-prefix", "--since", since, "nginx")
        # The hostile request was the last one sent.
        if "[31mred" in log or time.monotonic() > deadline:
            return log, secrets, since
        time.sleep(0.2)


@pytest.fixture(scope="module")
def records(traffic):
    log = traffic[0]
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def mine(records, **fields):
    return [r for r in records if all(r[name] == value for name, value in fields.items())]


def test_access_log_every_line_json_with_fields_or_error_log(traffic):
    log = traffic[0]
    lines = log.splitlines()
    assert any(line.startswith("{") for line in lines)
    for line in lines:
        if not line.startswith("{"):
            assert ERROR_LOG_LINE.match(line), line
            continue
        record = json.loads(line)
        assert set(record) == FIELDS, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", record["time"])
        ipaddress.ip_address(record["client"])
        for name in ("status", "bytes_in", "bytes_out"):
            assert type(record[name]) is int, line
        assert isinstance(record["duration"], float | int)
        assert record["verdict"] in {"", "cached", "checked", "refused", "throttled"}, line
        assert "?" not in record["path"], line


def test_access_log_user_checked_then_cached_path_without_query(records):
    searches = mine(records, user=USER, method="GET", path=SEARCH)
    assert [(r["status"], r["kind"], r["verdict"]) for r in searches] == [
        (200, "password", "checked"),
        (200, "password", "cached"),
    ]
    assert all(r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in searches)


def test_access_log_token_named_and_refused_for_its_role(records):
    assert [
        (r["method"], r["path"], r["status"], r["kind"], r["verdict"])
        for r in mine(records, user=TOKEN)
    ] == [
        ("GET", SEARCH, 200, "token", "checked"),
        ("POST", "/api/2.0/mlflow/experiments/create", 403, "token", "refused"),
    ]


def test_access_log_wrong_password_refused_without_user(records):
    refused = mine(records, status=401, path=SEARCH)
    assert [(r["user"], r["kind"], r["verdict"]) for r in refused] == [("", "", "refused")]


def test_access_log_artifact_download_names_user_and_public_path(records):
    downloads = mine(records, user=USER, method="GET", status=200)
    assert "/api/2.0/mlflow-artifacts/artifacts/0/acct/artifacts/a.txt" in [
        r["path"] for r in downloads
    ]
    assert not [r for r in records if "_artifact_files" in r["path"]]


def test_access_log_long_path_cut_to_512_characters(records):
    (record,) = [r for r in records if r["path"].startswith(LONG_PATH[:40])]
    assert record["path"] == LONG_PATH[:512] and record["status"] == 401


def test_access_log_hostile_path_logged_as_escaped_json(traffic, records):
    assert "\x1b" not in traffic[0]
    hostile = mine(records, status=400)
    assert [(r["path"], r["verdict"]) for r in hostile] == [("/api/\x1b[31mred", "")]


@pytest.mark.parametrize(
    "secret",
    ["password", "wrong password", "token", "cookie", "query secret", "Basic credentials",
     "wrong Basic credentials"],
)  # fmt: skip
def test_access_log_holds_no_secret(traffic, secret):
    log, secrets, _ = traffic
    assert secrets[secret] not in log


def test_access_log_holds_no_header_or_query_string(traffic):
    log = traffic[0]
    for text in ("Authorization", "Basic ", "Bearer", "Cookie", "session=", "max_results"):
        assert text not in log


def test_stackctl_audit_user_json_finds_the_users_requests(traffic):
    since = traffic[2]
    result = host_stackctl("audit", "--user", USER, "--since", since, "--json")
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    calls = [(r["method"], r["path"], r["status"], r["verdict"]) for r in found]
    assert calls[:4] == [
        ("GET", SEARCH, 200, "checked"),
        ("GET", SEARCH, 200, "cached"),
        ("POST", "/api/2.0/mlflow/experiments/create", 200, "checked"),
        ("POST", "/api/2.0/mlflow/experiments/delete", 200, "checked"),
    ]
    assert {r["user"] for r in found} == {USER}


def test_stackctl_audit_who_called_delete_table(traffic):
    result = host_stackctl(
        "audit", "--since", traffic[2], "--method", "post", "--path-contains", "experiments/delete"
    )
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:2] == ["TIME", "USER"]
    assert [row.split()[1] for row in rows] == [USER]


def test_stackctl_audit_hostile_path_printed_escaped(traffic):
    result = host_stackctl("audit", "--since", traffic[2], "--path-contains", "red")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "/api/\\x1b[31mred" in result.stdout


def test_stackctl_audit_bad_time_one_line_exit_2(stack):
    result = host_stackctl("audit", "--since", "last tuesday")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("stackctl: audit: --since:") and result.stderr.count("\n") == 1
