"""What nginx tells the gate about the client request it is asking about, checked.

Contract of the nginx -> gate boundary (the other end: nginx/njs/verdicts.js and the
``/_gate`` location of nginx/templates/mlflow.conf.template):

- nginx sends the gate only headers it wrote itself (``proxy_pass_request_headers off``),
  plus the client's ``Authorization``, whose value nginx's own parser has already freed of
  CR, LF and NUL.
- ``X-Original-Path`` is nginx's normalized ``$uri`` percent-encoded byte by byte: only
  ``A-Z a-z 0-9 / . _ ~ -`` stand for themselves, every other byte is ``%XX``. So the header can
  never hold a control character, and the gate decodes exactly the bytes nginx will send on,
  the way the server decodes them (UTF-8, undecodable bytes replaced), and classifies that.
- ``X-Original-Method`` is ``$request_method``, which nginx accepts only as ``A-Z _ -``.
- ``X-Gate-Nonce`` is 32 hex digits drawn at random by njs for this one question; the gate
  echoes it on every answer, and njs throws away any answer that does not carry it. An answer
  that was meant for another request (a desynchronised keep-alive connection) therefore can
  never grant anything.
- ``X-Client-Address`` is nginx's ``$remote_addr``: the peer, or with ``TRUSTED_PROXIES`` the
  right-most address of ``X-Forwarded-For`` that is not a trusted proxy (nginx's realip module).
- ``X-Stack-Proxy-Secret`` is the per-installation secret (mlflowstack/stacksecrets.py) that
  only nginx, the gate and the server know: whoever reaches the gate's port without it
  (another container on the backend network) is refused like any other malformed request.

Whatever does not fit this exactly was not written by our nginx (or nginx let a client past
its normalization), so it is refused as malformed: :func:`parse` returns None and the gate
answers 400 before it looks at any credential.
"""

import dataclasses
import hmac
import ipaddress
import re
from urllib.parse import unquote

_ESCAPED_PATH = re.compile(r"/(?:[A-Za-z0-9/._~-]|%[0-9A-F]{2})*")
_METHOD = re.compile(r"[A-Z_-]{1,32}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# nginx merges slashes and resolves dot segments before $uri exists; these never survive.
_UNNORMALIZED = re.compile(r"//|/\.\.?(?:/|$)")
MAX_PATH_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class ForwardedRequest:
    """The client request nginx asks about, as nginx will send it to the server."""

    method: str
    path: str  # decoded, as the server will route it
    nonce: str
    client: str


def escape_path(path: bytes) -> str:
    """The form nginx (njs) puts in ``X-Original-Path``; the inverse of :func:`decode_path`."""
    safe = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._~-")
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in path)


def decode_path(escaped: str) -> str | None:
    """Decode an ``X-Original-Path`` value, or None when it is not one nginx could have sent."""
    if len(escaped) > 3 * MAX_PATH_BYTES or not _ESCAPED_PATH.fullmatch(escaped):
        return None
    path = unquote(escaped, encoding="utf-8", errors="replace")
    if _CONTROL.search(path) or _UNNORMALIZED.search(path):
        return None
    return path


def parse(environ: dict, proxy_secret: bytes) -> ForwardedRequest | None:
    """The request nginx asks about, or None when any field is missing or malformed."""
    sent = environ.get("HTTP_X_STACK_PROXY_SECRET", "").encode("latin-1")
    if not hmac.compare_digest(sent, proxy_secret):
        return None
    method = environ.get("HTTP_X_ORIGINAL_METHOD", "")
    nonce = environ.get("HTTP_X_GATE_NONCE", "")
    client = environ.get("HTTP_X_CLIENT_ADDRESS", "")
    path = decode_path(environ.get("HTTP_X_ORIGINAL_PATH", ""))
    if path is None or not _METHOD.fullmatch(method) or not _NONCE.fullmatch(nonce):
        return None
    try:
        client = str(ipaddress.ip_address(client))
    except ValueError:
        return None
    return ForwardedRequest(method=method, path=path, nonce=nonce, client=client)


def nonce_of(environ: dict) -> str | None:
    """The nonce to echo, when the request carries a well-formed one."""
    nonce = environ.get("HTTP_X_GATE_NONCE", "")
    return nonce if _NONCE.fullmatch(nonce) else None
