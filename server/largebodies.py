"""Large request bodies, one at a time: what a logged-in user can make the server hold in memory.

Why: MLflow reads a JSON body whole and turns every value in it into Python and protobuf
objects, about 450 bytes each. Measured here (server/guard.py already caps bodies at
REQUEST_BODY_LIMIT, 32m): a viewer's 4 MB ``runs/search`` body of tiny values cost the worker
260 MB, which it kept afterwards; a 30 MB one took the container past its 2 GB limit and the
kernel killed the worker, with every request it was serving. Many such bodies at once (40
threads a worker) would do the same with small ones.

Contract (an ASGI middleware between the guard and MLflow's app):

- A body of at most ``SMALL_BODY`` bytes passes untouched. It cannot hold more than
  ``SMALL_BODY / 2`` values (a value and its comma take two bytes at least), so the worst
  such bodies at once stay bounded: 40 threads x 2 workers x ~9 MB.
- A larger body, or one of unknown length (chunked), waits for this worker's one slot for
  large bodies (first come, first served). After ``SLOT_WAIT_SECONDS`` without one: 503 with
  ``Retry-After`` (the MLflow client retries it). Its body is then read whole, within
  ``BODY_READ_SECONDS`` (else 408), so the slot bounds the memory of everything the request does.
- A large body with more than ``MAX_STRUCTURE`` commas, brackets and braces is refused (413,
  MLflow's error shape) before MLflow parses it. Counted everywhere, inside JSON strings too:
  MLflow parses some string fields as JSON again (dataset records, model JSON, tags, a
  double-encoded body), and counting bytes cannot be fooled by an encoding or an escape. The
  largest legitimate call, ``log-batch`` at MLflow's own limits, has a few thousand.
- A compressed body (``Content-Encoding`` other than ``identity``) is refused with 415:
  MLflow's trace intake (``/v1/traces``) inflates gzip and deflate whole, unbounded, so a
  1.5 MB body became 1.5 GB and the kernel killed the worker (an attacker review found it),
  and no count of the compressed bytes says what they inflate to. OpenTelemetry exporters
  send uncompressed bodies unless told otherwise (``OTEL_EXPORTER_OTLP_COMPRESSION``).
- An artifact ``PUT`` (streamed to the volume as it comes, never parsed or inflated) is not
  held or refused here.
"""

import asyncio
import json
import re

SMALL_BODY = 40 * 1024
MAX_STRUCTURE = 500_000
SLOT_WAIT_SECONDS = 30.0
BODY_READ_SECONDS = 120.0
ARTIFACT_PUT = re.compile(r"/(?:ajax-)?api/2\.0/mlflow-artifacts/artifacts/.+")


def structure_count(body: bytes) -> int:
    """Commas, brackets and braces in ``body``: an upper bound on the JSON values a parse of it,
    or of any JSON string inside it, can make."""
    return body.count(b",") + body.count(b"[") + body.count(b"{")


def declared_body(headers) -> tuple[bool, int | None]:
    """(whether the request has a body, its declared length or None when chunked)."""
    length, chunked = None, False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return True, None
        elif name == b"transfer-encoding":
            chunked = True
    if chunked:
        return True, None
    return bool(length), length


class LargeBodies:
    """ASGI middleware keeping the contract in this module's docstring."""

    def __init__(
        self, app, slot_wait: float = SLOT_WAIT_SECONDS, read_time: float = BODY_READ_SECONDS
    ):
        self.app = app
        self._slot_wait, self._read_time = slot_wait, read_time
        self._slot = None  # made in the worker's event loop, on first use

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _artifact_put(scope):
            return await self.app(scope, receive, send)
        if _compressed(scope["headers"]):
            message = (
                "Compressed request bodies are not accepted here (Content-Encoding); "
                "send the body uncompressed"
            )
            return await _error(send, 415, "INVALID_PARAMETER_VALUE", message)
        if self._passes(scope):
            return await self.app(scope, receive, send)
        if self._slot is None:
            self._slot = asyncio.Lock()
        try:
            await asyncio.wait_for(self._slot.acquire(), self._slot_wait)
        except TimeoutError:
            message = "The server is busy with other large requests; retry shortly"
            return await _error(send, 503, "TEMPORARILY_UNAVAILABLE", message, retry_after=5)
        try:
            try:
                messages, body = await asyncio.wait_for(_read_whole(receive), self._read_time)
            except TimeoutError:
                message = f"The request body did not arrive within {self._read_time:.0f} s"
                return await _error(send, 408, "INVALID_PARAMETER_VALUE", message)
            if structure_count(body) > MAX_STRUCTURE:
                message = (
                    f"Request body too complex: more than {MAX_STRUCTURE} commas, brackets and "
                    "braces; send it in smaller batches"
                )
                return await _error(send, 413, "RESOURCE_LIMIT_EXCEEDED", message)
            replay = iter(messages)

            async def receive_again():
                message = next(replay, None)
                return message if message is not None else await receive()

            return await self.app(scope, receive_again, send)
        finally:
            self._slot.release()

    @staticmethod
    def _passes(scope) -> bool:
        has_body, length = declared_body(scope["headers"])
        return not has_body or (length is not None and length <= SMALL_BODY)


def _artifact_put(scope) -> bool:
    return scope["method"] == "PUT" and ARTIFACT_PUT.fullmatch(scope["path"]) is not None


def _compressed(headers) -> bool:
    return any(
        name == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
        for name, value in headers
    )


async def _read_whole(receive):
    """The request's messages up to its last body part, and the body they carry."""
    messages, parts = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    # One message for MLflow instead of many, so the body is not held twice.
    if messages and messages[-1]["type"] == "http.request":
        messages = [{"type": "http.request", "body": body, "more_body": False}]
    return messages, body


async def _error(send, status, code, message, retry_after=None):
    """MLflow's own error shape, so its client raises (or retries) as for MLflow's answers."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if retry_after is not None:
        headers.append((b"retry-after", b"%d" % retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
