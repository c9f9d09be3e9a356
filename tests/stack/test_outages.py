"""Outages under load: nothing acknowledged is lost, and nothing unverified gets through.

Invariants, from the client's side: every write the MLflow client saw acknowledged is still
there after the server's whole container was killed with SIGKILL and started again, and no
artifact lists as complete unless every byte of it arrived (killing one process is not
enough: gunicorn would start a new worker, and the others would keep serving). While the gate
is down, no request is let through that the gate did not verify (fail closed); restarts of
nginx and the gate cost clients retries, never an error or a wrong answer; a stopped gate gets
every request a 503 with Retry-After (which clients retry), never a 500.

Clients keep writing through the kill, with the MLflow client's own retries, as a team's
training jobs would. A write the server committed but could not answer is retried by the
client and may land twice: metrics allow that, and the checks below accept it. The one failure
a client may see is the kill itself cutting the answer it was reading: nginx has passed the
answer's head on, and its body never comes (the client's retries cover connecting and the head,
not the body). So each client may see at most one such cut, at the kill, and nothing else.
"""

import hashlib
import os
import subprocess
import threading
import time
import uuid

import pytest
import requests
from mlflow import MlflowClient

WRITERS = 3
# Long enough for writes before, during and after the outage; bounded for CI.
BEFORE_KILL_SECONDS = 4
AFTER_RESTART_SECONDS = 4
ARTIFACT_SIZES = (256 * 1024, 2 * 1024 * 1024, 6 * 1024 * 1024)


class Writer(threading.Thread):
    """Logs one metric per step into its own run until told to stop; remembers each step the
    client saw acknowledged, and the errors that the client's retries did not hide."""

    def __init__(self, client, run_id, stop):
        super().__init__(daemon=True)
        self.client, self.run_id, self.stop = client, run_id, stop
        self.acknowledged, self.errors = [], []

    def run(self):
        step = 0
        while not self.stop.is_set():
            try:
                self.client.log_metric(self.run_id, "loss", 1.0 / (step + 1), step=step)
                self.acknowledged.append(step)
            except Exception as error:  # noqa: BLE001 - the outage's failures are counted
                self.errors.append((time.monotonic(), repr(error)[:200]))
            step += 1


class Uploader(threading.Thread):
    """Uploads artifacts of several sizes, each a fresh name; remembers every upload's
    checksum (acknowledged or not: an unacknowledged one may still have landed whole)."""

    def __init__(self, client, run_id, stop, directory):
        super().__init__(daemon=True)
        self.client, self.run_id, self.stop, self.directory = client, run_id, stop, directory
        self.sent, self.acknowledged, self.errors = {}, set(), []

    def run(self):
        number = 0
        while not self.stop.is_set():
            size = ARTIFACT_SIZES[number % len(ARTIFACT_SIZES)]
            name = f"part-{number:04d}.bin"
            data = os.urandom(size)
            path = self.directory / name
            path.write_bytes(data)
            self.sent[name] = hashlib.sha256(data).hexdigest()
            try:
                self.client.log_artifact(self.run_id, str(path), "uploads")
                self.acknowledged.add(name)
            except Exception as error:  # noqa: BLE001
                self.errors.append((time.monotonic(), repr(error)[:200]))
            path.unlink()
            number += 1


@pytest.fixture
def patient_client(mlflow_env, monkeypatch):
    """The MLflow client with retries that outlast a restart of the server (about 15 s here),
    as a long training job would set them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "8")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient()


def _kill_server_container(stack) -> None:
    container = stack.compose("ps", "-q", "server").split()[0]
    subprocess.run(["docker", "kill", "-s", "KILL", container], check=True, capture_output=True)


def test_server_container_killed_keeps_every_acknowledged_write(stack, patient_client, tmp_path):
    client = patient_client
    experiment_id = client.create_experiment(f"crash-{uuid.uuid4().hex[:8]}")
    stop = threading.Event()
    writers = _metric_writers(client, experiment_id, stop)
    uploader = Uploader(client, client.create_run(experiment_id).info.run_id, stop, tmp_path)
    uploader.start()

    time.sleep(BEFORE_KILL_SECONDS)
    acknowledged_before = sum(len(writer.acknowledged) for writer in writers)
    killed_at = time.monotonic()
    _kill_server_container(stack)
    stack.compose("up", "-d", "--wait", "--no-build", "server")
    restarted_at = time.monotonic()
    time.sleep(AFTER_RESTART_SECONDS)
    stop.set()
    for thread in (*writers, uploader):
        thread.join(timeout=120)
        assert not thread.is_alive(), "a client still waits on its request"

    # Clients really wrote before and after the kill, and the retries rode out the outage.
    assert acknowledged_before > 0
    for writer in writers:
        assert writer.acknowledged[-1] > acknowledged_before / WRITERS, writer.acknowledged[-5:]
    for thread in (*writers, uploader):
        _assert_only_cut_by_the_kill(thread.errors, killed_at, restarted_at)
    _assert_nothing_lost(client, writers)

    listed = {
        info.path.rsplit("/", 1)[1]: info.file_size
        for info in client.list_artifacts(uploader.run_id, "uploads")
    }
    assert uploader.acknowledged and uploader.acknowledged <= set(listed), sorted(
        uploader.acknowledged - set(listed)
    )
    # Every file that lists, acknowledged or not, is whole: its bytes are what was sent.
    download = tmp_path / "back"
    for name in listed:
        local = client.download_artifacts(uploader.run_id, f"uploads/{name}", str(download))
        with open(local, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == uploader.sent[name], name


def _metric_writers(client, experiment_id, stop, count=WRITERS):
    writers = [
        Writer(client, client.create_run(experiment_id).info.run_id, stop) for _ in range(count)
    ]
    for writer in writers:
        writer.start()
    return writers


# What urllib3 says when an answer's body stops short, or the connection dies under the client.
CUT_ANSWER_SIGNS = ("IncompleteRead", "Connection broken", "Connection aborted")


def _assert_only_cut_by_the_kill(errors, killed_at, restarted_at):
    """At most one error, an answer cut short, seen between the kill and the restart."""
    assert len(errors) <= 1, [message for _, message in errors]
    for seen_at, message in errors:
        assert any(sign in message for sign in CUT_ANSWER_SIGNS), message
        assert "Max retries" not in message, message  # the retries did not outlast the outage
        assert killed_at <= seen_at <= restarted_at, (seen_at - killed_at, message)


def _assert_nothing_lost(client, writers):
    for writer in writers:
        stored = {metric.step for metric in client.get_metric_history(writer.run_id, "loss")}
        lost = sorted(set(writer.acknowledged) - stored)
        assert lost == [], f"{len(lost)} acknowledged steps lost, e.g. {lost[:5]}"


def test_gate_and_nginx_restarted_under_load_cost_clients_nothing(stack, patient_client):
    client = patient_client
    experiment_id = client.create_experiment(f"restarts-{uuid.uuid4().hex[:8]}")
    stop = threading.Event()
    writers = _metric_writers(client, experiment_id, stop)
    time.sleep(2)
    counts = []
    for service in ("auth", "nginx"):
        stack.compose("restart", service)
        stack.compose("up", "-d", "--wait", "--no-build", service)
        counts.append(sum(len(writer.acknowledged) for writer in writers))
        time.sleep(2)
    stop.set()
    for writer in writers:
        writer.join(timeout=120)
        assert not writer.is_alive(), "a client still waits on its request"
    final = sum(len(writer.acknowledged) for writer in writers)
    assert 0 < counts[0] < counts[1] < final, (counts, final)
    for writer in writers:
        assert writer.errors == [], writer.errors[:3]
    _assert_nothing_lost(client, writers)


# Credentials the gate never verified (so nginx's memory of its answers cannot hold them), and
# hostile ones: while the gate is down, none of them may reach MLflow.
def _unverified_credentials(user, password):
    return [
        None,
        (user, password),
        (user, password + "x"),
        ("admin", "admin"),
        "Bearer " + "a" * 43,
        "Basic !!!",
        "Basic " + "x" * 5000,
    ]


def test_gate_stopped_fails_closed_then_recovers(stack):
    user, password = f"closed-{uuid.uuid4().hex[:6]}", "closed-password-7"
    stack.add_user(user, password, "admin")
    since = stack.now()
    stack.compose("stop", "auth")
    try:
        # (Each takes about 3 s here: the stopped gate's address answers "no route to host".)
        paths = ("/api/2.0/mlflow/experiments/search?max_results=1", "/graphql")
        for credentials in _unverified_credentials(user, password):
            headers = {"Authorization": credentials} if isinstance(credentials, str) else {}
            auth = credentials if isinstance(credentials, tuple) else None
            for path in paths:
                answer = requests.get(stack.url + path, auth=auth, headers=headers)
                shown = (path, credentials and str(credentials)[:20], answer.status_code)
                # Refused, and said so in a way clients retry: never a 500, never MLflow's
                # own answer (a 404 would be MLflow's: it saw the request).
                assert answer.status_code == 503, shown
                assert answer.headers.get("Retry-After") == "5", shown
                assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE", shown
    finally:
        stack.compose("up", "-d", "--wait", "--no-build", "auth")
    stack.wait_for_status(200, (user, password))
    assert stack.unverified_requests_seen_by_server(since) == []
