"""stackctl backup --encrypt and restore of an encrypted archive (backup.py, restore.py,
backupcrypt.py's passphrase and temporary-file handling), on test_backup.py's fake stack (no
Docker; the agent runs locally). The real stack: tests/stack/test_backup_encrypted.py."""

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import test_backup
from mlflowstack import archive, backupcrypt
from test_backup import backup_to, put, snapshot, stackctl, target

# test_backup.py's fake stack (a fixture), shared.
stack = test_backup.stack

FAST = {"n": 2**10, "r": 8, "p": 1}


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(backupcrypt, "SCRYPT", FAST)


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def secret_file(tmp_path: Path, text: str = "correct horse\n", mode: int = 0o600) -> str:
    path = tmp_path / "passphrase"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def encrypted_backup(stack, tmp_path: Path) -> dict:
    return backup_to(
        stack, tmp_path / "backups", "--encrypt", "--passphrase-file", secret_file(tmp_path)
    )


def test_backup_encrypt_writes_0600_archive_without_plaintext(stack, tmp_path):
    report = encrypted_backup(stack, tmp_path)
    path = Path(report["archive"])
    assert report["encrypted"] is True and path.name.endswith(".tar.enc")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(backupcrypt.MAGIC)
    for secret in (b"model bytes", b"s" * 64, b"$2y$12$x", b"manifest"):
        assert secret not in data
    assert sorted(os.listdir(path.parent)) == [path.name]  # no plaintext left beside it


def test_backup_encrypt_always_full_and_never_a_base(stack, tmp_path):
    plain = backup_to(stack, tmp_path / "backups")
    encrypted = encrypted_backup(stack, tmp_path)
    assert encrypted["incremental_after"] is None and encrypted["artifacts_copied"] == 2
    put(stack["artifacts"], "1/run1/artifacts/new.txt", b"new")
    later = backup_to(stack, tmp_path / "backups", "--output", str(tmp_path / "backups/c.tar"))
    assert later["incremental_after"] == Path(plain["archive"]).name


def test_backup_passphrase_file_without_encrypt_refused(stack, tmp_path):
    status, _, err = stackctl(
        stack, "backup", "--output", str(tmp_path), "--passphrase-file", secret_file(tmp_path)
    )
    assert status == 1 and err == "stackctl: --passphrase-file is for --encrypt\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_backup_encrypt_passphrase_file_readable_by_others_refused(stack, tmp_path, mode):
    path = secret_file(tmp_path, mode=mode)
    status, _, err = stackctl(
        stack, "backup", "--output", str(tmp_path / "b.tar"), "--encrypt", "--passphrase-file", path
    )
    assert status == 1 and "too open" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.tar").exists()


@pytest.mark.parametrize("text", ["", "\n", "\nsecond line\n"])
def test_backup_encrypt_empty_passphrase_refused(stack, tmp_path, text):
    path = secret_file(tmp_path, text)
    status, _, err = stackctl(
        stack, "backup", "--output", str(tmp_path / "b.tar"), "--encrypt", "--passphrase-file", path
    )
    assert (status, err) == (1, "stackctl: refusing an empty passphrase\n")


def test_backup_encrypt_no_terminal_no_file_refused(stack, tmp_path, no_terminal):
    status, _, err = stackctl(stack, "backup", "--output", str(tmp_path / "b.tar"), "--encrypt")
    assert status == 1 and "--passphrase-file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.tar").exists()


def test_read_passphrase_prompt_mismatch_refused(monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    answers = iter(["one", "two"])
    monkeypatch.setattr(backupcrypt.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(backupcrypt.BundleError, match="differ"):
        backupcrypt.read_passphrase(None, confirm=True)


def test_restore_encrypted_round_trip_same_bytes(stack, tmp_path, monkeypatch):
    report = encrypted_backup(stack, tmp_path)
    fresh = target(stack, monkeypatch)
    status, out, err = stackctl(
        stack, "restore", report["archive"], "--json", "--passphrase-file", secret_file(tmp_path)
    )
    assert status == 0, err
    answer = json.loads(out)
    assert answer["encrypted"] is True and answer["archives_used"] == [report["archive"]]
    assert snapshot(fresh["artifacts"]) == snapshot(stack["artifacts"])
    assert snapshot(fresh["secrets"]) == snapshot(stack["secrets"])
    assert sorted(os.listdir(tmp_path / "backups")) == [Path(report["archive"]).name]


def test_restore_encrypted_wrong_passphrase_changes_nothing(stack, tmp_path, monkeypatch):
    report = encrypted_backup(stack, tmp_path)
    fresh = target(stack, monkeypatch)
    before = snapshot(fresh["root"])
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    wrong.chmod(0o600)
    status, _, err = stackctl(stack, "restore", report["archive"], "--passphrase-file", str(wrong))
    assert (status, err) == (1, "stackctl: wrong passphrase or corrupted archive\n")
    assert snapshot(fresh["root"]) == before and stack["steps"] == []
    assert sorted(os.listdir(tmp_path / "backups")) == [Path(report["archive"]).name]


def test_restore_encrypted_no_terminal_no_file_refused(stack, tmp_path, no_terminal):
    report = encrypted_backup(stack, tmp_path)
    status, _, err = stackctl(stack, "restore", report["archive"])
    assert status == 1 and "--passphrase-file" in err and stack["steps"] == []


def test_restore_encrypted_temp_removed_when_restore_fails(stack, tmp_path, monkeypatch):
    report = encrypted_backup(stack, tmp_path)
    target(stack, monkeypatch, runs=1)  # not empty: refused after the decryption
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen = []
    real = archive.verify_backup

    def spy(path):
        seen.append((path, stat.S_IMODE(path.stat().st_mode),
                     stat.S_IMODE(path.parent.stat().st_mode)))  # fmt: skip
        return real(path)

    monkeypatch.setattr(archive, "verify_backup", spy)
    status, _, err = stackctl(
        stack, "restore", report["archive"], "--passphrase-file", secret_file(tmp_path),
        "--tmp-dir", str(scratch),
    )  # fmt: skip
    assert status == 1 and "not empty" in err
    assert [(p.parent.parent, m, d) for p, m, d in seen] == [(scratch, 0o600, 0o700)]
    assert list(scratch.iterdir()) == []


def test_backup_encrypt_openssl_fails_one_line_no_file(stack, tmp_path, monkeypatch):
    monkeypatch.setattr(
        backupcrypt, "openssl_command", lambda iv, fd, decrypt: ["openssl", "enc", "-no-such"]
    )
    directory = tmp_path / "backups"
    directory.mkdir()
    status, _, err = stackctl(
        stack, "backup", "--output", str(directory), "--encrypt",
        "--passphrase-file", secret_file(tmp_path),
    )  # fmt: skip
    assert status == 1 and err.startswith("stackctl: openssl failed: ") and err.count("\n") == 1
    assert list(directory.iterdir()) == []


def test_backup_encrypt_without_openssl_names_the_package(stack, tmp_path, monkeypatch):
    monkeypatch.setattr(backupcrypt.shutil, "which", lambda name: None)
    status, _, err = stackctl(
        stack, "backup", "--output", str(tmp_path / "b.tar"), "--encrypt",
        "--passphrase-file", secret_file(tmp_path),
    )  # fmt: skip
    assert (status, err) == (1, "stackctl: openssl not found: install the 'openssl' package\n")
    assert not (tmp_path / "b.tar").exists()
