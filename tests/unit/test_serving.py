"""server/serving.py without Docker: SERVE_MODELS parsing, and a real supervisor serving a
stand-in scoring process (a tiny HTTP server instead of MLflow's app, so no model is needed):
rollouts under load fail no request, a dead scorer is replaced, a model that cannot be fetched
leaves its port closed (refused at once, never a hang)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import serving

SERVING = Path(serving.__file__)


def test_parse_serve_models_alias_and_version_in_order_get_ports():
    specs = serving.parse_serve_models(" iris@production, churn/3 ,,")
    assert [(s.name, s.alias, s.version, s.port) for s in specs] == [
        ("iris", "production", None, 5100),
        ("churn", None, "3", 5101),
    ]
    assert [s.reference for s in specs] == ["iris@production", "churn/3"]


def test_parse_serve_models_empty_is_no_models():
    assert serving.parse_serve_models("") == []


@pytest.mark.parametrize(
    "value",
    [
        "iris",  # neither alias nor version
        "iris@",
        "iris/0",
        "iris/v1",
        "../etc@x",
        "-iris@x",
        "iris@pro duction",
        "iris@x\ny",
        "ir$is@x",
        "a" * 65 + "@x",
        "iris@x;rm -rf /",
    ],
)
def test_parse_serve_models_bad_entry_raises_one_line(value):
    with pytest.raises(serving.ServingError) as error:
        serving.parse_serve_models(value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["iris@a,iris/2", "iris@a,IRIS@b"])
def test_parse_serve_models_duplicate_name_in_any_case_raises(value):
    with pytest.raises(serving.ServingError, match="twice"):
        serving.parse_serve_models(value)


def test_parse_serve_models_too_many_raises():
    with pytest.raises(serving.ServingError, match="at most"):
        serving.parse_serve_models(",".join(f"m{i}@x" for i in range(serving.MAX_MODELS + 1)))


# --- A real supervisor with stand-in fetch and score children ------------------------------

# Stand-ins for the two children serving.py starts of itself ("fetch", "score"). "fetch"
# answers the version in STUB_DIR/<name>.version (missing: the model does not exist); "score"
# serves GET/POST with "version N" after STUB_LOAD_SECONDS, on the inherited socket.
STUB = r"""
import os, sys, socket, time, http.server, signal, threading
import serving

def fetch(reference, target):
    name = reference.split("@")[0].split("/")[0]
    path = os.path.join(os.environ["STUB_DIR"], name + ".version")
    if not os.path.exists(path):
        print(f"Registered Model with name={name} not found", file=sys.stderr)
        return 1
    version = open(path).read().strip()
    open(os.path.join(target, "version"), "w").write(version)
    print(version)
    return 0

def score(model_dir, fd, ready_fd):
    version = open(os.path.join(model_dir, "version")).read().strip()
    if version == "broken":
        print("cannot load the model", file=sys.stderr)
        return 1
    time.sleep(float(os.environ.get("STUB_LOAD_SECONDS", "0.3")))
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = f"version {version}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = _answer
        def log_message(self, *args):
            pass
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = False  # server_close() waits for the requests it accepted
    server = Server(("0.0.0.0", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    server.socket.listen(128)  # as uvicorn does once the app has loaded
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    # Graceful like uvicorn: stop accepting, finish what was accepted.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0

serving.fetch_model = fetch
serving.score = score
sys.argv[0] = __file__
sys.exit(serving.main(sys.argv[1:]))
"""


def _free_base_port() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base < 60000:
            return base
    raise RuntimeError("no free port")


@pytest.fixture
def supervisor(tmp_path, monkeypatch):
    stub = tmp_path / "stub_serving.py"
    stub.write_text(STUB)
    base = _free_base_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SERVING.parent), str(tmp_path)]),
        "STUB_DIR": str(tmp_path),
        "SERVING_CONTROL": str(tmp_path / "control.sock"),
        "SERVING_MODELS_DIR": str(tmp_path / "models"),
        "SERVING_BASE_PORT": str(base),
        "SERVING_STOP_TIMEOUT": "10",
        "SERVING_BIND_ADDRESS": "127.0.0.1",
    }

    class Supervisor:
        port = base
        directory = tmp_path
        process = None

        def start(self, serve_models: str):
            env["SERVE_MODELS"] = serve_models
            self.process = subprocess.Popen(
                [sys.executable, str(stub), "run"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not (tmp_path / "control.sock").exists():
                assert time.monotonic() < deadline, "supervisor did not start"
                time.sleep(0.05)

        def command(self, *args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, str(stub), *args], env=env,
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        def set_version(self, name: str, version: str):
            (tmp_path / f"{name}.version").write_text(version)

        def get(self, port_offset: int = 0, timeout: float = 5) -> str:
            url = f"http://127.0.0.1:{base + port_offset}/invocations"
            with urllib.request.urlopen(url, data=b"{}", timeout=timeout) as answer:
                return answer.read().decode()

        def wait_serving(self, expected: str, port_offset: int = 0):
            deadline = time.monotonic() + 20
            while True:
                try:
                    if self.get(port_offset) == expected:
                        return
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"never served {expected!r}"
                time.sleep(0.1)

    supervisor = Supervisor()
    yield supervisor
    if supervisor.process:
        supervisor.process.terminate()
        supervisor.process.wait(20)


def test_supervise_serves_model_and_reports_status(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    supervisor.wait_serving("version 1")
    status = json.loads(supervisor.command("status").stdout.splitlines()[0])
    assert status == [
        {
            "model": "iris",
            "reference": "iris@production",
            "port": supervisor.port,
            "version": "1",
            "problem": "",
        }
    ]


def test_rollout_under_load_fails_no_request(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    supervisor.wait_serving("version 1")
    seen, failures, stop = set(), [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                seen.add(supervisor.get())
            except Exception as error:  # any failure at all is what this test looks for
                failures.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        for version in ("2", "3"):
            supervisor.set_version("iris", version)
            result = supervisor.command("rollout", "iris")
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"version {version} loaded" in result.stdout
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert supervisor.get() == "version 3"
    assert {"version 1", "version 3"} <= seen


def test_rollout_same_version_does_nothing_unless_forced(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    supervisor.wait_serving("version 1")
    result = supervisor.command("rollout", "iris")
    assert result.returncode == 0 and "already serving version 1" in result.stdout
    forced = supervisor.command("rollout", "iris", "--force")
    assert forced.returncode == 0 and "version 1 loaded" in forced.stdout


def test_rollout_new_version_fails_to_load_old_keeps_serving(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    supervisor.wait_serving("version 1")
    supervisor.set_version("iris", "broken")
    result = supervisor.command("rollout", "iris")
    assert result.returncode == 1
    assert "still serving version 1" in result.stdout
    assert supervisor.get() == "version 1"


def test_rollout_unknown_model_refused_with_served_names(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    result = supervisor.command("rollout", "nope")
    assert result.returncode == 1 and "served: iris" in result.stdout


def test_supervise_model_missing_port_refused_at_once_then_served_once_registered(supervisor):
    supervisor.start("iris@production")
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError) as error:
        supervisor.get(timeout=5)
    assert isinstance(error.value.reason, ConnectionRefusedError)
    assert time.monotonic() - started < 1
    status = json.loads(supervisor.command("status").stdout.splitlines()[0])
    assert "not found" in status[0]["problem"] and status[0]["version"] is None
    supervisor.set_version("iris", "4")
    supervisor.wait_serving("version 4")


def test_supervise_dead_scorer_is_replaced(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    supervisor.wait_serving("version 1")
    scorers = subprocess.run(
        ["pgrep", "-f", f"stub_serving.py score {supervisor.directory}"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert len(scorers) == 1
    os.kill(int(scorers[0]), 9)
    time.sleep(1.5)
    supervisor.wait_serving("version 1")


def test_control_socket_only_for_its_owner(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.start("iris@production")
    mode = (supervisor.directory / "control.sock").stat().st_mode & 0o777
    assert mode & 0o077 == 0


# --- The scoring process's own check: only nginx's requests ------------------------------


def call(app, method: str, path: str, headers: dict[str, str]) -> int:
    """One request through an ASGI app; its status."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


SECRET = "ab" * 32


def guarded(secret: bytes = SECRET.encode()):
    async def inner(scope, receive, send):
        inner.seen = scope["headers"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    inner.seen = None
    return serving.require_serving_secret(inner, secret), inner


def test_require_serving_secret_right_secret_passes_and_header_removed():
    app, inner = guarded()
    status = call(app, "POST", "/invocations", {"X-Serving-Secret": SECRET})
    assert status == 200
    assert all(name != b"x-serving-secret" for name, _ in inner.seen)


@pytest.mark.parametrize("headers", [{}, {"X-Serving-Secret": "ab" * 31}, {"X-Other": SECRET}])
def test_require_serving_secret_missing_or_wrong_refused(headers):
    app, inner = guarded()
    assert call(app, "POST", "/invocations", headers) == 403
    assert inner.seen is None


def test_require_serving_secret_health_probe_needs_none():
    app, _ = guarded()
    assert call(app, "GET", "/ping", {}) == 200
    assert call(app, "POST", "/ping", {}) == 403


def test_require_serving_secret_none_configured_refuses_even_empty_header():
    app, _ = guarded(b"")
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": ""}) == 403
