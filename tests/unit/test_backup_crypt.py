"""Unit tests of backupcrypt: round trip, tamper and truncation refusal, key off the argv."""

import random
from pathlib import Path

import pytest
from mlflowstack import backupcrypt
from mlflowstack.files import BundleError

FAST = {"n": 2**10, "r": 8, "p": 1}


def _encrypt(tmp_path: Path, data: bytes, passphrase: bytes = b"correct horse") -> Path:
    plain = tmp_path / "plain.tar"
    plain.write_bytes(data)
    target = tmp_path / "archive.enc"
    with open(target, "wb") as handle:
        backupcrypt.encrypt_file(plain, handle, passphrase, FAST)
    return target


def _decrypt(tmp_path: Path, source: Path, passphrase: bytes = b"correct horse") -> bytes:
    out = tmp_path / "out.tar"
    with open(out, "wb") as handle:
        backupcrypt.decrypt_file(source, handle, passphrase)
    return out.read_bytes()


def test_decrypt_file_round_trip_returns_plaintext(tmp_path):
    data = random.Random(1).randbytes(300_000)
    archive = _encrypt(tmp_path, data)
    assert backupcrypt.is_encrypted(archive)
    assert data[:64] not in archive.read_bytes()
    assert _decrypt(tmp_path, archive) == data


def test_decrypt_file_wrong_passphrase_refused_nothing_written(tmp_path):
    archive = _encrypt(tmp_path, b"secret data")
    with pytest.raises(BundleError, match="wrong passphrase or corrupted archive"):
        _decrypt(tmp_path, archive, b"other")
    assert (tmp_path / "out.tar").read_bytes() == b""


@pytest.mark.parametrize("where", ["header", "middle", "tag"])
def test_decrypt_file_flipped_byte_refused(tmp_path, where):
    archive = _encrypt(tmp_path, b"x" * 5000)
    blob = bytearray(archive.read_bytes())
    index = {"header": len(backupcrypt.MAGIC) + 5, "middle": len(blob) // 2, "tag": -1}[where]
    blob[index] ^= 0x01
    archive.write_bytes(bytes(blob))
    with pytest.raises(BundleError):
        _decrypt(tmp_path, archive)
    assert (tmp_path / "out.tar").read_bytes() == b""


def test_decrypt_file_random_truncations_and_flips_refused(tmp_path):
    archive = _encrypt(tmp_path, b"payload " * 200)
    original = archive.read_bytes()
    rng = random.Random(7)
    for _ in range(25):
        blob = bytearray(original)
        if rng.random() < 0.5:
            blob = blob[: rng.randrange(len(blob))]
        else:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        archive.write_bytes(bytes(blob))
        with pytest.raises(BundleError):
            _decrypt(tmp_path, archive)
        assert (tmp_path / "out.tar").read_bytes() == b""


def test_openssl_command_key_not_in_argv():
    key = bytes(range(32))
    command = backupcrypt.openssl_command(b"\x01" * 16, 7, decrypt=False)
    joined = " ".join(command)
    assert key.hex() not in joined and "-K" not in command
    assert "fd:7" in command


def test_derive_keys_empty_passphrase_refused():
    with pytest.raises(BundleError, match="empty passphrase"):
        backupcrypt.derive_keys(b"", b"s" * 16, **FAST)
