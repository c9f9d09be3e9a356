"""The one safe file writer of the project, and the lock that serialises writers.

Contract: a file written here is either wholly the old content or wholly the new one, for any
reader at any moment (temp file in the same directory, fsync, rename, fsync of the directory),
and has its final mode before it gets its final name. ``create_file`` never replaces an existing
file unless asked to; nor does ``open_atomic``, the same writer for content too big for memory
(backup archives).
"""

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


class BundleError(Exception):
    """A problem the operator must fix; its text is the one line shown to them."""


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically; the file has ``mode`` from its first byte."""
    directory = path.parent
    if not directory.is_dir():
        raise BundleError(f"{directory}: directory does not exist")
    try:
        handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise BundleError(f"{directory}: cannot write here ({error.strerror})") from error
    try:
        with os.fdopen(handle, "wb") as temp:
            os.fchmod(temp.fileno(), mode)
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)


def create_file(path: Path, data: bytes, mode: int, *, force: bool = False) -> bool:
    """Write a generated file unless it exists; return whether it was written.

    With ``force`` an existing file is replaced (atomically, like every write here).
    """
    if path.exists() and not force:
        return False
    write_atomic(path, data, mode)
    return True


@contextlib.contextmanager
def open_atomic(path: Path, mode: int, *, force: bool = False):
    """Yield a binary file whose content becomes ``path`` when the block ends without an error.

    The file has ``mode`` from its first byte (so a secret is never readable by others, even
    half written). Without ``force`` an existing ``path`` is never replaced: the final name is
    taken by ``link``, which fails if it exists, even if another writer took it meanwhile.
    On any error the temporary file is removed and ``path`` is as it was.
    """
    directory = path.parent
    if not directory.is_dir():
        raise BundleError(f"{directory}: directory does not exist")
    if path.exists() and not force:
        raise BundleError(f"{path} exists, not replaced (--force replaces it)")
    try:
        handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise BundleError(f"{directory}: cannot write here ({error.strerror})") from error
    try:
        with os.fdopen(handle, "wb") as temp:
            os.fchmod(temp.fileno(), mode)
            yield temp
            temp.flush()
            os.fsync(temp.fileno())
        if force:
            os.replace(temp_name, path)
        else:
            try:
                os.link(temp_name, path)
            except FileExistsError:
                raise BundleError(f"{path} exists, not replaced (--force replaces it)") from None
            os.unlink(temp_name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)


def remove_file(path: Path) -> None:
    """Remove ``path`` and make the removal durable (fsync of its directory), so that after a
    crash the file is not back while what replaced it elsewhere is."""
    path.unlink()
    _fsync_directory(path.parent)


def copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically, keeping the source's mode (for backups)."""
    mode = source.stat().st_mode & 0o777
    with source.open("rb") as handle:
        write_atomic(target, handle.read(), mode)


@contextlib.contextmanager
def exclusive_lock(directory: Path, name: str = ".lock"):
    """Hold an exclusive lock on ``directory/name`` so read-modify-write cycles never interleave.

    A second writer waits for the first and then reads what the first wrote, so no change is
    lost. The lock file stays in place; it holds no data.
    """
    if not directory.is_dir():
        raise BundleError(f"{directory}: directory does not exist")
    try:
        handle = os.open(directory / name, os.O_RDWR | os.O_CREAT, SECRET_MODE)
    except OSError as error:
        raise BundleError(f"{directory}: cannot lock ({error.strerror})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
