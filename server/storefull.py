"""Artifact uploads into a full volume answer 507 with a message that says so.

Contract: after ``install()``, an upload into the server's own artifact store (``PUT
.../mlflow-artifacts/artifacts/...``) that fails because the volume is full (``ENOSPC``, or a
quota's ``EDQUOT``) answers ``507 Insufficient Storage`` in MLflow's JSON error shape, with a
message that names the cause. The rest of the request body is read and dropped first, so the
client, still sending, gets that answer and not a reset connection. MLflow has already
removed its partial staging file (which never lists as an artifact). Every other failure, and
every other upload, is answered as before.

Why: MLflow lets the OSError through, so the client got "500 Internal Server Error" without a
reason, and the MLflow client retries a 500 for minutes: a training job seemed to hang, then
failed with "too many 500 error responses". A 507 is not retried, and the client shows the
message. tests/stack/test_disk_full.py checks it on a full volume; metrics, on the database's
own volume, keep working, and uploads work again once space is freed.
"""

import errno
import os

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

FULL_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ArtifactStoreFull(MlflowException):
    """MLflow's upload route answers an MlflowException with its status and JSON."""

    def __init__(self, error: OSError):
        super().__init__(
            f"The artifact store is full ({os.strerror(error.errno)}): nothing was stored. "
            "Free space on the server's artifact volume (or ask its administrator), then retry.",
            error_code="RESOURCE_EXHAUSTED",
        )

    def get_http_status_code(self) -> int:
        # RESOURCE_EXHAUSTED would be 429, which clients retry: a full disk stays full.
        return 507


def install() -> None:
    original = LocalArtifactRepository.log_artifact_from_async_stream
    if getattr(original, "_store_full_aware", False):
        return

    async def log_artifact_from_async_stream(self, chunks, *args, **kwargs):
        try:
            return await original(self, chunks, *args, **kwargs)
        except OSError as error:
            if error.errno not in FULL_ERRORS:
                raise
            async for _ in chunks:  # the unsent rest of the body, so the answer is read
                pass
            raise ArtifactStoreFull(error) from error

    log_artifact_from_async_stream._store_full_aware = True
    LocalArtifactRepository.log_artifact_from_async_stream = log_artifact_from_async_stream
