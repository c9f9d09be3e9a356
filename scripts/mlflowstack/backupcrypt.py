"""Passphrase encryption of backup archives with the host's stdlib and ``openssl`` only.

Format: MAGIC, one JSON header line (version, scrypt n/r/p/salt, cipher, iv), the AES-256-CTR
ciphertext, then a 32-byte HMAC-SHA256 tag over header line + ciphertext (encrypt-then-MAC).
scrypt(passphrase, salt) gives 64 bytes: 32 for AES, 32 for the HMAC. AES runs in
``openssl enc`` as a stream filter; its key reaches openssl only through a pipe fd, never argv
or the environment (other local users can read /proc/*/cmdline). ``decrypt_file`` checks the
tag over the whole file before it writes a single decrypted byte.
Not wired into the CLI yet (see the encrypt branch's report).
"""

import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

from .files import BundleError

MAGIC = b"MLFLOWSTACK-ENCRYPTED-BACKUP\n"
SCRYPT = {"n": 2**17, "r": 8, "p": 1}
_MAXMEM = 256 * 1024 * 1024
_TAG = 32
_CHUNK = 1024 * 1024
_REFUSED = "wrong passphrase or corrupted archive"


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts with the encrypted-archive magic."""
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def derive_keys(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """Return (AES key, HMAC key) from scrypt; refuse an empty passphrase."""
    if not passphrase:
        raise BundleError("refusing an empty passphrase")
    keys = hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=64)
    return keys[:32], keys[32:]


def openssl_command(iv: bytes, fd: int, *, decrypt: bool) -> list[str]:
    """The openssl argv: the key comes from pipe ``fd``; only the public IV is on the line."""
    command = ["openssl", "enc", "-aes-256-ctr", "-pbkdf2", "-iter", "1", "-md", "sha256"]
    command += ["-S", iv[:8].hex(), "-pass", f"fd:{fd}"]
    return command + (["-d"] if decrypt else [])


def _openssl(iv: bytes, key: bytes, *, decrypt: bool, stdout):
    if shutil.which("openssl") is None:
        raise BundleError("openssl not found: install the 'openssl' package")
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            openssl_command(iv, read_end, decrypt=decrypt),
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=(read_end,),
        )
        os.write(write_end, key.hex().encode() + b"\n")
    finally:
        os.close(read_end)
        os.close(write_end)
    return process


def encrypt_file(source: Path, target_handle, passphrase: bytes, scrypt: dict = SCRYPT) -> None:
    """Write the encrypted form of ``source`` to the open binary ``target_handle``."""
    salt, iv = secrets.token_bytes(16), secrets.token_bytes(16)
    aes_key, mac_key = derive_keys(passphrase, salt, **scrypt)
    header = {"version": 1, "kdf": "scrypt", **scrypt, "salt": salt.hex()}
    header |= {"cipher": "aes-256-ctr", "iv": iv.hex()}
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    mac = hmac.new(mac_key, MAGIC + line, hashlib.sha256)
    target_handle.write(MAGIC + line)
    process = _openssl(iv, aes_key, decrypt=False, stdout=subprocess.PIPE)
    # A feeder thread: openssl's output must be drained while its input is still being written.
    feeder = threading.Thread(target=_feed, args=(source, process.stdin), daemon=True)
    feeder.start()
    while chunk := process.stdout.read(_CHUNK):
        mac.update(chunk)
        target_handle.write(chunk)
    feeder.join()
    if process.wait() != 0:
        raise BundleError(f"openssl failed: {process.stderr.read().decode(errors='replace')}")
    target_handle.write(mac.digest())


def _feed(source: Path, stdin) -> None:
    try:
        with open(source, "rb") as plain:
            while chunk := plain.read(_CHUNK):
                stdin.write(chunk)
    except BrokenPipeError:
        pass  # openssl died; its exit status reports it
    finally:
        stdin.close()


def _read_header(handle) -> tuple[bytes, dict]:
    if handle.read(len(MAGIC)) != MAGIC:
        raise BundleError("not an encrypted backup archive")
    line = handle.readline(4096)
    try:
        header = json.loads(line)
        fields = (header["version"], header["n"], header["r"], header["p"])
        salt, iv = bytes.fromhex(header["salt"]), bytes.fromhex(header["iv"])
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(_REFUSED) from error
    if fields[0] != 1 or len(salt) != 16 or len(iv) != 16 or not line.endswith(b"\n"):
        raise BundleError(_REFUSED)
    return line, {"n": fields[1], "r": fields[2], "p": fields[3], "salt": salt, "iv": iv}


def decrypt_file(source: Path, target_handle, passphrase: bytes) -> None:
    """Verify the tag over all of ``source``, then write its plaintext to ``target_handle``."""
    size = source.stat().st_size
    with open(source, "rb") as handle:
        line, header = _read_header(handle)
        body = size - len(MAGIC) - len(line) - _TAG
        if body < 0:
            raise BundleError(_REFUSED)
        try:
            aes_key, mac_key = derive_keys(
                passphrase, header["salt"], header["n"], header["r"], header["p"]
            )
        except (ValueError, MemoryError) as error:
            raise BundleError(_REFUSED) from error
        mac = hmac.new(mac_key, MAGIC + line, hashlib.sha256)
        left = body
        while left and (chunk := handle.read(min(_CHUNK, left))):
            mac.update(chunk)
            left -= len(chunk)
        if left or not hmac.compare_digest(mac.digest(), handle.read(_TAG)):
            raise BundleError(_REFUSED)
        handle.seek(len(MAGIC) + len(line))
        process = _openssl(header["iv"], aes_key, decrypt=True, stdout=target_handle)
        left = body
        while left and (chunk := handle.read(min(_CHUNK, left))):
            process.stdin.write(chunk)
            left -= len(chunk)
        process.stdin.close()
        if process.wait() != 0:
            raise BundleError(f"openssl failed: {process.stderr.read().decode(errors='replace')}")
