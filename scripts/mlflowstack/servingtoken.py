"""The serving profile's own API token, kept by ``stackctl bootstrap`` (the ``init`` service).

Contract: ``keep_serving_token(store, directory, wanted)``:

- ``wanted`` (SERVE_MODELS names models): the tokens file holds a token ``serving`` with the
  role ``viewer`` and no expiry whose secret is ``directory/token`` (mode 0600). The file's
  secret is kept only while the tokens file holds exactly that token: anything else (a missing
  or malformed file, no such token because an operator revoked it, another secret or role)
  gets a fresh secret, so a revoked secret is never registered again. Nothing changes when
  all of that already holds (every ``up`` runs init).
- ``wanted`` also leaves ``directory/serving-secret`` (64 hex characters, 0600, never replaced
  once made): nginx sends it with every prediction and the scoring processes refuse requests
  without it, so another container on the backend network that reaches the serving
  container's address predicts nothing without a login. It is not the stack's proxy secret,
  which would let a model (code) speak to the server as anyone: this one opens only the
  scoring processes.
- not ``wanted``: the token and both files are removed, so no credential lies around unused.
- Returns one line saying what changed, or "" when nothing did. A user already named
  ``serving`` is not touched: BundleError says so (the serving container then cannot fetch).

Why a viewer token: the serving container runs models, which are code; with this token it can
read what any viewer can and change nothing (server/serving.py). The secret is printed nowhere.
"""

import secrets
from pathlib import Path

from mlflowstack.ensure import converge_token
from mlflowstack.files import SECRET_MODE, create_file, write_atomic
from mlflowstack.users import (
    BundleError,
    UserStore,
    new_token_secret,
    token_digest,
    validate_token_secret,
)

SERVING_TOKEN_NAME = "serving"
SERVING_TOKEN_FILE = "token"
SERVING_SECRET_FILE = "serving-secret"


def _read_secret(path: Path) -> str | None:
    try:
        secret = path.read_text().strip()
        validate_token_secret(secret)
    except (OSError, UnicodeDecodeError, BundleError):
        return None
    return secret


def keep_serving_token(store: UserStore, directory: Path, wanted: bool) -> str:
    path = Path(directory) / SERVING_TOKEN_FILE
    secret_path = Path(directory) / SERVING_SECRET_FILE
    if not wanted:
        changes = converge_token(store, SERVING_TOKEN_NAME, "viewer", "absent", None, None)
        existed = path.exists() or secret_path.exists()
        path.unlink(missing_ok=True)
        secret_path.unlink(missing_ok=True)
        return "removed the serving token (SERVE_MODELS is empty)" if changes or existed else ""
    made_secret = create_file(secret_path, (secrets.token_hex(32) + "\n").encode(), SECRET_MODE)
    secret = _read_secret(path)
    if secret is not None:
        mine = [t for t in store.load_tokens().values() if t.name == SERVING_TOKEN_NAME]
        held = [(t.digest, t.role, t.expires) for t in mine]
        if held == [(token_digest(secret), "viewer", None)]:
            return "created the serving proxy secret" if made_secret else ""
    # Whoever copied the old secret (a model's code could read it) keeps nothing.
    secret, fresh = new_token_secret(), True
    try:
        changes = converge_token(store, SERVING_TOKEN_NAME, "viewer", "present", secret, None)
    except BundleError as error:
        raise BundleError(f"the serving profile's token: {error}") from None
    if fresh:
        # After the tokens file: a crash in between leaves a token nobody holds, replaced on
        # the next start, never a file whose secret the gate does not know.
        write_atomic(path, (secret + "\n").encode(), SECRET_MODE)
    return f"serving token: {', '.join(changes) or 'kept'}" if changes or fresh else ""
