"""The server's side of the nginx -> server boundary: MLflow sees only what nginx vouched for.

Contract (an ASGI middleware around MLflow's FastAPI app; gunicorn serves ``guard:create_app()``):

- Every request except ``GET``/``HEAD /health`` (the container's own healthcheck) must carry the
  per-installation proxy secret that only nginx knows (``X-Stack-Proxy-Secret``; generated at
  first start into the secrets volume, see ``stackctl bootstrap``). Without it: 403, one log
  line. So a process that reaches the server's address past nginx gets nothing: another
  container on the backend network (a served model is code; the Docker host has no address
  there, compose.yaml).
  The job runner inside this container (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``) presents the
  same secret as a bearer token, since nginx removes every client's ``Authorization``.
- A request from nginx must also name the user the gate verified (``X-Stack-User``, the
  gate's percent-encoded name; nginx sets it only after the gate said yes and removes any
  client's copy). Without it: 403 and a ``no verified user`` log line, which the stack tests
  look for. This is the invariant checked from the far side: **MLflow never sees a request
  without a verified identity**, its own health check aside.
- Host names are case-insensitive; nginx accepts any case, so the ``Host`` header is
  lower-cased before MLflow's allowed-hosts check compares it.
- A state-changing request (not GET/HEAD/OPTIONS) with an ``Origin`` must come from the
  stack's own origin: the origin's host and port are the request's own ``Host``. A plain HTML
  form on a foreign site (or on another port of the same host) can no longer overwrite an
  artifact.
- A request body larger than ``REQUEST_BODY_LIMIT`` is refused with 413 (by its
  ``Content-Length``, or cut off while it streams), except an artifact ``PUT`` to the streaming
  artifact router: MLflow's Flask app reads a body into memory whole, and nginx can lift its
  own limit only per location, not per method.
- A body larger than a few KB waits for the worker's one slot for large bodies, and one with
  more structure than any MLflow call needs is refused before MLflow parses it
  (``largebodies.py`` says why: MLflow's parse multiplies a body's size ~75 times).
- Once checked, the proxy secret and the identity headers (every ``X-Stack-*``) are removed
  from what MLflow sees, so nothing it forwards (AI-gateway passthrough sends the incoming
  headers to providers) carries them; the verified identity stays in
  ``scope["state"]["stack_user"]`` and is what MLflow records as the user (``identity.py``,
  which also answers MLflow's ``users/current`` call).
- ``experiments/create`` may not choose an artifact location outside the stack's artifact
  root: only ``mlflow-artifacts:/`` URIs without ``..`` pass, so an editor cannot make the
  server write into its database volume or its own file system.

Refusals never echo client text; log lines carry only escaped, bounded values.
"""

import hmac
import json
import logging
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import identity
import largebodies

log = logging.getLogger("mlflow_stack.guard")

SECRET_HEADER = b"x-stack-proxy-secret"
USER_HEADER = b"x-stack-user"
ROLE_HEADER = b"x-stack-role"
AUTH_HEADER = b"x-stack-auth"
# Every header nginx writes for this hop starts so; none of them reaches MLflow.
_STACK_PREFIX = b"x-stack-"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CREATE_EXPERIMENT = re.compile(r"/(?:ajax-)?api/2\.0/mlflow/experiments/create")
_ARTIFACT_LOCATION_KEYS = frozenset({"artifactlocation"})
_ALLOWED_LOCATION = re.compile(r"mlflow-artifacts:/(?!/)[A-Za-z0-9._~/-]*")
_USER = re.compile(r"[\x21-\x7e]{1,512}")
_ARTIFACT_PUT = largebodies.ARTIFACT_PUT
MAX_CREATE_BODY = 1 << 20


class GuardError(RuntimeError):
    """The guard cannot start (missing or unusable secret)."""


def _printable(value: bytes | str, limit: int = 120) -> str:
    """A bounded, escaped rendering of client text for a log line."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return ascii(value[:limit])


def read_secret(path: Path) -> bytes:
    """The proxy secret from its file: 32+ hex characters, or GuardError."""
    try:
        secret = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise GuardError(f"proxy secret {path}: {error}") from None
    if not re.fullmatch(r"[0-9a-f]{32,128}", secret):
        raise GuardError(f"proxy secret {path}: not 32-128 lower-case hex characters")
    return secret.encode("ascii")


def origin_allowed(origin: str, host: str) -> bool:
    """Whether a state-changing request from ``origin`` may reach MLflow: only from the
    stack's own origin, i.e. the origin's host and port are the request's ``Host`` (which nginx
    has already checked against ``PUBLIC_HOSTNAME``). Another port of the same name is another
    site, so it is refused too.
    """
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
        return False
    return parts.netloc == host.lower()


def artifact_location_problem(body: bytes) -> str | None:
    """Why an experiments/create body asks for a forbidden artifact location, or None.

    Parsed as Flask parses it for MLflow (``json.loads`` on the bytes, encoding detected), and
    every spelling protobuf accepts (``artifact_location``, ``artifactLocation``) is checked.
    """
    try:
        document = json.loads(body) if body.strip() else {}
        # MLflow decodes a JSON string a second time ("older clients double-encode").
        if isinstance(document, str):
            document = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        return "the request body is not JSON"
    if not isinstance(document, dict):
        return "the request body is not a JSON object"
    for key, value in document.items():
        if key.replace("_", "").lower() not in _ARTIFACT_LOCATION_KEYS or value in (None, ""):
            continue
        if not isinstance(value, str) or not _ALLOWED_LOCATION.fullmatch(value):
            return "artifact_location must be an mlflow-artifacts:/ URI (the stack's artifact root)"
        if ".." in value.split("/"):
            return "artifact_location may not contain '..'"
    return None


class BodyTooLarge(Exception):
    """A streamed request body went past the limit; the request is abandoned."""


def content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bounded(receive, limit: int):
    seen = 0

    async def bounded_receive():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge(f"request body past {limit} bytes")
        return message

    return bounded_receive


def parse_size(text: str) -> int:
    """nginx's size syntax (``32m``, ``512k``, ``1048576``) in bytes, or GuardError."""
    match = re.fullmatch(r"([1-9][0-9]{0,8})([kKmM]?)", text.strip())
    if not match:
        raise GuardError(f"REQUEST_BODY_LIMIT: {text!r} is not a size such as 32m")
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20}[match[2].lower()]


class Guard:
    """ASGI middleware keeping the contract in this module's docstring."""

    def __init__(self, app, secret: bytes, body_limit: int):
        self.app = app
        self._secret = secret
        self._bearer = b"Bearer " + secret
        self._body_limit = body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                return await self.app(scope, receive, send)
            return  # websockets: nothing of MLflow's, and nothing nginx forwards
        method, path = scope["method"], scope["path"]
        if path == "/health" and method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        secret = user = role = kind = authorization = host = origin = None
        for name, value in headers:
            if name == SECRET_HEADER:
                secret = value
            elif name == USER_HEADER:
                user = value
            elif name == ROLE_HEADER:
                role = value
            elif name == AUTH_HEADER:
                kind = value
            elif name == b"authorization":
                authorization = value
            elif name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        internal = authorization is not None and hmac.compare_digest(authorization, self._bearer)
        if not internal:
            if secret is None or not hmac.compare_digest(secret, self._secret):
                log.warning("refused: not from the proxy: %s %s", method, _printable(path))
                return await _refuse(send, 403, "Forbidden: not through the stack's proxy")
            if user is None or not _USER.fullmatch(user.decode("latin-1")):
                log.error("refused: no verified user: %s %s", method, _printable(path))
                return await _refuse(send, 403, "Forbidden: no verified user")
        who = None if internal else identity.from_headers(user, role, kind)
        scope = {
            **scope,
            "headers": [
                (n, v.lower() if n == b"host" else v)
                for n, v in headers
                if not n.startswith(_STACK_PREFIX) and not (internal and n == b"authorization")
            ],
            "state": {**scope.get("state", {}), "stack_user": who},
        }
        if who is not None and method == "GET" and identity.ACCOUNT_PATH.fullmatch(path):
            answer = identity.account_answer(who, path, scope.get("query_string", b""))
            if answer is not None:
                return await _send(send, answer[0], "application/json", answer[1])
        if origin is not None and method not in _SAFE_METHODS:
            host_text = (host or b"").decode("latin-1")
            if not origin_allowed(origin.decode("latin-1"), host_text):
                shown = _printable(origin), method, _printable(path)
                log.warning("refused: foreign origin %s: %s %s", *shown)
                message = "Permission denied: a write from another site (Origin) is refused"
                return await _mlflow_error(send, message, 403, "PERMISSION_DENIED")
        token = identity.serve_as(who)
        try:
            if method == "POST" and _CREATE_EXPERIMENT.fullmatch(path):
                return await self._create_experiment(scope, receive, send)
            if not (method == "PUT" and _ARTIFACT_PUT.fullmatch(path)):
                length = content_length(scope["headers"])
                if length is not None and length > self._body_limit:
                    message = f"Request body too large: at most {self._body_limit} bytes here"
                    return await _mlflow_error(send, message, 413, "RESOURCE_LIMIT_EXCEEDED")
                receive = _bounded(receive, self._body_limit)
            return await self.app(scope, receive, send)
        finally:
            identity.reset(token)

    async def _create_experiment(self, scope, receive, send):
        body, more, messages = b"", True, []
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_CREATE_BODY:
                return await _mlflow_error(send, "the request body is too large")
        problem = artifact_location_problem(body)
        if problem is not None:
            return await _mlflow_error(send, problem)

        replay = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive_again():
            message = next(replay, None)
            return message if message is not None else await receive()

        return await self.app(scope, receive_again, send)


async def _send(send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send, status: int, text: str) -> None:
    await _send(send, status, "text/plain", (text + "\n").encode())


async def _mlflow_error(
    send, message: str, status: int = 400, code: str = "INVALID_PARAMETER_VALUE"
) -> None:
    """MLflow's own error shape, so the client raises its usual MlflowException with this
    message, and the UI shows it in its error banner."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    await _send(send, status, "application/json", body)


def create_app():
    """gunicorn entry point: MLflow's FastAPI app behind the guard."""
    try:
        secret = read_secret(Path(os.environ.get("PROXY_SECRET_FILE", "")))
        body_limit = parse_size(os.environ.get("REQUEST_BODY_LIMIT", "32m"))
    except GuardError as error:
        print(f"guard: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from mlflow.server.fastapi_app import app

    identity.install()
    return Guard(largebodies.LargeBodies(app), secret, body_limit)
