"""server/guard.py: MLflow sees only requests nginx vouched for, with the origin and artifact
location rules of issue 9."""

import asyncio
import json

import guard
import identity
import pytest

SECRET = b"ab" * 32


LIMIT = 1 << 20


def run(
    app, method="GET", path="/api/2.0/mlflow/experiments/search", headers=(), body=b"", query=b""
):
    """Call the guard as uvicorn would; (status, body, what the wrapped app saw or None)."""
    seen = {}

    async def inner(scope, receive, send):
        body_read = b""
        while True:
            message = await receive()
            body_read += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.update(scope=scope, body=body_read)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    chunks = body if isinstance(body, list) else [body]
    messages = iter(
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    )

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    asyncio.run(guard.Guard(inner, SECRET, LIMIT)(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), seen or None


FROM_NGINX = (("X-Stack-Proxy-Secret", SECRET.decode()), ("X-Stack-User", "alice"))


def test_guard_request_from_nginx_with_user_reaches_mlflow():
    status, _, seen = run([], headers=FROM_NGINX)
    assert status == 200 and seen is not None


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("X-Stack-User", "alice"),),
        (("X-Stack-Proxy-Secret", "ab" * 31 + "ac"), ("X-Stack-User", "alice")),
        (("X-Stack-Proxy-Secret", SECRET.decode()),),
        (("X-Stack-Proxy-Secret", SECRET.decode()), ("X-Stack-User", "")),
        (("X-Stack-Proxy-Secret", SECRET.decode()), ("X-Stack-User", "a b")),
        (("Authorization", "Bearer " + "ab" * 31),),
        (("Authorization", "Basic " + SECRET.decode()),),
    ],
)
def test_guard_without_secret_or_user_403_never_reaches_mlflow(headers, caplog):
    status, _, seen = run([], headers=headers)
    assert status == 403 and seen is None
    assert "refused:" in caplog.text


def test_guard_health_without_secret_reaches_mlflow():
    assert run([], path="/health")[2] is not None
    assert run([], method="POST", path="/health")[0] == 403


def test_guard_internal_bearer_secret_reaches_mlflow():
    status, _, seen = run([], headers=(("Authorization", "Bearer " + SECRET.decode()),))
    assert status == 200 and seen is not None


def test_guard_mixed_case_host_lowered_for_mlflow():
    _, _, seen = run([], headers=(*FROM_NGINX, ("Host", "MLflow.Example.COM:8080")))
    assert dict(seen["scope"]["headers"])[b"host"] == b"mlflow.example.com:8080"


@pytest.mark.parametrize(
    "origin,host,ok",
    [
        ("http://box:8080", "box:8080", True),
        ("https://BOX:8080", "box:8080", True),
        ("http://evil.example", "box:8080", False),
        ("http://box", "box:8080", False),
        ("http://localhost:1234", "localhost:18080", False),
        ("null", "box", False),
        ("http://box/path", "box", False),
        ("", "box", False),
    ],
)
def test_origin_allowed_cases(origin, host, ok):
    assert guard.origin_allowed(origin, host) is ok


def test_guard_foreign_origin_write_403_read_passes():
    headers = (*FROM_NGINX, ("Host", "box:8080"), ("Origin", "http://evil.example"))
    path = "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model.pkl"
    assert run([], method="PUT", path=path, headers=headers)[0] == 403
    assert run([], method="GET", path=path, headers=headers)[0] == 200
    same = (*FROM_NGINX, ("Host", "box:8080"), ("Origin", "http://box:8080"))
    assert run([], method="PUT", path=path, headers=same)[0] == 200


@pytest.mark.parametrize(
    "body",
    [
        {"name": "e", "artifact_location": "/var/lib/mlflow/db/evil"},
        {"name": "e", "artifact_location": "file:///tmp/x"},
        {"name": "e", "artifactLocation": "file:///tmp/x"},
        {"name": "e", "artifact_location": "mlflow-artifacts:/../db"},
        {"name": "e", "artifact_location": "mlflow-artifacts:/a/../../db"},
        {"name": "e", "artifact_location": "s3://bucket/x"},
        {"name": "e", "artifact_location": "mlflow-artifacts://host/x"},
        {"name": "e", "artifact_location": ["file:///tmp"]},
    ],
)
def test_guard_create_experiment_outside_artifact_root_400_mlflow_error(body):
    for prefix in ("/api", "/ajax-api"):
        status, answer, seen = run(
            [],
            method="POST",
            path=prefix + "/2.0/mlflow/experiments/create",
            headers=FROM_NGINX,
            body=json.dumps(body).encode(),
        )
        assert status == 400 and seen is None
        assert json.loads(answer)["error_code"] == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "e"},
        {"name": "e", "artifact_location": ""},
        {"name": "e", "artifact_location": "mlflow-artifacts:/team-a/e1"},
    ],
)
def test_guard_create_experiment_under_root_reaches_mlflow_with_body(body):
    raw = json.dumps(body).encode()
    status, _, seen = run(
        [],
        method="POST",
        path="/api/2.0/mlflow/experiments/create",
        headers=FROM_NGINX,
        body=raw,
    )
    assert status == 200 and seen["body"] == raw


def test_artifact_location_problem_utf16_body_parsed_like_flask():
    body = json.dumps({"name": "e", "artifact_location": "file:///x"}).encode("utf-16")
    assert guard.artifact_location_problem(body) is not None


def test_artifact_location_problem_not_json_refused():
    assert guard.artifact_location_problem(b"name=e&artifact_location=file:///x") is not None


def test_read_secret_malformed_guard_error(tmp_path):
    (tmp_path / "s").write_text("not-hex\n")
    with pytest.raises(guard.GuardError):
        guard.read_secret(tmp_path / "s")
    with pytest.raises(guard.GuardError):
        guard.read_secret(tmp_path / "missing")
    (tmp_path / "s").write_text("ab" * 32 + "\n")
    assert guard.read_secret(tmp_path / "s") == SECRET


def test_guard_double_encoded_json_location_checked_like_mlflow():
    inner = json.dumps({"name": "e", "artifact_location": "file:///var/lib/mlflow/db"})
    status, _, seen = run(
        [],
        method="POST",
        path="/api/2.0/mlflow/experiments/create",
        headers=FROM_NGINX,
        body=json.dumps(inner).encode(),
    )
    assert status == 400 and seen is None


def test_artifact_location_problem_not_an_object_refused():
    assert guard.artifact_location_problem(b"[1, 2]") is not None
    assert guard.artifact_location_problem(json.dumps(json.dumps([1])).encode()) is not None


def test_guard_large_declared_body_413_unless_artifact_put():
    headers = (*FROM_NGINX, ("Content-Length", str(LIMIT + 1)))
    path = "/api/2.0/mlflow-artifacts/artifacts"
    for method in ("GET", "POST", "DELETE"):
        assert run([], method=method, path=path, headers=headers)[0] == 413
    put = "/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/big.bin"
    body = b"x" * (LIMIT + 1)
    assert run([], method="PUT", path=put, headers=headers, body=body)[0] == 200


def test_guard_streamed_body_past_limit_abandoned():
    chunks = [b"x" * (LIMIT // 2)] * 3
    with pytest.raises(guard.BodyTooLarge):
        run([], method="POST", path="/api/2.0/mlflow/runs/search", headers=FROM_NGINX, body=chunks)


def test_guard_secret_and_identity_headers_not_passed_to_mlflow():
    extra = (("X-Stack-Role", "viewer"), ("X-Stack-Auth", "token"), ("X-Other", "kept"))
    _, _, seen = run([], headers=(*FROM_NGINX, *extra))
    names = {name for name, _ in seen["scope"]["headers"]}
    assert not {n for n in names if n.startswith(b"x-stack-")}
    assert b"x-other" in names
    assert seen["scope"]["state"]["stack_user"] == identity.Identity("alice", "viewer", "token")
    bearer = (("Authorization", "Bearer " + SECRET.decode()),)
    _, _, internal = run([], headers=bearer)
    assert b"authorization" not in {name for name, _ in internal["scope"]["headers"]}


def test_parse_size_nginx_syntax():
    assert guard.parse_size("32m") == 32 << 20
    assert guard.parse_size("512k") == 512 << 10
    assert guard.parse_size("1000") == 1000
    with pytest.raises(guard.GuardError):
        guard.parse_size("1g")


@pytest.mark.parametrize(
    "path", ["/api/2.0/mlflow/users/current", "/ajax-api/2.0/mlflow/users/current"]
)
def test_guard_current_user_answered_from_verified_identity(path):
    headers = (*FROM_NGINX[:1], ("X-Stack-User", "j%C3%B6rg"), ("X-Stack-Role", "admin"))
    status, body, seen = run([], path=path, headers=headers)
    assert status == 200 and seen is None
    answer = json.loads(body)
    assert answer["user"]["username"] == "jörg" and answer["user"]["is_admin"] is True
    assert answer["is_basic_auth"] is False


def test_guard_current_user_without_identity_refused():
    status, _, seen = run([], path="/api/2.0/mlflow/users/current", headers=FROM_NGINX[:1])
    assert status == 403 and seen is None


def test_guard_identity_visible_to_app_only_during_its_request():
    seen = []

    async def app(scope, receive, send):
        seen.append(identity.current())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def both():
        wrapped = guard.Guard(app, SECRET, LIMIT)
        scope = {"type": "http", "method": "GET", "path": "/api/2.0/mlflow/experiments/search"}

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            pass

        headers = [(b"x-stack-proxy-secret", SECRET), (b"x-stack-user", b"alice")]
        await wrapped({**scope, "headers": headers}, receive, send)
        bearer = [(b"authorization", b"Bearer " + SECRET)]
        await wrapped({**scope, "headers": bearer}, receive, send)
        return identity.current()

    after = asyncio.run(both())
    assert [who and who.name for who in seen] == ["alice", None] and after is None


def test_guard_account_page_calls_answer_own_role_only():
    headers = (*FROM_NGINX, ("X-Stack-Role", "viewer"))
    base = "/ajax-api/3.0/mlflow/users"
    status, body, seen = run([], path=base + "/current/permissions", headers=headers)
    assert status == 200 and seen is None
    assert {row["permission"] for row in json.loads(body)["permissions"]} == {"READ"}
    status, body, _ = run([], path=base + "/roles/list", headers=headers)
    assert status == 200 and json.loads(body)["roles"][0]["name"] == "viewer"


def test_guard_other_users_roles_403_mlflow_error():
    headers = (*FROM_NGINX, ("X-Stack-Role", "admin"))
    status, body, seen = run(
        [], path="/ajax-api/3.0/mlflow/users/roles/list", headers=headers, query=b"username=bob"
    )
    assert status == 403 and seen is None
    assert json.loads(body)["error_code"] == "PERMISSION_DENIED"
