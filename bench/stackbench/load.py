"""Load generation with wrk (Debian package ``wrk``) and bench/wrk/mlflow.lua.

Contract: ``run_wrk`` sends one kind of MLflow call (or a model's prediction) for a bounded
number of whole seconds over ``connections`` keep-alive connections (or one connection per
request with ``close``) to a 127.0.0.1 port, and returns every answer counted by status plus
wrk's latency percentiles. ``start_wrk``/``finish_wrk`` do the same in the background, for
overlapping loads.
"""

import base64
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

from stackbench.stack import BenchError

LUA = Path(__file__).resolve().parents[1] / "wrk" / "mlflow.lua"
# The MLflow calls measured: label -> the Lua script's request kind.
KINDS = {
    "log-metric": "metric",
    "log-batch-100": "batch",
    "runs-search": "search",
    "experiments-list": "list",
}
# The served model's calls (stackbench.serving): label -> the Lua script's request kind.
SERVING_KINDS = {"predict-5": "predict"}

# The iris features as the benchmark's model is trained on them, and the body of one
# prediction: 5 rows in MLflow's dataframe_split JSON (what a client's DataFrame becomes).
IRIS_COLUMNS = ("sepal_length", "sepal_width", "petal_length", "petal_width")
PREDICTION_ROWS = (
    (5.1, 3.5, 1.4, 0.2),
    (6.2, 2.9, 4.3, 1.3),
    (7.7, 3.0, 6.1, 2.3),
    (5.0, 3.4, 1.5, 0.2),
    (6.4, 3.2, 5.3, 2.3),
)
PREDICTION_BODY = json.dumps(
    {
        "dataframe_split": {
            "columns": list(IRIS_COLUMNS),
            "data": [list(r) for r in PREDICTION_ROWS],
        }
    },
    separators=(",", ":"),
)


def wrk_binary() -> str:
    """Path of wrk, or BenchError telling how to install it."""
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk is not installed: run `apt-get install -y wrk` (Debian) and retry")
    return found


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a load goes: a port, credentials, the ids that port's server knows."""

    port: int
    authorization: str
    experiment_id: str
    run_id: str
    close: bool = False  # one connection per request ("Connection: close")
    path: str = ""  # the URL path of a prediction (kind "predict")
    headers: tuple[str, ...] = ()  # more request headers, "Name: value"
    scheme: str = "http"  # "https": wrk speaks TLS (it does not check the certificate)


@dataclasses.dataclass
class WrkResult:
    """One wrk run. ``rate`` counts 2xx answers only; anything else is in ``failures``."""

    seconds: float
    statuses: dict[int, int]
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_ms: float | None = None  # CPU time of the containers serving it (see Bench.run)
    wall: float = 0.0  # seconds the wrk process ran (start-up and tear-down included)

    @property
    def ok(self) -> int:
        return sum(count for status, count in self.statuses.items() if 200 <= status < 300)

    @property
    def failures(self) -> int:
        return sum(self.statuses.values()) - self.ok + self.socket_errors

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float | None:
        return self.cpu_ms / self.ok if self.cpu_ms is not None and self.ok else None


def _command(
    target: Target, kind: str, connections: int, seconds: int, authorization: str | None = None
) -> list[str]:
    arguments = [target.experiment_id if kind in ("search", "list") else target.run_id]
    if kind == "predict":
        arguments = [target.path, PREDICTION_BODY]
    command = [wrk_binary(), "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
    command += ["-s", str(LUA)]
    if authorization or target.authorization:  # none for a scoring process's own port
        command += ["-H", f"Authorization: {authorization or target.authorization}"]
    if target.close:
        command += ["-H", "Connection: close"]
    for header in target.headers:
        command += ["-H", header]
    return [*command, f"{target.scheme}://127.0.0.1:{target.port}", "--", kind, *arguments]


def start_wrk(
    target: Target, kind: str, connections: int, seconds: int, authorization: str | None = None
) -> subprocess.Popen:
    """Start wrk in the background; ``authorization`` overrides the target's credentials."""
    command = _command(target, kind, connections, seconds, authorization)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(process: subprocess.Popen, seconds: int) -> WrkResult:
    """Wait for a ``start_wrk`` process (bounded) and parse its result line."""
    try:
        out, err = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired as error:
        process.kill()
        process.communicate()
        raise BenchError("wrk did not stop in time") from error
    line = next((x for x in out.splitlines() if x.startswith("BENCH-RESULT ")), None)
    if process.returncode or line is None:
        raise BenchError(f"wrk failed ({process.returncode}): {(err or out).strip()[-500:]}")
    data = json.loads(line.removeprefix("BENCH-RESULT "))
    return WrkResult(
        seconds=data["duration_us"] / 1e6,
        statuses={int(status): count for status, count in data["statuses"].items()},
        socket_errors=sum(
            data[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
        ),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def run_wrk(target: Target, kind: str, connections: int, seconds: int) -> WrkResult:
    """One bounded wrk run in the foreground; ``wall`` is how long the process took."""
    started = time.monotonic()
    result = finish_wrk(start_wrk(target, kind, connections, seconds), seconds)
    result.wall = time.monotonic() - started
    return result
