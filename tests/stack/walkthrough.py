"""The first-project walkthrough (examples/decision-tree) as a user runs it, for stack tests.

Plain helpers, no fixtures, so any test module can import them (``from walkthrough import
...``). Contract:

- A user's *tracking env* is a dict of the MLFLOW_TRACKING_* variables a client sets
  (``tracking_env``): the URI and a user name and password, or an API token.
- ``mlflow_run`` runs ``mlflow run examples/decision-tree --env-manager local`` in a
  subprocess of this test interpreter (so the entry point's ``python`` has mlflow and
  scikit-learn), with exactly that tracking env (no other MLFLOW_* variable of the test
  process leaks in), and returns the exit status, the combined output and the run's ID (None
  if ``mlflow run`` ended before creating a run). ``run_project`` does the same, asserts
  success and returns the run ID.
- ``client_as(env)``: inside the ``with`` block, the in-process MLflow client (MlflowClient,
  ``mlflow.pyfunc.load_model``, ...) talks to the stack as that env's user; the previous
  variables are restored after it.
- ``train_two_and_promote`` runs the project twice (depths 1 and 3 by default) into one
  registered model and sets the alias ``production`` on the version with the higher test
  accuracy: (model_name, better_version, other_version), versions as MLflow's strings.
- ``unique_model_name``: the stack is shared by every test of a session, so each model name
  carries a random suffix.
"""

import contextlib
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

PROJECT_DIR = Path(__file__).resolve().parents[2] / "examples" / "decision-tree"
# A run through the stack took ~14 s on the 2-core machine (a bad parameter ~8 s); a busy one
# can take far longer (log_model alone is ~6 s: it saves, reloads and checks the model).
RUN_TIMEOUT = 300
_TRACKING_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# mlflow run logs "=== Running command '...' in run with ID '<32 hex>' ===" once it has a run.
_RUN_ID = re.compile(r"in run with ID '([0-9a-f]{32})'")


@dataclass
class ProjectRun:
    returncode: int
    output: str  # stdout and stderr interleaved, as a terminal would show them
    run_id: str | None


def tracking_env(url: str, username=None, password=None, token=None) -> dict[str, str]:
    """The variables an MLflow client sets to reach the stack as this user (or token)."""
    env = {"MLFLOW_TRACKING_URI": url}
    if token is not None:
        env["MLFLOW_TRACKING_TOKEN"] = token
    else:
        env["MLFLOW_TRACKING_USERNAME"] = username
        env["MLFLOW_TRACKING_PASSWORD"] = password
    return env


def unique_model_name(prefix: str = "iris") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mlflow_run(
    stack_env: dict[str, str],
    tree_depth: int | str,
    model_name: str,
    experiment: str | None = None,
    timeout: float = RUN_TIMEOUT,
) -> ProjectRun:
    """``mlflow run`` of the example project as a user runs it; see the module's contract."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(stack_env)
    # The entry point's command is "python main.py ...": this interpreter's, found on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "--env-manager", "local"]
    command += ["-P", f"tree_depth={tree_depth}", "-P", f"model_name={model_name}"]
    if experiment is not None:
        command += ["--experiment-name", experiment]
    result = subprocess.run(
        command,
        env=env,
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    found = _RUN_ID.search(result.stdout)
    return ProjectRun(result.returncode, result.stdout, found.group(1) if found else None)


def run_project(
    stack_env: dict[str, str], tree_depth: int, model_name: str, experiment: str | None = None
) -> str:
    """A successful ``mlflow run`` of the example project; its run ID."""
    run = mlflow_run(stack_env, tree_depth, model_name, experiment)
    assert run.returncode == 0 and run.run_id, f"mlflow run failed:\n{run.output}"
    return run.run_id


@contextlib.contextmanager
def client_as(stack_env: dict[str, str]):
    """An MlflowClient for the env's user; mlflow's module functions use that user too."""
    saved = {name: os.environ.get(name) for name in _TRACKING_VARIABLES}
    try:
        for name in _TRACKING_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(stack_env)
        yield MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def version_of_run(client: MlflowClient, model_name: str, run_id: str) -> str:
    """The one version of ``model_name`` the run registered."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    assert len(versions) == 1, (model_name, run_id, versions)
    return versions[0].version


def train_two_and_promote(
    stack_env: dict[str, str],
    experiment: str | None = None,
    model_name: str | None = None,
    depths: tuple[int, int] = (1, 3),
) -> tuple[str, str, str]:
    """Two project runs into one registered model; ``production`` on the more accurate one."""
    model_name = model_name or unique_model_name()
    run_ids = [run_project(stack_env, depth, model_name, experiment) for depth in depths]
    with client_as(stack_env) as client:
        accuracy = {
            version_of_run(client, model_name, run_id): client.get_run(run_id).data.metrics[
                "accuracy"
            ]
            for run_id in run_ids
        }
        better, other = sorted(accuracy, key=accuracy.get, reverse=True)
        client.set_registered_model_alias(model_name, "production", better)
    return model_name, better, other
