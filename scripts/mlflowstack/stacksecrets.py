"""Secrets the stack generates for itself at first start, kept in the ``secrets`` volume.

Contract: ``ensure_proxy_secret(directory)`` leaves ``directory/proxy-secret`` holding 64
lower-case hex characters (256 random bits) and a newline, mode 0600, owned by the stack's
uid (10001). It creates the file only when missing and never replaces it: nginx, the gate and
the server read it at start, so a new value would need all three restarted.

Why: nginx sends it on every request to the gate and the server, which refuse requests
without it (server/guard.py, mlflowstack/forwarded.py). A process on the Docker host that
reaches their bridge addresses can therefore not skip the authentication in nginx.
"""

import secrets
from pathlib import Path

from mlflowstack.files import SECRET_MODE, create_file

PROXY_SECRET_FILE = "proxy-secret"


def ensure_proxy_secret(directory: Path) -> bool:
    """Create the proxy secret if it is missing; True when this call created it."""
    return create_file(
        directory / PROXY_SECRET_FILE, (secrets.token_hex(32) + "\n").encode(), SECRET_MODE
    )


def read_proxy_secret(directory: Path) -> bytes:
    """The proxy secret as nginx sends it (no newline)."""
    return (directory / PROXY_SECRET_FILE).read_bytes().strip()
