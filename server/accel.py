"""How the server sends files: nginx sends them itself (X-Accel-Redirect, as Rack::Sendfile
does), and the server sends them in big chunks when it must.

Contract: after ``install()``, a Starlette ``FileResponse`` (MLflow's artifact downloads)
answers a request that carries ``X-Sendfile-Type: X-Accel-Redirect`` and
``X-Accel-Mapping: <directory>/=<uri prefix>/`` for a regular file under that directory with
its own status and headers (type, disposition, nosniff), an empty body, and
``X-Accel-Redirect: <uri prefix>/<percent-encoded path below the directory>``. nginx then
serves the file from the same volume with sendfile, ranges and HEAD included. Every other
request or response (a client reaching the server directly, a file elsewhere, a streamed
download from a remote artifact store) is answered as before, in chunks of ``CHUNK_BYTES``.

Why: relayed through nginx, Python reads and sends each chunk and nginx copies it once more:
about 2 s of CPU per GiB on this kind of machine. sendfile costs a fraction of that, and the
server's workers stay free for tracking calls while models download. Only nginx can reach the
server, and it sets both headers on every request, so a client cannot choose the mapping;
one that reaches the server directly and sends them only gets an empty body.
"""

import os
from urllib.parse import quote

from starlette.responses import FileResponse

# Starlette reads and sends 64 KiB at a time, each read a hop to a thread. With 1 MiB (what the
# MLflow client reads in) a direct 1 GiB download went from ~150 to ~450 MiB/s here; memory
# stays bounded at one chunk per download in flight.
CHUNK_BYTES = 1 << 20
_SENDFILE_TYPE = b"x-sendfile-type"
_MAPPING = b"x-accel-mapping"
# Headers of the file itself: nginx computes them anew for what it sends.
_FILE_HEADERS = {b"content-length", b"etag", b"last-modified"}
_starlette_call = FileResponse.__call__


def redirect_uri(headers: list[tuple[bytes, bytes]], path: str) -> str | None:
    """The X-Accel-Redirect URI for ``path`` under the request's mapping, else None."""
    values = dict(headers)
    if values.get(_SENDFILE_TYPE, b"").lower() != b"x-accel-redirect":
        return None
    directory, equals, prefix = values.get(_MAPPING, b"").decode("latin-1").partition("=")
    directory = directory.rstrip("/")
    if not equals or not directory.startswith("/") or not prefix.startswith("/"):
        return None
    absolute = os.path.normpath(os.path.abspath(path))
    if not absolute.startswith(directory + "/") or not os.path.isfile(absolute):
        return None
    # nginx unescapes the URI and refuses ".." segments; quoting also keeps "?" and "#" in
    # artifact names from being read as a query or fragment.
    return prefix.rstrip("/") + "/" + quote(absolute[len(directory) + 1 :], safe="/")


async def _accelerated_call(self: FileResponse, scope, receive, send) -> None:
    uri = None
    if scope.get("type") == "http" and self.status_code == 200:
        uri = redirect_uri(scope.get("headers") or [], os.fspath(self.path))
    if uri is None:
        await _starlette_call(self, scope, receive, send)
        return
    headers = [(name, value) for name, value in self.raw_headers if name not in _FILE_HEADERS]
    headers += [(b"x-accel-redirect", uri.encode("ascii")), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
    if self.background is not None:
        await self.background()


def install() -> None:
    """Route FileResponse through ``_accelerated_call``, in big chunks (idempotent)."""
    FileResponse.chunk_size = CHUNK_BYTES
    FileResponse.__call__ = _accelerated_call
