"""Issue 9, critical: a control character in the path once split nginx's question to the gate
in two, and the smuggled answer let the next client in without a password.

What must hold, checked from both ends: such a request is refused with 400 before anything
else, no unauthenticated request that follows it gets anything, and the server logs no request
without a verified user.
"""

import concurrent.futures
import itertools
import uuid

import pytest
import requests

REPORTED = "/x%0D%0A%0D%0AGET%20/health%20HTTP/1.1%0D%0AX-Pad:%20x"
CONTROLS = ["%0D%0A", "%0A", "%0D", "%00", "%0d%0a", "%09", "%1F", "%7F"]


def splitting_paths():
    yield REPORTED
    for ctrl in CONTROLS:
        yield f"/x{ctrl}{ctrl}GET%20/health%20HTTP/1.1{ctrl}X-Pad:%20x"
        yield f"/{ctrl}api/2.0/mlflow/experiments/search"
        yield f"/api/2.0/mlflow/{ctrl}experiments/search"
        yield f"/api/2.0/mlflow/experiments/search{ctrl}"
        yield f"/api/2.0/mlflow/experiments/create{ctrl}"
        yield f"/healthz{ctrl}"


PATHS = list(splitting_paths())

PROBES = [
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1", None),  # read
    ("POST", "/api/2.0/mlflow/experiments/create", "pwned"),  # write
    ("GET", "/api/3.0/mlflow/gateway/secrets/list", None),  # admin
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1", "bearer"),  # a bogus header
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_control_character_in_path_400(stack, path, method):
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    assert stack.raw(request.encode()) == 400


def _probe(stack, probe) -> int:
    method, path, kind = probe
    headers = {"Content-Type": "application/json"}
    body = None
    if kind == "pwned":
        body = f'{{"name": "pwned-{uuid.uuid4().hex}"}}'
    elif kind == "bearer":
        headers["Authorization"] = "Bearer not-a-token"
    return requests.request(method, stack.url + path, headers=headers, data=body).status_code


def _attack_then_probe(stack, round_number: int) -> list[tuple[str, int]]:
    path = PATHS[round_number % len(PATHS)]
    with requests.Session() as session:
        # --path-as-is: requests keeps an already percent-encoded path as it is.
        session.get(stack.url + path)
    probe = PROBES[round_number % len(PROBES)]
    return [(f"{probe[0]} {probe[1]} after {path}", _probe(stack, probe))]


def test_splitting_then_unauthenticated_requests_never_granted(stack, admin):
    since = stack.now()
    # 8 at a time, 400 rounds: nginx keeps up to 32 connections to the gate per worker, and
    # concurrency makes it use many of them.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(
            itertools.chain.from_iterable(
                pool.map(lambda n: _attack_then_probe(stack, n), range(400))
            )
        )
    granted = [(what, status) for what, status in outcomes if status != 401]
    assert granted == []
    search = requests.post(
        stack.url + "/api/2.0/mlflow/experiments/search",
        json={"max_results": 1000, "filter": "name LIKE 'pwned-%'"},
        auth=admin,
    )
    assert search.status_code == 200 and search.json().get("experiments", []) == []
    assert stack.unverified_requests_seen_by_server(since) == []


def test_lone_crlf_at_end_next_user_unaffected(stack, admin):
    url = stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    for _ in range(50):
        requests.get(stack.url + "/api/2.0/mlflow/experiments/search%0D%0A", auth=admin)
        assert requests.get(url, auth=admin).status_code == 200
