"""server/gunicorn.conf.py's worker tuning, and the MLflow behaviour it works around."""

import atexit
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[2] / "server" / "gunicorn.conf.py"

# Each scenario runs the hook in a worker of its own, forked, as gunicorn forks its workers,
# after MLflow is imported: importing it takes seconds, the hook itself little.
_RUN_HOOK = """
import gc, json, os, runpy, sys, types
conf_path, scenarios = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(conf_path))
import accel, registry, mlflow.server.handlers
for name, env in scenarios.items():
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.update(env)
            conf = runpy.run_path(conf_path)
            log = types.SimpleNamespace(info=lambda *a: None)
            conf["post_worker_init"](types.SimpleNamespace(log=log))
            from starlette.responses import FileResponse
            result = {
                "auth_absent": sys.modules.get("mlflow.server.auth", "importable") is None,
                "frozen": gc.get_freeze_count() > 0,
                "chunk_size": FileResponse.chunk_size,
                "call_module": FileResponse.__call__.__module__,
                "confined": __import__(
                    "mlflow.store.artifact.artifact_repository_registry", fromlist=["x"]
                )._artifact_repository_registry.get_artifact_repository.__name__,
            }
            print(json.dumps({name: result}), flush=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
"""

SCENARIOS = {"default": {}, "gc_freeze_off": {"SERVER_GC_FREEZE": "false"}}
_started: list[tuple[subprocess.Popen, str]] = []


def start_early() -> None:
    """Start the workers now (tests/conftest.py calls this once tests are collected): they
    take seconds, and run on another core while the tests before these run."""
    # registry.install() opens the default registry store (sqlite:///mlflow.db in the cwd).
    cwd = tempfile.mkdtemp(prefix="server-hook-")
    run = subprocess.Popen(
        [sys.executable, "-c", _RUN_HOOK, str(CONF), json.dumps(SCENARIOS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        # The image sets the artifact destination; confine() reads it.
        env={"PATH": "/usr/bin:/bin", "MLFLOW_ARTIFACTS_DESTINATION": f"{cwd}/artifacts"},
    )
    _started.append((run, cwd))
    # Also when no test gets to wait for it (a failure with -x, an interrupt).
    atexit.register(_discard, run, cwd)


def _discard(run: subprocess.Popen, cwd: str) -> None:
    if run.poll() is None:
        run.kill()
        run.communicate()
    shutil.rmtree(cwd, ignore_errors=True)


@pytest.fixture(scope="module")
def hook():
    """What post_worker_init left behind in a worker, per scenario of SCENARIOS."""
    if not _started:
        start_early()
    run, cwd = _started[0]
    try:
        stdout, stderr = run.communicate(timeout=300)
    finally:
        _discard(run, cwd)
    assert run.returncode == 0, stderr
    results = {}
    for line in stdout.splitlines():
        results.update(json.loads(line))
    assert results.keys() == SCENARIOS.keys(), stderr
    return results


def test_post_worker_init_default_marks_auth_absent_and_freezes(hook):
    assert (hook["default"]["auth_absent"], hook["default"]["frozen"]) == (True, True)


def test_post_worker_init_gc_freeze_off_leaves_collector_alone(hook):
    assert (hook["gc_freeze_off"]["auth_absent"], hook["gc_freeze_off"]["frozen"]) == (True, False)


def test_post_worker_init_downloads_get_big_chunks_and_nginx_handoff(hook):
    assert (hook["default"]["chunk_size"], hook["default"]["call_module"]) == (2**20, "accel")


def test_pinned_mlflow_still_imports_its_auth_app_in_runs_search():
    """When this fails, MLflow stopped the per-call import: drop the workaround in the hook."""
    handlers = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "handlers.py"
    source = handlers.read_text()
    search = source[source.index("def search_runs_impl(") :]
    search = search[: search.index("\ndef ")]
    assert "from mlflow.server import auth" in search


def test_post_worker_init_confines_artifact_repositories(hook):
    """artifactstore.confine wraps the registry every artifact repository comes from."""
    assert hook["default"]["confined"] == "confined"
