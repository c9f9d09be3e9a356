"""The stack tier: build and start the real stack with pytest-docker, drive it from outside.

Runs under its own compose project name (STACK_TEST_PROJECT, default ``mlflowstack-test``; its
images are named after it too), publishes on 127.0.0.1 only (STACK_TEST_PORT, default a free
port), and ends with ``down -v``. Everything a test needs from inside the stack goes through
``docker compose``, or through a throwaway container on its backend network, which this host
cannot reach (Stack.backend_request). The stack runs compose.yaml's defaults: the repository's
``.env`` (a developer's own settings) is not read, except for the build's CA bundle (see
docker_setup).
"""

import base64
import dataclasses
import datetime
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import requests
from mlflowstack.cabundle import compose_build_ca_bundle

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("STACK_TEST_PROJECT") or "mlflowstack-test"
# compose.yaml's own project name: a developer's stack, whose volumes ``down -v`` would delete.
_DEFAULT_PROJECT = "mlflow-stack"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = int(os.environ.get("STACK_TEST_PORT") or _free_port())
# SERVE_MODELS of the test stack: test_model_serving.py registers the first and starts the serve
# profile; the second is never registered (a listed model that cannot load).
SERVED_MODEL, MISSING_MODEL = "iris-served", "ghost"
BASE_URL = f"http://127.0.0.1:{PORT}"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def docker_compose_file():
    return str(ROOT / "compose.yaml")


@pytest.fixture(scope="session")
def docker_compose_project_name():
    return PROJECT


@pytest.fixture(scope="session")
def docker_setup():
    """Settings for every compose call of the session (pytest-docker's, Stack's, and stackctl's
    on the host): no ``.env`` (COMPOSE_ENV_FILES), this project, this port; the build's CA
    bundle where the README's ``docker compose up`` finds it. The environment's other settings
    (e.g. BASE_IMAGE) still apply, as an explicit choice of whoever runs the tests."""
    if PROJECT == _DEFAULT_PROJECT:
        raise pytest.UsageError(f"STACK_TEST_PROJECT={PROJECT}: the tests end with down -v")
    ca_bundle = compose_build_ca_bundle(ROOT / "compose.yaml")
    os.environ.update(
        COMPOSE_ENV_FILES=os.devnull,
        COMPOSE_PROJECT_NAME=PROJECT,
        HTTP_PORT=str(PORT),
        BIND_ADDRESS="127.0.0.1",
        PUBLIC_HOSTNAME=f"127.0.0.1:{PORT},localhost",
        SERVE_MODELS=f"{SERVED_MODEL}@production,{MISSING_MODEL}@production",
    )
    if ca_bundle:
        os.environ["EXTRA_CA_BUNDLE"] = ca_bundle
    return ["up --build -d --wait"]


@pytest.fixture(scope="session")
def docker_cleanup():
    # With the profile, or down would leave the serving container (and its volume) behind.
    return ["--profile serve down -v"]


# Stack.backend_request's client, run by python in a container on the backend network.
_BACKEND_REQUEST = """
import base64, http.client, json, sys
host, port, method, path, headers, body = json.loads(sys.argv[1])
connection = http.client.HTTPConnection(host, port, timeout=10)
body = None if body is None else base64.b64decode(body)
connection.request(method, path, body=body, headers=headers)
answer = connection.getresponse()
content = base64.b64encode(answer.read()).decode()
print(json.dumps({"status": answer.status, "headers": answer.getheaders(), "body": content}))
"""


@dataclasses.dataclass
class BackendAnswer:
    """An answer to Stack.backend_request (headers: the last value of each name)."""

    status_code: int
    headers: requests.structures.CaseInsensitiveDict
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Stack:
    """The running test stack, seen from outside."""

    url = BASE_URL

    def compose(self, *args: str, input: str | None = None, check: bool = True) -> str:
        command = ["docker", "compose", "-p", PROJECT, "-f", str(ROOT / "compose.yaml"), *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, check=False)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def stackctl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.compose("run", "--rm", "-T", "stackctl", *args, input=input, check=check)

    def image(self, service: str) -> str:
        """The image (its ID) the service's container runs, e.g. to start a helper beside it."""
        container = self.compose("ps", "-q", service).split()[0]
        result = subprocess.run(
            ["docker", "inspect", "-f", "{{.Image}}", container],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def admin_password(self) -> str:
        path = "/var/lib/mlflow-stack/users/initial-admin-password"
        return self.compose("exec", "-T", "auth", "cat", path).strip()

    def memory_kib(self, service: str) -> int:
        """KiB a service's processes use: the sum of their proportional set sizes (shared pages
        split between the processes sharing them, so forked workers are not counted twice).
        Read from the processes: Docker's own accounting needs a cgroup memory controller,
        which not every host has (this one reports 0 B)."""
        script = "cat /proc/[0-9]*/smaps_rollup 2>/dev/null | awk '/^Pss:/ {s += $2} END {print s}'"
        return int(self.compose("exec", "-T", service, "sh", "-c", script).strip() or 0)

    def add_user(self, name: str, password: str, role: str = "editor") -> None:
        self.stackctl(
            "user", "add", name, "--role", role, "--password-stdin", input=password + "\n"
        )

    def append_users_line(self, line: str) -> None:
        """Edit the users file by hand, as an operator with a shell in the volume would."""
        script = "cat >> /var/lib/mlflow-stack/users/htpasswd"
        self.compose(
            "run", "--rm", "-T", "--entrypoint", "sh", "stackctl", "-c", script, input=line
        )

    def raw(self, request: bytes, timeout: float = 10) -> int:
        """Send bytes exactly as given on a new connection; the answer's status (0: none)."""
        with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as sock:
            sock.sendall(request)
            try:
                status_line = sock.makefile("rb").readline(200)
            except (TimeoutError, ConnectionError):
                return 0
        parts = status_line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def _address_on(self, service: str, network: str) -> str:
        container = self.compose("ps", "-q", service).split()[0]
        template = f'{{{{(index .NetworkSettings.Networks "{PROJECT}_{network}").IPAddress}}}}'
        result = subprocess.run(
            ["docker", "inspect", "-f", template, container],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def container_ip(self, service: str) -> str:
        """The service's address on the edge network, the one this host reaches (only nginx
        is on it: the host has no address on the backend network, see compose.yaml)."""
        return self._address_on(service, "edge")

    def backend_ip(self, service: str) -> str:
        """The service's address on the backend network (see backend_request)."""
        return self._address_on(service, "backend")

    def backend_request(
        self,
        service: str,
        port: int,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> BackendAnswer:
        """One HTTP request straight to a service's backend address, from where a process
        other than nginx can reach it: a throwaway container on the backend network (the
        stack's auth image, hardened like the services), not this host, which reaches nothing
        there. The Host header is the address, as for any client that dialled it."""
        request = [self.backend_ip(service), port, method, path, headers or {}]
        request.append(None if body is None else base64.b64encode(body).decode())
        command = [
            "docker", "run", "--rm", "--network", f"{PROJECT}_backend",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
            "--user", "10001:10001", "--entrypoint", "python", self.image("auth"),
            "-c", _BACKEND_REQUEST, json.dumps(request),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise AssertionError(f"request from the backend network failed:\n{result.stderr}")
        answer = json.loads(result.stdout)
        return BackendAnswer(
            answer["status"],
            requests.structures.CaseInsensitiveDict(answer["headers"]),
            base64.b64decode(answer["body"]),
        )

    def logs(self, service: str, since: str | None = None) -> str:
        return self.compose("logs", "--no-color", *(["--since", since] if since else []), service)

    @staticmethod
    def now() -> str:
        """A timestamp for ``logs(since=...)``."""
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def unverified_requests_seen_by_server(self, since: str) -> list[str]:
        """The server's log lines, since ``since``, about requests that came without nginx's
        proxy secret or without a verified user (server/guard.py refuses and logs each one)."""
        return [
            line
            for line in self.logs("server", since).splitlines()
            if "refused: no verified user" in line or "refused: not from the proxy" in line
        ]

    def wait_for_status(self, expected: int, auth, path="/api/2.0/mlflow/experiments/search"):
        """Poll until a request gets ``expected``; return the seconds it took (at most 5).

        ``auth`` is a (user, password) pair or a whole Authorization header value.
        """
        headers = {"Authorization": auth} if isinstance(auth, str) else {}
        auth = None if headers else auth
        start = time.monotonic()
        while True:
            status = requests.get(
                self.url + path, auth=auth, headers=headers, params={"max_results": 1}
            ).status_code
            elapsed = time.monotonic() - start
            if status == expected or elapsed > 5:
                assert status == expected, f"still {status} after {elapsed:.1f}s"
                return elapsed
            time.sleep(0.2)


@pytest.fixture(scope="session")
def stack(docker_services):
    return Stack()


@pytest.fixture(scope="session")
def admin(stack):
    return ("admin", stack.admin_password())


@pytest.fixture(autouse=True)
def _tracking_uri_reset():
    """A test that sets MLflow's process-wide tracking URI must not point the next one's
    clients at its stack: a URI set by mlflow.set_tracking_uri outranks MLFLOW_TRACKING_URI
    (one left set sent a second stack's credentials to the session's stack)."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_env(stack, admin, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    return stack


class SecondStack:
    """A second stack beside the session's, from the same images (tagged under its own
    project name, no build), with compose files layered over compose.yaml; for tests that
    need settings or volumes the shared stack must not get. Ends with ``down -v``."""

    IMAGES = ("auth", "server", "nginx")

    def __init__(self, suffix: str, *overrides: Path, env: dict[str, str] | None = None):
        """``command``: its ``docker compose`` words; ``env``: the environment they (and a
        host ``scripts/stackctl`` of this stack) run with."""
        self.project = f"{PROJECT}-{suffix}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        files = [ROOT / "compose.yaml", *overrides]
        self.command = ["docker", "compose", "-p", self.project]
        for file in files:
            self.command += ["-f", str(file)]
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "HTTP_PORT": str(self.port),
            "PUBLIC_HOSTNAME": f"127.0.0.1:{self.port},localhost",
            "SERVE_MODELS": "",
            **(env or {}),
        }

    def compose(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [*self.command, *args], env=self.env, capture_output=True, text=True, check=False
        )
        if check and result.returncode:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def write_file(self, service: str, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in the service's volumes, as the service's own user, from
        a one-off container (the service itself may be stopped)."""
        command = [*self.command, "run", "--rm", "-T", "--no-deps", "--entrypoint", "sh"]
        script = 'cat > "$1.partial" && mv "$1.partial" "$1"'
        subprocess.run(
            [*command, service, "-c", script, "sh", path],
            input=data, env=self.env, capture_output=True, check=True,
        )  # fmt: skip

    def __enter__(self):
        for image in self.IMAGES:
            subprocess.run(
                ["docker", "tag", f"{PROJECT}-{image}", f"{self.project}-{image}"], check=True
            )
        try:
            self.compose("up", "-d", "--wait", "--no-build")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.compose("--profile", "serve", "down", "-v", check=False)
        for image in self.IMAGES:
            subprocess.run(["docker", "rmi", f"{self.project}-{image}"], capture_output=True)

    def admin(self) -> tuple[str, str]:
        path = "/var/lib/mlflow-stack/users/initial-admin-password"
        return ("admin", self.compose("exec", "-T", "auth", "cat", path).strip())
