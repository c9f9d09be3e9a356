"""One request's answer can never be read as another's, even on a desynchronised connection.

A second nginx of the stack's own image asks the real gate through tests/stack/desync_gate.py,
which hands every question the answer to the previous one (the first: a smuggled /health 204).
Without the nonce check in nginx/njs/verdicts.js, that 204 let an anonymous request in.
"""

import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import PROJECT, _free_port

HERE = Path(__file__).resolve().parent
DESYNC = f"{PROJECT}-desync-gate"
EDGE = f"{PROJECT}-desync-nginx"


@pytest.fixture(scope="module")
def desync_edge(stack):
    port = _free_port()
    script = HERE / "desync_gate.py"
    try:
        stack.compose(
            "run", "-d", "--rm", "--no-deps", "--name", DESYNC,
            "-v", f"{script}:/opt/desync_gate.py:ro",
            # As the auth service: on the gate's network (stackctl has none).
            "--entrypoint", "python3", "auth", "/opt/desync_gate.py", "auth", "8000",
        )  # fmt: skip
        stack.compose(
            "run", "-d", "--rm", "--no-deps", "--name", EDGE,
            "-e", f"GATE_UPSTREAM={DESYNC}:8000", "-p", f"127.0.0.1:{port}:8080", "nginx",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/healthz", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        subprocess.run(["docker", "rm", "-f", EDGE, DESYNC], capture_output=True, check=False)


def test_desynchronised_gate_answers_grant_nothing(desync_edge, stack):
    since = stack.now()
    statuses = []
    with requests.Session() as session:  # one connection, so it meets the same gate connection
        for index in range(60):
            path = ["/api/2.0/mlflow/experiments/search", "/api/3.0/mlflow/gateway/secrets/list"]
            # "localhost": a name the test stack's PUBLIC_HOSTNAME allows on any port.
            answer = session.get(desync_edge + path[index % 2], headers={"Host": "localhost"})
            statuses.append(answer.status_code)
    assert not [s for s in statuses if s < 400], statuses
    logs = subprocess.run(["docker", "logs", EDGE], capture_output=True, text=True)
    assert "without this request's nonce" in logs.stdout + logs.stderr
    assert stack.unverified_requests_seen_by_server(since) == []
