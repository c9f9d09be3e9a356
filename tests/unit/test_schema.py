"""server/schema.py with the real MLflow's migrations on SQLite files: which schema the
database has, the copy before a migration, and the refusal of a newer schema."""

import sqlite3
import stat

import pytest
import schema
import sqlalchemy
from alembic import command
from mlflow.store.db import utils as db_utils
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore


def _uri(path) -> str:
    return f"sqlite:///{path}"


def _revisions() -> list[str]:
    """This MLflow's revisions, newest first."""
    return [script.revision for script in schema._migrations().walk_revisions()]


@pytest.fixture
def current_db(tmp_path):
    path = tmp_path / "db" / "mlflow.db"
    path.parent.mkdir()
    SqlAlchemyStore(_uri(path), str(tmp_path / "artifacts"))
    return path


@pytest.fixture(scope="module")
def older_db_template(tmp_path_factory):
    """A database two migrations behind this MLflow, with an experiment in it."""
    path = tmp_path_factory.mktemp("older") / "mlflow.db"
    engine = sqlalchemy.create_engine(_uri(path))
    db_utils.InitialBase.metadata.create_all(engine)
    config = db_utils._get_alembic_config(_uri(path))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, _revisions()[2])
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO experiments (experiment_id, name, lifecycle_stage) "
            "VALUES (7, 'kept', 'active')"
        )
    engine.dispose()
    return path


@pytest.fixture
def older_db(older_db_template, tmp_path):
    path = tmp_path / "db" / "mlflow.db"
    path.parent.mkdir()
    path.write_bytes(older_db_template.read_bytes())
    return path


def _revision_of(path) -> str:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_settle_no_tables_is_fresh_and_writes_nothing(tmp_path):
    path = tmp_path / "empty.db"
    assert schema.settle(_uri(path), tmp_path / "copies") == "fresh"
    assert not (tmp_path / "copies").exists()


def test_settle_current_schema_is_current_without_copy(current_db, tmp_path):
    assert schema.settle(_uri(current_db), tmp_path / "copies") == "current"
    assert not (tmp_path / "copies").exists()


def test_settle_older_schema_copies_then_migrates_keeping_data(older_db, tmp_path):
    old_revision = _revision_of(older_db)
    assert old_revision == _revisions()[2]
    lines = []
    assert schema.settle(_uri(older_db), tmp_path / "copies", log=lines.append) == "upgraded"
    assert _revision_of(older_db) == _revisions()[0]
    (copy,) = (tmp_path / "copies").iterdir()
    assert copy.name.startswith(f"pre-upgrade-{old_revision}-") and copy.suffix == ".db"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert _revision_of(copy) == old_revision  # the copy is the database as it was
    store = SqlAlchemyStore(_uri(older_db), str(tmp_path / "artifacts"))  # MLflow accepts it
    assert store.get_experiment("7").name == "kept"
    assert any("copied the database" in line for line in lines)
    # A second start finds the schema current and copies nothing more.
    assert schema.settle(_uri(older_db), tmp_path / "copies") == "current"
    assert len(list((tmp_path / "copies").iterdir())) == 1


def test_settle_unknown_revision_refuses_and_changes_nothing(current_db, tmp_path):
    with sqlite3.connect(current_db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dcafe1234'")
    before = current_db.read_bytes()
    with pytest.raises(schema.SchemaError, match="f00dcafe1234.*newer"):
        schema.settle(_uri(current_db), tmp_path / "copies")
    assert current_db.read_bytes() == before
    assert not (tmp_path / "copies").exists()


def test_settle_older_schema_other_database_refuses_with_command(monkeypatch, older_db, tmp_path):
    monkeypatch.setattr(schema, "sqlite_path", lambda uri: None)
    with pytest.raises(schema.SchemaError, match="mlflow db upgrade"):
        schema.settle(_uri(older_db), tmp_path / "copies")
    assert _revision_of(older_db) == _revisions()[2]


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("sqlite:////var/lib/mlflow/db/mlflow.db", "/var/lib/mlflow/db/mlflow.db"),
        ("sqlite://", None),
        ("postgresql://u@db/mlflow", None),
    ],
)
def test_sqlite_path_uris(uri, expected):
    found = schema.sqlite_path(uri)
    assert (str(found) if found else None) == expected
