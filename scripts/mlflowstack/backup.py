"""``stackctl backup``: one archive of the stack (archive.py), taken while it runs.

Contract: the database is a snapshot by SQLite's online backup API (clients may keep writing),
or with the bundled PostgreSQL a pg_dump of one snapshot with the row counts of that snapshot
(pgstore.dump), taken before the artifacts are listed, so every artifact its runs name is in
the archive. An external database (DATABASE_URI) is refused: it is its operator's to back up. The
archive is written atomically, mode 0600 (it holds the stack's secrets), never over an
existing file without ``--force``. Artifacts that the newest archive of this compose project
in the same directory holds, or names, with the same path, size and mtime are not sent again
(``--full`` sends all); the manifest says which archive holds each one. What the host receives
is hashed again and must match what the agent read. With ``--encrypt`` the tar stream goes
through backupcrypt on its way to the file (no plaintext on disk); such an archive is always
full, and never the base of a later one (find_previous cannot read it). Progress goes to stderr
only on a terminal; ``--quiet`` prints nothing; ``--json`` prints one JSON object on stdout.
"""

import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

from mlflowstack import archive, backupcrypt, commands, pgstore, stackio
from mlflowstack.files import SECRET_MODE, BundleError, open_atomic
from mlflowstack.volumeagent import safe_relative


def bundle_version(project_dir: Path) -> str:
    """pyproject's version ("unknown" without one: a bundle copied without it), and the git
    commit when the bundle is a checkout. Never raises: a backup does not fail for a label."""
    text = ""
    with contextlib.suppress(OSError):
        text = (project_dir / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.M)
    version = match[1] if match else "unknown"
    with contextlib.suppress(OSError):
        commit = subprocess.run(
            ["git", "-C", str(project_dir), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        if commit:
            version += f"+{commit}"
    return version


def output_path(args, now: datetime.datetime) -> Path:
    """``--output`` (an existing directory, or a path ending in ``/``, which is made mode 0700
    if missing, gets a new file named by the time, ``.tar.enc`` when encrypted; any other path
    is the archive's), default ``backups/``."""
    name = now.strftime("mlflow-backup-%Y%m%dT%H%M%SZ.tar")
    name += ".enc" if getattr(args, "encrypt", False) else ""
    if args.output is None:
        directory = commands._project_dir(args) / "backups"
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory / name
    path = Path(args.output)
    if str(args.output).endswith(("/", os.sep)) and not path.is_dir():
        # The newcomer review: "--output DIR/" wrote a file named DIR.
        path.mkdir(mode=0o700, parents=True)
    return path / name if path.is_dir() else path


def _receive_server(out, stream, progress: stackio.Progress) -> tuple[dict, dict[str, str]]:
    """Copy the server agent's stream into ``out``; its listing and the sha256 of each member
    as the host received it."""
    listing, received, count, total = None, {}, 0, 0
    with tarfile.open(fileobj=stream, mode="r|") as incoming:
        for member in incoming:
            name = member.name
            if name == "listing.json" and member.isreg():
                listing = json.loads(incoming.extractfile(member).read())
                continue
            if not member.isreg() or not (
                name == archive.DATABASE or name.startswith(archive.ARTIFACTS)
            ):
                raise BundleError(f"the server agent sent {name[:200]!r}")
            safe_relative(name)
            received[name] = stackio.copy_member(
                out, name, member.size, incoming.extractfile(member)
            )
            count, total = count + 1, total + member.size
            progress.update(f"backup: {count} files, {stackio.human(total)} copied")
    if listing is None:
        raise BundleError("the server agent's stream ended early")
    if listing["database"] is None and archive.DATABASE in received:
        raise BundleError("the server agent sent a database it did not list")
    return listing, received


def _check_received(listing: dict, received: dict[str, str]) -> None:
    """What arrived is what the agent read (no corruption on the way)."""
    # No database from the agent: the bundled PostgreSQL's dump came another way.
    database = listing["database"]
    if database is not None and received.get(archive.DATABASE) != database["sha256"]:
        raise BundleError("the database snapshot arrived damaged; run the backup again")
    for entry in listing["artifacts"]:
        digest = entry["sha256"]
        if digest is not None and received.get(archive.ARTIFACTS + entry["path"]) != digest:
            raise BundleError(f"artifact {entry['path']!r} arrived damaged; run the backup again")


def backup(args) -> int:
    now = datetime.datetime.now(datetime.UTC)
    path = output_path(args, now)
    if path.exists() and not args.force:
        raise BundleError(f"{path} exists, not replaced (--force replaces it)")
    encrypt = getattr(args, "encrypt", False)
    passphrase_file = getattr(args, "passphrase_file", None)
    if passphrase_file is not None and not encrypt:
        raise BundleError("--passphrase-file is for --encrypt")
    # Asked before any work, so a typo costs nothing.
    passphrase = backupcrypt.read_passphrase(passphrase_file, confirm=True) if encrypt else None
    stackio.require_running(args)
    stores = stackio.agent_json(args, "server", "inspect-store")
    store = stores["store"]
    if store not in (pgstore.SQLITE, pgstore.POSTGRES):
        raise BundleError(pgstore.EXTERNAL_REFUSAL)
    artifact_store = stores.get("artifacts", "volume")
    if artifact_store != "volume":
        # Said before the work, and whatever --quiet says: the archive is not the whole stack.
        print(
            f"backup: warning: the artifacts are in {artifact_store[:200]}, not in the volume: "
            "this archive holds none of them; back the bucket up with its own tools",
            file=sys.stderr,
        )
    project = stackio.project_name(args)
    full = args.full or encrypt  # an encrypted archive names no earlier one
    previous = None if full else archive.find_previous(path.parent, project, exclude=path)
    known = archive.known_artifacts(previous, path.parent, replacing=path.name)
    progress = stackio.Progress(not (args.quiet or args.json))
    started = time.monotonic()
    backup_id = uuid.uuid4().hex
    with (
        open_atomic(path, SECRET_MODE, force=args.force) as handle,
        _sink(handle, passphrase) as sink,
        tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as out,
    ):
        # First, like SQLite's snapshot below: artifacts listed later include all it names.
        dumped = None
        if store == pgstore.POSTGRES:
            dumped = pgstore.dump(args, out, path.parent, progress)
        with stackio.agent(args, "server", "dump-server") as server:
            server.stdin.write(json.dumps(known).encode())
            server.stdin.close()
            listing, received = _receive_server(out, server.stdout, progress)
        _check_received(listing, received)
        if (listing["database"] is None) != (dumped is not None):
            raise BundleError("the server's backend store changed during the backup; run it again")
        listing["database"] = listing["database"] or dumped
        files = _copy_files(args, out)
        manifest = archive.build_manifest(
            backup_id=backup_id,
            created=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            project=project,
            bundle_version=bundle_version(commands._project_dir(args)),
            archive_name=path.name,
            listing=listing,
            previous=previous,
            files=files,
        )
        # Last, so an archive cut short has none and is refused as truncated.
        data = json.dumps(manifest, indent=1).encode()
        stackio.copy_member(out, archive.MANIFEST, len(data), io.BytesIO(data))
    progress.end()
    report = _backup_report(path, manifest, previous, time.monotonic() - started)
    report["encrypted"] = encrypt
    stackio.print_report(args, report, _backup_line(report))
    return 0


@contextlib.contextmanager
def _sink(handle, passphrase: bytes | None):
    """Where the tar stream goes: the archive file, or its encryption."""
    if passphrase is None:
        yield handle
    else:
        with backupcrypt.encrypting(handle, passphrase) as sink:
            yield sink


def _copy_files(args, out: tarfile.TarFile) -> list[dict]:
    """The users, secrets and server-secrets volumes' files (auth image), then the bundle's
    .env."""
    files = []
    with stackio.agent(args, "files", "dump-files") as agent:
        agent.stdin.close()
        with tarfile.open(fileobj=agent.stdout, mode="r|") as incoming:
            for member in incoming:
                if not member.isreg() or not archive.FILE_MEMBER.fullmatch(member.name):
                    raise BundleError(f"the files agent sent {member.name[:200]!r}")
                digest = stackio.copy_member(
                    out, member.name, member.size, incoming.extractfile(member)
                )
                files.append({"member": member.name, "size": member.size, "sha256": digest})
    env = commands._project_dir(args) / ".env"
    if env.is_file():
        data = env.read_bytes()
        digest = stackio.copy_member(out, archive.ENV_MEMBER, len(data), io.BytesIO(data))
        files.append({"member": archive.ENV_MEMBER, "size": len(data), "sha256": digest})
    return files


def _backup_report(path: Path, manifest: dict, previous: dict | None, seconds: float) -> dict:
    held = [a for a in manifest["artifacts"] if a["archive"] == path.name]
    return {
        "archive": str(path),
        "backup_id": manifest["backup_id"],
        "bytes": path.stat().st_size,
        "seconds": round(seconds, 1),
        "incremental_after": previous["_file"] if previous else None,
        # What restore needs beside this archive: where the artifacts it did not copy are.
        "needs_archives": sorted({a["archive"] for a in manifest["artifacts"]} - {path.name}),
        "artifacts": len(manifest["artifacts"]),
        "artifacts_copied": len(held),
        "artifact_bytes_copied": sum(a["size"] for a in held),
        "artifact_bytes_total": sum(a["size"] for a in manifest["artifacts"]),
        "database": manifest["database"]["kind"],
        "row_counts": manifest["database"]["row_counts"],
        "files": [f["member"] for f in manifest["files"]],
        "skipped": manifest["skipped"],
    }


def _backup_line(report: dict) -> str:
    counts = report["row_counts"]
    needs = report["needs_archives"]
    line = (
        f"backup: wrote {report['archive']} ({stackio.human(report['bytes'])}, "
        f"{report['seconds']} s, mode 0600: it holds the stack's secrets"
        + (
            "; encrypted: without the passphrase it cannot be restored"
            if report["encrypted"]
            else ""
        )
        + "): "
        f"{counts.get('experiments', 0)} experiments, {counts.get('runs', 0)} runs, "
        f"{counts.get('registered_models', 0)} registered models, {report['artifacts']} "
        f"artifacts ({report['artifacts_copied']} copied"
        + (f"; the rest are in {', '.join(needs)}, which restore needs beside it" if needs else "")
        + f"), {len(report['files'])} files of users, secrets and .env"
    )
    if report["skipped"]:
        line += f"; skipped {len(report['skipped'])} links or special files"
    return line
