"""Secrets the stack generates for itself at first start, each in the volume of the services
that read it (compose.yaml, "Who reads which secret"): ``secrets`` for the proxy secret (nginx,
the gate, the server), ``server-secrets`` for MLflow's key-encryption passphrase (the server
alone).

Contract: ``ensure_proxy_secret(directory)`` leaves ``directory/proxy-secret`` holding 64
lower-case hex characters (256 random bits) and a newline, mode 0600, owned by the stack's
uid (10001). It creates the file only when missing and never replaces it: nginx, the gate and
the server read it at start, so a new value would need all three restarted.
``ensure_kek_passphrase(directory)`` does the same for ``directory/mlflow-kek-passphrase``.
``move_kek_passphrase(shared, server)`` moves a passphrase that a stack before the split kept
in the shared volume into the server's, once, and never loses or replaces one (see there).
``ensure_secrets(shared, server)`` moves first, then creates what is missing: a stack upgraded
from the old layout keeps its passphrase and never gets a new one. The old place then holds an
empty directory of that name (``mark_kek_moved``), so that older code on these volumes can
neither make a passphrase there nor use one.

Why: nginx sends the proxy secret on every request to the gate and the server, which refuse
requests without it (server/guard.py, mlflowstack/forwarded.py). Another container on the
backend network that reaches their addresses (the Docker host has none there) can therefore not
skip the authentication in nginx.

MLflow's AI gateway encrypts the secrets it stores (provider API keys) in the database with a
key derived from ``MLFLOW_CRYPTO_KEK_PASSPHRASE``, whose default is a value built into MLflow:
anyone with a copy of the database could decrypt them. server/start.py hands this file's
passphrase to MLflow. Replacing it would make every stored secret undecryptable, so it is
never replaced here; changing it means MLflow's own ``mlflow crypto rotate-kek`` with the
server stopped, which the stack does not automate. Only the server needs it, so it lives in a
volume only init, the server and stackctl (backup, restore) mount: a compromised nginx or gate
never sees it.

``ensure_postgres_password(directory)`` does the same for ``directory/password``: the password of
the bundled PostgreSQL's role (the postgres profile, README "PostgreSQL"). It lives in a volume
of its own (``POSTGRES_SECRET_DIR``), because the postgres container reads it and must not see
the proxy secret or the passphrase. PostgreSQL stores it at its first start (postgres/
entrypoint.sh), so a replaced file would no longer match: it is never replaced either.

Run as ``python -m mlflowstack.stacksecrets`` (the init service, before ``stackctl
bootstrap``): moves the passphrase out of ``SECRETS_DIR`` into ``SERVER_SECRETS_DIR`` if a
stack before the split left it there, creates whichever file is missing (the PostgreSQL password
in ``POSTGRES_SECRET_DIR`` when set), and says so without printing any value.
"""

import os
import secrets
import sys
from pathlib import Path

from mlflowstack.files import SECRET_MODE, BundleError, create_file, remove_file

PROXY_SECRET_FILE = "proxy-secret"
KEK_PASSPHRASE_FILE = "mlflow-kek-passphrase"
POSTGRES_PASSWORD_FILE = "password"
# The secrets of the server-secrets volume: a stack before the split kept them in secrets.
SERVER_ONLY = frozenset({KEK_PASSPHRASE_FILE})


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


def move_kek_passphrase(shared: Path, server: Path) -> str | None:
    """Move ``shared/mlflow-kek-passphrase`` (where stacks before the split kept it) into
    ``server``; what happened: None (nothing in ``shared``, or ``shared`` is ``server``),
    ``"moved"``, or ``"removed"`` (the server's copy was there already with the same bytes: a
    move cut short, finished now).

    The server's copy is written (0600, fsync) and read back before the shared one is removed,
    so a move killed at any point leaves at least one whole copy and the next run finishes it.
    Two different passphrases are a BundleError and neither file is touched: data may be
    encrypted under either, and only the operator can tell which (README, "Security")."""
    old = shared / KEK_PASSPHRASE_FILE
    # One directory under two names (both settings pointed at one volume): the file is already
    # where it belongs, and "removing the shared copy" would remove the only one.
    if not old.is_file() or (server.is_dir() and shared.samefile(server)):
        return None
    data = old.read_bytes()
    target = server / KEK_PASSPHRASE_FILE
    outcome = "removed"
    if create_file(target, data, SECRET_MODE):
        outcome = "moved"
    if target.read_bytes() != data:
        raise BundleError(
            f"{old} and {target} hold different key-encryption passphrases; neither was "
            "changed: keep the one MLflow's stored AI-gateway secrets were encrypted with in "
            f"{target}, remove {old}, then start again"
        )
    remove_file(old)
    return outcome


def mark_kek_moved(shared: Path, server: Path) -> bool:
    """Leave an empty directory (mode 0700, no secret in it) where the shared volume held the
    passphrase before the split, unless something is there or ``shared`` is ``server``; True
    when this call made it.

    Why: code from before the split, run on these volumes (``stackctl upgrade``'s rollback
    brings back the old images; a checkout of an older bundle brings back the old compose.yaml
    too), would otherwise make a new passphrase there (its init creates a missing one) and an
    old server would encrypt with it. With the directory, its init makes none, and its server
    either reads the server-secrets file that compose.yaml names (KEK_PASSPHRASE_FILE) or
    stops, saying it cannot read the passphrase: never a second key in silence."""
    marker = shared / KEK_PASSPHRASE_FILE
    if marker.exists() or marker.is_symlink() or (server.is_dir() and shared.samefile(server)):
        return False
    marker.mkdir(mode=0o700)
    return True


def ensure_secrets(shared: Path, server: Path) -> list[str]:
    """Move the passphrase of a stack before the split (move_kek_passphrase), create every
    missing secret, then mark the old place (mark_kek_moved); the names of the secrets this
    call created."""
    move_kek_passphrase(shared, server)
    made = []
    if ensure_proxy_secret(shared):
        made.append(PROXY_SECRET_FILE)
    if ensure_kek_passphrase(server):
        made.append(KEK_PASSPHRASE_FILE)
    mark_kek_moved(shared, server)
    return made


def main(environ=os.environ) -> int:
    shared = environ.get("SECRETS_DIR")
    server = environ.get("SERVER_SECRETS_DIR")
    if not shared or not server:
        print("stacksecrets: SECRETS_DIR and SERVER_SECRETS_DIR must be set", file=sys.stderr)
        return 2
    postgres_dir = environ.get("POSTGRES_SECRET_DIR")
    try:
        # On its own first, to say what it did; ensure_secrets' own move then finds nothing.
        moved = move_kek_passphrase(Path(shared), Path(server))
        made = ensure_secrets(Path(shared), Path(server))
        made_postgres = bool(postgres_dir) and ensure_postgres_password(Path(postgres_dir))
    except (BundleError, OSError) as error:
        print(f"stacksecrets: {error}", file=sys.stderr)
        return 1
    if moved:
        print(
            f"stacksecrets: {KEK_PASSPHRASE_FILE} {moved} from {shared} (now in {server} only)",
            file=sys.stderr,
        )
    if made_postgres:
        print(f"stacksecrets: created {POSTGRES_PASSWORD_FILE} in {postgres_dir}", file=sys.stderr)
    for name in made:
        where = server if name == KEK_PASSPHRASE_FILE else shared
        print(f"stacksecrets: created {name} in {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
