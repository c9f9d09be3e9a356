"""stackctl backup, restore (scripts/mlflowstack/backup.py, restore.py, archive.py) and their
agent (volumeagent.py), without Docker: the agent runs as a local subprocess on directories of
a temporary "stack" (a SQLite database, artifacts, users, secrets, server-secrets), exactly the
code that ``docker compose exec``/``run`` would run, and compose's own steps are recorded
instead."""

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import stat
import sys
import tarfile
import time
from pathlib import Path

import pytest
from mlflowstack import archive, backup, cli, files, restore, stackio, volumeagent
from mlflowstack.archive import ArchiveError
from mlflowstack.files import BundleError
from mlflowstack.volumeagent import AgentError

REPO = Path(__file__).resolve().parents[2]

SHA_A = hashlib.sha256(b"a").hexdigest()


def make_stack(root: Path, runs: int = 1) -> dict[str, Path]:
    """A stack's volumes as directories: a database with MLflow's three counted tables."""
    names = ("db", "artifacts", "users", "secrets", "server-secrets")
    places = {name: root / name for name in names}
    for place in places.values():
        place.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(places["db"] / "mlflow.db")) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT)")
        db.execute("CREATE TABLE runs (run_uuid TEXT, experiment_id INTEGER)")
        db.execute("CREATE TABLE registered_models (name TEXT)")
        db.execute("INSERT INTO experiments VALUES (0, 'Default')")
        for i in range(runs):
            db.execute("INSERT INTO experiments VALUES (?, ?)", (i + 1, f"exp{i}"))
            db.execute("INSERT INTO runs VALUES (?, ?)", (f"run{i}", i + 1))
        db.commit()
    (places["users"] / "htpasswd").write_text("admin:$2y$12$x\n")
    (places["users"] / "tokens").write_text(
        json.dumps({"name": "ci", "role": "viewer", "sha256": "0" * 64, "expires": None}) + "\n"
    )
    (places["users"] / ".lock").write_text("")
    (places["secrets"] / "proxy-secret").write_text("s" * 64 + "\n")
    (places["server-secrets"] / "mlflow-kek-passphrase").write_text(f"k{root.name}" * 16 + "\n")
    return places


def use_stack(monkeypatch, places: dict[str, Path]) -> None:
    """Point the agent (a subprocess; it reads these at start) at ``places``."""
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", f"sqlite:///{places['db'] / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(places["artifacts"]))
    monkeypatch.setenv("USERS_DIR", str(places["users"]))
    monkeypatch.setenv("SECRETS_DIR", str(places["secrets"]))
    monkeypatch.setenv("SERVER_SECRETS_DIR", str(places["server-secrets"]))
    # As in the auth image: the agent's users and secrets modes use mlflowstack.
    monkeypatch.setenv("PYTHONPATH", str(Path(stackio.__file__).parents[1]))


def put(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """A source stack, compose replaced: the agent runs here, compose's steps are recorded."""
    places = make_stack(tmp_path / "source")
    put(places["artifacts"], "1/run0/artifacts/model.pkl", b"model bytes")
    put(places["artifacts"], "1/run0/artifacts/plot.png", b"png image data")
    use_stack(monkeypatch, places)
    project = tmp_path / "bundle"
    project.mkdir()
    (project / "pyproject.toml").write_text('version = "0.1.0"\n')
    steps = []
    monkeypatch.setattr(
        stackio,
        "_agent_command",
        lambda args, place, words, script: [sys.executable, str(script), *words],
    )
    monkeypatch.setattr(stackio, "require_running", lambda args: None)
    monkeypatch.setattr(stackio, "project_name", lambda args: "mlflow-stack")
    monkeypatch.setattr(stackio, "compose_checked", lambda args, *words: steps.append(words))
    places.update(project=project, root=tmp_path, steps=steps)
    return places


def stackctl(stack, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--project-dir", str(stack["project"]), *argv])
    return status, out.getvalue(), err.getvalue()


def backup_to(stack, directory: Path, *extra) -> dict:
    directory.mkdir(exist_ok=True)
    status, out, err = stackctl(stack, "backup", "--output", str(directory), "--json", *extra)
    assert status == 0, err
    return json.loads(out)


def target(stack, monkeypatch, runs: int = 0) -> dict[str, Path]:
    """A second, fresh stack; the agent is pointed at it."""
    places = make_stack(stack["root"] / "target", runs=runs)
    (places["users"] / "tokens").unlink()
    (places["users"] / "initial-admin-password").write_text("fresh\n")
    use_stack(monkeypatch, places)
    places["root"] = stack["root"] / "target"
    return places


# files.open_atomic


def test_open_atomic_new_file_has_mode_from_first_byte(tmp_path):
    path = tmp_path / "a.tar"
    with files.open_atomic(path, files.SECRET_MODE) as handle:
        handle.write(b"x")
        assert stat.S_IMODE(os.fstat(handle.fileno()).st_mode) == 0o600
        assert not path.exists()
    assert path.read_bytes() == b"x" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_atomic_existing_file_refused_without_force(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"old")
    with pytest.raises(BundleError, match="exists"), files.open_atomic(path, 0o600) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.tar"]


def test_open_atomic_force_replaces(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"old")
    with files.open_atomic(path, 0o600, force=True) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new"


def test_open_atomic_error_inside_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), files.open_atomic(tmp_path / "a.tar", 0o600) as handle:
        handle.write(b"half")
        raise RuntimeError
    assert os.listdir(tmp_path) == []


# The manifest


def listing(*artifacts) -> dict:
    return {
        "mlflow_version": "3.17.2",
        "database": {"size": 1, "sha256": SHA_A, "row_counts": {"runs": 1}},
        "artifacts": list(artifacts),
        "skipped": [],
    }


def manifest_of(archive_name="b.tar", backup_id="1" * 32, previous=None, items=(), files=()):
    return archive.build_manifest(
        backup_id=backup_id,
        created="2026-11-28T04:00:00.000000Z",
        project="mlflow-stack",
        bundle_version="0.1.0",
        archive_name=archive_name,
        listing=listing(*items),
        previous=previous,
        files=list(files),
    )


def test_build_manifest_sent_artifact_held_by_this_archive():
    manifest = manifest_of(items=[{"path": "1/r/a", "size": 1, "mtime_ns": 5, "sha256": SHA_A}])
    assert manifest["artifacts"] == [
        {"path": "1/r/a", "size": 1, "mtime_ns": 5, "sha256": SHA_A, "archive": "b.tar",
         "backup_id": "1" * 32}
    ]  # fmt: skip
    assert manifest["format"] == archive.FORMAT and manifest["mlflow_version"] == "3.17.2"


def test_build_manifest_unsent_artifact_points_at_earlier_archive():
    first = manifest_of("a.tar", "2" * 32, items=[
        {"path": "1/r/a", "size": 1, "mtime_ns": 5, "sha256": SHA_A}])  # fmt: skip
    second = manifest_of(previous=first, items=[
        {"path": "1/r/a", "size": 1, "mtime_ns": 5, "sha256": None}])  # fmt: skip
    entry = second["artifacts"][0]
    assert (entry["archive"], entry["backup_id"], entry["sha256"]) == ("a.tar", "2" * 32, SHA_A)


def test_build_manifest_unsent_artifact_unknown_before_refused():
    with pytest.raises(ArchiveError, match="neither sent"):
        manifest_of(items=[{"path": "1/r/a", "size": 1, "mtime_ns": 5, "sha256": None}])


def test_known_artifacts_archive_gone_or_replaced_sent_again(stack, tmp_path):
    first = Path(backup_to(stack, tmp_path / "backups")["archive"])
    manifest = archive.read_manifest(first)
    known = {"1/run0/artifacts/model.pkl": [11], "1/run0/artifacts/plot.png": [14]}
    assert {p: v[:1] for p, v in archive.known_artifacts(manifest, first.parent).items()} == known
    assert archive.known_artifacts(manifest, first.parent, replacing=first.name) == {}
    backup_to(stack, tmp_path / "other", "--output", str(tmp_path / "other/x.tar"))
    os.replace(tmp_path / "other/x.tar", first)  # the same name, another backup
    assert archive.known_artifacts(manifest, first.parent) == {}
    first.unlink()
    assert archive.known_artifacts(manifest, first.parent) == {}
    assert archive.known_artifacts(None, first.parent) == {}


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a/.", "a/..", "a\x00b", ""]
)
def test_validate_manifest_unsafe_artifact_path_refused(path):
    manifest = manifest_of(items=[{"path": "ok", "size": 1, "mtime_ns": 5, "sha256": SHA_A}])
    manifest["artifacts"][0]["path"] = path
    with pytest.raises(ArchiveError, match="unsafe path"):
        archive.validate_manifest(manifest)


@pytest.mark.parametrize("member", ["users/../x", "etc/passwd", "users/a/b", "/users/x", "env/x"])
def test_validate_manifest_file_outside_its_places_refused(member):
    manifest = manifest_of(files=[{"member": "users/htpasswd", "size": 1, "sha256": SHA_A}])
    manifest["files"][0]["member"] = member
    with pytest.raises(ArchiveError, match="unsafe file name"):
        archive.validate_manifest(manifest)


@pytest.mark.parametrize("name", ["../b.tar", "dir/b.tar", ".hidden"])
def test_validate_manifest_holding_archive_elsewhere_refused(name):
    manifest = manifest_of(items=[{"path": "ok", "size": 1, "mtime_ns": 5, "sha256": SHA_A}])
    manifest["artifacts"][0]["archive"] = name
    with pytest.raises(ArchiveError, match="archive name"):
        archive.validate_manifest(manifest)


def test_validate_manifest_foreign_refused():
    with pytest.raises(ArchiveError, match="not a stackctl backup"):
        archive.validate_manifest({"format": "something-else"})


# Archives on disk


def test_backup_writes_mode_0600_archive_with_checked_manifest(stack, tmp_path):
    report = backup_to(stack, tmp_path / "backups")
    path = Path(report["archive"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    manifest = archive.read_manifest(path)
    assert manifest["database"]["row_counts"] == {
        "experiments": 2, "registered_models": 0, "runs": 1}  # fmt: skip
    assert sorted(a["path"] for a in manifest["artifacts"]) == [
        "1/run0/artifacts/model.pkl", "1/run0/artifacts/plot.png"]  # fmt: skip
    model = next(a for a in manifest["artifacts"] if a["path"].endswith("model.pkl"))
    assert model["sha256"] == hashlib.sha256(b"model bytes").hexdigest()
    # The users store's lock is not data; the files are.
    assert [f["member"] for f in manifest["files"]] == [
        "users/htpasswd", "users/tokens", "secrets/proxy-secret",
        "server-secrets/mlflow-kek-passphrase"]  # fmt: skip
    with tarfile.open(path) as tar:
        assert tar.getnames()[-1] == archive.MANIFEST
    assert archive.verify_backup(path).artifacts.keys() == {
        a["path"] for a in manifest["artifacts"]
    }


def test_backup_env_file_archived_when_present(stack, tmp_path):
    (stack["project"] / ".env").write_text("HTTP_PORT=8080\n")
    report = backup_to(stack, tmp_path / "backups")
    assert "env/.env" in report["files"]


def test_backup_existing_output_refused_without_force(stack, tmp_path):
    path = tmp_path / "mine.tar"
    path.write_bytes(b"keep")
    status, _, err = stackctl(stack, "backup", "--output", str(path))
    assert status == 1 and "exists" in err and path.read_bytes() == b"keep"
    status, _, err = stackctl(stack, "backup", "--output", str(path), "--force", "--quiet")
    assert status == 0 and err == "" and archive.read_manifest(path)


def test_backup_second_run_copies_only_new_artifacts(stack, tmp_path):
    first = backup_to(stack, tmp_path / "backups")
    put(stack["artifacts"], "1/run1/artifacts/new.txt", b"new")
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    assert first["artifacts_copied"] == 2
    assert (second["artifacts_copied"], second["artifacts"]) == (1, 3)
    assert second["incremental_after"] == Path(first["archive"]).name
    with tarfile.open(second["archive"]) as tar:
        assert [n for n in tar.getnames() if n.startswith("artifacts/")] == [
            "artifacts/1/run1/artifacts/new.txt"]  # fmt: skip
    plan = archive.verify_backup(Path(second["archive"]))
    assert plan.artifacts["1/run0/artifacts/model.pkl"].archive == Path(first["archive"])


def test_backup_third_run_report_names_every_archive_restore_needs(stack, tmp_path):
    """Newcomer review: the report named only the newest archive ("from b2.tar") while the
    artifacts it did not copy were in the first one as well."""
    first = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b1.tar"))
    put(stack["artifacts"], "1/run1/artifacts/new.txt", b"new")
    backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    third = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b3.tar"))
    assert first["needs_archives"] == []
    assert third["incremental_after"] == "b2.tar"
    assert third["needs_archives"] == ["b1.tar", "b2.tar"]


def test_backup_force_over_an_archive_others_name_copies_its_artifacts_again(stack, tmp_path):
    first = Path(backup_to(stack, tmp_path / "backups")["archive"])
    backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    again = backup_to(stack, tmp_path / "backups", "--output", str(first), "--force")
    assert again["artifacts_copied"] == 2
    assert archive.verify_backup(first).artifacts["1/run0/artifacts/model.pkl"].archive == first


def test_backup_odd_artifact_names_round_trip(stack, tmp_path, monkeypatch):
    """Names an MLflow client may give (MLflow allows these on Linux) never stop a backup."""
    odd = ["1/run0/artifacts/back\\slash.txt", "1/run0/artifacts/new\nline\x1b[31m.txt"]
    for name in odd:
        put(stack["artifacts"], name, b"odd")
    path = backup_to(stack, tmp_path / "backups")["archive"]
    fresh = target(stack, monkeypatch)
    status, _, err = stackctl(stack, "restore", path, "--quiet")
    assert status == 0, err
    assert all((fresh["artifacts"] / name).read_bytes() == b"odd" for name in odd)


def test_backup_changed_artifact_copied_again(stack, tmp_path):
    backup_to(stack, tmp_path / "backups")
    put(stack["artifacts"], "1/run0/artifacts/plot.png", b"another png")
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    assert second["artifacts_copied"] == 1


def test_backup_full_copies_everything_again(stack, tmp_path):
    backup_to(stack, tmp_path / "backups")
    second = backup_to(stack, tmp_path / "b", "--full")
    assert second["artifacts_copied"] == 2 and second["incremental_after"] is None


def test_read_manifest_not_a_tar_refused(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"hello, this is not a tar archive" * 100)
    with pytest.raises(ArchiveError, match="x.tar"):
        archive.read_manifest(path)


def test_read_manifest_foreign_tar_refused(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        data = json.dumps({"format": "other"}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="not a stackctl backup"):
        archive.read_manifest(path)


def test_verify_backup_truncated_refused(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    data = path.read_bytes()
    # Half-way, inside the manifest (the last member), inside the first header. (The tar's
    # trailing zero blocks hold no data: an archive without them is still whole.)
    for cut in (len(data) // 2, data.rfind(b'"format"'), 300):
        path.write_bytes(data[:cut])
        with pytest.raises(ArchiveError):
            archive.verify_backup(path)


def test_verify_backup_corrupted_byte_refused(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    data = bytearray(path.read_bytes())
    at = data.find(b"model bytes")
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="model.pkl': checksum differs"):
        archive.verify_backup(path)


def rewrite(path: Path, change) -> None:
    """Rebuild the archive at ``path``: ``change(members)`` edits a list of (TarInfo, bytes)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]
    change(members)
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_verify_backup_member_not_in_manifest_refused(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])

    def add_extra(members):
        info = tarfile.TarInfo("../../etc/cron.d/evil")
        info.size = 3
        members.insert(0, (info, b"bad"))

    rewrite(path, add_extra)
    with pytest.raises(ArchiveError, match="does not name"):
        archive.verify_backup(path)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_verify_backup_link_or_device_in_place_of_a_file_refused(stack, tmp_path, kind):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])

    def to_link(members):
        for info, _ in members:
            if info.name.endswith("model.pkl"):
                info.type, info.linkname, info.size = kind, "/etc/shadow", 0

    rewrite(path, to_link)
    with pytest.raises(ArchiveError, match="not one plain file"):
        archive.verify_backup(path)


def test_verify_backup_traversal_in_manifest_refused(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])

    def traverse(members):
        for info, _ in members:
            if info.name.endswith("model.pkl"):
                info.name = "artifacts/../../../tmp/evil"
        info, data = members[-1]
        manifest = json.loads(data)
        for entry in manifest["artifacts"]:
            if entry["path"].endswith("model.pkl"):
                entry["path"] = "../../../tmp/evil"
        data = json.dumps(manifest).encode()
        info.size = len(data)
        members[-1] = (info, data)

    rewrite(path, traverse)
    with pytest.raises(ArchiveError, match="unsafe path"):
        archive.verify_backup(path)


def test_verify_backup_earlier_archive_missing_refused(stack, tmp_path):
    first = backup_to(stack, tmp_path / "backups")
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    Path(first["archive"]).unlink()
    with pytest.raises(ArchiveError, match="missing; this incremental backup needs it"):
        archive.verify_backup(Path(second["archive"]))


def test_verify_backup_earlier_archive_replaced_refused(stack, tmp_path):
    first = backup_to(stack, tmp_path / "backups")
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    backup_to(stack, tmp_path / "other", "--output", str(tmp_path / "other/x.tar"))
    os.replace(tmp_path / "other/x.tar", first["archive"])
    with pytest.raises(ArchiveError, match="another backup_id"):
        archive.verify_backup(Path(second["archive"]))


def test_verify_backup_database_rows_differ_refused(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])

    def other_counts(members):
        info, data = members[-1]
        manifest = json.loads(data)
        manifest["database"]["row_counts"]["runs"] = 7
        data = json.dumps(manifest).encode()
        info.size = len(data)
        members[-1] = (info, data)

    rewrite(path, other_counts)
    with pytest.raises(ArchiveError, match="row counts differ"):
        archive.verify_backup(path)


def test_find_previous_newest_of_this_project(stack, tmp_path):
    first = backup_to(stack, tmp_path / "backups")
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    (tmp_path / "backups/junk.tar").write_bytes(b"junk")
    found = archive.find_previous(tmp_path / "backups", "mlflow-stack")
    assert found["backup_id"] == second["backup_id"] != first["backup_id"]
    assert archive.find_previous(tmp_path / "backups", "another-project") is None


# The agent's own checks (what a hostile stream meets inside the container)


@pytest.mark.parametrize(
    "name", ["a/b.txt", "1/run/artifacts/model/MLmodel", "x", "a\\b", "new\nline", "..x", "é"]
)
def test_safe_relative_plain_path_accepted(name):
    assert volumeagent.safe_relative(name) == name


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../../b", "a//b", "a/./b", "a\x00b", "a/"])
def test_safe_relative_unsafe_path_refused(name):
    with pytest.raises(AgentError):
        volumeagent.safe_relative(name)


def agent_stream(expect: dict, members: list[tuple[str, bytes]], kind=tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [("expect.json", json.dumps(expect).encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name != "expect.json" and kind != tarfile.REGTYPE:
                info.type, info.linkname, info.size = kind, "/etc/passwd", 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def agent_places(tmp_path, monkeypatch):
    places = make_stack(tmp_path / "stack")
    monkeypatch.setattr(volumeagent, "DB_PATH", str(places["db"] / "mlflow.db"))
    monkeypatch.setattr(volumeagent, "ARTIFACTS", str(places["artifacts"]))
    monkeypatch.setattr(volumeagent, "USERS", str(places["users"]))
    monkeypatch.setattr(volumeagent, "SECRETS", str(places["secrets"]))
    monkeypatch.setattr(volumeagent, "SERVER_SECRETS", str(places["server-secrets"]))
    return places


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_load_server_traversal_member_refused_nothing_written(agent_places, tmp_path):
    db = (agent_places["db"] / "mlflow.db").read_bytes()
    evil = "artifacts/../../../escaped"
    expect = {"database": SHA_A, "artifacts": {"../../../escaped": SHA_A}}
    stream = agent_stream(expect, [("db/mlflow.db", b"a"), (evil, b"a")])
    before = snapshot(tmp_path)
    with pytest.raises(AgentError, match="unsafe path"):
        volumeagent.load_server(io.BytesIO(stream), io.BytesIO())
    assert snapshot(tmp_path) == before and (agent_places["db"] / "mlflow.db").read_bytes() == db


def test_load_server_symlink_member_refused(agent_places):
    expect = {"database": SHA_A, "artifacts": {"x": SHA_A}}
    stream = agent_stream(expect, [("db/mlflow.db", b"a"), ("artifacts/x", b"a")], tarfile.SYMTYPE)
    with pytest.raises(AgentError, match="unexpected member"):
        volumeagent.load_server(io.BytesIO(stream), io.BytesIO())
    assert os.listdir(agent_places["artifacts"]) == []


def test_load_server_checksum_mismatch_changes_nothing(agent_places):
    db = (agent_places["db"] / "mlflow.db").read_bytes()
    expect = {"database": SHA_A, "artifacts": {"x": SHA_A}}
    stream = agent_stream(expect, [("db/mlflow.db", b"a"), ("artifacts/x", b"b")])
    with pytest.raises(AgentError, match="checksum differs"):
        volumeagent.load_server(io.BytesIO(stream), io.BytesIO())
    assert os.listdir(agent_places["artifacts"]) == []
    assert sorted(os.listdir(agent_places["db"])) == ["mlflow.db"]
    assert (agent_places["db"] / "mlflow.db").read_bytes() == db


def test_load_server_intact_replaces_database_and_moves_artifacts_in(agent_places):
    expect = {"database": SHA_A, "artifacts": {"1/r/x": SHA_A}}
    volumeagent.load_server(
        io.BytesIO(agent_stream(expect, [("db/mlflow.db", b"a"), ("artifacts/1/r/x", b"a")])),
        io.BytesIO(),
    )
    assert (agent_places["db"] / "mlflow.db").read_bytes() == b"a"
    artifact = agent_places["artifacts"] / "1/r/x"
    assert artifact.read_bytes() == b"a" and stat.S_IMODE(artifact.stat().st_mode) == 0o644
    assert os.listdir(agent_places["artifacts"]) == ["1"]


def test_load_files_writes_0600_and_drops_files_of_the_old_users(agent_places):
    (agent_places["users"] / "initial-admin-password").write_text("old")
    expect = {"files": {"users/htpasswd": SHA_A, "secrets/proxy-secret": SHA_A}}
    stream = agent_stream(expect, [("users/htpasswd", b"a"), ("secrets/proxy-secret", b"a")])
    volumeagent.load_files(io.BytesIO(stream), io.BytesIO())
    assert sorted(os.listdir(agent_places["users"])) == [".lock", "htpasswd"]
    written = agent_places["secrets"] / "proxy-secret"
    assert written.read_bytes() == b"a" and stat.S_IMODE(written.stat().st_mode) == 0o600


def test_load_files_archive_before_split_kek_goes_to_server_secrets(agent_places):
    """An archive of a stack that kept the passphrase in the shared volume."""
    kek = b"k" * 64 + b"\n"
    digest = hashlib.sha256(kek).hexdigest()
    expect = {"files": {"secrets/proxy-secret": SHA_A, "secrets/mlflow-kek-passphrase": digest}}
    stream = agent_stream(
        expect, [("secrets/proxy-secret", b"a"), ("secrets/mlflow-kek-passphrase", kek)]
    )
    volumeagent.load_files(io.BytesIO(stream), io.BytesIO())
    assert snapshot(agent_places["secrets"]) == {"proxy-secret": b"a"}
    written = agent_places["server-secrets"] / "mlflow-kek-passphrase"
    assert written.read_bytes() == kek and stat.S_IMODE(written.stat().st_mode) == 0o600


def test_server_only_secrets_agent_copy_same_as_stacksecrets():
    from mlflowstack import stacksecrets

    assert volumeagent.SERVER_ONLY == stacksecrets.SERVER_ONLY


def test_load_files_kek_under_both_prefixes_refused_nothing_written(agent_places, tmp_path):
    members = ["secrets/mlflow-kek-passphrase", "server-secrets/mlflow-kek-passphrase"]
    expect = {"files": dict.fromkeys(members, SHA_A)}
    before = snapshot(tmp_path)
    with pytest.raises(AgentError, match="two members"):
        volumeagent.load_files(
            io.BytesIO(agent_stream(expect, [(m, b"a") for m in members])), io.BytesIO()
        )
    assert snapshot(tmp_path) == before


def test_load_files_member_outside_users_and_secrets_refused(agent_places):
    expect = {"files": {"db/htpasswd": SHA_A}}
    before = snapshot(agent_places["users"])
    with pytest.raises(AgentError, match="unexpected member"):
        volumeagent.load_files(
            io.BytesIO(agent_stream(expect, [("db/htpasswd", b"a")])), io.BytesIO()
        )
    assert snapshot(agent_places["users"]) == before


# restore


def test_target_problems_fresh_stack_none():
    server = {"experiments": 0, "runs": 0, "registered_models": 0, "artifacts": 0}
    assert restore.target_problems(server, {"users": ["admin"], "tokens": ["serving"]}) == []


def test_target_problems_used_stack_each_named():
    server = {"experiments": 2, "runs": 5, "registered_models": 0, "artifacts": 1}
    problems = restore.target_problems(server, {"users": ["admin", "bob"], "tokens": ["ci"]})
    assert problems == ["2 experiments besides Default", "5 runs", "1 artifact files"] + [
        "users bob", "tokens ci"]  # fmt: skip


def test_restore_roundtrip_same_bytes_services_restarted(stack, tmp_path, monkeypatch):
    backup_to(stack, tmp_path / "backups")
    put(stack["artifacts"], "1/run1/artifacts/late.txt", b"late")
    report = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    fresh = target(stack, monkeypatch)
    status, out, err = stackctl(stack, "restore", report["archive"], "--json")
    assert status == 0, err
    assert json.loads(out)["artifacts"] == 3
    assert snapshot(fresh["artifacts"]) == snapshot(stack["artifacts"])
    assert snapshot(fresh["users"]) == {**snapshot(stack["users"]), ".lock": b""}
    assert snapshot(fresh["secrets"]) == snapshot(stack["secrets"])
    assert snapshot(fresh["server-secrets"]) == snapshot(stack["server-secrets"])
    for path in ("1/run0/artifacts/model.pkl", "1/run1/artifacts/late.txt"):
        assert (fresh["artifacts"] / path).stat().st_mtime_ns == (
            stack["artifacts"] / path).stat().st_mtime_ns  # fmt: skip
    with contextlib.closing(sqlite3.connect(fresh["db"] / "mlflow.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
    assert stack["steps"] == [
        ("stop", "nginx", "auth", "server"),
        ("up", "-d", "--wait", "--no-build", "nginx", "auth", "server"),
    ]


def test_restore_corrupted_archive_changes_nothing(stack, tmp_path, monkeypatch):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    data = bytearray(path.read_bytes())
    data[data.find(b"png image data")] ^= 1
    path.write_bytes(bytes(data))
    fresh = target(stack, monkeypatch)
    before = snapshot(fresh["root"])
    status, _, err = stackctl(stack, "restore", str(path))
    assert status == 1 and err.count("\n") == 1 and "checksum differs" in err
    assert snapshot(fresh["root"]) == before and stack["steps"] == []


def test_restore_non_empty_stack_refused_without_force(stack, tmp_path, monkeypatch):
    path = backup_to(stack, tmp_path / "backups")["archive"]
    used = target(stack, monkeypatch, runs=2)
    before = snapshot(used["root"])
    status, _, err = stackctl(stack, "restore", path)
    assert status == 1 and "not empty (2 experiments besides Default; 2 runs" in err
    assert snapshot(used["root"]) == before and stack["steps"] == []
    status, _, err = stackctl(stack, "restore", path, "--force", "--quiet")
    assert status == 0 and err == ""
    assert snapshot(used["artifacts"]) == snapshot(stack["artifacts"])


def test_restore_another_mlflow_version_refused(stack, tmp_path, monkeypatch):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    target(stack, monkeypatch)
    real = stackio.agent_json

    def older(args, place, *words, **script):
        answer = real(args, place, *words, **script)
        return {**answer, "mlflow_version": "3.1.0"} if words == ("inspect-server",) else answer

    monkeypatch.setattr(stackio, "agent_json", older)
    status, _, err = stackctl(stack, "restore", str(path))
    assert status == 1 and "MLflow 3.17.2, this stack runs 3.1.0" in err


def test_verify_backup_renamed_archive_still_holds_its_own_artifacts(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    renamed = path.with_name("renamed.tar")
    path.rename(renamed)
    assert archive.verify_backup(renamed).artifacts["1/run0/artifacts/model.pkl"].archive == renamed


def test_backup_after_renamed_archive_refers_to_its_new_name(stack, tmp_path):
    path = Path(backup_to(stack, tmp_path / "backups")["archive"])
    path.rename(path.with_name("first.tar"))
    second = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/b2.tar"))
    assert second["artifacts_copied"] == 0
    plan = archive.verify_backup(Path(second["archive"]))
    assert plan.artifacts["1/run0/artifacts/model.pkl"].archive.name == "first.tar"


def test_remove_stale_only_our_day_old_leftovers(tmp_path):
    for name in (".stackctl-old.db", ".stackctl-new.db", "mlflow.db", ".stackctl-olddir"):
        (tmp_path / name).mkdir() if name.endswith("dir") else (tmp_path / name).write_text("x")
    day_ago = time.time() - volumeagent.STALE_SECONDS - 60
    for name in (".stackctl-old.db", ".stackctl-olddir", "mlflow.db"):
        os.utime(tmp_path / name, (day_ago, day_ago))
    volumeagent.remove_stale(str(tmp_path), time.time())
    assert sorted(os.listdir(tmp_path)) == [".stackctl-new.db", "mlflow.db"]


def test_backup_links_in_artifacts_skipped_never_followed(stack, tmp_path):
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "key").write_bytes(b"not an artifact")
    (stack["artifacts"] / "1/run0/artifacts/link-to-dir").symlink_to(secret)
    (stack["artifacts"] / "1/run0/artifacts/link-to-file").symlink_to(secret / "key")
    report = backup_to(stack, tmp_path / "backups")
    assert report["skipped"] == [
        "1/run0/artifacts/link-to-dir", "1/run0/artifacts/link-to-file"]  # fmt: skip
    assert b"not an artifact" not in Path(report["archive"]).read_bytes()


def test_agent_failure_line_escaped_for_the_terminal(stack, tmp_path):
    # The agent's last stderr line reaches the operator's terminal; a name in it is a client's.
    with pytest.raises(BundleError) as refused, stackio.agent(stack, "server", "no-such-mode"):
        pass
    assert "volumeagent: usage" in str(refused.value)
    errors = io.BytesIO(b"volumeagent: load-server: bad name 'a\x1b[31mb'\n")

    class Failed:
        returncode = 1

    line = stackio._agent_failure("load-server", Failed, errors)
    assert "\x1b" not in line and "\\x1b[31m" in line


def test_bundle_version_without_pyproject_unknown(tmp_path):
    """A bundle copied without pyproject.toml (as Ansible's did) still backs up."""
    assert backup.bundle_version(tmp_path).startswith("unknown")
    assert backup.bundle_version(tmp_path / "missing").startswith("unknown")


def test_bundle_version_reads_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nversion = "9.8.7"\n')
    assert backup.bundle_version(tmp_path).startswith("9.8.7")


def test_one_off_command_server_never_built_on_any_compose_version():
    """A one-off container of the server's image must not build: ``pull_policy: build`` has
    ``run`` print the build on stdout (the agent's answer), and a shipped VM has no base image
    to build from. ``--pull never`` is refused by Compose 2.26 (Debian 13, the Ansible VMs:
    restore failed there with "unknown flag: --pull"); the policy variable works everywhere."""
    import types

    import yaml
    from mlflowstack import commands

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert compose["services"]["server"]["pull_policy"] == "${SERVER_PULL_POLICY:-build}"
    command = commands.one_off_command(types.SimpleNamespace(project_dir=REPO), "server", "x")
    assert command[:2] == ["env", "SERVER_PULL_POLICY=never"]
    assert command[2:4] == ["docker", "compose"]
    assert command[-6:] == ["run", "--rm", "-T", "--no-deps", "server", "x"]
    assert "--pull" not in command
    assert "--pull" not in stackio._agent_command(
        types.SimpleNamespace(project_dir=REPO), "server-run", ("load-server",), stackio.AGENT
    )


def test_output_path_trailing_slash_makes_directory_new_file_inside(tmp_path):
    """Newcomer review: "--output /srv/backups/" on a missing directory wrote a file there."""
    import argparse
    import datetime

    now = datetime.datetime(2026, 11, 29, 4, 5, 6, tzinfo=datetime.UTC)
    args = argparse.Namespace(output=f"{tmp_path}/backups/", project_dir=None, encrypt=False)
    path = backup.output_path(args, now)
    assert path == tmp_path / "backups" / "mlflow-backup-20261129T040506Z.tar"
    assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
    args.output = str(tmp_path / "archive.tar")
    assert backup.output_path(args, now) == tmp_path / "archive.tar"
