"""The database the server and the migrate service use (server/backendstore.py), the migrate
service's decisions (server/migrate.py) and the server's check of a non-SQLite schema
(schema.require_current), on SQLite files standing in for PostgreSQL where a database is needed:
no Docker, no PostgreSQL."""

from pathlib import Path

import backendstore
import migrate
import pytest
import schema
import sqlalchemy
import start
from mlflowstack import pgstore, stacksecrets, upgradeagent, volumeagent

SQLITE_DEFAULT = "sqlite:////var/lib/mlflow/db/mlflow.db"


def _password_file(tmp_path: Path, content: str, name: str = "password") -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def test_backend_store_uri_no_profile_keeps_sqlite_default():
    env = {"MLFLOW_BACKEND_STORE_URI": SQLITE_DEFAULT, "COMPOSE_PROFILES": "serve"}
    assert backendstore.backend_store_uri(env) == SQLITE_DEFAULT


def test_backend_store_uri_postgres_profile_bundled_with_generated_password(tmp_path):
    env = {
        "MLFLOW_BACKEND_STORE_URI": SQLITE_DEFAULT,
        "COMPOSE_PROFILES": "serve, postgres",
        "POSTGRES_PASSWORD_FILE": _password_file(tmp_path, "a" * 64 + "\n"),
    }
    uri = backendstore.backend_store_uri(env)
    assert uri == f"postgresql://mlflow:{'a' * 64}@postgres:5432/mlflow"


def test_backend_store_uri_postgres_profile_missing_password_raises(tmp_path):
    env = {"COMPOSE_PROFILES": "postgres", "POSTGRES_PASSWORD_FILE": str(tmp_path / "absent")}
    with pytest.raises(backendstore.SettingError, match="cannot read the database password"):
        backendstore.backend_store_uri(env)


def test_backend_store_uri_postgres_profile_empty_password_raises(tmp_path):
    env = {"COMPOSE_PROFILES": "postgres", "POSTGRES_PASSWORD_FILE": _password_file(tmp_path, "")}
    with pytest.raises(backendstore.SettingError, match="init service"):
        backendstore.backend_store_uri(env)


def test_backend_store_uri_external_password_file_quoted_into_uri(tmp_path):
    env = {
        "DATABASE_URI": "postgresql://ml@db.example:5432/mlflow?sslmode=require",
        "DATABASE_PASSWORD_FILE": _password_file(tmp_path, "p@ss:w/rd%\nsecond line\n"),
        "COMPOSE_PROFILES": "postgres",
    }
    url = sqlalchemy.engine.make_url(backendstore.backend_store_uri(env))
    assert (url.username, url.password, url.host, url.database) == (
        "ml", "p@ss:w/rd%", "db.example", "mlflow"
    )  # fmt: skip
    assert url.query == {"sslmode": "require"}


def test_backend_store_uri_external_empty_password_file_uri_unchanged():
    env = {"DATABASE_URI": "postgresql://ml@db/mlflow", "DATABASE_PASSWORD_FILE": "/dev/null"}
    assert backendstore.backend_store_uri(env) == "postgresql://ml@db/mlflow"


def test_backend_store_uri_external_password_twice_raises_without_showing_it(tmp_path):
    env = {
        "DATABASE_URI": "postgresql://ml:inline-secret@db/mlflow",
        "DATABASE_PASSWORD_FILE": _password_file(tmp_path, "file-secret\n"),
    }
    with pytest.raises(backendstore.SettingError) as refused:
        backendstore.backend_store_uri(env)
    assert "secret" not in str(refused.value)


def test_backend_store_uri_external_not_a_uri_raises_naming_the_setting():
    with pytest.raises(backendstore.SettingError, match="DATABASE_URI"):
        backendstore.backend_store_uri({"DATABASE_URI": "not a uri"})


def test_redacted_password_hidden():
    assert backendstore.redacted("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"


def test_bundled_password_path_is_what_init_generates():
    path = Path(backendstore.DEFAULT_POSTGRES_PASSWORD_FILE)
    assert path.name == stacksecrets.POSTGRES_PASSWORD_FILE


def test_ensure_postgres_password_second_run_keeps_the_file(tmp_path):
    assert stacksecrets.ensure_postgres_password(tmp_path)
    first = (tmp_path / stacksecrets.POSTGRES_PASSWORD_FILE).read_bytes()
    assert not stacksecrets.ensure_postgres_password(tmp_path)
    assert (tmp_path / stacksecrets.POSTGRES_PASSWORD_FILE).read_bytes() == first
    assert (tmp_path / stacksecrets.POSTGRES_PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
    assert len(first.strip()) == 64


def test_stacksecrets_main_with_postgres_dir_creates_password_there(tmp_path, capsys):
    for name in ("secrets", "server-secrets", "postgres"):
        (tmp_path / name).mkdir()
    environ = {
        "SECRETS_DIR": str(tmp_path / "secrets"),
        "SERVER_SECRETS_DIR": str(tmp_path / "server-secrets"),
        "POSTGRES_SECRET_DIR": str(tmp_path / "postgres"),
    }
    assert stacksecrets.main(environ) == 0
    password = (tmp_path / "postgres" / stacksecrets.POSTGRES_PASSWORD_FILE).read_text().strip()
    err = capsys.readouterr().err
    assert "password" in err and password not in err
    for other in ("secrets", "server-secrets"):
        assert not (tmp_path / other / stacksecrets.POSTGRES_PASSWORD_FILE).exists()


def test_migrate_main_sqlite_touches_nothing(tmp_path, capsys):
    database = tmp_path / "mlflow.db"
    assert migrate.main({"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{database}"}) == 0
    assert not database.exists()
    assert "nothing to do" in capsys.readouterr().out


def test_migrate_main_bad_setting_exits_2(tmp_path):
    env = {"COMPOSE_PROFILES": "postgres", "POSTGRES_PASSWORD_FILE": str(tmp_path / "absent")}
    assert migrate.main(env) == 2


def test_migrate_fresh_database_creates_then_current(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert migrate.migrate(uri, log=lambda _line: None) == "created"
    assert migrate.migrate(uri, log=lambda _line: None) == "current"
    schema.require_current(uri)


def test_migrate_older_schema_logs_pending_revisions_then_upgrades(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'older.db'}"
    migrate.migrate(uri, log=lambda _line: None)
    migrations = schema._migrations()
    head = migrations.get_current_head()
    previous = migrations.get_revision(head).down_revision

    def set_revision(revision):
        engine = sqlalchemy.create_engine(uri)
        with engine.begin() as connection:
            connection.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{revision}'")
        engine.dispose()

    # An older schema, as far as the revision says; `mlflow db upgrade` itself stands in (the
    # head's migration would re-create its table), and must be called once, with the URI.
    set_revision(previous)
    engine = sqlalchemy.create_engine(uri)
    assert migrate.pending_revisions(engine, migrations) == [head]
    engine.dispose()
    from mlflow.db import upgrade

    calls = []
    monkeypatch.setattr(upgrade, "callback", lambda url: (calls.append(url), set_revision(head)))
    lines = []
    assert migrate.migrate(uri, log=lines.append) == "upgraded"
    assert calls == [uri]
    assert head in lines[0] and lines[-1].endswith(head)


def test_migrate_newer_schema_refused_exit_1(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'newer.db'}"
    migrate.migrate(uri, log=lambda _line: None)
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    engine.dispose()
    # main() leaves SQLite to the server: the non-SQLite path is reached through migrate().
    monkeypatch.setattr(backendstore, "is_sqlite", lambda _uri: False)
    assert migrate.main({"DATABASE_URI": uri}) == 1
    assert "ffffffffffff" in capsys.readouterr().err


def test_require_current_fresh_database_raises_naming_migrate(tmp_path):
    with pytest.raises(schema.SchemaError, match="migrate service"):
        schema.require_current(f"sqlite:///{tmp_path / 'empty.db'}")


def test_prepare_backend_store_non_sqlite_only_checks(monkeypatch):
    seen = []
    monkeypatch.setattr(schema, "require_current", seen.append)
    monkeypatch.setattr(schema, "settle", lambda *_: pytest.fail("migrated in the server"))
    import mlflow.server.handlers as handlers

    monkeypatch.setattr(handlers, "initialize_backend_stores", lambda *args: None)
    uri = "postgresql://mlflow:pw@postgres:5432/mlflow"
    env = {"_MLFLOW_SERVER_FILE_STORE": uri, "_MLFLOW_SERVER_REGISTRY_STORE": uri,
           "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/"}  # fmt: skip
    monkeypatch.setattr(start.os.environ, "update", lambda _env: None)
    start.prepare_backend_store(env)
    assert seen == [uri]


def test_start_main_postgres_profile_password_only_in_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSE_PROFILES", "postgres")
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", _password_file(tmp_path, "b" * 64 + "\n"))
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", SQLITE_DEFAULT)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path))
    monkeypatch.setenv("KEK_PASSPHRASE_FILE", _password_file(tmp_path, "k" * 64, "kek"))
    seen = {}
    monkeypatch.setattr(start, "prepare_backend_store", lambda env: seen.update(env))
    monkeypatch.setattr(start.os, "execve", lambda *args: None)
    start.main()
    assert (
        seen["_MLFLOW_SERVER_FILE_STORE"] == f"postgresql://mlflow:{'b' * 64}@postgres:5432/mlflow"
    )


@pytest.mark.parametrize(
    ("environ", "kind"),
    [
        ({"COMPOSE_PROFILES": "serve,postgres"}, "postgresql"),
        ({"COMPOSE_PROFILES": "postgres", "DATABASE_URI": "postgresql://ml@db/mlflow"}, "external"),
        ({"COMPOSE_PROFILES": "serve", "DATABASE_URI": " "}, "sqlite"),
        ({}, "sqlite"),
    ],
)
def test_store_kind_settings_named_as_backendstore_reads_them(environ, kind):
    assert volumeagent.store_kind(environ) == kind
    assert upgradeagent.store_kind(environ) == kind
    assert pgstore.kind_from_settings(environ) == kind


def test_no_external_store_external_database_refused_bundled_passes():
    with pytest.raises(volumeagent.AgentError, match="back it up with its own tools"):
        volumeagent.no_external_store({"DATABASE_URI": "postgresql://ml@db/mlflow"})
    volumeagent.no_external_store({"COMPOSE_PROFILES": "postgres"})


def test_volumeagent_main_server_mode_with_external_database_exits_1(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URI", "postgresql://ml@db.example/mlflow")
    monkeypatch.setitem(volumeagent.MODES, "dump-server", lambda *_: pytest.fail("dumped"))
    assert volumeagent.main(["dump-server"]) == 1
    assert "external database (DATABASE_URI)" in capsys.readouterr().err


CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
EXTERNAL = "postgresql://mlflow@db.example.com:5432/mlflow"


def _external(tmp_path: Path, uri: str = EXTERNAL, ca: str = CA_PEM) -> dict[str, str]:
    return {
        "DATABASE_URI": uri,
        "DATABASE_PASSWORD_FILE": _password_file(tmp_path, "pw\n"),
        "DATABASE_CA_FILE": _password_file(tmp_path, ca, name="ca.pem"),
    }


def test_backend_store_uri_ca_file_verifies_full_by_default(tmp_path):
    url = sqlalchemy.engine.make_url(backendstore.backend_store_uri(_external(tmp_path)))
    assert url.query == {"sslrootcert": str(tmp_path / "ca.pem"), "sslmode": "verify-full"}
    assert url.password == "pw"


def test_backend_store_uri_ca_file_keeps_the_uris_sslmode(tmp_path):
    env = _external(tmp_path, uri=EXTERNAL + "?sslmode=verify-ca")
    url = sqlalchemy.engine.make_url(backendstore.backend_store_uri(env))
    assert url.query["sslmode"] == "verify-ca"


def test_backend_store_uri_empty_ca_file_changes_nothing(tmp_path):
    uri = backendstore.backend_store_uri(_external(tmp_path, ca=""))
    assert "sslrootcert" not in uri and "sslmode" not in uri


@pytest.mark.parametrize(
    ("uri", "ca", "message"),
    [
        (EXTERNAL, "not a certificate\n", "holds no PEM certificate"),
        (EXTERNAL + "?sslrootcert=/etc/ca.pem", CA_PEM, "keep one"),
    ],
)
def test_backend_store_uri_bad_ca_settings_refused(tmp_path, uri, ca, message):
    with pytest.raises(backendstore.SettingError, match=message):
        backendstore.backend_store_uri(_external(tmp_path, uri=uri, ca=ca))


def test_backend_store_uri_unreadable_ca_file_refused(tmp_path):
    env = {**_external(tmp_path), "DATABASE_CA_FILE": str(tmp_path / "missing.pem")}
    with pytest.raises(backendstore.SettingError, match="cannot read the database's CA"):
        backendstore.backend_store_uri(env)
