"""Secrets the stack generates for itself at first start, kept in the ``secrets`` volume.

Contract: ``ensure_proxy_secret(directory)`` leaves ``directory/proxy-secret`` holding 64
lower-case hex characters (256 random bits) and a newline, mode 0600, owned by the stack's
uid (10001). It creates the file only when missing and never replaces it: nginx, the gate and
the server read it at start, so a new value would need all three restarted.
``ensure_kek_passphrase(directory)`` does the same for ``directory/mlflow-kek-passphrase``.

Why: nginx sends the proxy secret on every request to the gate and the server, which refuse
requests without it (server/guard.py, mlflowstack/forwarded.py). Another container on the
backend network that reaches their addresses (the Docker host has none there) can therefore not
skip the authentication in nginx.

MLflow's AI gateway encrypts the secrets it stores (provider API keys) in the database with a
key derived from ``MLFLOW_CRYPTO_KEK_PASSPHRASE``, whose default is a value built into MLflow:
anyone with a copy of the database could decrypt them. server/start.py hands this file's
passphrase to MLflow. Replacing it would make every stored secret undecryptable, so it is
never replaced here; changing it means MLflow's own ``mlflow crypto rotate-kek`` with the
server stopped, which the stack does not automate.

``ensure_postgres_password(directory)`` does the same for ``directory/password``: the password of
the bundled PostgreSQL's role (the postgres profile, README "PostgreSQL"). It lives in a volume
of its own (``POSTGRES_SECRET_DIR``), because the postgres container reads it and must not see
the proxy secret or the passphrase. PostgreSQL stores it at its first start (postgres/
entrypoint.sh), so a replaced file would no longer match: it is never replaced either.

Run as ``python -m mlflowstack.stacksecrets`` (the init service, before ``stackctl
bootstrap``): creates whichever of these files is missing in ``SECRETS_DIR`` (and in
``POSTGRES_SECRET_DIR`` when set), and says so without printing any value.
"""

import os
import secrets
import sys
from pathlib import Path

from mlflowstack.files import SECRET_MODE, BundleError, create_file

PROXY_SECRET_FILE = "proxy-secret"
KEK_PASSPHRASE_FILE = "mlflow-kek-passphrase"
POSTGRES_PASSWORD_FILE = "password"


def ensure_proxy_secret(directory: Path) -> bool:
    """Create the proxy secret if it is missing; True when this call created it."""
    return create_file(
        directory / PROXY_SECRET_FILE, (secrets.token_hex(32) + "\n").encode(), SECRET_MODE
    )


def read_proxy_secret(directory: Path) -> bytes:
    """The proxy secret as nginx sends it (no newline)."""
    return (directory / PROXY_SECRET_FILE).read_bytes().strip()


def ensure_kek_passphrase(directory: Path) -> bool:
    """Create MLflow's key-encryption passphrase if it is missing (256 random bits as 64 hex
    characters, as MLflow asks for a high-entropy value of 32 characters or more); True when
    this call created it. An existing file is never touched, whatever it holds."""
    return create_file(
        directory / KEK_PASSPHRASE_FILE, (secrets.token_hex(32) + "\n").encode(), SECRET_MODE
    )


def ensure_postgres_password(directory: Path) -> bool:
    """Create the bundled PostgreSQL's password if it is missing (256 random bits as 64 hex
    characters: nothing in a URI or in initdb's password file needs quoting); True when this
    call created it. An existing file is never touched, whatever it holds."""
    return create_file(
        directory / POSTGRES_PASSWORD_FILE, (secrets.token_hex(32) + "\n").encode(), SECRET_MODE
    )


def ensure_secrets(directory: Path) -> list[str]:
    """Create every missing secret of the volume; the names of those this call created."""
    made = []
    if ensure_proxy_secret(directory):
        made.append(PROXY_SECRET_FILE)
    if ensure_kek_passphrase(directory):
        made.append(KEK_PASSPHRASE_FILE)
    return made


def main(environ=os.environ) -> int:
    directory = environ.get("SECRETS_DIR")
    if not directory:
        print("stacksecrets: SECRETS_DIR is not set", file=sys.stderr)
        return 2
    postgres_dir = environ.get("POSTGRES_SECRET_DIR")
    try:
        made = [(name, directory) for name in ensure_secrets(Path(directory))]
        if postgres_dir and ensure_postgres_password(Path(postgres_dir)):
            made.append((POSTGRES_PASSWORD_FILE, postgres_dir))
    except BundleError as error:
        print(f"stacksecrets: {error}", file=sys.stderr)
        return 1
    for name, where in made:
        print(f"stacksecrets: created {name} in {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
