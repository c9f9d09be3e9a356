"""The in-stack sides of stackctl upgrade, on local files: upgradeagent.py (runs in the server
image: inspect, put-back of a pre-upgrade copy) and volumeagent.py's database-only load (the
rollback's fallback to the archive), also as upgrade's real context drives it."""

import argparse
import contextlib
import hashlib
import io
import json
import os
import sqlite3
import tarfile
from pathlib import Path

import pytest
import test_backup
from mlflowstack import upgrade, upgradeagent, volumeagent

# A stack of local directories, the volume agent running on them, compose's steps recorded.
stack = test_backup.stack

# upgradeagent.py (in the server image)


@pytest.fixture
def volumes(tmp_path, monkeypatch):
    db = tmp_path / "db" / "mlflow.db"
    (tmp_path / "db" / "pre-upgrade").mkdir(parents=True)
    (tmp_path / "artifacts" / "1").mkdir(parents=True)
    (tmp_path / "artifacts" / "1" / "a.bin").write_bytes(b"x" * 100)
    monkeypatch.setattr(upgradeagent, "DB", str(db))
    monkeypatch.setattr(upgradeagent, "ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setattr(upgradeagent, "COPIES", str(tmp_path / "db" / "pre-upgrade"))
    return db


def make_db(path: Path, revision: str | None) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE experiments (name TEXT)")
        if revision:
            db.execute("CREATE TABLE alembic_version (version_num TEXT)")
            db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
        db.commit()


def test_agent_inspect_revision_sizes_copies(volumes):
    make_db(volumes, "aaa111")
    (volumes.parent / "pre-upgrade" / "pre-upgrade-aaa111-20261128T120000Z.db").write_bytes(b"")
    answer = upgradeagent.inspect()
    assert answer["revision"] == "aaa111" and answer["artifact_bytes"] == 100
    assert answer["db_bytes"] == volumes.stat().st_size and answer["db_free"] > 0
    assert answer["copies"] == ["pre-upgrade-aaa111-20261128T120000Z.db"]


def test_agent_inspect_no_mlflow_tables_revision_none(volumes):
    make_db(volumes, None)
    assert upgradeagent.inspect()["revision"] is None


def test_agent_put_back_copy_replaces_database_wal_removed(volumes):
    make_db(volumes, "bbb222")
    Path(str(volumes) + "-wal").write_bytes(b"belongs to the migrated database")
    name = "pre-upgrade-aaa111-20261128T120000Z.db"
    make_db(volumes.parent / "pre-upgrade" / name, "aaa111")
    assert upgradeagent.put_back(name) == {"revision": "aaa111"}
    assert not Path(str(volumes) + "-wal").exists()
    assert oct(volumes.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name", ["../mlflow.db", "pre-upgrade-x-1.db", "mlflow.db"])
def test_agent_put_back_not_a_copy_name_refused(volumes, name, capsys):
    make_db(volumes, "bbb222")
    assert upgradeagent.main(["put-back", name]) == 1
    assert "not a pre-upgrade copy's name" in capsys.readouterr().err
    assert upgradeagent.revision() == "bbb222"


def test_agent_put_back_corrupt_copy_refused_database_kept(volumes, capsys):
    make_db(volumes, "bbb222")
    name = "pre-upgrade-aaa111-20261128T120000Z.db"
    (volumes.parent / "pre-upgrade" / name).write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    assert upgradeagent.main(["put-back", name]) == 1
    assert capsys.readouterr().err.startswith("upgradeagent: ")
    assert upgradeagent.revision() == "bbb222"


def test_load_server_database_only_artifacts_kept(tmp_path, monkeypatch):
    db, artifacts = tmp_path / "db" / "mlflow.db", tmp_path / "artifacts"
    db.parent.mkdir()
    (artifacts / "1").mkdir(parents=True)
    (artifacts / "1" / "written-meanwhile.bin").write_bytes(b"keep me")
    db.write_bytes(b"migrated")
    monkeypatch.setattr(volumeagent, "DB_PATH", str(db))
    monkeypatch.setattr(volumeagent, "ARTIFACTS", str(artifacts))
    data = b"the archived database"
    expect = {"database": hashlib.sha256(data).hexdigest(), "artifacts": {},
              "database_only": True}  # fmt: skip
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as out:
        for name, body in (("expect.json", json.dumps(expect).encode()), ("db/mlflow.db", data)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            out.addfile(info, io.BytesIO(body))
    stream.seek(0)
    volumeagent.load_server(stream, io.BytesIO())
    assert db.read_bytes() == data
    assert (artifacts / "1" / "written-meanwhile.bin").read_bytes() == b"keep me"
    assert sorted(os.listdir(artifacts)) == ["1"]


def test_default_context_load_database_archive_db_back_artifacts_kept(stack, tmp_path):
    archived = Path(test_backup.backup_to(stack, tmp_path / "backups")["archive"])
    # Then the stack moves on: the new server changes the database, a client logs an artifact.
    db = stack["db"] / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute("INSERT INTO runs VALUES ('by-the-new-server', 1)")
        connection.commit()
    test_backup.put(stack["artifacts"], "1/run9/artifacts/new.bin", b"logged meanwhile")
    args = argparse.Namespace(project_dir=str(stack["project"]), users_dir=None, quiet=True,
                              json=False)  # fmt: skip
    upgrade.default_context(args).load_database(args, archived)
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert connection.execute("SELECT run_uuid FROM runs").fetchall() == [("run0",)]
    assert (stack["artifacts"] / "1/run9/artifacts/new.bin").read_bytes() == b"logged meanwhile"
    assert (stack["artifacts"] / "1/run0/artifacts/model.pkl").read_bytes() == b"model bytes"
