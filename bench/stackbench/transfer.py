"""Artifact transfers with the real MLflow client, through the proxy and straight to the server.

Contract: ``artifacts`` writes one random file of ``size`` bytes to a temporary directory,
uploads it with ``mlflow.log_artifact`` and downloads it with ``mlflow.artifacts.
download_artifacts`` through nginx+gate and directly, alternating the order (ABBA), while it
samples nginx's memory; the file and every download are deleted before it returns. Each
transfer runs in a child process of the project's venv (it has mlflow), which times only the
transfer call itself: ``python -m stackbench.transfer upload FILE EXPERIMENT_ID`` or
``... download RUN_ID NAME DIRECTORY`` prints one JSON line.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stackbench.stack import ROOT, BenchError, BenchStack

CHUNK = 64 * 2**20


@dataclasses.dataclass
class Transfer:
    """One timed transfer: ``direction`` upload/download, ``path`` proxy/direct."""

    direction: str
    path: str
    size: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.size / 2**20 / self.seconds


@dataclasses.dataclass
class ArtifactResult:
    transfers: list[Transfer]
    nginx_idle: int | None  # bytes before the first transfer
    nginx_max: int | None  # the highest sample during the proxied transfers


def venv_python() -> str:
    """The project's venv interpreter (it has mlflow), else the running one."""
    candidate = ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


class _Sampler(threading.Thread):
    """Samples one container's memory every 100 ms while ``active`` is set."""

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read, self.peak = read, None
        self.active, self.stopped = threading.Event(), threading.Event()

    def run(self):
        while not self.stopped.wait(0.1):
            if self.active.is_set() and (value := self.read()) is not None:
                self.peak = max(self.peak or 0, value)


def _child(env: dict[str, str], *args: str) -> dict:
    command = [venv_python(), "-m", "stackbench.transfer", *args]
    # bench/ for stackbench, scripts/ for mlflowstack (stackbench.stack imports it).
    bench = Path(__file__).resolve().parents[1]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(bench), str(bench.parent / "scripts")])}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=1800, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"artifact {args[0]} timed out") from error
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise BenchError(f"artifact {args[0]} failed: {result.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def artifacts(stack: BenchStack, experiment_id: str, size: int, rounds: int) -> ArtifactResult:
    base = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    base["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "1800"
    envs = {
        "proxy": {
            **base,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack.ports.edge}",
            "MLFLOW_TRACKING_USERNAME": stack.user,
            "MLFLOW_TRACKING_PASSWORD": stack.password,
        },
        "direct": {
            **base,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack.ports.direct}",
            # The bare server admits the proxy secret as a bearer token (server/guard.py).
            "MLFLOW_TRACKING_TOKEN": stack.proxy_secret(),
        },
    }
    sampler = _Sampler(lambda: stack.memory_bytes("nginx"))
    idle = stack.memory_bytes("nginx")
    transfers = []
    with tempfile.TemporaryDirectory(prefix="mlflowstack-bench-") as tmp:
        source = Path(tmp, "blob.bin")
        with source.open("wb") as file:
            for offset in range(0, size, CHUNK):
                file.write(os.urandom(min(CHUNK, size - offset)))
        sampler.start()
        try:
            for index in range(rounds):
                order = ("proxy", "direct") if index % 2 == 0 else ("direct", "proxy")
                for path in order:
                    if path == "proxy":
                        sampler.active.set()
                    up = _child(envs[path], "upload", str(source), experiment_id)
                    transfers.append(Transfer("upload", path, size, up["seconds"]))
                    destination = Path(tmp, f"down-{index}-{path}")
                    down = _child(
                        envs[path], "download", up["run_id"], source.name, str(destination)
                    )
                    if down["bytes"] != size:
                        raise BenchError(f"download via {path}: {down['bytes']} of {size} bytes")
                    transfers.append(Transfer("download", path, size, down["seconds"]))
                    sampler.active.clear()
                    _remove_tree(destination)
        finally:
            sampler.stopped.set()
            sampler.join()
    return ArtifactResult(transfers, idle, sampler.peak)


def _remove_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    directory.rmdir()


def _main(argv: list[str]) -> int:
    import mlflow  # only in the child: importing mlflow takes seconds

    if argv[0] == "upload":
        source, experiment_id = argv[1:3]
        with mlflow.start_run(experiment_id=experiment_id) as run:
            started = time.perf_counter()
            mlflow.log_artifact(source)
            seconds = time.perf_counter() - started
        print(json.dumps({"run_id": run.info.run_id, "seconds": seconds}))
    else:
        run_id, name, destination = argv[1:4]
        os.makedirs(destination)
        started = time.perf_counter()
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=name, dst_path=destination
        )
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "bytes": os.path.getsize(local)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
