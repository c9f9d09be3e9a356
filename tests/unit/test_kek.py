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
from mlflowstack.stacksecrets import KEK_PASSPHRASE_FILE, ensure_kek_passphrase, ensure_secrets

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


def test_ensure_kek_passphrase_differs_from_proxy_secret(tmp_path):
    ensure_secrets(tmp_path)
    kek = (tmp_path / KEK_PASSPHRASE_FILE).read_bytes()
    assert kek != (tmp_path / stacksecrets.PROXY_SECRET_FILE).read_bytes()


def test_ensure_secrets_second_run_creates_nothing(tmp_path):
    assert ensure_secrets(tmp_path) == [stacksecrets.PROXY_SECRET_FILE, KEK_PASSPHRASE_FILE]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert ensure_secrets(tmp_path) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_main_creates_files_and_never_prints_values(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlflowstack.stacksecrets"],
        env={**os.environ, "SECRETS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT / "scripts")},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    passphrase = (tmp_path / KEK_PASSPHRASE_FILE).read_text().strip()
    assert KEK_PASSPHRASE_FILE in result.stderr
    assert passphrase not in result.stdout + result.stderr


def test_main_without_secrets_dir_exits_2():
    assert stacksecrets.main({}) == 2


def test_main_missing_directory_exits_1(tmp_path):
    assert stacksecrets.main({"SECRETS_DIR": str(tmp_path / "absent")}) == 1


def test_kek_environment_file_gives_mlflow_variable(tmp_path):
    path = tmp_path / KEK_PASSPHRASE_FILE
    path.write_text(PASSPHRASE + "\n")
    env = start.kek_environment({"KEK_PASSPHRASE_FILE": str(path)})
    assert env == {"MLFLOW_CRYPTO_KEK_PASSPHRASE": PASSPHRASE}


def test_kek_environment_default_path_is_the_secrets_volume():
    default = Path(start.DEFAULT_KEK_PASSPHRASE_FILE)
    assert (default.parent, default.name) == (
        Path("/var/lib/mlflow-stack/secrets"),
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
