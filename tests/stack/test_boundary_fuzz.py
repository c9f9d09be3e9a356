"""Fuzzing the edge: thousands of malformed requests, none of which may reach MLflow unverified.

Seeded, so a failure replays. Each generated request mixes random bytes and encodings in the
method, the path and the headers (control characters raw and encoded, smuggling headers,
forged internal headers, odd bodies); after every few, unauthenticated probes for a read, a
write and an admin call. Checked from both ends: no probe and no generated request without a
password is answered 2xx (``/healthz`` aside), and the server logged no request that came
without nginx's secret or without a verified user.
"""

import concurrent.futures
import random

import requests

SEED = 20261127
COUNT = 3000

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"get", b"G\x00T",
           b"GET\r\nX", b"M-SEARCH", b"A" * 40, b"POST /x HTTP/1.1\r\n\r\nGET", b""]  # fmt: skip
PATHS = [
    b"/api/2.0/mlflow/experiments/search",
    b"/api/2.0/mlflow/experiments/create",
    b"/api/2.0/mlflow/runs/search",
    b"/api/3.0/mlflow/gateway/secrets/list",
    b"/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/a.bin",
    b"/ajax-api/2.0/mlflow/experiments/search",
    b"/graphql",
    b"/health",
    b"/healthz",
    b"/_gate",
    b"/_auth",
    b"/_artifact_files/0/x",
    b"/",
]
PIECES = [b"%0D%0A", b"%0A", b"%0D", b"%00", b"%7F", b"%2F", b"%2E%2E", b"/../", b"//", b"%25",
          b"\r\n", b"\n", b"\r", b"\x00", b"\t", b" ", b"\x7f", b"\xff", b"%C0%AF", b"?a=%0D%0A",
          b"#x", b";x", b"%u000d", b"\\", b"@", b"http://evil/"]  # fmt: skip
HEADERS = [
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5",
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Content-Length: -1",
    b"Transfer-Encoding: identity, chunked",
    b" Transfer-Encoding: chunked",
    b"Transfer-Encoding : chunked",
    b"X-Original-Path: /health",
    b"X-Original-Method: GET",
    b"X-Gate-Nonce: 00000000000000000000000000000000",
    b"X-Gate-User: admin",
    b"X-Stack-User: admin",
    b"X-Stack-Proxy-Secret: " + b"0" * 64,
    b"X-Forwarded-For: 127.0.0.1",
    b"Authorization: Bearer mlst_" + b"A" * 40,
    b"Authorization: Basic",
    b"Authorization: Basic %%%",
    b"Authorization: Negotiate abc",
    b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket",
    b"Expect: 100-continue",
    b"Origin: http://evil.example",
    b"Host: evil.example",
    b"X-HTTP-Method-Override: DELETE",
    b"X-Folded: a\r\n b",
    b"Bad Header Name: x",
    b"X-Nul: a\x00b",
    b"X-Cr: a\rb",
]
BODIES = [b"", b"{}", b'{"name":"fuzz"}', b"0\r\n\r\n",
          b"5\r\nhello\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n"]  # fmt: skip
PROBES = [
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1"),
    ("POST", "/api/2.0/mlflow/experiments/create"),
    ("GET", "/api/3.0/mlflow/gateway/secrets/list"),
    ("POST", "/api/2.0/mlflow/runs/search"),
]


def generate(rng: random.Random) -> tuple[bytes, bytes]:
    """One malformed request and the path it names (to tell /healthz apart)."""
    path = rng.choice(PATHS)
    for _ in range(rng.randrange(0, 4)):
        cut = rng.randrange(0, len(path) + 1)
        piece = rng.choice(PIECES) if rng.random() < 0.8 else bytes([rng.randrange(256)])
        path = path[:cut] + piece + path[cut:]
    method = rng.choice(METHODS)
    headers = [b"Host: 127.0.0.1"] if rng.random() < 0.9 else []
    headers += rng.sample(HEADERS, rng.randrange(0, 4))
    body = rng.choice(BODIES)
    version = rng.choice([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])
    request = method + b" " + path + b" " + version + b"\r\n"
    request += b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    return request, path


def _run(stack, index: int) -> list[str]:
    rng = random.Random(SEED + index)
    request, path = generate(rng)
    problems = []
    status = stack.raw(request, timeout=5)
    if 200 <= status < 300 and not path.startswith(b"/healthz"):
        problems.append(f"{status} for generated request {request!r}")
    if index % 3 == 0:
        method, probe = PROBES[index // 3 % len(PROBES)]
        answer = requests.request(method, stack.url + probe, json={"name": f"fuzz-{index}"})
        if answer.status_code != 401:
            problems.append(f"{answer.status_code} for probe {method} {probe} after {request!r}")
    return problems


def test_generated_requests_never_reach_mlflow_unverified(stack, admin):
    since = stack.now()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = [p for found in pool.map(lambda i: _run(stack, i), range(COUNT)) for p in found]
    assert problems == []
    assert stack.unverified_requests_seen_by_server(since) == []
    search = requests.post(
        stack.url + "/api/2.0/mlflow/experiments/search",
        json={"max_results": 1000, "filter": "name LIKE 'fuzz%'"},
        auth=admin,
    )
    assert search.status_code == 200 and search.json().get("experiments", []) == []
    # The stack still serves its users.
    url = stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, auth=admin).ok
