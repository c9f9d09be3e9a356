"""The benchmark's own compose project: bring-up, tear-down, users and container counters.

Contract: ``BenchStack`` drives ``docker compose -p mlflowstack-bench -f compose.yaml
-f bench/compose.bench.yaml`` with every port published on 127.0.0.1 (free ports picked at
start), with settings from the environment only (the repository's ``.env`` is not read, but for
the build's CA bundle). On a machine others share, ``BENCH_PROJECT`` names another project and
``BENCH_PORT_BASE`` takes the ports from BASE on (edge, no-auth, direct, basic-auth, serving,
https, no-auth over TLS).
With ``serve_model`` the stack is started with ``SERVE_MODELS`` naming it, so nginx routes it and
init makes the serving token; the ``serve`` profile itself is started by the benchmark.
``down()`` removes containers, network and volumes and may be called at any time, more than
once. CPU time and memory come from each container's cgroup (v1 or v2), found through the
container's init PID, so reading them costs no ``docker`` call during a measurement.
"""

import dataclasses
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflowstack.cabundle import compose_build_ca_bundle

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "mlflowstack-bench"
SERVING = "serving"
COMPOSE_FILES = (ROOT / "compose.yaml", ROOT / "bench" / "compose.bench.yaml")
TLS_COMPOSE_FILES = (ROOT / "compose.tls.yaml", ROOT / "bench" / "compose.bench-tls.yaml")
STACK = ("nginx", "auth", "server")
BASELINE = "basicauth"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B)\s*$")
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


class BenchError(RuntimeError):
    """The benchmark itself cannot go on (a failed goal is not one)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Ports:
    """Host ports, all on 127.0.0.1: the edge, nginx without auth, the server, basic-auth, the
    first scoring process; the https section's edge and nginx without auth over TLS."""

    edge: int
    noauth: int
    direct: int
    basicauth: int
    serving: int
    https: int
    noauth_tls: int


def pick_ports(base: str | None) -> Ports:
    """Free ports from the OS, or BASE, BASE+1, ... (each checked free) when ``base`` is set."""
    count = len(dataclasses.fields(Ports))
    if not base:
        return Ports(*(free_port() for _ in range(count)))
    if not base.isdigit() or not 1024 <= int(base) <= 65535 - count:
        raise BenchError(f"BENCH_PORT_BASE={base!r}: not a port number")
    ports = [int(base) + i for i in range(count)]
    for port in ports:
        with socket.socket() as sock:
            # As a server binds: connections of an earlier run in TIME_WAIT do not count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as error:
                raise BenchError(f"BENCH_PORT_BASE: port {port} is taken ({error})") from error
    return Ports(*ports)


class BenchStack:
    """The stack under test plus its benchmark-only extras, seen from the host."""

    user = "bench"

    def __init__(
        self,
        extra_files: tuple[Path, ...] = (),
        serve_model: str | None = None,
        project: str | None = None,
        settings: dict[str, str] | None = None,
    ):
        """``project``: a second stack beside the first (the replicas section's), on free
        ports; ``settings``: .env settings of this stack on top of compose.yaml's defaults."""
        # Extra override files let a run try other settings (e.g. a candidate cpu_shares).
        self.files = (*COMPOSE_FILES, *extra_files)
        self.project = project or os.environ.get("BENCH_PROJECT") or PROJECT
        self.ports = pick_ports(None if project else os.environ.get("BENCH_PORT_BASE"))
        self.serve_model = serve_model  # "NAME@ALIAS", or None: no serving
        # Fresh secrets per run: nothing here may outlive the project's ``down -v``.
        self.password = secrets.token_urlsafe(18)
        self.basicauth_admin_password = secrets.token_urlsafe(18)
        self.env = {
            **os.environ,
            # Not the developer's .env: what is measured is compose.yaml's defaults plus the
            # settings in the environment, which the report names (cli.SETTINGS).
            "COMPOSE_ENV_FILES": os.devnull,
            "COMPOSE_PROJECT_NAME": self.project,
            "BIND_ADDRESS": "127.0.0.1",
            "HTTP_PORT": str(self.ports.edge),
            # Without a port each entry allows any port, so every published port is accepted.
            "PUBLIC_HOSTNAME": "127.0.0.1,localhost",
            "BENCH_NOAUTH_PORT": str(self.ports.noauth),
            "BENCH_DIRECT_PORT": str(self.ports.direct),
            "BENCH_BASICAUTH_PORT": str(self.ports.basicauth),
            "BENCH_SERVING_PORT": str(self.ports.serving),
            "HTTPS_PORT": str(self.ports.https),
            "BENCH_NOAUTH_TLS_PORT": str(self.ports.noauth_tls),
            # Only when the serving cell runs: the other cells measure the stack without it.
            "SERVE_MODELS": serve_model or "",
            "BENCH_BASICAUTH_ADMIN_PASSWORD": self.basicauth_admin_password,
            "BENCH_BASICAUTH_SECRET_KEY": secrets.token_hex(16),
            **(settings or {}),
        }
        # The build's CA bundle as the README's `docker compose up` finds it (the environment,
        # else .env); failing both, as .ci/run does: behind this kind of machine's
        # TLS-inspecting proxy pip must trust the host bundle.
        ca_bundle = os.environ.get("EXTRA_CA_BUNDLE") or compose_build_ca_bundle(
            ROOT / "compose.yaml"
        )
        if not ca_bundle and HOST_CA_BUNDLE.is_file():
            ca_bundle = str(HOST_CA_BUNDLE)
        if ca_bundle:
            self.env["EXTRA_CA_BUNDLE"] = ca_bundle
        self._cgroups: dict[str, tuple[int, Path | None, Path | None, int]] = {}

    # -- compose -------------------------------------------------------------------------

    def compose(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 900
    ) -> str:
        """Run one compose command in the bench project; return stdout, raise BenchError."""
        files = [arg for path in self.files for arg in ("-f", str(path))]
        command = ["docker", "compose", "-p", self.project, *files, *args]
        try:
            result = subprocess.run(
                command,
                input=input,
                capture_output=True,
                text=True,
                env=self.env,
                cwd=ROOT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise BenchError(f"docker compose {' '.join(args)}: timed out") from error
        if check and result.returncode:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            raise BenchError(f"docker compose {' '.join(args)} failed:\n{tail}")
        return result.stdout

    def build(self, baseline: bool = True) -> None:
        # The basic-auth image starts FROM this project's server image, so that one first.
        self.compose("build")
        # (compose.bench.yaml passes it as SERVER_IMAGE.)
        if baseline:
            self.compose("--profile", "bench", "build", BASELINE)

    def up(self, *services: str, profile: str | None = None) -> float:
        """``up -d --wait`` of the images built before (``--no-build``: compose.yaml's
        ``pull_policy: build`` would rebuild them inside the timing); the seconds until
        healthy."""
        options = ["--profile", profile] if profile else []
        start = time.monotonic()
        self.compose(*options, "up", "-d", "--wait", "--no-build", *services)
        self._cgroups.clear()
        return time.monotonic() - start

    def enable_tls(self, directory: Path) -> float:
        """Switch the running stack to TLS_MODE=self-signed, as an operator would (README,
        HTTPS): stackctl makes the certificate in ``directory`` and installs it, then ``up``
        recreates nginx with compose.tls.yaml and the no-auth TLS server; the seconds ``up``
        took. Plain HTTP then only redirects, so this is the last section of a run."""
        self.files = (*self.files, *TLS_COMPOSE_FILES)
        self.env["TLS_MODE"] = "self-signed"
        stackctl_env = {**self.env, "COMPOSE_FILE": os.pathsep.join(map(str, self.files))}
        for command in (("self-signed", "--force"), ("reload",)):
            result = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "stackctl"), "tls", *command,
                 "--tls-dir", str(directory)],
                env=stackctl_env, capture_output=True, text=True, check=False, timeout=300,
            )  # fmt: skip
            if result.returncode:
                raise BenchError(f"stackctl tls {command[0]} failed: {result.stderr.strip()}")
        return self.up("nginx")

    def forget(self, service: str) -> None:
        """``service``'s container was replaced outside ``up``: find its cgroup again."""
        self._cgroups.pop(service, None)

    def stop(self) -> None:
        """Remove the containers but keep the volumes (the next ``up`` is a restart)."""
        self.compose("down")
        self._cgroups.clear()

    def down(self) -> None:
        """Remove everything of the bench project, volumes included."""
        self.compose(
            "--profile",
            "bench",
            "--profile",
            "tools",
            "--profile",
            "serve",
            "down",
            "-v",
            "--remove-orphans",
            check=False,
            timeout=300,
        )
        self._cgroups.clear()

    def add_user(self, name: str, password: str) -> None:
        """Add an editor the real way: stackctl in the auth image, bcrypt cost 12."""
        self.compose(
            "run",
            "--rm",
            "-T",
            "stackctl",
            "user",
            "add",
            name,
            "--password-stdin",
            input=password + "\n",
        )

    def proxy_secret(self) -> str:
        """nginx's secret for the server: "direct" presents it as a bearer token, as the job
        runner does (server/guard.py), so the bare server accepts the benchmark's calls."""
        path = "/var/lib/mlflow-stack/secrets/proxy-secret"
        return self.compose("exec", "-T", "auth", "cat", path).strip()

    def logs(self, service: str, since: str) -> str:
        return self.compose(
            "--profile", "bench", "--profile", "serve", "logs", "--no-color", "--since", since,
            service,
        )  # fmt: skip

    # -- counters ------------------------------------------------------------------------

    def container_id(self, service: str) -> str:
        found = self.compose(
            "--profile", "bench", "--profile", "serve", "ps", "-q", service
        ).split()
        if not found:
            raise BenchError(f"service {service} is not running")
        return found[0]

    def _cgroup(self, service: str) -> tuple[int, Path | None, Path | None, int]:
        """(cgroup version, CPU directory, memory directory, init PID) of a service."""
        cached = self._cgroups.get(service)
        if cached and Path(f"/proc/{cached[3]}").exists():
            return cached
        container = self.container_id(service)
        pid = int(_docker("inspect", "-f", "{{.State.Pid}}", container).strip())
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        v1 = {}
        unified = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if not controllers:
                unified = path
            for controller in controllers.split(","):
                v1[controller] = (controllers, path)
        if "cpuacct" in v1:
            cpu_dir = Path("/sys/fs/cgroup", v1["cpuacct"][0], v1["cpuacct"][1].lstrip("/"))
            mem = v1.get("memory")
            mem_dir = Path("/sys/fs/cgroup", mem[0], mem[1].lstrip("/")) if mem else None
            entry = (1, cpu_dir, mem_dir, pid)
        elif unified is not None:
            directory = Path("/sys/fs/cgroup", unified.lstrip("/"))
            entry = (2, directory, directory, pid)
        else:
            entry = (0, None, None, pid)
        self._cgroups[service] = entry
        return entry

    def cpu_ns(self, services: tuple[str, ...]) -> int | None:
        """CPU time used so far by all processes of ``services``; None if unreadable."""
        total = 0
        for service in services:
            version, cpu_dir, _, _ = self._cgroup(service)
            try:
                if version == 1:
                    total += int((cpu_dir / "cpuacct.usage").read_text())
                elif version == 2:
                    stat = _keyed((cpu_dir / "cpu.stat").read_text())
                    total += stat["usage_usec"] * 1000
                else:
                    return None
            except (OSError, KeyError, ValueError):
                return None
        return total

    def memory_bytes(self, service: str) -> int | None:
        """Memory in use as ``docker stats`` counts it (usage less inactive file cache)."""
        version, _, mem_dir, _ = self._cgroup(service)
        try:
            if version == 1:
                usage = int((mem_dir / "memory.usage_in_bytes").read_text())
                inactive = _keyed((mem_dir / "memory.stat").read_text()).get("total_inactive_file")
            elif version == 2:
                usage = int((mem_dir / "memory.current").read_text())
                inactive = _keyed((mem_dir / "memory.stat").read_text()).get("inactive_file")
            else:
                return None
        except (OSError, ValueError, TypeError):
            return None
        return usage - (inactive or 0)

    def docker_stats(self, services: tuple[str, ...]) -> dict[str, int]:
        """Memory per service from ``docker stats --no-stream``, in bytes. Where docker says
        0 (an engine that cannot read the container's cgroup reports "0B / 0B"), the same
        count from the cgroup itself (``memory_bytes``)."""
        ids = {self.container_id(service): service for service in services}
        out = _docker("stats", "--no-stream", "--format", "{{json .}}", *ids)
        memory = {}
        for line in out.splitlines():
            row = json.loads(line)
            service = next(s for cid, s in ids.items() if cid.startswith(row["ID"]))
            memory[service] = parse_size(row["MemUsage"].split("/")[0])
            if not memory[service]:
                memory[service] = self.memory_bytes(service) or 0
        return memory


def parse_size(text: str) -> int:
    """``"6.973MiB"`` -> bytes (docker's human-readable sizes)."""
    match = _SIZE.match(text)
    if not match or match[2] not in _UNITS:
        raise BenchError(f"cannot read size {text!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def _keyed(text: str) -> dict[str, int]:
    pairs = (line.split() for line in text.splitlines() if line.strip())
    return {key: int(value) for key, value in pairs}


def _docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise BenchError(f"docker {args[0]} failed: {result.stderr.strip()}")
    return result.stdout
