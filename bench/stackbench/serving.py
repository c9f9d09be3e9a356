"""The serving cell's set-up and footprint: a registered model, the serve profile's start, and
the memory of its processes.

Contract: ``register`` trains a decision tree on iris (scikit-learn's copy, no download) in a
child process of the project's venv and registers it through nginx as the bench user (an
editor), with the alias of ``MODEL`` (``python -m stackbench.serving register NAME ALIAS``
prints one JSON line). ``start`` runs ``docker compose --profile serve up -d`` of the serving
service and times it to the first 200 of a prediction through nginx and the gate; ``remove``
stops and removes the service again (the model stays registered). ``secret_header`` is the
serving secret nginx adds to every prediction, which the scoring processes require.
``processes`` reads, inside the serving container, every process's resident memory from /proc
and names each by its role in server/serving.py (supervisor, scorer, ...).
"""

import dataclasses
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stackbench.load import IRIS_COLUMNS, PREDICTION_BODY
from stackbench.stack import SERVING, BenchError, BenchStack
from stackbench.transfer import venv_python

MODEL = "iris@production"  # SERVE_MODELS of the benchmark's stack: one model, so port 5100
NAME = MODEL.split("@")[0]
EDGE_PATH = f"/serving/{NAME}/invocations"  # through nginx (and the gate, on the edge)
DIRECT_PATH = "/invocations"  # the scoring process's own
START_TIMEOUT = 300.0  # seconds (serving.py's own load timeout)
SECRET_FILE = "/var/lib/mlflow-serving/serving-secret"  # in the serving container

# Inside the container (python of the server image): pid, RSS and peak RSS in KiB, command.
_PROCESSES = r"""
import os
me = os.getpid()
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == me:
        continue
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        continue
    kib = [status.get(key, "0 kB").split()[0] for key in ("VmRSS", "VmHWM")]
    print(pid, *kib, command[:300], sep="\t")
"""
_ROLES = (  # (role, what its command line contains), first match wins
    ("init", "docker-init"),  # compose's init: true ("docker-init -- python serving.py run")
    ("scorer", "serving.py score"),
    ("supervisor", "serving.py run"),
    ("fetch", "serving.py fetch"),
    ("health check", "health"),
)


@dataclasses.dataclass
class Start:
    """One start of the serve profile: ``up -d`` returned after ``up_seconds``; the first
    prediction through nginx answered 200 after ``first_prediction_seconds`` (both from the
    moment ``up`` was called); ``tries`` predictions were sent until then."""

    up_seconds: float
    first_prediction_seconds: float
    tries: int


@dataclasses.dataclass
class Process:
    role: str
    pid: int
    rss: int  # bytes
    peak: int  # bytes (VmHWM: the highest RSS so far)


def register(stack: BenchStack, alias_of: str = MODEL) -> str:
    """Train and register the model as the bench user through nginx; its version."""
    name, alias = alias_of.split("@")
    bench = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack.ports.edge}",
        "MLFLOW_TRACKING_USERNAME": stack.user,
        "MLFLOW_TRACKING_PASSWORD": stack.password,
        # bench/ for stackbench, scripts/ for mlflowstack (stackbench.stack imports it).
        "PYTHONPATH": os.pathsep.join([str(bench), str(bench.parent / "scripts")]),
        "GIT_PYTHON_REFRESH": "quiet",
    }
    command = [venv_python(), "-m", "stackbench.serving", "register", name, alias]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=600, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError("registering the serving model timed out") from error
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise BenchError(f"registering the serving model failed: {result.stderr.strip()[-800:]}")
    return json.loads(lines[-1])["version"]


def predict(
    port: int, path: str, authorization: str | None, more: tuple[str, ...] = ()
) -> tuple[int, str]:
    """One prediction: its status (0 when the connection failed) and the start of the answer.
    ``more``: further headers, "Name: value"."""
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    headers |= dict(header.split(": ", 1) for header in more)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=PREDICTION_BODY, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()[:300].decode(errors="replace")
    except OSError as error:
        return 0, str(error)
    finally:
        connection.close()


def start(stack: BenchStack, authorization: str) -> Start:
    """``up -d`` of the serving service, timed to its first prediction through nginx."""
    started = time.monotonic()
    stack.compose("--profile", "serve", "up", "-d", "--no-build", SERVING)
    stack.forget(SERVING)
    up_seconds = time.monotonic() - started
    tries = 0
    while True:
        tries += 1
        if predict(stack.ports.edge, EDGE_PATH, authorization)[0] == 200:
            return Start(up_seconds, time.monotonic() - started, tries)
        if time.monotonic() - started > START_TIMEOUT:
            tail = stack.logs(SERVING, "10m")[-1500:]
            raise BenchError(f"no prediction within {START_TIMEOUT:.0f} s:\n{tail}")
        time.sleep(0.05)


def secret_header(stack: BenchStack) -> str:
    """The header nginx adds to every prediction (the serve profile's own secret, made by
    init): the scoring processes refuse requests without it, so "direct" presents it, as the
    matrix's direct path presents the proxy secret to the server."""
    secret = stack.compose("exec", "-T", SERVING, "cat", SECRET_FILE).strip()
    if not secret:
        raise BenchError(f"no serving secret in {SECRET_FILE}")
    return f"X-Serving-Secret: {secret}"


def remove(stack: BenchStack) -> None:
    stack.compose("--profile", "serve", "rm", "--stop", "--force", SERVING)
    stack.forget(SERVING)


def processes(stack: BenchStack) -> list[Process]:
    """Every process in the serving container (but this reader), with its role."""
    return parse_processes(stack.compose("exec", "-T", SERVING, "python", "-c", _PROCESSES))


def parse_processes(out: str) -> list[Process]:
    """The reader's lines (pid, RSS KiB, peak KiB, command; tab-separated) as processes."""
    found = []
    for line in out.splitlines():
        pid, rss, peak, command = line.split("\t", 3)
        role = next((role for role, mark in _ROLES if mark in command), "other")
        found.append(Process(role, int(pid), int(rss) * 1024, int(peak) * 1024))
    return found


def _register_main(name: str, alias: str) -> int:
    """In the child: a depth-3 tree on iris with a signature, registered, the alias set."""
    import mlflow
    import mlflow.sklearn
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    features, labels = load_iris(return_X_y=True)
    frame = pd.DataFrame(features, columns=list(IRIS_COLUMNS))
    model = DecisionTreeClassifier(max_depth=3, random_state=0).fit(frame, labels)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(frame, model.predict(frame)),
            registered_model_name=name,
            skops_trusted_types=["sklearn.tree._tree.Tree"],
        )
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, alias, version)
    print(json.dumps({"version": version}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "register":
        sys.exit(_register_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m stackbench.serving register NAME ALIAS", file=sys.stderr)
    sys.exit(2)
