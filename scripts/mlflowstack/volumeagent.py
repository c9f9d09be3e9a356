"""The side of ``stackctl backup`` and ``restore`` that runs inside the stack's containers, next
to the volumes. The host sends this file's text as ``python -c SOURCE MODE`` to the server image
(database, artifacts), which has none of our code, so those modes use the standard library
only, or to the auth image (users, secrets, server-secrets). Nothing is written to a
container's root file system (the services may run read-only): data crosses as a tar stream on
stdin or stdout, and temporary files live in the volumes themselves.

Modes (``MODE`` is the first argument; stdout carries the answer, stderr one line on failure):

- ``dump-server``: stdin holds a JSON map ``{path: [size, mtime_ns]}`` of artifacts the
  previous backup holds. stdout gets a tar stream: ``db/mlflow.db`` (a snapshot by SQLite's
  online backup API, never a copy of the live file), then ``artifacts/PATH`` for every artifact
  not in that map with the same size and mtime, then ``listing.json`` (MLflow's version, the
  snapshot's row counts and sha256, every artifact with size, mtime and sha256; null when it
  was not read, the host takes it from the previous manifest). With the bundled PostgreSQL
  there is no ``db/mlflow.db`` and the listing's database is null: the host dumps that
  database itself, before this runs (mlflowstack/pgstore.py).
- ``load-server``: stdin holds a tar stream: ``expect.json`` (``{"database": sha256,
  "artifacts": {path: sha256}, "mtimes": {path: mtime_ns}, "force": bool, "database_only":
  bool}``), then the members it names (``database_only``: the database alone, the artifacts
  left as they are; ``stackctl upgrade``'s rollback; ``database`` null: the artifacts alone,
  which is all it takes with the bundled PostgreSQL, and only then). Everything is
  written into staging places inside the volumes and checked against its sha256; only when all
  arrived intact does it replace the database and move the artifacts in. The server must be
  stopped (the host does that).
- ``inspect-server``: JSON of what the target holds (experiments besides Default, runs,
  registered models, artifact files), for restore's "is it empty" check, and its ``store``
  (the database counts only for SQLite; the host asks PostgreSQL itself).
- ``inspect-store``: ``{"store": "sqlite" | "postgresql" | "external", "artifacts": "volume" |
  URI}``, the backend store
  the server's settings name (:func:`store_kind`).

The ``-server`` modes refuse an external database (``DATABASE_URI``): it is the operator's to
back up.
- ``dump-files`` / ``load-files`` / ``inspect-files``: the same for the users, secrets and
  server-secrets directories (members ``users/NAME``, ``secrets/NAME``, ``server-secrets/NAME``),
  in the auth image, whose ``mlflowstack`` these modes use: the users store reads the users
  (the one owner of that format), and load writes each archived file byte for byte with
  ``files.write_atomic`` (mode 0600) under the store's lock. An archive made before the
  server's secrets had a volume of their own holds ``secrets/mlflow-kek-passphrase``: load
  puts it into server-secrets, where the server reads it and no other running service can.

Every path taken from a stream is checked by :func:`safe_relative` before it is joined to a
directory, and only regular files are accepted, so a hostile stream cannot write outside.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import sys
import tarfile
import tempfile
import time

DB_PATH = os.environ.get("MLFLOW_BACKEND_STORE_URI", "sqlite:////var/lib/mlflow/db/mlflow.db")
DB_PATH = DB_PATH.removeprefix("sqlite:///")
ARTIFACTS = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "/var/lib/mlflow/artifacts")
USERS = os.environ.get("USERS_DIR", "/var/lib/mlflow-stack/users")
SECRETS = os.environ.get("SECRETS_DIR", "/var/lib/mlflow-stack/secrets")
SERVER_SECRETS = os.environ.get("SERVER_SECRETS_DIR", "/var/lib/mlflow-stack/server-secrets")
# mlflowstack.stacksecrets.SERVER_ONLY, written out: this script comes from the host's bundle
# and may run in an auth image built before that name existed.
SERVER_ONLY = frozenset({"mlflow-kek-passphrase"})
# Our own temporary names in the volumes: skipped by dumps, cleaned by loads.
OURS = ".stackctl-"
CHUNK = 1 << 20
# Users and secrets files are small; a bigger one in a stream is not ours.
SMALL_FILE_LIMIT = 16 << 20
STALE_SECONDS = 24 * 3600


class AgentError(Exception):
    """The one line the host shows."""


def safe_relative(name: str) -> str:
    """``name`` if it is a relative POSIX path that stays below where it is joined (no absolute
    path, no ``..`` or ``.`` component, no empty component, no NUL); AgentError otherwise.

    Other characters are allowed: MLflow lets a client name an artifact with a backslash or a
    control character (plain bytes of a file name here), and refusing them would let any
    editor make every backup fail. Messages show names with repr(), never raw."""
    if (
        not name
        or len(name) > 4096
        or name.startswith("/")
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise AgentError(f"unsafe path in the stream: {name[:200]!r}")
    return name


class HashingReader(io.RawIOBase):
    """Reads ``size`` bytes of ``handle`` and hashes them; a file that shrank is an error."""

    def __init__(self, handle, size: int, name: str):
        self.handle, self.left, self.name = handle, size, name
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.handle.read(n)
        if len(data) < n:
            raise AgentError(f"{self.name!r} changed while it was read; run the backup again")
        self.left -= len(data)
        self.digest.update(data)
        return data


def _add(out: tarfile.TarFile, name: str, path: str) -> tuple[int, str]:
    """Stream the file at ``path`` into ``out`` as ``name``; its (size, sha256)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o600
        reader = HashingReader(handle, size, name)
        out.addfile(info, reader)
    return size, reader.digest.hexdigest()


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    out.addfile(info, io.BytesIO(data))


def row_counts(connection: sqlite3.Connection) -> dict[str, int]:
    """Rows per table (SQLite's own tables left out)."""
    names = [
        row[0]
        for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name"
        )
    ]
    count = 'SELECT COUNT(*) FROM "{}"'
    return {name: connection.execute(count.format(name)).fetchone()[0] for name in names}


def walk_artifacts(root: str):
    """(relative path, lstat) of every entry below ``root`` in a stable order, never following
    a link (a link to a directory is an entry, not a way in); our own temporary entries, and
    entries deleted while the walk goes on, are left out."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(OURS))
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        for name in sorted([f for f in files if not f.startswith(OURS)] + links):
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                yield os.path.relpath(path, root).replace(os.sep, "/"), os.lstat(path)


def remove_stale(directory: str, now: float) -> None:
    """Our temporary files and directories left by a backup or restore that was killed (a
    day old: any running one is younger)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith(OURS):
            continue
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
            if os.lstat(path).st_mtime >= now - STALE_SECONDS:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def dump_server(stdin, stdout) -> None:
    known = json.loads(stdin.read() or b"{}")
    remove_stale(os.path.dirname(DB_PATH), time.time())
    from importlib import metadata

    listing = {"mlflow_version": metadata.version("mlflow"), "artifacts": [], "skipped": []}
    with tarfile.open(fileobj=stdout, mode="w|", format=tarfile.PAX_FORMAT) as out:
        listing["database"] = _dump_sqlite(out) if store_kind() == "sqlite" else None
        # After the snapshot: every artifact its runs name exists by now.
        for path, info in walk_artifacts(ARTIFACTS):
            if not stat.S_ISREG(info.st_mode):
                listing["skipped"].append(path)
                continue
            entry = {"path": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
            if known.get(path) == [info.st_size, info.st_mtime_ns]:
                entry["sha256"] = None
            else:
                try:
                    entry["size"], entry["sha256"] = _add(
                        out, "artifacts/" + path, os.path.join(ARTIFACTS, path)
                    )
                except FileNotFoundError:
                    continue  # deleted since it was listed (nothing of it went into the stream)
            listing["artifacts"].append(entry)
        _add_bytes(out, "listing.json", json.dumps(listing).encode())


def _dump_sqlite(out: tarfile.TarFile) -> dict:
    """The SQLite snapshot as ``db/mlflow.db`` of ``out``; its listing entry."""
    # The snapshot goes into the database's own volume (the root file system may be read-only
    # and /tmp small), and is removed once streamed.
    fd, snapshot = tempfile.mkstemp(dir=os.path.dirname(DB_PATH), prefix=OURS, suffix=".db")
    os.close(fd)
    try:
        source = sqlite3.connect(f"file:{DB_PATH}?mode=ro", uri=True)
        target = sqlite3.connect(snapshot)
        with contextlib.closing(source), contextlib.closing(target):
            # One step: a consistent copy as of one moment, while writers go on (WAL).
            source.backup(target)
            counts = row_counts(target)
        size, digest = _add(out, "db/mlflow.db", snapshot)
    finally:
        os.unlink(snapshot)
    return {"size": size, "sha256": digest, "row_counts": counts}


def _receive(archive: tarfile.TarFile, expected: dict[str, str], place) -> None:
    """Write each further member of ``archive`` named in ``expected`` (name -> sha256) to
    ``place(name)``, checking its sha256; any other member, type or a missing one is an error
    (the file written so far stays in the staging place, which the caller removes)."""
    seen = set()
    with archive:
        # next(), not iteration: a TarFile's iterator starts again with expect.json.
        while (member := archive.next()) is not None:
            name = safe_relative(member.name)
            if name not in expected or name in seen or not member.isreg():
                raise AgentError(f"unexpected member in the stream: {name[:200]!r}")
            target = place(name)
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            source = archive.extractfile(member)
            digest = hashlib.sha256()
            with open(target, "xb") as handle:
                # As the server writes them: nginx (another user until the services share one)
                # reads artifacts to send downloads; the database is the server's alone.
                os.fchmod(handle.fileno(), 0o600 if name == "db/mlflow.db" else 0o644)
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if digest.hexdigest() != expected[name]:
                raise AgentError(f"{name!r}: checksum differs from the manifest")
            seen.add(name)
    missing = set(expected) - seen
    if missing:
        raise AgentError(f"the stream ended without {sorted(missing)[0]!r}")


def _read_expect(stream) -> tuple[dict, tarfile.TarFile]:
    # Returned open: the caller reads the rest of the same stream and closes it.
    archive = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115
    first = archive.next()
    if first is None or first.name != "expect.json" or not first.isreg():
        raise AgentError("the stream does not start with expect.json")
    return json.loads(archive.extractfile(first).read()), archive


def load_server(stdin, stdout) -> None:
    expect, archive = _read_expect(stdin)
    sqlite = expect["database"] is not None
    if sqlite != (store_kind() == "sqlite"):
        # The host checked the kinds; a stack switched since must not get the wrong database.
        raise AgentError("the archive's database is not of this stack's backend store")
    expected = {"db/mlflow.db": expect["database"]} if sqlite else {}
    for path, digest in expect["artifacts"].items():
        expected["artifacts/" + safe_relative(path)] = digest
    for directory in (os.path.dirname(DB_PATH), ARTIFACTS):
        remove_stale(directory, time.time())
    staging = tempfile.mkdtemp(dir=ARTIFACTS, prefix=OURS)
    db_stage = os.path.join(os.path.dirname(DB_PATH), OURS + "restore.db")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(db_stage)

    def place(name: str) -> str:
        if name == "db/mlflow.db":
            return db_stage
        return os.path.join(staging, name.removeprefix("artifacts/"))

    try:
        _receive(archive, expected, place)
        # The artifacts keep their times, so the next backup of this stack into the same
        # directory finds them unchanged (size and mtime) and copies none again.
        for path, mtime_ns in expect.get("mtimes", {}).items():
            if type(mtime_ns) is int and "artifacts/" + path in expected:
                os.utime(os.path.join(staging, path), ns=(mtime_ns, mtime_ns))
        _swap_in(
            staging,
            db_stage if sqlite else None,
            bool(expect.get("force")),
            bool(expect.get("database_only")),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(db_stage)
    stdout.write(json.dumps({"artifacts": len(expect["artifacts"])}).encode())


def _swap_in(staging: str, db_stage: str | None, force: bool, database_only: bool = False) -> None:
    """Everything arrived intact: replace the database (``db_stage``: none with PostgreSQL),
    then move the artifacts in."""
    existing = [n for n in os.listdir(ARTIFACTS) if not n.startswith(OURS) and not database_only]
    if existing and not force:
        raise AgentError("the artifact store is not empty (restore --force replaces it)")
    for name in existing:
        path = os.path.join(ARTIFACTS, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if db_stage is not None:
        # The live database's WAL files belong to the old database: they go with it.
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DB_PATH + suffix)
        os.replace(db_stage, DB_PATH)
    for name in os.listdir(staging):
        os.rename(os.path.join(staging, name), os.path.join(ARTIFACTS, name))


def inspect_server(stdin, stdout) -> None:
    from importlib import metadata

    answer = {"mlflow_version": metadata.version("mlflow"), "store": store_kind()}
    if answer["store"] == "sqlite":
        with contextlib.closing(sqlite3.connect(f"file:{DB_PATH}?mode=ro", uri=True)) as db:
            one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
            answer["experiments"] = one("SELECT COUNT(*) FROM experiments WHERE experiment_id != 0")
            answer["runs"] = one("SELECT COUNT(*) FROM runs")
            answer["registered_models"] = one("SELECT COUNT(*) FROM registered_models")
    answer["artifacts"] = sum(1 for _ in walk_artifacts(ARTIFACTS))
    stdout.write(json.dumps(answer).encode())


def _small_files(directory: str):
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith(".") and os.path.isfile(path) and not os.path.islink(path):
            yield name, path


def _file_places() -> dict[str, str]:
    """Member prefix -> directory (read at call time: the tests point them elsewhere)."""
    return {"users": USERS, "secrets": SECRETS, "server-secrets": SERVER_SECRETS}


def dump_files(stdin, stdout) -> None:
    with tarfile.open(fileobj=stdout, mode="w|", format=tarfile.PAX_FORMAT) as out:
        for prefix, directory in _file_places().items():
            for name, path in _small_files(directory):
                _add(out, f"{prefix}/{name}", path)


def _destination(name: str, server_only: frozenset[str]) -> tuple[str, str]:
    """(prefix of the volume, file name) that member ``name`` is written to: its own, but a
    server-only secret archived under ``secrets/`` (before the split) goes to server-secrets."""
    prefix, _, rest = name.partition("/")
    if prefix not in _file_places() or "/" in rest:
        raise AgentError(f"unexpected member in the stream: {name[:200]!r}")
    if prefix == "secrets" and rest in server_only:
        prefix = "server-secrets"
    return prefix, rest


def load_files(stdin, stdout) -> None:
    """All files are read and checked in memory first (they are small), then written."""
    expect, archive = _read_expect(stdin)
    expected = {safe_relative(name): digest for name, digest in expect["files"].items()}
    received = {}
    with archive:
        # next(), not iteration: a TarFile's iterator starts again with expect.json.
        while (member := archive.next()) is not None:
            name = safe_relative(member.name)
            if name not in expected or name in received or not member.isreg():
                raise AgentError(f"unexpected member in the stream: {name[:200]!r}")
            if member.size > SMALL_FILE_LIMIT:
                raise AgentError(f"{name}: too big for a users or secrets file")
            data = archive.extractfile(member).read()
            if hashlib.sha256(data).hexdigest() != expected[name]:
                raise AgentError(f"{name!r}: checksum differs from the manifest")
            received[name] = data
    if set(received) != set(expected):
        raise AgentError("the stream ended early")
    # The project's own writer and the users store's lock (the auth image has mlflowstack):
    # no stackctl writer interleaves, each file is whole or absent, mode 0600 from its start.
    from pathlib import Path

    from mlflowstack.files import SECRET_MODE, exclusive_lock, write_atomic

    places = _file_places()
    wanted_in: dict[str, dict[str, bytes]] = {prefix: {} for prefix in places}
    for name, data in received.items():
        prefix, rest = _destination(name, SERVER_ONLY)
        if rest in wanted_in[prefix]:
            raise AgentError(f"two members of the stream for {prefix}/{rest}")
        wanted_in[prefix][rest] = data
    with exclusive_lock(Path(USERS)):
        for prefix, directory in places.items():
            wanted = wanted_in[prefix]
            # What the target's own first start made (its admin password file, its tokens)
            # describes users that no longer exist once the archive's users are in.
            for name, path in _small_files(directory):
                if name not in wanted:
                    os.unlink(path)
            for name, data in wanted.items():
                write_atomic(Path(directory) / name, data, SECRET_MODE)
    stdout.write(json.dumps({"files": sorted(received)}).encode())


def inspect_files(stdin, stdout) -> None:
    # Read by the users store, the one owner of these files (the auth image has it).
    from mlflowstack.users import UserStore

    store = UserStore(USERS)
    users = sorted(store.load_users().users)
    tokens = sorted(token.name for token in store.load_tokens().values())
    stdout.write(json.dumps({"users": users, "tokens": tokens}).encode())


def inspect_store(stdin, stdout) -> None:
    # "artifacts": the object store of ARTIFACTS_DESTINATION, or "volume" (server/artifactstore.py).
    artifacts = os.environ.get("ARTIFACTS_DESTINATION", "").strip() or "volume"
    stdout.write(json.dumps({"store": store_kind(), "artifacts": artifacts}).encode())


MODES = {
    "inspect-store": inspect_store,
    "dump-server": dump_server,
    "load-server": load_server,
    "inspect-server": inspect_server,
    "dump-files": dump_files,
    "load-files": load_files,
    "inspect-files": inspect_files,
}


def store_kind(environ=os.environ) -> str:
    """The backend store the server's settings name, by server/backendstore.py's rules (compose
    hands the server's container the profiles and DATABASE_URI): "external" (DATABASE_URI),
    "postgresql" (the postgres profile: the bundled database) or "sqlite" (the file here).
    mlflowstack.pgstore.kind_from_settings, written out: this script runs without it."""
    profiles = {name.strip() for name in environ.get("COMPOSE_PROFILES", "").split(",")}
    if environ.get("DATABASE_URI", "").strip():
        return "external"
    return "postgresql" if "postgres" in profiles else "sqlite"


def no_external_store(environ=os.environ) -> None:
    """Refuse the server's modes for an external database: its backup is its operator's (a
    backup of the unused SQLite file would hold none of its runs)."""
    if store_kind(environ) == "external":
        raise AgentError(
            "the backend store is an external database (DATABASE_URI): back it up with its "
            "own tools; stackctl covers SQLite and the bundled PostgreSQL (README, 'PostgreSQL')"
        )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in MODES:
        print(f"volumeagent: usage: MODE ({'|'.join(MODES)})", file=sys.stderr)
        return 2
    try:
        if argv[0].endswith("-server"):
            no_external_store()
        MODES[argv[0]](sys.stdin.buffer, sys.stdout.buffer)
    except Exception as error:  # one line for the host, whatever failed
        message = " ".join(str(error).split())[:300] or type(error).__name__
        print(f"volumeagent: {argv[0]}: {message}", file=sys.stderr)
        return 1
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
