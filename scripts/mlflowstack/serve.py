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

from mlflowstack import commands
from mlflowstack.files import BundleError

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SERVING = ["exec", "-T", "serving", "python", "/opt/mlflow-stack/serving.py"]


def serve_status(args) -> int:
    return commands._compose(args, *_SERVING, "status")


def serve_rollout(args) -> int:
    if not _MODEL_NAME.fullmatch(args.model):
        raise BundleError(
            f"{args.model[:80]!r} is not a model name of SERVE_MODELS (letters, digits, '.', '_', "
            "'-', at most 64)"
        )
    force = ["--force"] if args.force else []
    return commands._compose(args, *_SERVING, "rollout", args.model, *force)
