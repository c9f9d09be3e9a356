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

def score(model_dir, ready_fd, fds):
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
        def address_string(self):
            return "-"
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = False  # server_close() waits for the requests it accepted
    servers = []
    for fd in fds:  # the TCP port and the unix socket
        server = Server(("0.0.0.0", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=fd)
        server.socket.listen(128)  # as uvicorn does once the app has loaded
        servers.append(server)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,)) for s in servers]
    for thread in threads:
        thread.start()
    # Graceful like uvicorn: stop accepting, finish what was accepted.
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(0.05):  # (a wait without timeout may miss the signal)
        pass
    for server in servers:
        server.shutdown()
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
        "SERVING_SOCKET_DIR": str(tmp_path / "sockets"),
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

        def get_unix(self, index: int = 0) -> str:
            """A prediction on the model's unix socket (nginx's way in)."""
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket_path(index)))
                sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                return read_response(sock)[1].decode()

        def socket_path(self, index: int = 0) -> Path:
            return tmp_path / "sockets" / f"model-{index}.sock"

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
        print(supervisor.process.stdout.read())  # shown when the test failed


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


def test_supervise_unix_socket_serves_for_nginx_workers(supervisor):
    supervisor.set_version("iris", "1")
    supervisor.set_version("churn", "7")
    supervisor.start("iris@production,churn/7")
    supervisor.wait_serving("version 1")
    supervisor.wait_serving("version 7", port_offset=1)
    assert supervisor.get_unix(0) == "version 1"
    assert supervisor.get_unix(1) == "version 7"
    # nginx's workers run as another user than the scorers.
    assert supervisor.socket_path(0).stat().st_mode & 0o777 == 0o666


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
    # The scorer's own last words, not "see the log".
    assert "did not load: cannot load the model; still serving version 1" in result.stdout
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
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        supervisor.get_unix()
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


def test_secret_file_new_secret_honoured_without_restart(tmp_path, monkeypatch):
    """init makes a new serving secret when SERVE_MODELS is emptied and set again; nginx sends
    the new one, and scorers that kept the old one would refuse every prediction."""
    clock = [1000.0]
    monkeypatch.setattr(serving.time, "monotonic", lambda: clock[0])
    path = tmp_path / "serving-secret"
    path.write_text(SECRET + "\n")
    app, _ = guarded(serving.SecretFile(path))
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": SECRET}) == 200
    renewed = "cd" * 32
    path.write_text(renewed + "\n")
    os.utime(path, ns=(1, 1))  # (a new mtime whatever the file system's resolution)
    clock[0] += 2
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": renewed}) == 200
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": SECRET}) == 403
    path.unlink()
    clock[0] += 2
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": renewed}) == 403


def test_require_serving_secret_none_configured_refuses_even_empty_header():
    app, _ = guarded(b"")
    assert call(app, "POST", "/invocations", {"X-Serving-Secret": ""}) == 403


# --- The scorer's drain with kept-alive connections (real uvicorn) ------------------------


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP answer with a Content-Length from a socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().splitlines()
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed inside an answer")
        body += chunk
    return head, body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


@pytest.mark.parametrize("http", ["httptools", "h11"])  # the image's, and uvicorn's fallback
def test_draining_server_closes_kept_connections_only_between_requests(monkeypatch, http):
    """nginx sends a request again when a kept connection closes under it, but not one on a
    new connection: the drain closes idle kept connections at once, busy ones after their
    answer, and leaves a connection that has not sent its request yet alone."""
    import asyncio

    monkeypatch.setattr(serving, "STOP_TIMEOUT", 10)
    release = threading.Event()

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"ok"})

    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    held = listener.dup()  # the supervisor's copy: the socket outlives the scorer's close
    address = listener.getsockname()
    config = uvicorn.Config(
        app, http=http, lifespan="off", log_level="warning", timeout_keep_alive=75
    )
    server = serving.draining_server()(config)
    runner = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    runner.start()
    request = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        while not server.started:
            time.sleep(0.02)
        idle, busy, fresh = (socket.create_connection(address) for _ in range(3))
        idle.sendall(request % b"fast")
        assert read_response(idle)[1] == b"ok"
        busy.sendall(request % b"slow")
        while len(server.server_state.connections) < 3:
            time.sleep(0.02)

        server.should_exit = True
        assert closed_within(idle, 3), "an idle kept connection stays open"
        assert not closed_within(fresh, 0.5), "a connection without its request yet was closed"
        fresh.sendall(request % b"fast")
        assert read_response(fresh)[1] == b"ok"
        assert closed_within(fresh, 3)
        assert runner.is_alive()  # the busy request is still being answered
        release.set()
        assert read_response(busy)[1] == b"ok"
        assert closed_within(busy, 3)
        runner.join(10)
        assert not runner.is_alive()
    finally:
        release.set()
        server.should_exit = True
        runner.join(10)
        held.close()
