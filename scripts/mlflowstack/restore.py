"""``stackctl restore FILE [--force]``: an archive back into a stack.

Contract: verifies the archive and every earlier archive it names (archive.verify_backup)
before anything changes; refuses a stack that is not empty (any experiment besides Default,
any run or registered model, any artifact, a user besides ``admin`` or a token besides the
serving profile's: what a fresh stack's init makes) unless ``--force``; then stops nginx, auth
and server, writes (the agent stages the database and artifacts in their volumes and checks
each sha256 again before it replaces anything; users and secrets are checked in memory before
the first is written), and starts them again with ``docker compose up -d --wait --no-build``,
also when writing failed. The archived .env goes to ``.env.from-backup``, never over ``.env``.

The database goes only into a store of its own kind: a SQLite archive onto a SQLite stack, a
PostgreSQL dump onto a stack with the bundled PostgreSQL (of its major version or newer); other
pairs, and an external database, are refused before anything changes. A dump is loaded first,
in one transaction that checks every table's row count before it commits (pgstore.load: a
failure leaves the database as it was), then the artifacts; the target keeps its own
PostgreSQL role and password.

An encrypted archive (backupcrypt's magic) is decrypted first, after its tag is checked over
the whole file, into a private temporary file (backupcrypt.plain_archive) that all of the above
reads and that is removed on every exit path; its passphrase comes from ``--passphrase-file`` or
one prompt.
"""

import contextlib
import io
import json
import tarfile
import time
from pathlib import Path

from mlflowstack import archive, backupcrypt, commands, pgstore, stackio
from mlflowstack.files import SECRET_MODE, BundleError, create_file

SERVICES = ("nginx", "auth", "server")
# What a fresh stack's init makes: restore may replace these without --force.
INIT_USERS = {"admin"}
INIT_TOKENS = {"serving"}


def target_problems(server: dict, files: dict) -> list[str]:
    """Why the target stack is not empty (an empty list: it is)."""
    problems = [
        f"{server[key]} {label}"
        for key, label in (
            ("experiments", "experiments besides Default"),
            ("runs", "runs"),
            ("registered_models", "registered models"),
            ("artifacts", "artifact files"),
        )
        if server.get(key)
    ]
    users = sorted(set(files.get("users", [])) - INIT_USERS)
    tokens = sorted(set(files.get("tokens", [])) - INIT_TOKENS)
    if users:
        problems.append(f"users {', '.join(users)}")
    if tokens:
        problems.append(f"tokens {', '.join(tokens)}")
    return problems


def _stream_pieces(
    stdin, expect: dict, pieces: list[archive.Piece], progress: stackio.Progress
) -> None:
    """A tar stream for the server agent: expect.json, then each piece from its archive."""
    with tarfile.open(fileobj=stdin, mode="w|", format=tarfile.PAX_FORMAT) as out:
        data = json.dumps(expect).encode()
        stackio.copy_member(out, "expect.json", len(data), io.BytesIO(data))
        open_archives: dict[Path, tarfile.TarFile] = {}
        total = 0
        with contextlib.ExitStack() as closing:
            for piece in pieces:
                source = open_archives.get(piece.archive)
                if source is None:
                    source = closing.enter_context(tarfile.open(piece.archive, "r:"))
                    open_archives[piece.archive] = source
                stackio.copy_member(out, piece.member, piece.size, source.extractfile(piece.member))
                total += piece.size
                progress.update(f"restore: {stackio.human(total)} written")


def _load(args, place: str, mode: str, expect: dict, pieces, progress: stackio.Progress) -> dict:
    # A broken pipe: the agent stopped reading (its exit status and error line say why).
    with stackio.agent(args, place, mode) as agent, contextlib.suppress(BrokenPipeError):
        _stream_pieces(agent.stdin, expect, pieces, progress)
    return stackio.answer(agent.rest)


def restore(args) -> int:
    path = Path(args.file)
    passphrase_file = getattr(args, "passphrase_file", None)
    with backupcrypt.plain_archive(path, passphrase_file, getattr(args, "tmp_dir", None)) as plain:
        return _restore(args, path, plain)


def _restore(args, path: Path, plain: Path) -> int:
    """Restore from ``plain`` (``path`` itself, or its decryption)."""
    progress = stackio.Progress(not (args.quiet or args.json))
    progress.update("restore: verifying the archive and every checksum")
    try:
        plan = archive.verify_backup(plain)
    finally:
        progress.end()
    stackio.require_running(args)
    server = stackio.agent_json(args, "server", "inspect-server")
    manifest = plan.manifest
    kind = manifest["database"].get("kind", pgstore.SQLITE)
    pgstore.require_same_store(kind, server.get("store", pgstore.SQLITE))
    if kind == pgstore.POSTGRES:
        found = pgstore.inspect(args)
        pgstore.require_major(manifest["database"]["postgres_major"],
                              int(found["server_version_num"]) // 10000)  # fmt: skip
        server.update({key: found[key] for key in ("experiments", "runs", "registered_models")})
    problems = target_problems(server, stackio.agent_json(args, "files", "inspect-files"))
    if server.get("mlflow_version") != manifest["mlflow_version"]:
        # Another MLflow may not read the database's schema (or would need a migration first).
        raise BundleError(
            f"the archive is from MLflow {plan.manifest['mlflow_version']}, this stack runs "
            f"{server.get('mlflow_version')}: restore into a stack of the archive's version, "
            "then upgrade (README: Upgrading MLflow)"
        )
    if problems and not args.force:
        raise BundleError(
            f"the stack is not empty ({'; '.join(problems)}): restore onto a fresh stack, "
            "or --force to replace everything in it"
        )
    server_expect = {
        "database": plan.database.sha256 if kind == pgstore.SQLITE else None,
        "artifacts": {p: piece.sha256 for p, piece in plan.artifacts.items()},
        "mtimes": {a["path"]: a["mtime_ns"] for a in manifest["artifacts"]},
        "force": bool(args.force),
    }
    server_pieces = [plan.database] if kind == pgstore.SQLITE else []
    server_pieces += plan.artifacts.values()
    volume_files = {m: p for m, p in plan.files.items() if m != archive.ENV_MEMBER}
    started = time.monotonic()
    stackio.compose_checked(args, "stop", *SERVICES)
    try:
        if kind == pgstore.POSTGRES:
            pgstore.load(args, plan.database, manifest["database"]["row_counts"], progress)
        try:
            _load(args, "server-run", "load-server", server_expect, server_pieces, progress)
        except BundleError as error:
            if kind == pgstore.SQLITE:
                raise
            raise BundleError(
                f"the database was restored, the artifacts, users and secrets were not "
                f"({error}); fix that, then restore --force again"
            ) from None
        files_expect = {"files": {m: p.sha256 for m, p in volume_files.items()}}
        try:
            _load(args, "files", "load-files", files_expect, list(volume_files.values()), progress)
        except BundleError as error:
            raise BundleError(
                f"the database and artifacts were restored, the users and secrets were not "
                f"({error}); fix that, then restore --force again"
            ) from None
    finally:
        progress.end()
        stackio.compose_checked(args, "up", "-d", "--wait", "--no-build", *SERVICES)
    env_note = _restore_env(args, plan)
    counts = manifest["database"]["row_counts"]
    report = {
        "archive": str(path),
        "encrypted": plain != path,
        "backup_id": manifest["backup_id"],
        "created": manifest["created"],
        "mlflow_version": manifest["mlflow_version"],
        "database": kind,
        "archives_used": [str(path if p == plain else p) for p in plan.archives],
        "row_counts": counts,
        "artifacts": len(plan.artifacts),
        "files": sorted(volume_files),
        "env": env_note,
        "seconds": round(time.monotonic() - started, 1),
    }
    line = (
        f"restore: restored backup of {manifest['created']} from {path.name}: "
        f"{counts.get('experiments', 0)} experiments, {counts.get('runs', 0)} runs, "
        f"{counts.get('registered_models', 0)} registered models, {len(plan.artifacts)} "
        f"artifacts, {len(volume_files)} files of users and secrets; nginx, auth and server "
        f"restarted{'; ' + env_note if env_note else ''}"
    )
    stackio.print_report(args, report, line)
    return 0


def _restore_env(args, plan: archive.Plan) -> str | None:
    """The archived .env goes beside the bundle's as ``.env.from-backup`` (mode 0600), never
    over a .env: the target's own settings (project name, port) are the operator's to merge."""
    piece = plan.files.get(archive.ENV_MEMBER)
    if piece is None:
        return None
    with tarfile.open(piece.archive, "r:") as source:
        data = source.extractfile(piece.member).read()
    target = commands._project_dir(args) / ".env.from-backup"
    if not create_file(target, data, SECRET_MODE, force=args.force):
        return f"the archived .env was not written: {target} exists (--force replaces it)"
    return f"the archived .env is in {target}: compare it with .env"
