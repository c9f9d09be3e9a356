"""Passphrase encryption of backup archives with the host's stdlib and ``openssl`` only.

Format: MAGIC, one JSON header line (version, scrypt n/r/p/salt, cipher, iv), the AES-256-CTR
ciphertext, then a 32-byte HMAC-SHA256 tag over header line + ciphertext (encrypt-then-MAC).
scrypt(passphrase, salt) gives 64 bytes: 32 for AES, 32 for the HMAC. AES runs in
``openssl enc`` as a stream filter; its key reaches openssl only through a pipe fd, never argv
or the environment (other local users can read /proc/*/cmdline). ``decrypt_file`` checks the
tag over the whole file before it writes a single decrypted byte.
"""

import contextlib
import getpass
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .files import BundleError

MAGIC = b"MLFLOWSTACK-ENCRYPTED-BACKUP\n"
SCRYPT = {"n": 2**17, "r": 8, "p": 1}
_MAXMEM = 256 * 1024 * 1024
_TAG = 32
_CHUNK = 1024 * 1024
_REFUSED = "wrong passphrase or corrupted archive"
_PASSPHRASE_LIMIT = 64 * 1024


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


class _Sink:
    """What tarfile writes to: openssl's stdin, with the offset tarfile asks for."""

    def __init__(self, stdin):
        self._stdin, self._offset = stdin, 0

    def write(self, data) -> int:
        self._stdin.write(data)
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        self._stdin.flush()


@contextlib.contextmanager
def encrypting(target_handle, passphrase: bytes, scrypt: dict | None = None):
    """Yield a write-only binary file; what is written there reaches the open binary
    ``target_handle`` encrypted, and the tag follows when the block ends without an error.
    On an error openssl is stopped and ``target_handle`` holds a partial file (open_atomic
    discards it). No plaintext touches the disk."""
    scrypt = scrypt or SCRYPT
    salt, iv = secrets.token_bytes(16), secrets.token_bytes(16)
    aes_key, mac_key = derive_keys(passphrase, salt, **scrypt)
    header = {"version": 1, "kdf": "scrypt", **scrypt, "salt": salt.hex()}
    header |= {"cipher": "aes-256-ctr", "iv": iv.hex()}
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    mac = hmac.new(mac_key, MAGIC + line, hashlib.sha256)
    target_handle.write(MAGIC + line)
    process = _openssl(iv, aes_key, decrypt=False, stdout=subprocess.PIPE)
    failed: list[BaseException] = []

    def drain() -> None:
        # openssl's output must be drained while its input is still being written.
        try:
            while chunk := process.stdout.read(_CHUNK):
                mac.update(chunk)
                target_handle.write(chunk)
        except BaseException as error:  # e.g. a full disk: stop openssl so the writer fails
            failed.append(error)
            process.kill()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        yield _Sink(process.stdin)
        process.stdin.close()
    except BrokenPipeError:
        # openssl exited early: its own words say why.
        drainer.join()
        process.wait()
        if failed:
            raise failed[0] from None
        raise BundleError(_openssl_failure(process)) from None
    except BaseException:
        process.kill()
        drainer.join()
        process.wait()
        if failed:
            raise failed[0] from None
        raise
    drainer.join()
    if failed:
        raise failed[0]
    if process.wait() != 0:
        raise BundleError(_openssl_failure(process))
    target_handle.write(mac.digest())


def _openssl_failure(process) -> str:
    lines = process.stderr.read().decode(errors="replace").strip().splitlines()
    return f"openssl failed: {lines[0][:200] if lines else f'exit status {process.returncode}'}"


def encrypt_file(source: Path, target_handle, passphrase: bytes, scrypt: dict | None = None):
    """Write the encrypted form of ``source`` to the open binary ``target_handle``."""
    with encrypting(target_handle, passphrase, scrypt) as sink, open(source, "rb") as plain:
        while chunk := plain.read(_CHUNK):
            sink.write(chunk)


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
    # A hostile header must not buy hours of scrypt: bounds well above what we write.
    n, r, p = fields[1:]
    if not all(type(v) is int for v in (n, r, p)) or not (
        2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16
    ):
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
        except (ValueError, MemoryError, OverflowError) as error:
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
            raise BundleError(_openssl_failure(process))


def read_passphrase(file: str | None, *, confirm: bool) -> bytes:
    """The passphrase: the first line of ``file`` (refused when group or others may read it,
    like ssh refuses such a key) or, on a terminal, typed at a prompt (twice with ``confirm``).
    Never from an argument or the environment. An empty one is refused."""
    if file is not None:
        try:
            with open(file, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode & 0o777
                data = handle.read(_PASSPHRASE_LIMIT)
        except OSError as error:
            raise BundleError(
                f"{file}: cannot read the passphrase file ({error.strerror})"
            ) from None
        if mode & 0o077:
            raise BundleError(
                f"{file}: permissions {mode:04o} are too open: a passphrase file must not be "
                "readable by group or others (chmod 600)"
            )
        passphrase = data.split(b"\n", 1)[0].removesuffix(b"\r")
    elif not sys.stdin.isatty():
        raise BundleError("no terminal to ask for the passphrase: give --passphrase-file FILE")
    else:
        passphrase = getpass.getpass("Backup passphrase: ").encode()
        if confirm and getpass.getpass("The same passphrase again: ").encode() != passphrase:
            raise BundleError("the two passphrases differ; nothing written")
    if not passphrase:
        raise BundleError("refusing an empty passphrase")
    return passphrase


@contextlib.contextmanager
def plain_archive(path: Path, passphrase_file: str | None, tmp_dir: str | None):
    """Yield a plaintext archive for ``path``: ``path`` itself when it is not encrypted, else
    its decryption (tag checked over the whole file first) in a file of mode 0600 in a new
    0700 directory under ``tmp_dir`` (default: beside ``path``), removed on every exit path."""
    try:
        encrypted = is_encrypted(path)
    except OSError:
        encrypted = False  # restore's verification says what is wrong with it
    if not encrypted:
        yield path
        return
    passphrase = read_passphrase(passphrase_file, confirm=False)
    parent = Path(tmp_dir) if tmp_dir else path.parent
    try:
        directory = Path(tempfile.mkdtemp(prefix=".stackctl-decrypt-", dir=parent))
    except OSError as error:
        raise BundleError(f"{parent}: cannot make a private directory ({error.strerror})") from None
    try:
        plain = directory / path.name.removesuffix(".enc")
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            decrypt_file(path, handle, passphrase)
        yield plain
    finally:
        shutil.rmtree(directory, ignore_errors=True)
