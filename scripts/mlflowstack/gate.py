"""The gate: nginx's ``auth_request`` target. It answers "who is this, and may they do this?"

Contract (WSGI, served by gunicorn; see auth/gunicorn.conf.py):

- ``GET /auth`` with the client's ``Authorization`` header and the fields of
  :mod:`mlflowstack.forwarded` (method, percent-encoded normalized path, nonce, client address)
  answers 400 when those fields are not exactly what our nginx writes (before any credential
  is looked at); else 204 with ``X-Gate-User`` (percent-encoded) when the credentials are
  valid and the role allows the request; 401 with a Basic challenge when they are missing or
  wrong; 403 when the role forbids the request; 403 with
  ``X-Gate-Reason: busy`` when every bcrypt slot is taken (nginx turns that into a 429,
  since auth_request passes only 2xx/401/403 through). A failed check keeps its slot for
  ``GATE_FAILURE_PAUSE`` times its own duration before answering 401.
- Every ``/auth`` answer echoes the request's ``X-Gate-Nonce``, so nginx can tell that an
  answer belongs to the question it asked (see :mod:`mlflowstack.forwarded`).
- ``GET /health`` answers 204.

Speed without weakening the passwords: a verified ``Authorization`` header is remembered under
an HMAC of the header (keyed per process, so the cache holds nothing that opens a door),
together with the user's name and the hash it was verified against. The files are re-read as
soon as they change on disk, and a remembered header counts only while that user can still log
in with that very hash: a changed, removed or disabled user is refused by the next request,
while everyone else keeps their entry (adding a colleague costs nobody a bcrypt check). The
role is always taken from the current file. Wrong passwords are never cached, so each failed
attempt costs one full bcrypt check; unknown or disabled users cost one check against a dummy
hash of the same cost, so names cannot be probed by timing.

nginx remembers this gate's "yes" for a second or two in front of it (nginx/njs/verdicts.js),
so most requests never reach this process.
"""

import base64
import binascii
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from mlflowstack import access, forwarded
from mlflowstack.stacksecrets import read_proxy_secret
from mlflowstack.users import (
    MAX_PASSWORD_BYTES,
    MIN_BCRYPT_COST,
    Token,
    User,
    Users,
    UserStore,
    bcrypt_cost,
    hash_password,
    token_digest,
)

log = logging.getLogger("gate")

BUSY = "busy"
_CHALLENGE = 'Basic realm="MLflow", charset="UTF-8"'
_CACHE_LIMIT = 10_000  # only valid credentials enter, so this bounds a pathological case
_PLACEHOLDER = "not-a-password"
_DUMMY_HASHES: dict[int, str] = {}


def _bcrypt_verify(password: str, password_hash: str) -> bool:
    from passlib.hash import bcrypt

    return bcrypt.verify(password, password_hash)


def _file_signature(path: Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class Gate:
    """Credential checks against a users directory, with a cache tied to the files' state."""

    def __init__(
        self,
        store: UserStore,
        bcrypt_slots: int = 1,
        verify=_bcrypt_verify,
        failure_pause: float = 0.0,
        sleep=time.sleep,
    ):
        self.store = store
        # After a failed check its slot stays taken, answer withheld, for failure_pause times
        # as long as the check took. A password flood then keeps the CPU busy only
        # 1 / (1 + failure_pause) of the time (others meanwhile get 429 at once), each wrong
        # guess costs its sender more time, and a sequential client (a typo, then the right
        # password) never notices: its next request starts after the 401.
        self._failure_pause = failure_pause
        self._sleep = sleep
        self._verify = verify
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(bcrypt_slots)
        self._signature: object = object()
        self._users = Users({}, [])
        self._tokens: dict[str, Token] = {}
        self._dummy_cost = MIN_BCRYPT_COST
        # HMAC of the header -> (name, the password hash it was verified against)
        self._cache: dict[bytes, tuple[str, str]] = {}
        self.dummy_hash(MIN_BCRYPT_COST)

    @staticmethod
    def dummy_hash(cost: int) -> str:
        """A hash of no one's password at ``cost``, made once per process and cost."""
        if cost not in _DUMMY_HASHES:
            _DUMMY_HASHES[cost] = hash_password(secrets.token_urlsafe(16), cost)
        return _DUMMY_HASHES[cost]

    def refresh(self) -> None:
        """Reload the files if they changed since the last look.

        Two stat() calls per request: cheaper than any timer, and a change is seen by the very
        next request (an atomic rename always gives a new inode).
        """
        signature = (
            _file_signature(self.store.users_path),
            _file_signature(self.store.tokens_path),
        )
        if signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    users = self.store.load_users()
                    for problem in users.problems:
                        log.warning("%s: %s", self.store.users_path, problem)
                    costs = [bcrypt_cost(u.password_hash) or 0 for u in users.users.values()]
                    self._dummy_cost = max([MIN_BCRYPT_COST, *costs])
                    self._users, self._tokens = users, self.store.load_tokens()
                    self._cache = {
                        key: entry
                        for key, entry in self._cache.items()
                        if _still_valid(users, *entry)
                    }
                    self._signature = signature

    def check_password(self, users: Users, name: str, password: str) -> User | None:
        """Exactly one bcrypt check, whoever ``name`` is; the user when the password is right."""
        user = users.users.get(name)
        usable = (
            user is not None
            and user.can_log_in
            and "\0" not in password
            and len(password.encode("utf-8")) <= MAX_PASSWORD_BYTES
        )
        if usable:
            return user if self._verify(password, user.password_hash) else None
        self._verify(_PLACEHOLDER, self.dummy_hash(self._dummy_cost))
        return None

    def identify(self, authorization: str, client: str = ""):
        """Return (name, role) for valid credentials, None for invalid ones, or BUSY.

        ``client`` is the address nginx saw the request come from.
        """
        self.refresh()
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            token = self._tokens.get(token_digest(credentials.strip()))
            if token is None or token.expired(time.time()):
                return None
            return (token.name, token.role)
        if scheme != "basic":
            return None
        cache_key = hmac.digest(self._key, authorization.encode("utf-8", "replace"), "sha256")
        users = self._users
        cached = self._cache.get(cache_key)
        if cached is not None and _still_valid(users, *cached):
            user = users.users[cached[0]]
            return (user.name, user.role)
        name_password = _decode_basic(credentials)
        if name_password is None:
            return None
        if not self._slots.acquire(blocking=False):
            return BUSY
        try:
            started = time.monotonic()
            user = self.check_password(users, *name_password)
            if user is None and self._failure_pause > 0:
                self._sleep((time.monotonic() - started) * self._failure_pause)
        finally:
            self._slots.release()
        if user is None:
            return None
        # Stored with the hash it was checked against, so an entry written after a reload
        # (this check straddled it) is still judged against the file as it is at lookup.
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {}
            self._cache[cache_key] = (user.name, user.password_hash)
        return (user.name, user.role)


def _still_valid(users: Users, name: str, verified_hash: str) -> bool:
    """True while ``name`` can log in and still has the hash a password was verified against."""
    user = users.users.get(name)
    return user is not None and user.can_log_in and user.password_hash == verified_hash


def _decode_basic(credentials: str) -> tuple[str, str] | None:
    """Decode Basic credentials as UTF-8 (RFC 7617, what browsers send after our challenge).

    Bytes that are not valid UTF-8 are read as Latin-1: Python's requests, and so the MLflow
    client, encodes non-ASCII names and passwords that way. No valid UTF-8 text changes meaning.
    """
    try:
        raw = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")
    name, colon, password = decoded.partition(":")
    return (name, password) if colon and name else None


def _respond(start_response, status: str, headers: list[tuple[str, str]]):
    start_response(status, [("Content-Length", "0"), *headers])
    return [b""]


def user_header_value(name: str) -> str:
    """The user's name as ``X-Gate-User`` carries it: UTF-8, percent-encoded byte by byte.

    nginx logs it and keeps it in its verdict memory; whatever a hand-edited users file holds,
    the header stays printable ASCII without spaces, quotes or backslashes. Names that
    ``stackctl`` accepts in plain ASCII (``alice``, ``alice@example.com``) are unchanged.
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in b'%"\\' else f"%{b:02X}"
        for b in name.encode("utf-8")
    )


def make_app(gate: Gate, proxy_secret: bytes):
    """The WSGI callable gunicorn serves (the contract is in this module's docstring)."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return _respond(start_response, "204 No Content", [])
        if path != "/auth":
            return _respond(start_response, "404 Not Found", [])
        request = forwarded.parse(environ, proxy_secret)
        if request is None:
            # Not written by our nginx: refused before any credential is looked at.
            nonce = forwarded.nonce_of(environ)
            return _respond(start_response, "400 Bad Request", _echo(nonce))
        echo = _echo(request.nonce)
        identity = gate.identify(environ.get("HTTP_AUTHORIZATION", ""), request.client)
        if identity is None:
            return _respond(
                start_response, "401 Unauthorized", [("WWW-Authenticate", _CHALLENGE), *echo]
            )
        if identity == BUSY:
            return _respond(start_response, "403 Forbidden", [("X-Gate-Reason", BUSY), *echo])
        name, role = identity
        user_header = ("X-Gate-User", user_header_value(name))
        if not access.allowed(role, request.method, request.path):
            return _respond(start_response, "403 Forbidden", [user_header, *echo])
        return _respond(start_response, "204 No Content", [user_header, *echo])

    return app


def _echo(nonce: str | None) -> list[tuple[str, str]]:
    return [("X-Gate-Nonce", nonce)] if nonce else []


def create_app():
    """gunicorn entry point: ``mlflowstack.gate:create_app()``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gate %(levelname)s %(message)s")
    directory = Path(os.environ.get("USERS_DIR", "/var/lib/mlflow-stack/users"))
    slots = int(os.environ.get("GATE_BCRYPT_SLOTS", "1"))
    pause = float(os.environ.get("GATE_FAILURE_PAUSE", "1"))
    secret_dir = Path(os.environ.get("SECRETS_DIR", "/var/lib/mlflow-stack/secrets"))
    try:
        proxy_secret = read_proxy_secret(secret_dir)
    except OSError as error:
        raise SystemExit(f"gate: proxy secret: {error}") from None
    if len(proxy_secret) < 32:
        raise SystemExit(f"gate: proxy secret in {secret_dir} is too short")
    gate = Gate(UserStore(directory), bcrypt_slots=slots, failure_pause=pause)
    gate.refresh()
    return make_app(gate, proxy_secret)
