"""MLflow's key-encryption passphrase: made once by init (mlflowstack/stacksecrets.py), handed
to MLflow by server/start.py from its file, never from the container's settings."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import start
from mlflowstack import stacksecrets
from mlflowstack.files import BundleError
from mlflowstack.stacksecrets import (
    KEK_PASSPHRASE_FILE,
    ensure_kek_passphrase,
    ensure_secrets,
    move_kek_passphrase,
)

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "a" * 64


def test_ensure_kek_passphrase_missing_creates_64_hex_mode_0600(tmp_path):
    assert ensure_kek_passphrase(tmp_path) is True
    path = tmp_path / KEK_PASSPHRASE_FILE
    assert re.fullmatch(rb"[0-9a-f]{64}\n", path.read_bytes())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_ensure_kek_passphrase_existing_file_never_overwritten(tmp_path):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_text("operator-chosen passphrase\n")
    assert ensure_kek_passphrase(tmp_path) is False
    assert path.read_text() == "operator-chosen passphrase\n"


def test_ensure_kek_passphrase_two_installations_differ(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    ensure_kek_passphrase(first), ensure_kek_passphrase(second)
    assert (first / KEK_PASSPHRASE_FILE).read_bytes() != (second / KEK_PASSPHRASE_FILE).read_bytes()


@pytest.fixture
def volumes(tmp_path):
    """(shared, server): the ``secrets`` and ``server-secrets`` volumes' directories."""
    shared, server = tmp_path / "secrets", tmp_path / "server-secrets"
    shared.mkdir(), server.mkdir()
    return shared, server


def test_ensure_kek_passphrase_differs_from_proxy_secret(volumes):
    shared, server = volumes
    ensure_secrets(shared, server)
    kek = (server / KEK_PASSPHRASE_FILE).read_bytes()
    assert kek != (shared / stacksecrets.PROXY_SECRET_FILE).read_bytes()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_ensure_secrets_fresh_volumes_kek_in_server_volume_only(volumes):
    shared, server = volumes
    assert ensure_secrets(shared, server) == [stacksecrets.PROXY_SECRET_FILE, KEK_PASSPHRASE_FILE]
    assert sorted(_files(shared)) == [stacksecrets.PROXY_SECRET_FILE]
    assert sorted(p.name for p in server.iterdir()) == [KEK_PASSPHRASE_FILE]
    marker = shared / KEK_PASSPHRASE_FILE
    assert marker.is_dir() and list(marker.iterdir()) == []
    assert stat.S_IMODE(marker.stat().st_mode) == 0o700


def test_ensure_secrets_second_run_creates_nothing(volumes):
    shared, server = volumes
    ensure_secrets(shared, server)
    before = [_files(directory) for directory in volumes]
    assert ensure_secrets(shared, server) == []
    assert [_files(directory) for directory in volumes] == before


def test_ensure_secrets_old_layout_keeps_kek_and_creates_none(volumes):
    """A stack before the split: its passphrase moves, no new one is made."""
    shared, server = volumes
    (shared / stacksecrets.PROXY_SECRET_FILE).write_text("p" * 64 + "\n")
    (shared / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    assert ensure_secrets(shared, server) == []
    assert (server / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"
    assert _files(shared) == {stacksecrets.PROXY_SECRET_FILE: b"p" * 64 + b"\n"}


def test_mark_kek_moved_older_code_on_the_volumes_makes_and_uses_no_passphrase(volumes):
    """What a rollback to images before the split runs: their init (ensure_kek_passphrase on
    the shared volume) makes nothing, their server (start.py's old default path) stops."""
    shared, server = volumes
    ensure_secrets(shared, server)
    assert ensure_kek_passphrase(shared) is False
    assert sorted(_files(shared)) == [stacksecrets.PROXY_SECRET_FILE]
    with pytest.raises(start.SettingError, match="cannot read"):
        start.kek_environment({"KEK_PASSPHRASE_FILE": str(shared / KEK_PASSPHRASE_FILE)})


def test_mark_kek_moved_file_there_left_alone(volumes):
    shared, server = volumes
    (shared / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    assert stacksecrets.mark_kek_moved(shared, server) is False
    assert (shared / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"


def test_move_kek_passphrase_nothing_shared_returns_none(volumes):
    shared, server = volumes
    assert move_kek_passphrase(shared, server) is None
    assert list(server.iterdir()) == []


def test_move_kek_passphrase_old_layout_moves_bytes_mode_0600(volumes):
    shared, server = volumes
    (shared / KEK_PASSPHRASE_FILE).write_bytes(b"operator's own passphrase, kept as is\n")
    (shared / KEK_PASSPHRASE_FILE).chmod(0o644)
    assert move_kek_passphrase(shared, server) == "moved"
    moved = server / KEK_PASSPHRASE_FILE
    assert moved.read_bytes() == b"operator's own passphrase, kept as is\n"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert not (shared / KEK_PASSPHRASE_FILE).exists()


def test_move_kek_passphrase_cut_short_same_copy_removes_shared(volumes):
    """Killed after the copy, before the removal: the next run finishes the move."""
    shared, server = volumes
    for directory in volumes:
        (directory / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    assert move_kek_passphrase(shared, server) == "removed"
    assert (server / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"
    assert not (shared / KEK_PASSPHRASE_FILE).exists()


def test_move_kek_passphrase_two_different_raises_and_touches_neither(volumes):
    shared, server = volumes
    (shared / KEK_PASSPHRASE_FILE).write_text("b" * 64 + "\n")
    (server / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    with pytest.raises(BundleError, match="different key-encryption passphrases") as caught:
        move_kek_passphrase(shared, server)
    assert (shared / KEK_PASSPHRASE_FILE).read_text() == "b" * 64 + "\n"
    assert (server / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"
    assert "b" * 32 not in str(caught.value) and PASSPHRASE not in str(caught.value)


def test_move_kek_passphrase_same_directory_twice_keeps_the_file(tmp_path):
    """Both settings naming one directory (through a link here): nothing moves or goes."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "secrets")
    (tmp_path / "secrets" / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    assert move_kek_passphrase(tmp_path / "secrets", tmp_path / "alias") is None
    assert ensure_secrets(tmp_path / "secrets", tmp_path / "alias") == [
        stacksecrets.PROXY_SECRET_FILE
    ]
    assert (tmp_path / "secrets" / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"


def test_move_kek_passphrase_server_volume_missing_raises_keeps_shared(tmp_path):
    """No server volume (an override that drops the mount): an error, never a new passphrase
    nor a lost one."""
    shared = tmp_path / "secrets"
    shared.mkdir()
    (shared / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    with pytest.raises(BundleError):
        ensure_secrets(shared, tmp_path / "absent")
    assert (shared / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"


def _run_main(shared: Path, server: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlflowstack.stacksecrets"],
        env={
            **os.environ,
            "SECRETS_DIR": str(shared),
            "SERVER_SECRETS_DIR": str(server),
            "PYTHONPATH": str(ROOT / "scripts"),
        },
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_main_creates_files_and_never_prints_values(volumes):
    shared, server = volumes
    result = _run_main(shared, server)
    assert result.returncode == 0, result.stderr
    passphrase = (server / KEK_PASSPHRASE_FILE).read_text().strip()
    assert KEK_PASSPHRASE_FILE in result.stderr
    assert passphrase not in result.stdout + result.stderr


def test_main_old_layout_says_moved_never_prints_value(volumes):
    shared, server = volumes
    (shared / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    result = _run_main(shared, server)
    assert result.returncode == 0, result.stderr
    assert f"{KEK_PASSPHRASE_FILE} moved" in result.stderr
    assert f"created {KEK_PASSPHRASE_FILE}" not in result.stderr
    assert PASSPHRASE not in result.stdout + result.stderr
    assert (server / KEK_PASSPHRASE_FILE).read_text() == PASSPHRASE + "\n"


def test_main_two_different_passphrases_exits_1(volumes):
    shared, server = volumes
    (shared / KEK_PASSPHRASE_FILE).write_text("b" * 64 + "\n")
    (server / KEK_PASSPHRASE_FILE).write_text(PASSPHRASE + "\n")
    assert stacksecrets.main({"SECRETS_DIR": str(shared), "SERVER_SECRETS_DIR": str(server)}) == 1


@pytest.mark.parametrize("missing", ["SECRETS_DIR", "SERVER_SECRETS_DIR"])
def test_main_without_a_directory_setting_exits_2(tmp_path, missing):
    environ = {"SECRETS_DIR": str(tmp_path), "SERVER_SECRETS_DIR": str(tmp_path)}
    del environ[missing]
    assert stacksecrets.main(environ) == 2


def test_main_missing_directory_exits_1(tmp_path):
    environ = {"SECRETS_DIR": str(tmp_path / "absent"), "SERVER_SECRETS_DIR": str(tmp_path)}
    assert stacksecrets.main(environ) == 1


def test_kek_environment_file_gives_mlflow_variable(tmp_path):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_text(PASSPHRASE + "\n")
    env = start.kek_environment({"KEK_PASSPHRASE_FILE": str(path)})
    assert env == {"MLFLOW_CRYPTO_KEK_PASSPHRASE": PASSPHRASE}


def test_kek_environment_default_path_is_the_server_secrets_volume():
    default = Path(start.DEFAULT_KEK_PASSPHRASE_FILE)
    assert (default.parent, default.name) == (
        Path("/var/lib/mlflow-stack/server-secrets"),
        KEK_PASSPHRASE_FILE,
    )


def test_kek_environment_file_wins_over_container_setting(tmp_path):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_text(PASSPHRASE + "\n")
    env = start.kek_environment(
        {"KEK_PASSPHRASE_FILE": str(path), "MLFLOW_CRYPTO_KEK_PASSPHRASE": "from-compose"}
    )
    assert env["MLFLOW_CRYPTO_KEK_PASSPHRASE"] == PASSPHRASE


def test_kek_environment_missing_file_raises_setting_error(tmp_path):
    with pytest.raises(start.SettingError, match="init service"):
        start.kek_environment({"KEK_PASSPHRASE_FILE": str(tmp_path / "absent")})


@pytest.mark.parametrize("content", ["", "short\n", "two words " + "x" * 40, "\xe9" * 40])
def test_kek_environment_unusable_passphrase_raises_setting_error(tmp_path, content):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(start.SettingError):
        start.kek_environment({"KEK_PASSPHRASE_FILE": str(path)})


def test_kek_environment_error_never_shows_the_passphrase(tmp_path):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_text("tooshort-secret")
    with pytest.raises(start.SettingError) as refused:
        start.kek_environment({"KEK_PASSPHRASE_FILE": str(path)})
    assert "tooshort-secret" not in str(refused.value)


def test_main_missing_passphrase_exits_2_before_touching_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "artifacts"))
    monkeypatch.setenv("KEK_PASSPHRASE_FILE", str(tmp_path / "absent"))
    monkeypatch.setattr(start, "prepare_backend_store", lambda env: pytest.fail("store touched"))
    assert start.main() == 2
    assert "key-encryption passphrase" in capsys.readouterr().err


def test_kek_passphrase_variable_is_mlflows():
    from mlflow.utils.crypto import CRYPTO_KEK_PASSPHRASE_ENV_VAR

    assert start.KEK_PASSPHRASE_VARIABLE == CRYPTO_KEK_PASSPHRASE_ENV_VAR


def test_compose_init_runs_stacksecrets_before_bootstrap():
    compose = (ROOT / "compose.yaml").read_text()
    assert "python -m mlflowstack.stacksecrets && exec stackctl bootstrap" in compose
    assert "MLFLOW_CRYPTO_KEK_PASSPHRASE" not in compose
