"""Where the tracking server keeps artifacts, and the object store's credentials.

Contract: ``artifact_store_environment(env)`` returns the variables the server process needs for
its artifact destination, read from the user-facing settings:

- ``ARTIFACTS_DESTINATION`` empty (the default): ``MLFLOW_ARTIFACTS_DESTINATION``, the image's
  directory in the mlflow-artifacts volume, as it is.
- otherwise an object store URI: ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]`` or
  ``wasbs://container@account.blob.core.windows.net[/prefix]``. Its credentials come from
  ``ARTIFACT_STORE_CREDENTIALS_FILE`` (compose mounts the operator's file there, or /dev/null):
  for S3 an AWS config file (``[default]`` with the key pair and ``region``), for GCS a service
  account's JSON key, both named to the SDK by path; for Azure a connection string, read into
  this process's environment only (like the database password, never into the container's
  settings). An empty file leaves the SDK to its own defaults (an instance role, workload
  identity). ``ARTIFACTS_S3_ENDPOINT_URL`` names an S3-compatible service (MinIO, Ceph) instead
  of AWS.

Clients never hold these credentials: they upload and download through nginx and the server
(``mlflow-artifacts:/`` URIs, MLflow's artifact proxy), so an editor's laptop has only its
MLflow login.

Presigned URLs: with an object store MLflow 3.17 advertises multipart uploads and downloads in
``/server-info`` and then hands clients presigned URLs, so they move bytes to and from the
bucket directly. That needs every client to reach the bucket, and bypasses this stack's access
log for those bytes. So by default ``install()`` (each worker, gunicorn.conf.py) makes MLflow
see no repository as able to presign: ``/server-info`` advertises neither, the presigned and
multipart routes answer MLflow's own 501, and clients stream through the proxy.
``ARTIFACTS_PRESIGNED_URLS=true`` leaves MLflow's behaviour on (faster for large models when
clients can reach the bucket; the routes stay behind the same roles: minting an upload URL is a
write, a download URL a read).

Confinement: after ``confine()`` (each worker, gunicorn.conf.py) this process opens artifacts
only inside its destination. Every artifact repository MLflow builds in the server goes through
one registry; the wrapper refuses, before any is built, a location that is not the destination
or below it (a ``..`` segment is refused outright), whatever its scheme. ``runs:/`` and
``models:/`` pass, as they resolve to another location, which is checked in its turn. Why: a
run's ``artifact_uri`` and a model version's ``source`` are data, set through the API (a
version's source is free text) or by a restored archive, and MLflow serves a run's files from
wherever its location points: ``file:///run/secrets`` listed the database password to any
viewer, and ``s3://another-bucket/...`` would read with the server's cloud credentials.

Raises SettingError (one line, no secret) on a URI of another scheme, a malformed bucket or
prefix, an endpoint that is not http(s)://host[:port], or an image without the scheme's SDK
(``SERVER_EXTRA_PACKAGES``). Why so strict: the values become environment variables that the
SDKs parse, and a typo would otherwise surface as a 500 on the first upload, not at start.
"""

import importlib.util
import os
import re
from urllib.parse import unquote, urlsplit

from backendstore import SettingError

DEFAULT_CREDENTIALS_FILE = "/run/secrets/artifact_store_credentials"
# Scheme -> (the import the SDK needs, the pinned package to add to SERVER_EXTRA_PACKAGES).
SDKS = {
    "s3": ("boto3", "boto3==1.44.8"),
    "gs": ("google.cloud.storage", "google-cloud-storage"),
    "wasbs": ("azure.storage.blob", "azure-storage-blob azure-identity"),
}
_PREFIX = r"(?:/[A-Za-z0-9._~-]+)*/?"
_DESTINATIONS = {
    # Bucket names as S3 and GCS allow them (lower case, digits, dots, hyphens; 3-63).
    "s3": re.compile(rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]{_PREFIX}$"),
    "gs": re.compile(rf"^gs://[a-z0-9][a-z0-9._-]{{1,61}}[a-z0-9]{_PREFIX}$"),
    "wasbs": re.compile(
        rf"^wasbs://[a-z0-9][a-z0-9-]{{1,61}}[a-z0-9]@[a-z0-9]{{3,24}}\.blob\.core\.windows\.net"
        rf"{_PREFIX}$"
    ),
}
_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?/?$")


def _scheme(destination: str) -> str:
    scheme = destination.split("://", 1)[0] if "://" in destination else ""
    pattern = _DESTINATIONS.get(scheme)
    if pattern is None:
        raise SettingError(
            f"ARTIFACTS_DESTINATION: {destination[:80]!r} is not s3://, gs:// or wasbs:// "
            "(leave it empty for the artifacts volume)"
        )
    if (
        not pattern.fullmatch(destination)
        or "/../" in f"{destination}/"
        or "/./" in f"{destination}/"
    ):
        raise SettingError(
            f"ARTIFACTS_DESTINATION: {destination[:80]!r} is not {scheme}://bucket[/prefix] "
            "(letters, digits and . _ ~ - in the prefix)"
        )
    return scheme


def _credentials(path: str) -> str | None:
    """The file's content stripped; None when it is empty (SDK defaults)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8"
        raise SettingError(
            f"{path}: cannot read the artifact store's credentials ({reason})"
        ) from None
    return content or None


def artifact_store_environment(env: dict[str, str]) -> dict[str, str]:
    """The artifact destination and its credentials' variables (see the module's contract)."""
    destination = env.get("ARTIFACTS_DESTINATION", "").strip()
    endpoint = env.get("ARTIFACTS_S3_ENDPOINT_URL", "").strip()
    if not destination:
        if endpoint:
            raise SettingError("ARTIFACTS_S3_ENDPOINT_URL is set but ARTIFACTS_DESTINATION is not")
        return {"MLFLOW_ARTIFACTS_DESTINATION": env["MLFLOW_ARTIFACTS_DESTINATION"]}
    scheme = _scheme(destination)
    module, package = SDKS[scheme]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise SettingError(
            f"ARTIFACTS_DESTINATION {scheme}://: the server image lacks {module}; add "
            f'SERVER_EXTRA_PACKAGES="{package}" (pinned) to .env and rebuild'
        )
    result = {"MLFLOW_ARTIFACTS_DESTINATION": destination}
    presigned_urls(env)
    if endpoint:
        if scheme != "s3" or not _ENDPOINT.fullmatch(endpoint):
            raise SettingError(
                f"ARTIFACTS_S3_ENDPOINT_URL: {endpoint[:80]!r} is not http(s)://host[:port] "
                "for an s3:// destination"
            )
        result["MLFLOW_S3_ENDPOINT_URL"] = endpoint.rstrip("/")
    path = env.get("ARTIFACT_STORE_CREDENTIALS_FILE") or DEFAULT_CREDENTIALS_FILE
    content = _credentials(path)
    if content is not None:
        if scheme == "s3":
            # Both: botocore reads keys from either, and the region only from the config file.
            result["AWS_SHARED_CREDENTIALS_FILE"] = result["AWS_CONFIG_FILE"] = path
        elif scheme == "gs":
            result["GOOGLE_APPLICATION_CREDENTIALS"] = path
        else:
            result["AZURE_STORAGE_CONNECTION_STRING"] = content
    return result


def presigned_urls(env: dict[str, str]) -> bool:
    """Whether MLflow may hand clients presigned URLs (``ARTIFACTS_PRESIGNED_URLS``)."""
    value = env.get("ARTIFACTS_PRESIGNED_URLS", "").strip().lower()
    if value not in {"", "true", "false"}:
        raise SettingError(f"ARTIFACTS_PRESIGNED_URLS: {value[:20]!r} is not true or false")
    return value == "true"


class _NoRepository:
    """A capability no artifact repository has."""


def install(env=None) -> None:
    """Unless presigned URLs are allowed, no repository presigns (see the module's contract)."""
    from mlflow.server import handlers

    if presigned_urls(os.environ if env is None else env):
        return
    for name in ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin"):
        setattr(handlers, name, _NoRepository)


# Locations that name another one, which the registry is asked for in its turn.
_RESOLVED_LATER = {"runs", "models"}
CONFINED = "this server opens artifacts only in its own artifact store"


def _location(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, path) of ``uri``; a plain path is a local file."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive, never ours
        host = parts.netloc.lower() if scheme == "file" else ""
        host = "" if host == "localhost" else host  # another host is never this container
        return "file", host, unquote(parts.path if scheme == "file" else uri)
    return scheme, parts.netloc.lower(), unquote(parts.path)


def confinement_problem(uri: str, destination: str) -> str | None:
    """Why the server may not open ``uri`` (CONFINED), or None: it is ``destination`` or below
    it, or a ``runs:/``/``models:/`` URI (see the module's contract)."""
    if not isinstance(uri, str):
        return CONFINED
    scheme, place, path = _location(uri)
    if scheme in _RESOLVED_LATER:
        return None
    if ".." in path.split("/") or "\\" in path or "\0" in path:
        return CONFINED
    root_scheme, root_place, root_path = _location(destination)
    if (scheme, place) != (root_scheme, root_place):
        return CONFINED
    root = "/" + root_path.strip("/")
    path = "/" + path.strip("/")
    if root != "/" and path != root and not path.startswith(root + "/"):
        return CONFINED
    return None


def confine(env=None) -> None:
    """Wrap MLflow's artifact repository registry (see the module's contract)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
    from mlflow.store.artifact import artifact_repository_registry

    destination = (os.environ if env is None else env)["MLFLOW_ARTIFACTS_DESTINATION"]
    registry = artifact_repository_registry._artifact_repository_registry
    original = registry.get_artifact_repository

    def confined(artifact_uri, *args, **kwargs):
        problem = confinement_problem(artifact_uri, destination)
        if problem:
            raise MlflowException(problem, error_code=PERMISSION_DENIED)
        return original(artifact_uri, *args, **kwargs)

    registry.get_artifact_repository = confined


def is_local(env: dict[str, str]) -> bool:
    """Whether artifacts live in the mlflow-artifacts volume (backup, gc and the disk-full
    guard act on that volume only)."""
    return not env.get("ARTIFACTS_DESTINATION", "").strip()
