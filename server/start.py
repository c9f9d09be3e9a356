"""Start the MLflow tracking server under gunicorn with uvicorn workers.

Contract: reads its settings from the environment (see compose.yaml and .env.example),
prepares the backend store once, then replaces itself with gunicorn serving
``mlflow.server.fastapi_app:app`` on port 5000. Exits non-zero with one line on stderr when a
setting is invalid.

Why not ``mlflow server``: its launcher runs uvicorn's own multi-worker supervisor, which stalls
~44 ms on every keep-alive request here, and its ``--gunicorn-opts`` path serves only the older
Flask app (no streaming artifact router, no OTLP ``/v1/traces``). Serving the FastAPI app under
gunicorn means doing by hand what ``mlflow server`` does before it spawns workers: the
``_MLFLOW_SERVER_*`` environment, the database set-up and (optionally) the job runner. Those are
MLflow internals, so the MLflow version is pinned and a stack test checks the full route set.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import artifactstore  # beside this file: where artifacts go, and the store's credentials
import backendstore  # beside this file: which database, and its password
import guard  # beside this file: the one reader of the proxy secret
from backendstore import SettingError

# Internal variables that `mlflow server` hands to its workers (mlflow/server/constants.py).
_BACKEND_STORE = "_MLFLOW_SERVER_FILE_STORE"
_REGISTRY_STORE = "_MLFLOW_SERVER_REGISTRY_STORE"
_ARTIFACT_ROOT = "_MLFLOW_SERVER_ARTIFACT_ROOT"
_ARTIFACTS_DESTINATION = "_MLFLOW_SERVER_ARTIFACT_DESTINATION"
_SERVE_ARTIFACTS = "_MLFLOW_SERVER_SERVE_ARTIFACTS"

_HOST_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?$")


def parse_public_hostnames(value: str) -> list[tuple[str, str | None]]:
    """Split ``PUBLIC_HOSTNAME`` (comma-separated ``host[:port]``) into (host, port) pairs.

    An empty value means "any host" and gives an empty list. Raises SettingError on an entry
    that is not a bare host name or address with an optional port (no scheme, no path).
    """
    pairs = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _HOST_ENTRY.match(entry)
        if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
            raise SettingError(f"PUBLIC_HOSTNAME: {entry!r} is not host[:port]")
        pairs.append((match["name"].lower(), match["port"]))
    return pairs


# The serving profile fetches models through nginx by its service name (server/serving.py).
SERVING_HOST = "nginx:8080"


def security_environment(public_hostname: str, serving: bool = False) -> dict[str, str]:
    """MLflow's allowed-hosts and CORS settings derived from ``PUBLIC_HOSTNAME``; with
    ``serving`` (SERVE_MODELS is set), also the Host the serving container sends.

    nginx refuses foreign Host headers first; MLflow's own middleware stays on with the same
    list so that it would also hold if the server were ever reached another way. A host without
    a port matches it on any port. Unset means any host, for a first start on a fresh clone.
    """
    pairs = parse_public_hostnames(public_hostname)
    if not pairs:
        return {"MLFLOW_SERVER_ALLOWED_HOSTS": "*", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "*"}
    # Not an origin: no browser page is ever served under that name.
    hosts, origins = [SERVING_HOST] if serving else [], []
    for name, port in pairs:
        suffixes = [f":{port}"] if port else ["", ":*"]
        # fnmatch treats "[" as a character class; IPv6 literals need it escaped.
        pattern_name = name.replace("[", "[[]", 1)
        for suffix in suffixes:
            hosts.append((pattern_name if "*" in suffix else name) + suffix)
        # The stack's own page sends its origin with every write, and MLflow refuses a write
        # whose origin is not listed: a name without a port is the stack's on any port, so its
        # origin is too (a pattern, which MLflow's write check matches; its CORS answers, which
        # would let another site read, match exact origins only). A page on another port of the
        # same host is still refused by server/guard.py, whose origin must equal the Host.
        for scheme in ("http", "https"):
            if port:
                origins.append(f"{scheme}://{name}:{port}")
            else:
                origins += [f"{scheme}://{name}", f"{scheme}://{pattern_name}:*"]
    return {
        "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(hosts),
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": ",".join(origins),
    }


def server_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment gunicorn's workers need, computed from the user-facing settings."""
    backend_uri = env["MLFLOW_BACKEND_STORE_URI"]
    # The volume's directory, or an object store with its credentials' variables.
    artifact_store = artifactstore.artifact_store_environment(env)
    derived = {
        **artifact_store,
        _BACKEND_STORE: backend_uri,
        _REGISTRY_STORE: env.get("MLFLOW_REGISTRY_STORE_URI") or backend_uri,
        # Clients get proxied "mlflow-artifacts:" URIs and stream through the server.
        _ARTIFACT_ROOT: "mlflow-artifacts:/",
        _ARTIFACTS_DESTINATION: artifact_store["MLFLOW_ARTIFACTS_DESTINATION"],
        _SERVE_ARTIFACTS: "true",
        # Some of MLflow's routes (the assistant's, through the gateway's store) open the
        # default tracking URI, not the server's store: in a fresh worker that is
        # sqlite:///mlflow.db in the working directory, a stray empty database (on the
        # read-only root file system, a worker stuck retrying). MLflow points the tracking URI
        # at the backend store itself once another route opened it; this does so from the start.
        "MLFLOW_TRACKING_URI": backend_uri,
        "_MLFLOW_SGI_NAME": "uvicorn",
        "_MLFLOW_IN_JOB_EXECUTOR": "false",
        **security_environment(
            env.get("PUBLIC_HOSTNAME", ""), serving=bool(env.get("SERVE_MODELS", "").strip())
        ),
        **telemetry_environment(env.get("MLFLOW_TELEMETRY", "")),
    }
    return {**env, **derived}


def telemetry_environment(value: str) -> dict[str, str]:
    """MLflow's usage telemetry: off unless ``MLFLOW_TELEMETRY`` is ``on`` (a private server)."""
    value = value.strip().lower() or "off"
    if value not in {"on", "off"}:
        raise SettingError(f"MLFLOW_TELEMETRY: {value!r} is not on or off")
    if value == "on":
        return {"MLFLOW_DISABLE_TELEMETRY": "false"}
    return {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


# MLflow's AI gateway encrypts the secrets it stores with a key derived from this passphrase
# (mlflow/utils/crypto.py); unset, MLflow uses a value built into every copy of it. The init
# service generates one per installation into the server-secrets volume, which only the server
# mounts of the running services (mlflowstack/stacksecrets.py, compose.yaml).
KEK_PASSPHRASE_VARIABLE = "MLFLOW_CRYPTO_KEK_PASSPHRASE"
DEFAULT_KEK_PASSPHRASE_FILE = "/var/lib/mlflow-stack/server-secrets/mlflow-kek-passphrase"
# MLflow asks for 32 characters or more; the init service writes 64 hex characters.
_KEK_MIN_LENGTH = 32


def kek_environment(env: dict[str, str]) -> dict[str, str]:
    """MLflow's key-encryption passphrase, read from its file (``KEK_PASSPHRASE_FILE``, else
    the server-secrets volume's): only the server's own process environment gets it, never the
    container's settings, so ``docker inspect`` does not show it.

    Raises SettingError when the file is missing, unreadable or too short: starting with
    MLflow's built-in passphrase instead would encrypt new secrets under a public key, and a
    later start with the real one could not decrypt them.
    """
    path = Path(env.get("KEK_PASSPHRASE_FILE") or DEFAULT_KEK_PASSPHRASE_FILE)
    try:
        passphrase = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not ASCII"
        raise SettingError(
            f"{path}: cannot read MLflow's key-encryption passphrase ({reason}); the init "
            "service creates it in the server-secrets volume"
        ) from None
    if len(passphrase) < _KEK_MIN_LENGTH or any(c.isspace() for c in passphrase):
        raise SettingError(
            f"{path}: MLflow's key-encryption passphrase must be one word of at least "
            f"{_KEK_MIN_LENGTH} characters"
        )
    return {KEK_PASSPHRASE_VARIABLE: passphrase}


def job_execution_enabled(env: dict[str, str]) -> bool:
    """Whether to run MLflow's job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``)."""
    value = env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false").strip().lower()
    if value not in {"true", "false", "1", "0", ""}:
        raise SettingError(f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION: {value!r} is not true or false")
    return value in {"true", "1"}


MAX_REPLICAS = 16


def check_replicas(env: dict[str, str], with_jobs: bool) -> int:
    """``SERVER_REPLICAS`` (compose's replica count of this service), checked against what
    several servers can share. Raises SettingError: more than one on the SQLite file (every
    replica would open it from its own container; the server copies and migrates it at start,
    which only one process may do), or with MLflow's job runner (its periodic tasks and job
    queue would run in every replica)."""
    raw = env.get("SERVER_REPLICAS", "").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_REPLICAS:
        raise SettingError(
            f"SERVER_REPLICAS: {raw[:20]!r} is not a number from 1 to {MAX_REPLICAS}"
        )
    replicas = int(raw)
    if replicas > 1 and backendstore.is_sqlite(env["MLFLOW_BACKEND_STORE_URI"]):
        raise SettingError(
            f"SERVER_REPLICAS={replicas} needs PostgreSQL (COMPOSE_PROFILES=postgres or "
            "DATABASE_URI): replicas cannot share the SQLite file"
        )
    if replicas > 1 and with_jobs:
        raise SettingError(
            f"SERVER_REPLICAS={replicas} with MLFLOW_SERVER_ENABLE_JOB_EXECUTION: the job runner "
            "would run in every replica; use one replica for it"
        )
    return replicas


def prepare_backend_store(env: dict[str, str]) -> None:
    """Create or check the database once, before any worker starts.

    Workers racing to create tables on a fresh SQLite file fail at random, so this runs first.
    WAL lets readers proceed while one writer commits (MLflow already sets busy_timeout).
    Any other database (PostgreSQL) was settled by the migrate service: it is only checked.
    """
    os.environ.update(env)
    import schema  # beside this file; it imports MLflow, which only this step needs
    from mlflow.server.handlers import initialize_backend_stores

    uri = env[_BACKEND_STORE]
    if backendstore.is_sqlite(uri):
        # An older schema (a new pin, a restored backup) is copied, then migrated; a newer one
        # stops the start (schema.py).
        schema.settle(uri, Path(env.get("SCHEMA_COPIES_DIR", "/var/lib/mlflow/db/pre-upgrade")))
    else:
        schema.require_current(uri)
    initialize_backend_stores(uri, env[_REGISTRY_STORE], env[_ARTIFACT_ROOT])
    if uri.startswith("sqlite:"):
        import sqlalchemy

        with sqlalchemy.create_engine(uri).connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def gunicorn_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn.conf.py"),
        # MLflow's FastAPI app behind the proxy-secret and identity checks (guard.py).
        "guard:create_app()",
    ]


def run_with_job_runner(env: dict[str, str]) -> int:
    """Run gunicorn as a child and MLflow's job runner beside it, as `mlflow server` does."""
    from mlflow.server.jobs.utils import _check_requirements, _launch_job_execution_runner

    _check_requirements(env[_BACKEND_STORE])
    server = subprocess.Popen(gunicorn_command(), env=env)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, _frame: server.send_signal(sig))
    job_env = {
        **env,
        "MLFLOW_BACKEND_STORE_URI": env[_BACKEND_STORE],
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_GATEWAY_URI": "http://127.0.0.1:5000",
        # guard.py admits the job runner's calls by the proxy secret as a bearer token.
        "MLFLOW_TRACKING_TOKEN": guard.read_secret(Path(env["PROXY_SECRET_FILE"])).decode(),
    }
    _launch_job_execution_runner(job_env, server.pid)
    return server.wait()


def main() -> int:
    try:
        # The database's URI with its password: in this process's environment (and gunicorn's)
        # only, never in the container's settings (backendstore.py).
        settings = {
            **os.environ,
            "MLFLOW_BACKEND_STORE_URI": backendstore.backend_store_uri(os.environ),
        }
        env = server_environment(settings)
        with_jobs = job_execution_enabled(env)
        check_replicas(env, with_jobs)
        env = {**env, **kek_environment(settings)}
    except (SettingError, KeyError) as error:
        print(f"start: {error}", file=sys.stderr)
        return 2
    import schema

    try:
        prepare_backend_store(env)
    except schema.SchemaError as error:
        print(f"start: {error}", file=sys.stderr)
        return 2
    if with_jobs:
        return run_with_job_runner(env)
    os.execve(sys.executable, gunicorn_command(), env)


if __name__ == "__main__":
    sys.exit(main())
