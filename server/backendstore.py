"""Which database the tracking server and the migrate service use, with its password.

Contract: ``backend_store_uri(env)`` returns the SQLAlchemy URI of the backend store, password
included, for the calling process only (server/start.py and server/migrate.py put it in their
own environment, never in the container's settings, so ``docker inspect`` does not show it):

- ``DATABASE_URI`` set: that database (an external PostgreSQL, README "PostgreSQL"). A URI
  without a password takes the first line of ``DATABASE_PASSWORD_FILE`` when that file is not
  empty (compose mounts the operator's file there, or /dev/null); a URI that holds a password
  and a non-empty file as well is refused, since one of them would be silently ignored. A
  non-empty ``DATABASE_CA_FILE`` (likewise mounted) becomes ``sslrootcert``, with
  ``sslmode=verify-full`` unless the URI sets a mode: the database's certificate and name are
  checked against the operator's CA (a managed database's bundle).
- otherwise, ``COMPOSE_PROFILES`` lists ``postgres``: the bundled PostgreSQL
  (``BUNDLED_POSTGRES_URI``), its password from ``POSTGRES_PASSWORD_FILE``, which the init
  service generates (mlflowstack/stacksecrets.py); a missing or empty file is refused.
- otherwise ``MLFLOW_BACKEND_STORE_URI`` (the image's SQLite file) as it is.

Raises SettingError, whose text never holds a password. ``is_sqlite(uri)`` tells the two
schema paths apart; ``redacted(uri)`` is the URI for a log line.

Why the profile decides: one setting (``COMPOSE_PROFILES=postgres``) both starts the database
and points the server at it, so the two cannot disagree. Why not ``MLFLOW_BACKEND_STORE_URI``
for the operator's URI: the stack's own agents (backup, gc, upgrade) read that variable in the
server container as the SQLite file's location.
"""

import sqlalchemy

BUNDLED_POSTGRES_URI = "postgresql://mlflow@postgres:5432/mlflow"
DEFAULT_POSTGRES_PASSWORD_FILE = "/var/lib/mlflow-stack/postgres/password"
POSTGRES_PROFILE = "postgres"


class SettingError(ValueError):
    """A setting from the environment cannot be used."""


def _read_password(path: str, required: bool) -> str | None:
    """The file's first line; None for an empty file that is not ``required``."""
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8"
        raise SettingError(f"{path}: cannot read the database password ({reason})") from None
    if not password:
        if required:
            raise SettingError(
                f"{path}: the database password is empty (the init service creates it)"
            )
        return None
    return password


def _parse(uri: str, setting: str) -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(uri)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # The URI may hold a password: only the setting's name is shown.
        raise SettingError(f"{setting}: not a database URI (driver://user@host/name)") from None


def profiles(env: dict[str, str]) -> set[str]:
    """The compose profiles switched on (``COMPOSE_PROFILES``, comma-separated)."""
    return {name.strip() for name in env.get("COMPOSE_PROFILES", "").split(",") if name.strip()}


def _with_ca(url: sqlalchemy.engine.URL, env: dict[str, str]) -> sqlalchemy.engine.URL:
    """The external database's URI verifying the server's certificate against
    ``DATABASE_CA_FILE`` when that file is not empty: ``sslrootcert`` names it, and
    ``sslmode`` is ``verify-full`` (the certificate and the host name) unless the URI chose."""
    path = env.get("DATABASE_CA_FILE", "").strip()
    if not path:
        return url
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise SettingError(
            f"{path}: cannot read the database's CA certificate ({error.strerror})"
        ) from None
    if not content.strip():
        return url
    if b"-----BEGIN CERTIFICATE-----" not in content:
        raise SettingError(f"{path}: DATABASE_CA_FILE holds no PEM certificate")
    if "sslrootcert" in url.query:
        raise SettingError(
            "DATABASE_URI names sslrootcert and DATABASE_CA_FILE is set too: keep one"
        )
    query = {"sslrootcert": path}
    if "sslmode" not in url.query:
        query["sslmode"] = "verify-full"
    return url.update_query_dict(query)


def backend_store_uri(env: dict[str, str]) -> str:
    """See the module's contract."""
    external = env.get("DATABASE_URI", "").strip()
    if external:
        url = _parse(external, "DATABASE_URI")
        password_file = env.get("DATABASE_PASSWORD_FILE", "").strip()
        password = _read_password(password_file, required=False) if password_file else None
        if password is not None and url.password is not None:
            raise SettingError(
                "DATABASE_URI holds a password and DATABASE_PASSWORD_FILE names one too: keep "
                "it in the file only"
            )
        if password is not None:
            url = url.set(password=password)
        return _with_ca(url, env).render_as_string(hide_password=False)
    if POSTGRES_PROFILE in profiles(env):
        path = env.get("POSTGRES_PASSWORD_FILE") or DEFAULT_POSTGRES_PASSWORD_FILE
        url = _parse(BUNDLED_POSTGRES_URI, "BUNDLED_POSTGRES_URI")
        url = url.set(password=_read_password(path, required=True))
        return url.render_as_string(hide_password=False)
    uri = env.get("MLFLOW_BACKEND_STORE_URI", "").strip()
    if not uri:
        raise SettingError("MLFLOW_BACKEND_STORE_URI is not set")
    return uri


def is_sqlite(uri: str) -> bool:
    """Whether the URI names a SQLite database (the server settles its own schema then)."""
    return uri.startswith("sqlite:")


def redacted(uri: str) -> str:
    """The URI with its password shown as ***, for log lines."""
    try:
        return sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return "(unparseable database URI)"
