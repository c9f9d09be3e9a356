"""Backup archives: their manifest, the incremental choice, and every check restore makes.

An archive is an uncompressed tar (artifacts are mostly compressed already, and gzip would cost
minutes of CPU on a 2-core box) whose last member is ``manifest.json``::

    db/mlflow.db                  the SQLite snapshot, or
    db/mlflow.sql                 the bundled PostgreSQL's dump (a plain pg_dump script,
                                  mlflowstack/pgstore.py); the manifest's database names its
                                  ``kind`` (none: sqlite, archives before PostgreSQL)
    artifacts/PATH                only the artifacts this archive holds (new or changed)
    users/NAME, secrets/NAME      the users and secrets volumes' files
    server-secrets/NAME           the server-secrets volume's (MLflow's key-encryption
                                  passphrase; archives before that volume hold it as
                                  secrets/mlflow-kek-passphrase, and restore moves it)
    env/.env                      the bundle's .env, when there is one
    manifest.json                 format, ids, versions, row counts, sha256 of everything

Incremental: the manifest lists *every* artifact of the stack (path, size, mtime, sha256) and
names the archive that holds its bytes (``archive`` and that archive's ``backup_id``): this one,
or an earlier one in the same directory. Restore needs those beside the archive it is given.

Contract:

- :func:`validate_manifest` accepts only a manifest this module would write (types, safe names,
  no duplicates); anything else raises :class:`ArchiveError` naming the problem.
- :func:`read_manifest` raises ArchiveError for a file that is not a tar, lacks the manifest
  (a truncated archive loses it: it is last), or is not ours.
- :func:`verify_backup` checks, before anything is written anywhere, every byte restore would
  use: each member's presence, type (regular files only), size and sha256, in this archive and
  in each earlier one it names; the database's integrity and row counts (SQLite's integrity
  check; a dump's completeness and the rows of its COPY blocks). It returns a
  :class:`Plan` naming where each piece is. Member names come from the manifest and pass
  :func:`safe_relative`, so no path of a hostile archive ever names a place outside the target.
"""

import contextlib
import dataclasses
import hashlib
import json
import re
import sqlite3
import tarfile
import tempfile
from pathlib import Path

from mlflowstack import pgstore
from mlflowstack.files import BundleError
from mlflowstack.volumeagent import AgentError, row_counts, safe_relative

FORMAT = "mlflow-stack-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "db/mlflow.db"
ARTIFACTS = "artifacts/"
ENV_MEMBER = "env/.env"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")
FILE_MEMBER = re.compile(
    r"(users|secrets|server-secrets)/[A-Za-z0-9_][A-Za-z0-9._-]{0,200}|env/\.env"
)
_ARCHIVE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}")
_MANIFEST_LIMIT = 256 << 20
CHUNK = 1 << 20


class ArchiveError(BundleError):
    """The archive cannot be used; the text is the one line shown."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One file restore writes: ``member`` of the archive at ``archive``."""

    archive: Path
    member: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """A verified backup: its manifest and where each piece's bytes are."""

    manifest: dict
    database: Piece
    artifacts: dict[str, Piece]
    files: dict[str, Piece]
    archives: tuple[Path, ...]


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise ArchiveError(f"manifest: {problem}")


def _is_int(value) -> bool:
    return type(value) is int and value >= 0


def _safe(name) -> str:
    _check(isinstance(name, str), "a path is not a string")
    try:
        return safe_relative(name)
    except AgentError:
        raise ArchiveError(f"manifest: unsafe path {name[:200]!r}") from None


def _text(value, pattern: re.Pattern) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def validate_manifest(manifest) -> dict:
    """``manifest`` if it is one of ours, else ArchiveError."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError("not a stackctl backup (its manifest is someone else's)")
    _check(manifest.get("format_version") == FORMAT_VERSION, "unknown format version")
    _check(_text(manifest.get("backup_id"), _ID), "bad backup_id")
    for key in ("created", "project", "bundle_version", "mlflow_version"):
        _check(isinstance(manifest.get(key), str), f"{key} missing")
    database = manifest.get("database")
    _check(isinstance(database, dict), "database missing")
    _check(_is_int(database.get("size")), "database size")
    _check(_text(database.get("sha256"), _HEX64), "database sha256")
    kind = database.get("kind", pgstore.SQLITE)
    member = {pgstore.SQLITE: DATABASE, pgstore.POSTGRES: pgstore.DUMP_MEMBER}.get(kind)
    _check(member is not None, "unknown database kind")
    _check(database.get("member", DATABASE) == member, "database member")
    if kind == pgstore.POSTGRES:
        _check(database.get("format") == pgstore.DUMP_FORMAT, "database dump format")
        _check(_is_int(database.get("postgres_major")), "database postgres_major")
    counts = database.get("row_counts")
    _check(isinstance(counts, dict), "row counts missing")
    _check(all(isinstance(k, str) and _is_int(v) for k, v in counts.items()), "row counts")
    _check(isinstance(manifest.get("artifacts"), list), "artifacts missing")
    _check(isinstance(manifest.get("files"), list), "files missing")
    paths = set()
    for entry in manifest["artifacts"]:
        _check(isinstance(entry, dict), "an artifact entry is not an object")
        path = _safe(entry.get("path"))
        _check(path not in paths, f"artifact {path!r} listed twice")
        paths.add(path)
        _check(_is_int(entry.get("size")) and _is_int(entry.get("mtime_ns")), f"{path}: size")
        _check(_text(entry.get("sha256"), _HEX64), f"{path}: sha256")
        # A plain file name: restore looks for it beside the archive it was given, nowhere else.
        _check(_text(entry.get("archive"), _ARCHIVE_NAME), f"{path}: archive name")
        _check(_text(entry.get("backup_id"), _ID), f"{path}: backup_id")
    members = set()
    for entry in manifest["files"]:
        _check(isinstance(entry, dict), "a file entry is not an object")
        member = entry.get("member")
        _check(_text(member, FILE_MEMBER), f"unsafe file name {str(member)[:200]!r}")
        _check(member not in members, f"file {member!r} listed twice")
        members.add(member)
        _check(_is_int(entry.get("size")), f"{member}: size")
        _check(_text(entry.get("sha256"), _HEX64), f"{member}: sha256")
    return manifest


def build_manifest(
    *,
    backup_id: str,
    created: str,
    project: str,
    bundle_version: str,
    archive_name: str,
    listing: dict,
    previous: dict | None,
    files: list[dict],
) -> dict:
    """The manifest of a new archive named ``archive_name``.

    ``listing`` is the server agent's answer (volumeagent.dump_server): an artifact with a
    null sha256 was not sent because ``previous`` (the previous manifest) holds it with the
    same size and mtime; its sha256 and holding archive come from there. Every other artifact
    is held by this archive. ``files`` are the users, secrets and .env entries (member, size,
    sha256). Raises ArchiveError if the listing names an artifact it did not send and the
    previous manifest does not hold.
    """
    before = {entry["path"]: entry for entry in (previous or {}).get("artifacts", [])}
    artifacts = []
    for item in listing["artifacts"]:
        path = item["path"]
        if item["sha256"] is None:
            old = before.get(path)
            if old is None or [old["size"], old["mtime_ns"]] != [item["size"], item["mtime_ns"]]:
                raise ArchiveError(f"artifact {path!r} was neither sent nor in the previous backup")
            artifacts.append(dict(old))
        else:
            artifacts.append({**item, "archive": archive_name, "backup_id": backup_id})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backup_id": backup_id,
        "created": created,
        "project": project,
        "bundle_version": bundle_version,
        "mlflow_version": listing["mlflow_version"],
        # The listing's, or the PostgreSQL dump's entry (its own kind and member).
        "database": {"kind": pgstore.SQLITE, "member": DATABASE, **listing["database"]},
        "artifacts": artifacts,
        "skipped": listing.get("skipped", []),
        "files": files,
    }
    return validate_manifest(manifest)


def known_artifacts(
    previous: dict | None, directory: Path, replacing: str | None = None
) -> dict[str, list[int]]:
    """What the server agent need not send again: ``{path: [size, mtime_ns]}`` of the previous
    manifest's artifacts whose holding archive is still in ``directory`` (that very backup:
    same backup_id). An artifact whose archive is gone or replaced, or is the file
    ``replacing`` names (``backup --force`` over it), is sent again, so a new archive never
    names a missing one."""
    if not previous:
        return {}
    present: dict[tuple[str, str], bool] = {}
    known = {}
    for entry in previous["artifacts"]:
        holder = (entry["archive"], entry["backup_id"])
        if holder not in present:
            present[holder] = holder[0] != replacing and _holds(directory / holder[0], holder[1])
        if present[holder]:
            known[entry["path"]] = [entry["size"], entry["mtime_ns"]]
    return known


def _holds(path: Path, backup_id: str) -> bool:
    """Whether ``path`` is the readable archive of that backup."""
    try:
        return path.is_file() and read_manifest(path)["backup_id"] == backup_id
    except ArchiveError:
        return False


def read_manifest(path: Path) -> dict:
    """The validated manifest of the archive at ``path``; ArchiveError for anything else."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            member = _last_manifest(archive)
            if member is None:
                raise ArchiveError(
                    f"{path.name}: no manifest (a truncated archive, or not a stackctl backup)"
                )
            if not member.isreg() or member.size > _MANIFEST_LIMIT:
                raise ArchiveError(f"{path.name}: its manifest is not a plain file")
            data = archive.extractfile(member).read()
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file") from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveError(f"{path.name}: not a readable tar archive ({error})") from None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ArchiveError(f"{path.name}: its manifest is not JSON") from None
    try:
        return validate_manifest(manifest)
    except ArchiveError as error:
        raise ArchiveError(f"{path.name}: {error}") from None


def _last_manifest(archive: tarfile.TarFile):
    found = None
    for member in archive:
        if member.name == MANIFEST:
            found = member
    return found


def find_previous(directory: Path, project: str, exclude: Path | None = None) -> dict | None:
    """The newest readable manifest of ``project`` among ``directory``'s ``*.tar`` files, with
    its file name as ``_file``; None when there is none."""
    best = None
    for path in sorted(directory.glob("*.tar")):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        with contextlib.suppress(ArchiveError):
            manifest = read_manifest(path)
            if manifest["project"] == project and (
                best is None or manifest["created"] > best["created"]
            ):
                best = {**manifest, "_file": path.name}
    if best:
        # Its own artifacts are in the file as it is called now (it may have been renamed).
        best["artifacts"] = [
            {**entry, "archive": best["_file"]}
            if entry["backup_id"] == best["backup_id"]
            else entry
            for entry in best["artifacts"]
        ]
    return best


def _verify_members(path: Path, wanted: dict[str, tuple[int, str]], exact: bool) -> None:
    """Read every member of ``path`` that ``wanted`` names (member -> (size, sha256)) and check
    type, size and sha256. With ``exact`` (the archive given to restore) any member the
    manifest does not name is an error too."""
    seen = set()
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                name = member.name
                if name == MANIFEST:
                    continue
                if name not in wanted:
                    if exact:
                        raise ArchiveError(
                            f"{path.name}: holds {name[:200]!r}, which its manifest does not name"
                        )
                    continue
                if name in seen or not member.isreg():
                    raise ArchiveError(f"{path.name}: {name!r} is not one plain file")
                size, digest = wanted[name]
                if member.size != size:
                    raise ArchiveError(f"{path.name}: {name!r}: size differs from the manifest")
                if _sha256(archive.extractfile(member)) != digest:
                    raise ArchiveError(f"{path.name}: {name!r}: checksum differs from the manifest")
                seen.add(name)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveError(f"{path.name}: unreadable ({error}); truncated?") from None
    missing = sorted(set(wanted) - seen)
    if missing:
        raise ArchiveError(f"{path.name}: {missing[0]!r} is missing (truncated?)")


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def verify_backup(path: Path) -> Plan:
    """Check everything restore would use (see the module's contract); the Plan, or
    ArchiveError with the first problem found. Reads only; writes nothing but a private
    temporary copy of the database for SQLite's own checks."""
    manifest = read_manifest(path)
    directory = path.parent
    by_archive: dict[str, dict[str, tuple[int, str]]] = {path.name: {}}
    ids = {path.name: manifest["backup_id"]}
    entry = manifest["database"]
    database = Piece(path, entry.get("member", DATABASE), entry["size"], entry["sha256"])
    by_archive[path.name][database.member] = (database.size, database.sha256)
    files = {}
    for entry in manifest["files"]:
        files[entry["member"]] = Piece(path, entry["member"], entry["size"], entry["sha256"])
        by_archive[path.name][entry["member"]] = (entry["size"], entry["sha256"])
    artifacts = {}
    for entry in manifest["artifacts"]:
        name, member = entry["archive"], ARTIFACTS + entry["path"]
        if entry["backup_id"] == manifest["backup_id"]:
            name = path.name  # held by this archive, whatever it is called now
        elif name not in ids:
            ids[name] = read_manifest(_beside(directory, name))["backup_id"]
        if ids[name] != entry["backup_id"]:
            raise ArchiveError(
                f"{name}: not the backup {path.name} was made after (another backup_id)"
            )
        by_archive.setdefault(name, {})[member] = (entry["size"], entry["sha256"])
        artifacts[entry["path"]] = Piece(directory / name, member, entry["size"], entry["sha256"])
    for name, wanted in by_archive.items():
        _verify_members(directory / name, wanted, exact=name == path.name)
    _check_database(path, manifest["database"])
    return Plan(manifest, database, artifacts, files, tuple(directory / n for n in by_archive))


def _beside(directory: Path, name: str) -> Path:
    candidate = directory / name
    if not candidate.is_file():
        raise ArchiveError(
            f"{name}: missing; this incremental backup needs it beside it (same directory)"
        )
    return candidate


def _check_database(path: Path, expected: dict) -> None:
    """SQLite's integrity check and the manifest's row counts, on a private copy; for a
    PostgreSQL dump, its completeness and the rows of its COPY blocks."""
    if expected.get("kind") == pgstore.POSTGRES:
        try:
            with tarfile.open(path, mode="r:") as archive:
                counts = pgstore.check_dump(archive.extractfile(expected["member"]))
        except BundleError as error:
            raise ArchiveError(f"{path.name}: {error}") from None
        if counts != expected["row_counts"]:
            raise ArchiveError(f"{path.name}: the dump's row counts differ from the manifest")
        return
    with tempfile.TemporaryDirectory(prefix="stackctl-restore-") as temp:
        copy = Path(temp) / "check.db"
        with tarfile.open(path, mode="r:") as archive, copy.open("wb") as out:
            source = archive.extractfile(DATABASE)
            while chunk := source.read(CHUNK):
                out.write(chunk)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True)) as db:
                verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
                counts = row_counts(db)
        except sqlite3.Error as error:
            raise ArchiveError(f"{path.name}: the database is unreadable ({error})") from None
    if verdict != "ok":
        raise ArchiveError(f"{path.name}: the database fails SQLite's integrity check")
    if counts != expected["row_counts"]:
        raise ArchiveError(f"{path.name}: the database's row counts differ from the manifest")
