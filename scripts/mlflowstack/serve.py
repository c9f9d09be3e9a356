"""``stackctl serve``: the serve profile's models, seen and rolled out from the host.

Contract: ``serve status`` prints what each model of SERVE_MODELS serves (version, port, why
not); ``serve rollout MODEL [--force]`` makes MODEL serve the version its alias names now,
with no failed request (the new version loads beside the old one, which stops only once the
new one answers; server/serving.py). Both run ``docker compose exec`` in the running
``serving`` container, so they need the profile up. MODEL is checked here with the rule
SERVE_MODELS names follow, so nothing else reaches the container's command line. The exit
status is the container's: 0 when done (or already serving that version), 1 otherwise.
"""

import re
import subprocess

from mlflowstack import commands
from mlflowstack.files import BundleError

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SERVING = ["exec", "-T", "serving", "python", "/opt/mlflow-stack/serving.py"]
NOT_RUNNING = (
    "the serving container is not running: set SERVE_MODELS and COMPOSE_PROFILES=serve in .env, "
    "then docker compose up -d"
)


def _require_serving_running(args) -> None:
    """One clear line instead of compose's own error when the profile is not up."""
    command = commands.compose_command(
        args, "--profile", "serve", "ps", "--status", "running", "--quiet", "serving"
    )
    try:
        running = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BundleError("docker is not installed here") from None
    if running.returncode == 0 and not running.stdout.strip():
        raise BundleError(NOT_RUNNING)


def serve_status(args) -> int:
    _require_serving_running(args)
    return commands._compose(args, *_SERVING, "status")


def serve_rollout(args) -> int:
    if not _MODEL_NAME.fullmatch(args.model):
        raise BundleError(
            f"{args.model[:80]!r} is not a model name of SERVE_MODELS (letters, digits, '.', '_', "
            "'-', at most 64)"
        )
    force = ["--force"] if args.force else []
    _require_serving_running(args)
    return commands._compose(args, *_SERVING, "rollout", args.model, *force)
