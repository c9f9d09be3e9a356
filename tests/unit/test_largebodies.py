"""server/largebodies.py: large bodies one at a time per worker, and none MLflow would blow up."""

import asyncio
import json

import largebodies
import pytest


def _scope(method="POST", path="/api/2.0/mlflow/runs/search", headers=()):
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


def _length(body: bytes):
    return [(b"content-length", b"%d" % len(body))]


class Recorder:
    """A stand-in for MLflow's app: records the body it read; a large one may wait to be
    released."""

    def __init__(self, hold: asyncio.Event | None = None):
        self.bodies, self.hold = [], hold

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if self.hold is not None and len(body) > largebodies.SMALL_BODY:
            await self.hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(app, scope, chunks, delay=0.0):
    """(status, headers, body) of one request whose body arrives in ``chunks``."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = []

    async def receive():
        if delay:
            await asyncio.sleep(delay)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent)


def test_structure_count_counts_commas_brackets_braces_inside_strings_too():
    assert largebodies.structure_count(b'{"a": [1, 2], "b": "x,y{"}') == 6


def test_large_bodies_small_body_passes_untouched():
    app = Recorder()
    body = json.dumps({"experiment_ids": ["0"] * 100}).encode()
    status, _, _ = asyncio.run(
        _call(largebodies.LargeBodies(app), _scope(headers=_length(body)), [body])
    )
    assert status == 200 and app.bodies == [body]


def test_large_bodies_too_much_structure_413_never_reaches_mlflow():
    app = Recorder()
    body = json.dumps({"experiment_ids": ["0"] * (largebodies.MAX_STRUCTURE + 1)}).encode()
    scope = _scope(headers=_length(body))
    status, _, answer = asyncio.run(
        _call(largebodies.LargeBodies(app), scope, [body[:1000], body[1000:]])
    )
    assert status == 413 and app.bodies == []
    assert json.loads(answer)["error_code"] == "RESOURCE_LIMIT_EXCEEDED"


def test_large_bodies_double_encoded_structure_counted():
    app = Recorder()
    inner = json.dumps({"experiment_ids": ["0"] * (largebodies.MAX_STRUCTURE + 1)})
    body = json.dumps(inner).encode()  # MLflow decodes such a string a second time
    status, _, _ = asyncio.run(
        _call(largebodies.LargeBodies(app), _scope(headers=_length(body)), [body])
    )
    assert status == 413 and app.bodies == []


def test_large_bodies_log_batch_at_mlflow_limits_reaches_mlflow_whole():
    """The largest legitimate call: log-batch with MLflow's most metrics, params and tags,
    every key and value as long as MLflow allows, values non-ASCII (escaped by the client),
    and a thousand commas in every param and tag (lists logged as text)."""
    long_key = "k" * 250
    body = json.dumps(
        {
            "run_id": "a" * 32,
            "metrics": [
                {"key": f"{long_key}{i}"[-250:], "value": 0.5, "timestamp": 1, "step": i}
                for i in range(1000)
            ],
            "params": [{"key": f"p{i}", "value": ("é" * 5 + ",") * 1000} for i in range(100)],
            "tags": [{"key": f"t{i}", "value": ("é" * 7 + ",") * 1000} for i in range(100)],
        }
    ).encode()
    app = Recorder()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    status, _, _ = asyncio.run(
        _call(largebodies.LargeBodies(app), _scope(headers=_length(body)), chunks)
    )
    assert status == 200 and app.bodies == [body]


def test_large_bodies_chunked_body_of_unknown_length_held_and_counted():
    app = Recorder()
    body = b"[" + b"0," * largebodies.MAX_STRUCTURE + b"0]"
    scope = _scope(headers=[(b"transfer-encoding", b"chunked")])
    status, _, _ = asyncio.run(_call(largebodies.LargeBodies(app), scope, [body]))
    assert status == 413 and app.bodies == []


def test_large_bodies_second_large_body_waits_then_503_retry_after():
    async def scenario():
        hold = asyncio.Event()
        app = Recorder(hold)
        middleware = largebodies.LargeBodies(app, slot_wait=0.2)
        body = b"x" * (largebodies.SMALL_BODY + 1)
        first = asyncio.create_task(_call(middleware, _scope(headers=_length(body)), [body]))
        await asyncio.sleep(0.05)
        second = await _call(middleware, _scope(headers=_length(body)), [body])
        small = await _call(middleware, _scope(headers=_length(b"{}")), [b"{}"])
        hold.set()
        third = await _call(middleware, _scope(headers=_length(body)), [body])
        return await first, second, small, third

    first, second, small, third = asyncio.run(scenario())
    assert first[0] == 200 and third[0] == 200
    assert second[0] == 503 and second[1][b"retry-after"] == b"5"
    assert small[0] == 200  # small bodies never wait for the slot


def test_large_bodies_artifact_put_streams_without_the_slot():
    async def scenario():
        hold = asyncio.Event()
        middleware = largebodies.LargeBodies(Recorder(hold), slot_wait=0.2)
        body = b"x" * (largebodies.SMALL_BODY + 1)
        first = asyncio.create_task(_call(middleware, _scope(headers=_length(body)), [body]))
        await asyncio.sleep(0.05)
        put = _scope(
            "PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/m.bin", _length(body)
        )
        middleware.app = Recorder()
        answer = await _call(middleware, put, [body[:10], body[10:]])
        hold.set()
        await first
        return answer

    assert asyncio.run(scenario())[0] == 200


def test_large_bodies_body_slower_than_read_time_408_and_slot_freed():
    async def scenario():
        middleware = largebodies.LargeBodies(Recorder(), read_time=0.1)
        body = b"x" * (largebodies.SMALL_BODY + 1)
        slow = await _call(middleware, _scope(headers=_length(body)), [body[:10], body[10:]], 0.08)
        fast = await _call(middleware, _scope(headers=_length(body)), [body])
        return slow, fast

    slow, fast = asyncio.run(scenario())
    assert slow[0] == 408 and fast[0] == 200


def test_large_bodies_slot_freed_when_mlflow_raises():
    async def failing(scope, receive, send):
        await receive()
        raise RuntimeError("MLflow failed")

    async def scenario():
        middleware = largebodies.LargeBodies(failing, slot_wait=0.1)
        body = b"x" * (largebodies.SMALL_BODY + 1)
        with pytest.raises(RuntimeError):
            await _call(middleware, _scope(headers=_length(body)), [body])
        middleware.app = Recorder()
        return await _call(middleware, _scope(headers=_length(body)), [body])

    assert asyncio.run(scenario())[0] == 200


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([], (False, None)),
        ([(b"content-length", b"0")], (False, 0)),
        ([(b"content-length", b"12")], (True, 12)),
        ([(b"content-length", b"x")], (True, None)),
        ([(b"transfer-encoding", b"chunked")], (True, None)),
    ],
)
def test_declared_body_cases(headers, expected):
    assert largebodies.declared_body(headers) == expected


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"GZIP", b"br", b"identity, gzip"])
def test_large_bodies_compressed_body_415_never_reaches_mlflow(encoding):
    """A 1.5 MB gzip body inflated to 1.5 GB in MLflow's trace intake; small ones too."""
    app = Recorder()
    body = b"\x1f\x8b" + b"\0" * 100
    headers = [*_length(body), (b"content-encoding", encoding)]
    scope = _scope(path="/v1/traces", headers=headers)
    status, _, answer = asyncio.run(_call(largebodies.LargeBodies(app), scope, [body]))
    assert status == 415 and app.bodies == []
    assert "uncompressed" in json.loads(answer)["message"]


def test_large_bodies_identity_encoding_passes():
    app = Recorder()
    headers = [*_length(b"{}"), (b"content-encoding", b"identity")]
    status, _, _ = asyncio.run(
        _call(largebodies.LargeBodies(app), _scope(headers=headers), [b"{}"])
    )
    assert status == 200 and app.bodies == [b"{}"]
