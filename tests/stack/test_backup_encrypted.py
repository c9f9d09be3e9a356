"""stackctl backup --encrypt and restore of that archive on real stacks (backup.py,
restore.py, backupcrypt.py with the host's openssl).

One encrypted backup of the session stack; the file holds none of a known param value,
artifact's bytes or user's bcrypt hash. Restoring it onto a second, empty stack with a wrong
passphrase is refused and changes nothing; with the right one, the second stack then holds the
same experiments, runs, params, metrics, models and artifact bytes, and the user logs in.
"""

import json
import os
import stat
from pathlib import Path

import pytest
import requests
from conftest import PROJECT, SecondStack
from test_backup_restore import client_as, compose_env, everything, host_stackctl

USER, PASSWORD = "enc-bob", "enc-bob-Secret-8k2m"
PARAM = "enc-param-value-5f1c9e"
ARTIFACT = b"enc-artifact-bytes-7d3a0b\n" * 100
MAGIC = b"MLFLOWSTACK-ENCRYPTED-BACKUP\n"


def passphrase_file(where: Path, name: str, text: str) -> str:
    path = where / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def encrypted_backup(stack, admin, tmp_path_factory):
    """Known data on the session stack, then one backup --encrypt of it. Returns the archive
    and the directory of the passphrase files."""
    where = tmp_path_factory.mktemp("encrypted")
    keys = tmp_path_factory.mktemp("keys")
    stack.add_user(USER, PASSWORD, "editor")
    (where / "data.txt").write_bytes(ARTIFACT)
    with client_as(stack.url, *admin) as client:
        experiment = client.create_experiment("enc-exp")
        run_id = client.create_run(experiment, run_name="enc-run").info.run_id
        client.log_param(run_id, "secret", PARAM)
        client.log_metric(run_id, "loss", 0.25, step=3)
        client.log_artifact(run_id, str(where / "data.txt"))
        client.set_terminated(run_id)
    (where / "data.txt").unlink()
    archives = where / "archives"
    archives.mkdir(mode=0o700)
    result = host_stackctl(
        compose_env(PROJECT), "backup", "--output", str(archives), "--encrypt", "--json",
        "--passphrase-file", passphrase_file(keys, "right", "a long enough passphrase"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["encrypted"] is True and report["incremental_after"] is None
    return Path(report["archive"]), keys


def test_backup_encrypt_file_private_and_opaque(encrypted_backup, stack):
    path, _ = encrypted_backup
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.name.endswith(".tar.enc")
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    htpasswd = stack.compose("exec", "-T", "auth", "cat", "/var/lib/mlflow-stack/users/htpasswd")
    bcrypt_hash = next(
        line.split(":", 1)[1] for line in htpasswd.splitlines() if line.startswith(USER + ":")
    )
    for plaintext in (PARAM.encode(), ARTIFACT[:64], bcrypt_hash.encode(), b"manifest.json"):
        assert plaintext not in data
    assert os.listdir(path.parent) == [path.name]


def test_restore_encrypted_wrong_then_right_passphrase_same_data(
    encrypted_backup, stack, admin, tmp_path
):
    path, keys = encrypted_backup
    with SecondStack("encrypted") as second:
        wrong = host_stackctl(
            second.env, "restore", str(path),
            "--passphrase-file", passphrase_file(keys, "wrong", "not the passphrase"),
        )  # fmt: skip
        assert wrong.returncode == 1
        assert wrong.stderr == "stackctl: wrong passphrase or corrupted archive\n"
        with client_as(second.url, *second.admin()) as client:
            assert [e.name for e in client.search_experiments()] == ["Default"]

        right = host_stackctl(
            second.env, "restore", str(path), "--json",
            "--passphrase-file", str(keys / "right"),
        )  # fmt: skip
        assert right.returncode == 0, right.stderr
        assert json.loads(right.stdout)["encrypted"] is True
        assert os.listdir(path.parent) == [path.name]  # the decrypted copy is gone

        with client_as(stack.url, *admin) as client:
            source = everything(client, tmp_path / "source", "enc-exp")
        with client_as(second.url, *admin) as client:
            restored = everything(client, tmp_path / "restored", "enc-exp")
        # The session stack's other tests may write between the backup and now: compare the
        # experiment this module wrote, and that nothing else of the backup is missing.
        ours = {k: v for k, v in source["runs"].items() if v["artifacts"] is not None}
        assert ours and all(restored["runs"][k] == v for k, v in ours.items())
        assert any(PARAM in r["params"].values() for r in ours.values())
        url = second.url + "/api/2.0/mlflow/experiments/search"
        answer = requests.get(url, auth=(USER, PASSWORD), params={"max_results": 1})
        assert answer.status_code == 200
