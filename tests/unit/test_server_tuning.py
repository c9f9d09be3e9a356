"""server/gunicorn.conf.py's worker tuning, and the MLflow behaviour it works around."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "server" / "gunicorn.conf.py"

_RUN_HOOK = """
import gc, runpy, sys, types
conf = runpy.run_path(sys.argv[1])
messages = []
worker = types.SimpleNamespace(log=types.SimpleNamespace(info=lambda *a: messages.append(a)))
conf["post_worker_init"](worker)
print(sys.modules.get("mlflow.server.auth", "importable") is None, gc.get_freeze_count() > 0)
from starlette.responses import FileResponse
print(FileResponse.chunk_size, FileResponse.__call__.__module__)
"""


def _run_hook(**env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_HOOK, str(CONF)],
        capture_output=True,
        text=True,
        check=True,
        # registry.install() opens the default registry store (sqlite:///mlflow.db in the cwd).
        cwd=tempfile.mkdtemp(prefix="server-hook-"),
        env={"PATH": "/usr/bin:/bin", **env},
    )
    return result.stdout.strip()


def test_post_worker_init_default_marks_auth_absent_and_freezes():
    assert _run_hook().splitlines()[0] == "True True"


def test_post_worker_init_gc_freeze_off_leaves_collector_alone():
    assert _run_hook(SERVER_GC_FREEZE="false").splitlines()[0] == "True False"


def test_post_worker_init_downloads_get_big_chunks_and_nginx_handoff():
    assert _run_hook().splitlines()[1] == f"{2**20} accel"


def test_pinned_mlflow_still_imports_its_auth_app_in_runs_search():
    """When this fails, MLflow stopped the per-call import: drop the workaround in the hook."""
    handlers = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "handlers.py"
    source = handlers.read_text()
    search = source[source.index("def search_runs_impl(") :]
    search = search[: search.index("\ndef ")]
    assert "from mlflow.server import auth" in search
