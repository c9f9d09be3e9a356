"""The gate: nginx's ``auth_request`` target. It answers "who is this, and may they do this?"

Contract (WSGI, served by gunicorn; see auth/gunicorn.conf.py):

- ``GET /auth`` with the client's ``Authorization`` header and the fields of
  :mod:`mlflowstack.forwarded` (method, percent-encoded normalized path, nonce, client address)
  answers 400 when those fields are not exactly what our nginx writes (before any credential
  is looked at); else 204 with ``X-Gate-User`` (percent-encoded), ``X-Gate-Role`` (viewer,
  editor or admin) and ``X-Gate-Kind`` (``password`` or ``token``) when the credentials are
  valid and the role allows the request; 401 with a Basic challenge when they are missing or
  wrong; 403 with the same headers and ``X-Gate-Needs`` (the access class the request needs:
  read, write or admin) when the role forbids the request, so nginx can say why; 403 with
  ``X-Gate-Reason: busy`` when no bcrypt slot can be had (nginx turns that into a 429,
  since auth_request passes only 2xx/401/403 through; see "Fair turns" below).
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
attempt costs one full bcrypt check.

Fair turns (:mod:`mlflowstack.fairness`): at most ``GATE_BCRYPT_SLOTS`` bcrypt checks run at
once. A free slot is taken at once; when all are busy, a request waits in a short queue (about
``queue_wait``, 3 s, or longer when one failed check holds a slot longer) instead of being
refused, and a freed slot goes first to an address (IPv4, or IPv6 /64) without a failed check
in the last 5 minutes. An address with recent failures gets at most one check running or
waiting; anything more is "busy" at once. The queue is bounded (``GATE_THREADS`` - slots - 1
waiters, at most 32) so cached logins always find a free thread. So a password flood from one
address, however many connections it uses, delays a valid login from elsewhere by one check and
one failure pause, never locks it out (the pure refuse-when-busy rule let a flood retake the
slot ~2 ms after each 401 and keep everyone out). A success clears its address's record.

Equal failures: every failed check takes the same time, whoever the name is (unknown, disabled,
or a user at any bcrypt cost), so neither names nor their hash costs can be probed by timing.
Unknown and disabled users are checked against a dummy hash at the minimum cost (a flood of
made-up names costs the least CPU). The gate learns how long one check at the minimum cost
takes (a moving average over its own checks, each scaled by 2**(cost - 12), as bcrypt's time
doubles per cost step), and pads every failure by sleeping, slot held, until it has taken that
estimate x 2**(highest cost in the users file - 12), x ``padding_margin`` (1.1, so the slowest
real checks rarely overrun the target). Then the slot stays taken for ``GATE_FAILURE_PAUSE``
times that padded duration before the 401: a flood keeps the CPU busy a fraction of the time,
each wrong guess costs its sender more time, and a sequential client (a typo, then the right
password) never notices, as its next request starts after the 401. Successes are not padded.

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
from mlflowstack.fairness import MAX_WAITERS, FairSlots, RecentFailures, client_key
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
_MAX_QUEUE_WAIT = 20.0  # well inside nginx's 60 s wait for the gate


def _bcrypt_verify(password: str, password_hash: str) -> bool:
    from passlib.hash import bcrypt

    return bcrypt.verify(password, password_hash)


def _file_signature(path: Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class CheckTimer:
    """How long one bcrypt check at ``MIN_BCRYPT_COST`` takes here, learnt from the checks made.

    Each observed check is scaled to the minimum cost (bcrypt's time doubles per cost step) and
    folded into an exponential moving average. One observation may raise the estimate at most
    to twice its value, so a single stalled check (swapping, a pause of the process) cannot make
    the next failures hold their slot for long.
    """

    def __init__(self, weight: float = 0.2):
        self._weight = weight
        self._lock = threading.Lock()
        self._estimate: float | None = None

    def observe(self, seconds: float, cost: int) -> None:
        scaled = seconds / 2 ** (cost - MIN_BCRYPT_COST)
        with self._lock:
            if self._estimate is None:
                self._estimate = scaled
            else:
                scaled = min(scaled, 2 * self._estimate)
                self._estimate += self._weight * (scaled - self._estimate)

    def duration(self, cost: int) -> float | None:
        """The expected duration of one check at ``cost``; None before the first check."""
        estimate = self._estimate
        return None if estimate is None else estimate * 2 ** (cost - MIN_BCRYPT_COST)


class Gate:
    """Credential checks against a users directory, with a cache tied to the files' state."""

    def __init__(
        self,
        store: UserStore,
        bcrypt_slots: int = 1,
        verify=_bcrypt_verify,
        failure_pause: float = 0.0,
        sleep=time.sleep,
        queue_wait: float = 3.0,
        max_waiters: int = 6,
        monotonic=time.monotonic,
        padding_margin: float = 1.1,
    ):
        self.store = store
        # After a failed check its slot stays taken, answer withheld, for failure_pause times
        # as long as the (padded) check took. A password flood then keeps the CPU busy at most
        # 1 / (1 + failure_pause) of the time, each wrong guess costs its sender more time,
        # and a sequential client (a typo, then the right password) never notices: its next
        # request starts after the 401.
        self._failure_pause = failure_pause
        self._sleep = sleep
        self._verify = verify
        self._monotonic = monotonic
        self._queue_wait = queue_wait
        self._padding_margin = padding_margin
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._slots = FairSlots(bcrypt_slots, max_waiters, RecentFailures(monotonic=monotonic))
        self._timer = CheckTimer()
        self._signature: object = object()
        self._users = Users({}, [])
        self._tokens: dict[str, Token] = {}
        self._max_cost = MIN_BCRYPT_COST  # of the users who can log in: what failures mimic
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
                    costs = [
                        bcrypt_cost(u.password_hash) or 0
                        for u in users.users.values()
                        if u.can_log_in
                    ]
                    self._max_cost = max([MIN_BCRYPT_COST, *costs])
                    self._users, self._tokens = users, self.store.load_tokens()
                    self._cache = {
                        key: entry
                        for key, entry in self._cache.items()
                        if _still_valid(users, *entry)
                    }
                    self._signature = signature

    def check_password(self, users: Users, name: str, password: str) -> User | None:
        """Exactly one bcrypt check, whoever ``name`` is; the user when the password is right."""
        return self._check(users, name, password)[0]

    def _check(self, users: Users, name: str, password: str) -> tuple[User | None, str]:
        """One bcrypt check: (the user when the password is right, the hash checked)."""
        user = users.users.get(name)
        usable = (
            user is not None
            and user.can_log_in
            and "\0" not in password
            and len(password.encode("utf-8")) <= MAX_PASSWORD_BYTES
        )
        if usable:
            right = self._verify(password, user.password_hash)
            return (user if right else None), user.password_hash
        # At the minimum cost: the padding, not the dummy's cost, makes this as slow as the rest.
        dummy = self.dummy_hash(MIN_BCRYPT_COST)
        self._verify(_PLACEHOLDER, dummy)
        return None, dummy

    def failure_hold(self, elapsed: float) -> float:
        """How much longer a failed check that took ``elapsed`` keeps its slot: padding + pause.

        The padding brings every failure to the expected duration of a check at the highest
        cost in the users file (times the margin); the pause follows the padded duration.
        """
        expected = self._timer.duration(self._max_cost)
        padded = elapsed if expected is None else max(elapsed, expected * self._padding_margin)
        return padded - elapsed + padded * self._failure_pause

    def queue_wait(self) -> float:
        """How long a request may wait for a slot: ``queue_wait``, or twice the longest hold.

        A failed check at the highest cost holds its slot for its padded duration plus the
        pause; a valid login queued behind it must outwait that (capped at 20 s).
        """
        expected = self._timer.duration(self._max_cost)
        if expected is None:
            return self._queue_wait
        hold = expected * self._padding_margin * (1 + self._failure_pause)
        return max(self._queue_wait, min(2 * hold, _MAX_QUEUE_WAIT))

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
        address = client_key(client)
        if not self._slots.acquire(address, self.queue_wait()):
            return BUSY
        try:
            started = self._monotonic()
            user, checked = self._check(users, *name_password)
            elapsed = self._monotonic() - started
            self._timer.observe(elapsed, bcrypt_cost(checked) or MIN_BCRYPT_COST)
            if user is None:
                # Recorded before the hold, so this address's next request is already judged.
                self._slots.failed(address)
                hold = self.failure_hold(elapsed)
                if hold > 0:
                    self._sleep(hold)
            else:
                self._slots.succeeded(address)
        finally:
            self._slots.release(address)
        if user is None:
            return None
        # Stored with the hash it was checked against, so an entry written after a reload
        # (this check straddled it) is still judged against the file as it is at lookup.
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                # The oldest entry goes (dicts keep insertion order): filling the cache with
                # spellings of one's own credentials cannot push everyone else back to bcrypt.
                self._cache.pop(next(iter(self._cache)))
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


def credential_kind(authorization: str) -> str:
    """``token`` for an API token (Bearer), ``password`` for a user's Basic credentials.

    Only called once :meth:`Gate.identify` accepted the header, which takes tokens only as
    Bearer and passwords only as Basic.
    """
    return "token" if authorization.partition(" ")[0].lower() == "bearer" else "password"


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
        who = [
            ("X-Gate-User", user_header_value(name)),
            ("X-Gate-Role", role),
            ("X-Gate-Kind", credential_kind(environ.get("HTTP_AUTHORIZATION", ""))),
        ]
        if not access.allowed(role, request.method, request.path):
            needs = ("X-Gate-Needs", access.classify(request.method, request.path))
            return _respond(start_response, "403 Forbidden", [*who, needs, *echo])
        return _respond(start_response, "204 No Content", [*who, *echo])

    return app


def _echo(nonce: str | None) -> list[tuple[str, str]]:
    return [("X-Gate-Nonce", nonce)] if nonce else []


def waiters_for(threads: int, slots: int) -> int:
    """How many requests may wait for a bcrypt slot: each parks one of gunicorn's threads.

    The running checks take up to ``slots`` threads and one more is always left for cached
    logins and health checks (``threads - 2`` with one slot), at most ``MAX_WAITERS``.
    """
    return max(0, min(MAX_WAITERS, threads - slots - 1))


def create_app():
    """gunicorn entry point: ``mlflowstack.gate:create_app()``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gate %(levelname)s %(message)s")
    directory = Path(os.environ.get("USERS_DIR", "/var/lib/mlflow-stack/users"))
    slots = int(os.environ.get("GATE_BCRYPT_SLOTS", "1"))
    threads = int(os.environ.get("GATE_THREADS", "8"))
    pause = float(os.environ.get("GATE_FAILURE_PAUSE", "1"))
    secret_dir = Path(os.environ.get("SECRETS_DIR", "/var/lib/mlflow-stack/secrets"))
    try:
        proxy_secret = read_proxy_secret(secret_dir)
    except OSError as error:
        raise SystemExit(f"gate: proxy secret: {error}") from None
    if len(proxy_secret) < 32:
        raise SystemExit(f"gate: proxy secret in {secret_dir} is too short")
    gate = Gate(
        UserStore(directory),
        bcrypt_slots=slots,
        failure_pause=pause,
        max_waiters=waiters_for(threads, slots),
    )
    gate.refresh()
    return make_app(gate, proxy_secret)
