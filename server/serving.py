"""Model serving behind the stack's login: one scoring process per model, rollouts that fail no
request.

Contract (the ``serving`` service of the ``serve`` compose profile runs ``serving.py run``):

- ``SERVE_MODELS`` lists the models: comma-separated ``NAME@ALIAS`` or ``NAME/VERSION``
  (``iris@production,churn@champion``). NAME is what clients put in ``/serving/NAME/...``:
  letters, digits, ``.``, ``_``, ``-`` (1-64, starting with a letter or digit); nginx renders
  its routes from the same variable with the same rule (``docker-entrypoint.sh``). Model *i*
  (from 0) listens on port ``5100 + i`` (health probe, benchmark) and on the unix socket
  ``SOCKET_DIR/model-i.sock``, which nginx reaches through a volume only it and this container
  mount, with kept-alive connections. A bad list stops the container with one line.
- Each model is fetched from the tracking server *through nginx* with the viewer token that
  ``stackctl bootstrap`` made for serving (``SERVING_TOKEN_FILE``). Why not the internal
  network: the server trusts whoever holds the proxy secret, and a model is code (a pickle)
  that runs here; a viewer token lets it read what its author (an editor) could read anyway,
  and change nothing.
- A model is answered by MLflow's own scoring app (``mlflow.pyfunc.scoring_server``, what
  ``mlflow models serve --env-manager local`` runs) under uvicorn, in a process of its own.
- The supervisor owns each model's listening sockets; a scoring process inherits them and
  accepts on them only once its model has loaded. A rollout (``serving.py rollout NAME``)
  starts the version the alias names now beside the old one, on the same sockets, waits until
  it has loaded, then stops the old one gracefully (``DrainingServer``: it answers what it
  accepted and closes kept-alive connections only between requests). Connections wait in the
  sockets' queues meanwhile, so no request is refused or failed; a request that meets a kept
  connection just as it closes is sent again by nginx on a new one (serving-proxy.conf).
- While no process holds a model (it cannot be fetched or loaded), its port is closed: nginx
  answers 503 at once, never a hang, and this container's log says why. The supervisor
  retries with backoff, so a model registered after the start is served once it exists, and
  a scoring process that dies is replaced.
- A scoring process answers only requests that carry the serving secret (nginx sends it after
  the login; ``stackctl bootstrap`` makes it), so another container on the backend network
  that reaches this container's address predicts nothing (the Docker host has no address
  there); its health probe (GET /ping) needs none.
- ``serving.py status`` and ``rollout`` reach the supervisor over a unix socket that only
  this container's user can open. Model names are checked before they are used in a path, a
  log line or an answer.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("serving")

# nginx renders the same ports (docker-entrypoint.sh); the variable is for tests.
BASE_PORT = int(os.environ.get("SERVING_BASE_PORT", "5100"))
MAX_MODELS = 32
CONTROL_SOCKET = Path(os.environ.get("SERVING_CONTROL", "/tmp/serving/control.sock"))
MODELS_DIR = Path(os.environ.get("SERVING_MODELS_DIR", "/tmp/serving/models"))
LOAD_TIMEOUT = float(os.environ.get("SERVING_LOAD_TIMEOUT", "300"))
STOP_TIMEOUT = float(os.environ.get("SERVING_STOP_TIMEOUT", "60"))
MAX_BACKOFF = 30.0
BIND_ADDRESS = os.environ.get("SERVING_BIND_ADDRESS", "0.0.0.0")
# A tmpfs volume shared with nginx only (compose.yaml); nginx renders the same paths.
SOCKET_DIR = Path(os.environ.get("SERVING_SOCKET_DIR", "/run/mlflow-serving"))
# Longer than nginx keeps an idle connection (60 s), so that nginx, not the scorer, closes it:
# a close from this side can cross a request that nginx is sending (then sent again).
KEEP_ALIVE_SECONDS = 75

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_ENTRY = re.compile(
    rf"(?P<name>{_NAME})(?:@(?P<alias>[A-Za-z0-9_-]{{1,255}})|/(?P<version>[1-9][0-9]{{0,9}}))"
)
_MODEL_NAME = re.compile(_NAME)


class ServingError(Exception):
    """A setting or a command cannot be carried out; the message is one line for the operator."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    alias: str | None
    version: str | None
    port: int

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"

    @property
    def socket_path(self) -> Path:
        # By position, never by name: a name goes into no path.
        return SOCKET_DIR / f"model-{self.port - BASE_PORT}.sock"


def parse_serve_models(value: str) -> list[ModelSpec]:
    """``SERVE_MODELS`` as specs, in order (model *i* on port BASE_PORT + i)."""
    specs: list[ModelSpec] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.fullmatch(entry)
        if not match:
            raise ServingError(
                f"SERVE_MODELS: {entry[:80]!r} is not NAME@ALIAS or NAME/VERSION (NAME: letters, "
                "digits, '.', '_', '-', at most 64)"
            )
        # In any case: nginx's map of names (docker-entrypoint.sh) compares without case.
        if any(spec.name.lower() == match["name"].lower() for spec in specs):
            raise ServingError(f"SERVE_MODELS: {match['name']!r} is listed twice")
        specs.append(
            ModelSpec(match["name"], match["alias"], match["version"], BASE_PORT + len(specs))
        )
    if len(specs) > MAX_MODELS:
        raise ServingError(f"SERVE_MODELS: at most {MAX_MODELS} models")
    return specs


# --- In the supervisor -------------------------------------------------------------------------


@dataclass
class Scorer:
    """One scoring process of one model version."""

    version: str
    process: subprocess.Popen
    model_dir: Path


@dataclass
class Served:
    spec: ModelSpec
    sockets: list[socket.socket] = field(default_factory=list)
    current: Scorer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    problem: str = "starting"


def _self_command() -> list[str]:
    """The children run the script this process was started as (tests start a stand-in)."""
    return [sys.executable, os.path.abspath(sys.argv[0])]


def fetch(spec: ModelSpec) -> tuple[str, Path]:
    """Resolve the spec to a version and download it (in a child: the supervisor stays small
    and never imports mlflow). Returns (version, directory); raises ServingError with the
    child's last line."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=MODELS_DIR))
    result = subprocess.run(
        [*_self_command(), "fetch", spec.reference, str(target)],
        capture_output=True, text=True, check=False, timeout=LOAD_TIMEOUT,
    )  # fmt: skip
    if result.returncode:
        shutil.rmtree(target, ignore_errors=True)
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ServingError(lines[-1][:300] if lines else f"fetch exited {result.returncode}")
    return result.stdout.strip().splitlines()[-1], target


def open_sockets(spec: ModelSpec) -> list[socket.socket]:
    """The model's TCP port and unix socket, bound but not listening: until a scorer has
    loaded the model and listens itself, connections are refused (nginx: 503 at once) instead
    of waiting in a queue."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((BIND_ADDRESS, spec.port))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        spec.socket_path.unlink(missing_ok=True)
        unix.bind(str(spec.socket_path))
        # nginx's workers run as another user; only nginx and this container mount the folder.
        os.chmod(spec.socket_path, 0o666)
    except OSError:
        tcp.close()
        unix.close()
        raise
    return [tcp, unix]


def _relay_stderr(process: subprocess.Popen) -> list[str]:
    """Copy the scorer's stderr to this container's log, line by line, for as long as it
    runs; return the list that holds its last lines, made printable (a model's own code writes
    them, and they reach an operator's terminal through ``rollout``)."""
    last: list[str] = []

    def relay() -> None:
        for raw in process.stderr:
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            text = raw.decode(errors="replace").strip()
            last.append("".join(c if c.isprintable() else "?" for c in text)[:300])
            del last[:-5]

    threading.Thread(target=relay, daemon=True).start()
    return last


def start_scorer(served: Served, version: str, model_dir: Path) -> Scorer:
    """Start a scoring process on the model's sockets and wait until it has loaded the model.
    Raises ServingError (the process stopped, ``model_dir`` removed) if it exits or takes
    longer than LOAD_TIMEOUT."""
    if not served.sockets:
        served.sockets = open_sockets(served.spec)
    fds = [str(sock.fileno()) for sock in served.sockets]
    ready_read, ready_write = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    process = subprocess.Popen(
        [*_self_command(), "score", str(model_dir), str(ready_write), *fds],
        pass_fds=(*(sock.fileno() for sock in served.sockets), ready_write), env=env,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(ready_write)
    last_lines = _relay_stderr(process)
    try:
        with os.fdopen(ready_read, "rb") as ready:
            # The scorer writes a line once its model is loaded; EOF first means it exited.
            timer = threading.Timer(LOAD_TIMEOUT, process.kill)
            timer.start()
            try:
                line = ready.readline()
            finally:
                timer.cancel()
        if line.strip() != b"ready":
            code = process.wait()
            time.sleep(0.1)  # the relay's last lines
            reason = next((text for text in reversed(last_lines) if text), f"exit {code}")
            raise ServingError(f"version {version} did not load: {reason}")
    except BaseException:
        process.kill()
        process.wait()
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return Scorer(version, process, model_dir)


def stop_scorer(scorer: Scorer) -> None:
    """Graceful: uvicorn stops accepting, finishes what it accepted, then exits."""
    scorer.process.send_signal(signal.SIGTERM)
    try:
        scorer.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        scorer.process.kill()
        scorer.process.wait()
    shutil.rmtree(scorer.model_dir, ignore_errors=True)


def close_port(served: Served) -> None:
    """No scorer left: close the sockets, so that connections are refused (nginx: 503 at
    once) instead of waiting in a queue nobody reads."""
    for sock in served.sockets:
        sock.close()
    if served.sockets:
        served.spec.socket_path.unlink(missing_ok=True)
    served.sockets = []


def bring_up(served: Served, stopping: threading.Event) -> None:
    """Fetch and start the model until it serves, with backoff; the reason of each failure is
    logged once per attempt."""
    delay = 1.0
    while not stopping.is_set():
        with served.lock:
            if served.current is not None:
                return
            try:
                version, model_dir = fetch(served.spec)
                served.current = start_scorer(served, version, model_dir)
                served.problem = ""
                log.info("%s: serving version %s on port %s", served.spec.reference, version,
                         served.spec.port)  # fmt: skip
                return
            except (ServingError, OSError, subprocess.TimeoutExpired) as error:
                close_port(served)
                served.problem = str(error)
                log.error("%s: not served: %s (retry in %.0f s)", served.spec.reference, error,
                          delay)  # fmt: skip
        stopping.wait(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def rollout(served: Served, force: bool, say) -> bool:
    """Serve the version the spec names now: start it beside the old one, wait until it has
    loaded, then stop the old one. The old one keeps serving if anything fails."""
    with served.lock:
        old = served.current
        say(f"{served.spec.reference}: resolving")
        try:
            version, model_dir = fetch(served.spec)
        except (ServingError, subprocess.TimeoutExpired) as error:
            say(f"error: {served.spec.reference}: {error}; nothing changed")
            return False
        if old is not None and old.version == version and not force:
            shutil.rmtree(model_dir, ignore_errors=True)
            say(f"{served.spec.reference}: already serving version {version}; nothing to do")
            return True
        say(f"{served.spec.reference}: loading version {version} beside "
            f"{'version ' + old.version if old else 'nothing'}")  # fmt: skip
        started = time.monotonic()
        try:
            new = start_scorer(served, version, model_dir)
        except (ServingError, OSError) as error:
            say(f"error: {served.spec.reference}: {error}; still serving "
                f"{'version ' + old.version if old else 'nothing'}")  # fmt: skip
            return False
        served.current, served.problem = new, ""
        say(f"{served.spec.reference}: version {version} loaded in "
            f"{time.monotonic() - started:.1f} s and answering")  # fmt: skip
        if old is not None:
            stop_scorer(old)
            say(f"{served.spec.reference}: version {old.version} stopped")
        log.info("%s: rolled out version %s", served.spec.reference, version)
        return True


def status(models: dict[str, Served]) -> list[dict]:
    return [
        {
            "model": s.spec.name,
            "reference": s.spec.reference,
            "port": s.spec.port,
            "version": s.current.version if s.current else None,
            "problem": s.problem,
        }
        for s in models.values()
    ]


def handle_control(connection: socket.socket, models: dict[str, Served]) -> None:
    """One command a connection: a JSON line in, text lines out, the last "ok" or "failed"."""
    with connection, connection.makefile("rwb", buffering=0) as stream:

        def say(line: str) -> None:
            stream.write((line + "\n").encode())

        try:
            request = json.loads(stream.readline(4096) or b"{}")
            command = request.get("command")
            if command == "status":
                say(json.dumps(status(models)))
                say("ok")
            elif command == "rollout":
                name = str(request.get("model", ""))
                served = models.get(name) if _MODEL_NAME.fullmatch(name) else None
                if served is None:
                    say(f"error: no served model of that name (served: {', '.join(models)})")
                    say("failed")
                else:
                    say("ok" if rollout(served, bool(request.get("force")), say) else "failed")
            else:
                say("error: unknown command")
                say("failed")
        except (ValueError, AttributeError):
            say("error: bad request")
            say("failed")
        except BrokenPipeError:
            pass


def supervise(specs: list[ModelSpec]) -> int:
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    models = {spec.name: Served(spec) for spec in specs}
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    for served in models.values():
        threading.Thread(target=bring_up, args=(served, stopping), daemon=True).start()

    CONTROL_SOCKET.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    CONTROL_SOCKET.unlink(missing_ok=True)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    control.bind(str(CONTROL_SOCKET))
    os.umask(old_umask)
    control.listen(8)
    control.settimeout(1.0)

    def watch() -> None:
        # A scorer that exits on its own (crash, out of memory) is replaced.
        while not stopping.wait(1.0):
            for served in models.values():
                if not served.lock.acquire(blocking=False):
                    continue
                try:
                    scorer = served.current
                    if scorer is None or scorer.process.poll() is None:
                        continue
                    log.error("%s: version %s exited (%s); restarting", served.spec.reference,
                              scorer.version, scorer.process.returncode)  # fmt: skip
                    served.current, served.problem = None, "scoring process exited"
                    shutil.rmtree(scorer.model_dir, ignore_errors=True)
                    close_port(served)
                finally:
                    served.lock.release()
                if served.current is None:
                    threading.Thread(target=bring_up, args=(served, stopping), daemon=True).start()

    threading.Thread(target=watch, daemon=True).start()
    log.info("serving %s", ", ".join(f"{s.reference} on port {s.port}" for s in specs))
    while not stopping.is_set():
        try:
            connection, _ = control.accept()
        except TimeoutError:
            continue
        threading.Thread(target=handle_control, args=(connection, models), daemon=True).start()
    for served in models.values():
        if served.current is not None:
            stop_scorer(served.current)
    return 0


# --- In the children ---------------------------------------------------------------------------


def fetch_model(reference: str, target: str) -> int:
    """Resolve ``NAME@ALIAS`` or ``NAME/VERSION`` with the serving token and download it into
    ``target``; print the version. One line on stderr and exit 1 on failure."""
    token_file = Path(os.environ.get("SERVING_TOKEN_FILE", "/var/lib/mlflow-serving/token"))
    try:
        token = token_file.read_text().strip()
    except OSError as error:
        print(f"no serving token ({error.strerror}: {token_file}); is init done?", file=sys.stderr)
        return 1
    os.environ["MLFLOW_TRACKING_TOKEN"] = token
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, _, alias = reference.partition("@")
    try:
        if alias:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        else:
            name, _, version = reference.partition("/")
            MlflowClient().get_model_version(name, version)
        download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=target)
    except MlflowException as error:
        print(str(error.message).splitlines()[0][:300], file=sys.stderr)
        return 1
    print(version)
    return 0


def require_serving_secret(app, secret):
    """ASGI wrapper: only requests that carry the serving secret (nginx's, after the login)
    reach the scoring app; the container's own health probe (GET /ping, /health) needs none.
    ``secret``: the bytes, or a callable that returns the current ones. No secret configured:
    everything else is refused (fail closed)."""
    import hmac

    current = secret if callable(secret) else lambda: secret

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"x-serving-secret", b"")
            probe = scope["method"] in ("GET", "HEAD") and scope["path"] in ("/ping", "/health")
            expected = current()
            if not probe and not (expected and hmac.compare_digest(sent, expected)):
                body = b'{"error_code": "PERMISSION_DENIED", "message": "Not from the proxy."}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            headers = [(k, v) for k, v in scope["headers"] if k != b"x-serving-secret"]
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return guarded


class SecretFile:
    """The serving secret as init keeps it, read again when the file changes (looked at once a
    second at most): init makes a new one when SERVE_MODELS was emptied and set again, and nginx
    then sends the new one while scorers of this container may still run."""

    def __init__(self, path: Path):
        self.path, self.secret, self.seen, self.checked = path, b"", None, 0.0

    def __call__(self) -> bytes:
        now = time.monotonic()
        if now - self.checked < 1.0:
            return self.secret
        self.checked = now
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        except OSError:
            seen = None
        if seen != self.seen:
            self.seen, self.secret = seen, self._read()
        return self.secret

    def _read(self) -> bytes:
        try:
            secret = self.path.read_bytes().strip()
        except OSError:
            secret = b""
        if not re.fullmatch(rb"[0-9a-f]{64}", secret):
            print(f"serving: no serving secret in {self.path}: predictions are refused", flush=True)
            return b""
        return secret


def _serving_secret() -> SecretFile:
    return SecretFile(
        Path(os.environ.get("SERVING_SECRET_FILE", "/var/lib/mlflow-serving/serving-secret"))
    )


def draining_server():
    """uvicorn's Server, draining on SIGTERM without failing a request (the class is made here
    so that the supervisor never imports uvicorn).

    It stops accepting (the sockets stay open in the supervisor, so what arrives meanwhile
    waits for the next process), then, until no connection is left: a connection that has had
    a request is closed once its answer is sent (an idle kept-alive one at once; nginx sends a
    request that crosses that close again, serving-proxy.conf); a connection that has had none
    yet is left alone until its request is answered. uvicorn's own shutdown would close those
    as idle, and a request on its way on a new connection is not sent again."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for server in self.servers:
                server.close()
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.server_state.connections and time.monotonic() < deadline:
                for connection in list(self.server_state.connections):
                    closing = connection.transport.is_closing()
                    if not closing and getattr(connection, "cycle", None) is not None:
                        # uvicorn's graceful close: now if idle, else after this answer.
                        connection.shutdown()
                await asyncio.sleep(0.02)
            await super().shutdown(sockets)

    return DrainingServer


def score(model_dir: str, ready_fd: int, fds: list[int]) -> int:
    """Load the model with MLflow's scoring app, say "ready", then serve on the inherited
    sockets until SIGTERM, draining (see draining_server)."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    secret = _serving_secret()
    os.environ[scoring_server._SERVER_MODEL_PATH] = model_dir
    # What `uvicorn mlflow.pyfunc.scoring_server.app:app` imports: the app, model loaded.
    from mlflow.pyfunc.scoring_server.app import app

    config = uvicorn.Config(
        require_serving_secret(app, secret),
        access_log=False,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=int(STOP_TIMEOUT),
    )
    with os.fdopen(ready_fd, "wb") as ready:
        ready.write(b"ready\n")
    draining_server()(config).run(sockets=[socket.socket(fileno=fd) for fd in fds])
    return 0


def control_client(command: dict) -> int:
    """Send one command to the supervisor and print its answer; exit 0 on "ok"."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(CONTROL_SOCKET))
            sock.sendall(json.dumps(command).encode() + b"\n")
            last = ""
            for raw in sock.makefile("rb"):
                last = raw.decode(errors="replace").rstrip("\n")
                if last not in ("ok", "failed"):
                    # Printable only: the answer reaches an operator's terminal.
                    print("".join(c if c.isprintable() else "?" for c in last), flush=True)
    except OSError as error:
        print(f"serving: the supervisor does not answer ({error.strerror})", file=sys.stderr)
        return 1
    return 0 if last == "ok" else 1


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="serving: %(message)s", stream=sys.stdout)
    command = argv[0] if argv else "run"
    try:
        if command == "run":
            specs = parse_serve_models(os.environ.get("SERVE_MODELS", ""))
            if not specs:
                raise ServingError("SERVE_MODELS is empty: name the models to serve in .env")
            return supervise(specs)
        if command == "fetch":
            return fetch_model(argv[1], argv[2])
        if command == "score":
            return score(argv[1], int(argv[2]), [int(fd) for fd in argv[3:]])
        if command == "status":
            return control_client({"command": "status"})
        if command == "rollout" and len(argv) >= 2:
            force = "--force" in argv[2:]
            return control_client({"command": "rollout", "model": argv[1], "force": force})
    except ServingError as error:
        print(f"serving: {error}", file=sys.stderr)
        return 2
    print("usage: serving.py run | status | rollout NAME [--force]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
