"""Replicas (README, "Replicas"): a PostgreSQL stack with SERVER_REPLICAS=3.

Invariants: nginx sends requests to every replica; while one replica is killed (the whole
container, `docker kill`) and started again, clients that log through the real MLflow client
(which retries as it always does) see no error, and every write a client saw acknowledged is in
the database afterwards; the server refuses several replicas on the SQLite file.
"""

import json
import subprocess
import threading
import time

import pytest
import requests
import test_postgres
from conftest import PROJECT, SecondStack
from mlflow import MlflowClient

REPLICAS = 3
CLIENTS = 4
# Local port 5000 (hex) and state ESTABLISHED in /proc/net/tcp.
SERVER_PORT, ESTABLISHED = ":1388 ", " 01 "


class ReplicatedStack(test_postgres.PostgresStack):
    def __init__(self):
        SecondStack.__init__(
            self, "rep", env={"COMPOSE_PROFILES": "postgres", "SERVER_REPLICAS": str(REPLICAS)}
        )

    def replicas(self) -> list[str]:
        return sorted(self.compose("ps", "-q", "server").split())

    @staticmethod
    def inspect_container(container: str) -> dict:
        result = subprocess.run(["docker", "inspect", container], capture_output=True,
                                text=True, check=True)  # fmt: skip
        return json.loads(result.stdout)[0]


@pytest.fixture(scope="module")
def replicated(stack):
    with ReplicatedStack() as second:
        yield second


@pytest.fixture
def client(replicated, monkeypatch):
    name, password = replicated.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(replicated.url)


def _established(container: str) -> int:
    table = subprocess.run(
        ["docker", "exec", container, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(1 for line in table.splitlines() if SERVER_PORT in line and ESTABLISHED in line)


def test_every_replica_serves(replicated):
    containers = replicated.replicas()
    assert len(containers) == REPLICAS
    auth = replicated.admin()
    with requests.Session() as session:
        for _ in range(30):
            answer = session.get(
                f"{replicated.url}/api/2.0/mlflow/experiments/search?max_results=5",
                auth=auth, timeout=30,
            )  # fmt: skip
            assert answer.status_code == 200, answer.text
    # nginx keeps its connections to each replica it used open (keepalive).
    assert all(_established(container) > 0 for container in containers)


def test_replica_killed_no_client_error_no_acknowledged_write_lost(replicated, client):
    experiment = client.create_experiment("replica-kill")
    runs = [client.create_run(experiment).info.run_id for _ in range(CLIENTS)]
    acknowledged: dict[str, list[int]] = {run: [] for run in runs}
    errors: list[str] = []
    stop = threading.Event()

    def log(run_id: str) -> None:
        step = 0
        while not stop.is_set():
            try:
                client.log_metric(run_id, "m", float(step), step=step)
                acknowledged[run_id].append(step)
            except Exception as error:  # any failure a user would see
                errors.append(f"{run_id} step {step}: {type(error).__name__}: {error}"[:300])
            step += 1

    threads = [threading.Thread(target=log, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    try:
        time.sleep(4)
        victim = replicated.replicas()[1]
        subprocess.run(["docker", "kill", victim], capture_output=True, check=True)
        killed_at = {run: len(steps) for run, steps in acknowledged.items()}
        time.sleep(10)
        subprocess.run(["docker", "start", victim], capture_output=True, check=True)
        deadline = time.monotonic() + 120
        while (
            replicated.inspect_container(victim)["State"].get("Health", {}).get("Status")
            != "healthy"
        ):
            assert time.monotonic() < deadline, "the killed replica did not get healthy again"
            time.sleep(1)
        time.sleep(4)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    for run, steps in acknowledged.items():
        # Writes went on while the replica was down, not just before and after.
        assert len(steps) > killed_at[run] + 5, (killed_at[run], len(steps))
        stored = {int(m.step) for m in client.get_metric_history(run, "m")}
        assert set(steps) <= stored, sorted(set(steps) - stored)[:10]


def test_several_replicas_on_sqlite_refused_with_one_line(stack):
    result = subprocess.run(
        ["docker", "run", "--rm", "-e", "SERVER_REPLICAS=3", f"{PROJECT}-server"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "start: SERVER_REPLICAS=3 needs PostgreSQL (COMPOSE_PROFILES=postgres or DATABASE_URI): "
        "replicas cannot share the SQLite file"
    )
