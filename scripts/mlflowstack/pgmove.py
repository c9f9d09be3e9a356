"""``stackctl migrate-to-postgres``: a running SQLite stack's data into the bundled PostgreSQL
(the ``postgres`` profile, README "PostgreSQL"), nothing lost.

Contract, step by step (:func:`migrate_to_postgres` reads in this order):

0. preflight, which changes nothing (each refusal one line, exit 1): this shell does not set
   ``COMPOSE_PROFILES`` or ``COMPOSE_ENV_FILES`` (either would hide the switch written to
   ``.env``); the stack's settings name neither ``DATABASE_URI`` nor the postgres profile; the
   server runs, on the SQLite file, whose schema is at the pinned MLflow's head; ``.env`` can
   take the switch; and, when the project has a ``postgres-data`` volume already, its database
   holds no MLflow rows (PostgreSQL is started to look, and stopped again if it was not running).
1. ``stackctl backup`` (``--output FILE``, default ``backups/pre-postgres-TIME.tar``), unless
   ``--no-backup``;
2. ``docker compose stop nginx auth server``: nothing writes to the SQLite file from here on;
3. with ``COMPOSE_PROFILES`` plus postgres in compose's environment only: postgres's image
   built if missing, ``up -d --wait postgres`` (init makes its password when missing), then the
   migrate service once (MLflow's tables at its head, or nothing when they are);
4. the copy, in a one-off container of the server's service (pgmoveagent.py ``copy``): one
   transaction, counts and contents compared before the commit;
5. the switch: ``.env`` gets postgres in ``COMPOSE_PROFILES`` (:func:`env_with_profile`, written
   atomically keeping its mode; created, mode 0644, if there is none);
6. ``docker compose up -d --wait --no-build``, and the running server must report PostgreSQL.

A failure in 2-4 (or an interrupt) starts the SQLite stack again as it was (the file was only
read) and stops PostgreSQL if this command started it; a failure in 5-6 puts ``.env`` back the
same way. Either way the command exits 1 with one line saying so. The SQLite file stays in the
``mlflow-db`` volume after a success: going back is removing postgres from ``COMPOSE_PROFILES``
(what PostgreSQL received since is not in the file). ``--dry-run`` runs step 0 and prints the
plan and every table's row count; ``--json`` prints one JSON object.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mlflowstack import commands, stackio
from mlflowstack.audit import printable
from mlflowstack.files import PUBLIC_MODE, BundleError, write_atomic

SERVICES = ("nginx", "auth", "server")
PROFILE = "postgres"
AGENT = Path(__file__).with_name("pgmoveagent.py")
README = "README, 'Move from SQLite to PostgreSQL'"
# compose-go's dotenv: the last assignment wins; a value quoted, or bare up to a " #" comment.
_ASSIGNMENT = re.compile(
    rb"(?m)^(?P<lead>[ \t]*(?:export[ \t]+)?COMPOSE_PROFILES[ \t]*=[ \t]*)"
    rb"(?P<value>\"[^\"\r\n]*\"|'[^'\r\n]*'|[^\r\n]*?)(?P<rest>(?:[ \t]+#[^\r\n]*)?[ \t]*\r?)$"
)
APPENDED = (
    b"# The bundled PostgreSQL holds the data since stackctl migrate-to-postgres; the SQLite\n"
    b"# file stays in the mlflow-db volume: without postgres here, the stack uses it again.\n"
)


def profile_list(value: str) -> list[str]:
    """The names of a ``COMPOSE_PROFILES`` value, in order."""
    return [name.strip() for name in value.split(",") if name.strip()]


def env_with_profile(content: bytes | None, profile: str = PROFILE) -> bytes:
    """``.env``'s bytes (None: there is none) with ``profile`` in ``COMPOSE_PROFILES``: added to
    the last uncommented assignment (the one compose uses), keeping its quotes and comment, or
    appended with a comment saying why; every other byte unchanged."""
    content = content or b""
    matches = list(_ASSIGNMENT.finditer(content))
    if not matches:
        if content and not content.endswith(b"\n"):
            content += b"\n"
        return content + APPENDED + f"COMPOSE_PROFILES={profile}\n".encode()
    match = matches[-1]
    value = match["value"]
    quote = value[:1] if value[:1] in (b'"', b"'") and len(value) > 1 else b""
    try:
        names = profile_list((value[1:-1] if quote else value).decode())
    except UnicodeDecodeError:
        raise BundleError(".env: its COMPOSE_PROFILES line is not UTF-8") from None
    if profile in names:
        return content
    joined = ",".join([*names, profile]).encode()
    return content[: match.start("value")] + quote + joined + quote + content[match.end("value") :]


def shell_refusal(environ) -> str | None:
    """Why this shell's environment would hide the switch written to .env (None: it would not)."""
    if "COMPOSE_ENV_FILES" in environ:
        return (
            "COMPOSE_ENV_FILES is set in this shell, so compose does not read the bundle's .env, "
            "where the switch to PostgreSQL is written: unset it, then again"
        )
    if "COMPOSE_PROFILES" in environ:
        return (
            "COMPOSE_PROFILES is set in this shell and outranks .env, where the switch to "
            "PostgreSQL is written: unset it (keep the profiles in .env), then again"
        )
    return None


def source_refusal(configured: dict, source: dict) -> str | None:
    """Why the stack's data cannot be moved (None: it can): ``configured``, the server's
    environment as compose resolves it now; ``source``, the agent's answer from the server."""
    if (configured.get("DATABASE_URI") or "").strip():
        return (
            "the stack uses an external database (DATABASE_URI): migrate-to-postgres moves the "
            "SQLite file into the bundled PostgreSQL only; nothing changed"
        )
    if PROFILE in profile_list(configured.get("COMPOSE_PROFILES") or ""):
        return (
            "the stack is set to the bundled PostgreSQL already (COMPOSE_PROFILES lists "
            "postgres): nothing to move; nothing changed"
        )
    if source.get("store") != "sqlite":
        store = source.get("store")
        return f"the running server uses {store}, not the SQLite file: nothing to move"
    revision, head, state = source.get("revision"), source.get("head"), source.get("state")
    version = source.get("mlflow_version")
    if state == "fresh":
        return (
            "the SQLite file has no MLflow tables yet: start the stack once (docker compose up "
            "-d --wait), then again"
        )
    if state == "older":
        return (
            f"the SQLite schema is at revision {revision}, older than MLflow {version}'s head "
            f"{head}: start the server once with this image (docker compose up -d --wait "
            "migrates it, after a copy) or run scripts/stackctl upgrade, then again"
        )
    if state != "current":
        return (
            f"the SQLite schema (revision {revision}) is newer than this image's MLflow "
            f"{version} knows: run the image that wrote it (README, 'Upgrading MLflow')"
        )
    return None


def target_refusal(target: dict | None) -> str | None:
    """Why the PostgreSQL database cannot take the copy (None: it is empty of MLflow rows;
    ``target`` None: it does not exist yet)."""
    extra = (target or {}).get("extra_rows") or {}
    if not extra:
        return None
    listed = ", ".join(f"{table} {count}" for table, count in sorted(extra.items())[:6])
    more = ", ..." if len(extra) > 6 else ""
    return (
        f"the PostgreSQL database is not empty ({sum(extra.values())} MLflow rows: {listed}"
        f"{more}): migrate-to-postgres copies into an empty one only; nothing changed ({README})"
    )


def plan(counts: dict[str, int], backup_path: Path | None, env_path: Path, env_exists: bool,
         profiles: str, target_note: str) -> list[str]:  # fmt: skip
    """The steps as ``--dry-run`` prints them."""
    rows = sum(n for table, n in counts.items() if table != "alembic_version")
    tables = len([table for table in counts if table != "alembic_version"])
    backup = f"stackctl backup --output {backup_path}" if backup_path else "no backup (--no-backup)"
    env = f"set in {env_path}, other lines kept" if env_exists else f"{env_path} created with it"
    return [
        f"0. preflight: the server runs on the SQLite file at MLflow's head; PostgreSQL: "
        f"{target_note} (passed)",
        f"1. {backup}",
        f"2. docker compose stop {' '.join(SERVICES)}",
        f"3. with COMPOSE_PROFILES={profiles}: postgres started (image built if missing, its "
        "password made by init if missing), then migrate (MLflow's tables at its head)",
        f"4. copy {rows} rows of {tables} tables in one transaction, foreign keys first; "
        "sequences set past the largest ids; counts and contents compared before the commit",
        f"5. COMPOSE_PROFILES={profiles} {env}",
        "6. docker compose up -d --wait --no-build: the server on PostgreSQL; the SQLite file "
        "stays in the mlflow-db volume",
        "On a failure before 5: the SQLite stack started again, unchanged; at 5-6: .env put back.",
    ]


class Compose:
    """``docker compose`` of the bundle; ``profiles`` puts COMPOSE_PROFILES in its environment
    (compose reads it for the profiles and hands it to the services, which .env cannot do
    before the switch)."""

    def __init__(self, args):
        self.args = args

    def run(
        self, *words: str, profiles: str | None = None, one_off: bool = False
    ) -> subprocess.CompletedProcess:
        """``docker compose WORDS``; with ``one_off``, ``run WORDS`` of a one-off container
        (commands.one_off_command)."""
        env = None if profiles is None else {**os.environ, "COMPOSE_PROFILES": profiles}
        if one_off:
            command = commands.one_off_command(self.args, *words)
        else:
            command = commands.compose_command(self.args, *words)
        try:
            return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, env=env, check=False)  # fmt: skip
        except FileNotFoundError:
            raise BundleError("docker is not installed here") from None

    def ok(self, *words: str, profiles: str | None = None, one_off: bool = False) -> str:
        done = self.run(*words, profiles=profiles, one_off=one_off)
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            reason = printable(lines[-1])[:300] if lines else f"exit status {done.returncode}"
            raise BundleError(f"docker compose {words[0]} failed: {reason}")
        return done.stdout

    def agent(self, mode: str, profiles: str | None = None) -> dict:
        """pgmoveagent's answer: ``source`` in the running server, else in a one-off container
        of the server's service (commands.one_off_command: never built there)."""
        script = ("-c", AGENT.read_text(), mode)
        if mode == "source":
            out = self.ok("exec", "-T", "server", "python", *script, profiles=profiles)
        else:
            where = ("--entrypoint", "python", "server")
            out = self.ok(*where, *script, profiles=profiles, one_off=True)
        return stackio.answer(out.encode())

    def config(self, profiles: str | None = None) -> dict:
        return json.loads(self.ok("config", "--format", "json", profiles=profiles))


def postgres_running(compose: Compose, profiles: str) -> bool:
    return bool(compose.ok("ps", "--status", "running", "-q", PROFILE, profiles=profiles).strip())


def start_postgres(compose: Compose, profiles: str) -> None:
    """Its image built if missing (a stack that never had the profile), then started, healthy."""
    image = compose.config(profiles)["services"][PROFILE]["image"]
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        compose.ok("build", PROFILE, profiles=profiles)
    compose.ok("up", "-d", "--wait", "--no-build", PROFILE, profiles=profiles)


def inspect_target(compose: Compose, project: str, profiles: str) -> tuple[dict | None, bool]:
    """The target's answer (None: the project has no postgres-data volume, so a new cluster
    starts empty) and whether PostgreSQL was started here to look."""
    labels = [f"label=com.docker.compose.project={project}",
              "label=com.docker.compose.volume=postgres-data"]  # fmt: skip
    listed = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", labels[0], "--filter", labels[1]],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listed.returncode:
        raise BundleError(f"docker volume ls failed: {printable(listed.stderr.strip())[:300]}")
    if not listed.stdout.strip():
        return None, False
    started = not postgres_running(compose, profiles)
    if started:
        start_postgres(compose, profiles)
    try:
        return compose.agent("target", profiles), started
    except BaseException:
        if started:
            compose.run("stop", PROFILE, profiles=profiles)
        raise


def backup_path_for(args, now: datetime.datetime) -> Path:
    """``--output`` (a directory: a new name in it), else a new name in ``backups/``."""
    name = now.strftime("pre-postgres-%Y%m%dT%H%M%SZ.tar")
    if args.output:
        path = Path(args.output)
        return path / name if path.is_dir() else path
    return commands._project_dir(args) / "backups" / name


def take_backup(args, path: Path) -> None:
    from mlflowstack import backup

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    backup.backup(
        argparse.Namespace(
            project_dir=args.project_dir, users_dir=None, output=str(path), force=False,
            full=False, quiet=True, json=False,
        )
    )  # fmt: skip


def migrate_to_postgres(args) -> int:
    quiet = args.json or args.quiet
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr))
    started_at = time.monotonic()
    compose = Compose(args)
    refusal = shell_refusal(os.environ)
    if refusal:
        raise BundleError(refusal)
    config = compose.config()
    configured = config["services"]["server"].get("environment") or {}
    stackio.require_running(args)
    source = compose.agent("source")
    refusal = source_refusal(configured, source)
    if refusal:
        raise BundleError(refusal)
    profiles = ",".join([*profile_list(configured.get("COMPOSE_PROFILES") or ""), PROFILE])
    env_path = commands._project_dir(args) / ".env"
    old_env = env_path.read_bytes() if env_path.exists() else None
    new_env = env_with_profile(old_env)
    now = datetime.datetime.now(datetime.UTC)
    backup_path = None if args.no_backup else backup_path_for(args, now)
    if backup_path is not None and backup_path.exists():
        raise BundleError(f"{backup_path} exists, not replaced")
    target, looked = inspect_target(compose, config["name"], profiles)
    if looked and (args.dry_run or target_refusal(target)):
        compose.run("stop", PROFILE, profiles=profiles)
    refusal = target_refusal(target)
    if refusal:
        raise BundleError(refusal)
    counts = source["row_counts"]
    note = "no database yet (a new, empty cluster)" if target is None else "empty"
    steps = plan(counts, backup_path, env_path, old_env is not None, profiles, note)
    if args.dry_run:
        if args.json:
            print(json.dumps({"plan": steps, "row_counts": counts}))
        else:
            print("\n".join(steps))
            print("Rows per table (SQLite, now):")
            print("\n".join(f"  {table}: {n}" for table, n in sorted(counts.items()) if n))
        return 0
    if backup_path is not None:
        say(f"migrate-to-postgres: taking a backup to {backup_path}")
        try:
            take_backup(args, backup_path)
        except (BundleError, OSError) as error:
            raise BundleError(f"backup failed, nothing changed: {error}") from None
    # Stopped again on a failure unless it ran before this command.
    ours = target is None or looked
    copied = _copy(compose, profiles, say, stop_postgres=ours)
    mode = env_path.stat().st_mode & 0o777 if old_env is not None else PUBLIC_MODE
    _switch(compose, (env_path, old_env, new_env, mode), profiles, say, stop_postgres=ours)
    report = {
        "backup": str(backup_path) if backup_path else None,
        "revision": copied["revision"],
        "tables": len(copied["row_counts"]),
        "rows": copied["rows"],
        "row_counts": copied["row_counts"],
        "sequences": copied["sequences"],
        "copy_seconds": copied["seconds"],
        "env": str(env_path),
        "env_created": old_env is None,
        "compose_profiles": profiles,
        "seconds": round(time.monotonic() - started_at, 1),
    }
    stackio.print_report(args, report, _done_line(report))
    return 0


def _copy(compose: Compose, profiles: str, say, stop_postgres: bool) -> dict:
    """Steps 2-4; on a failure, the SQLite stack back as it was, and BundleError."""
    step = "stop"
    try:
        say(f"migrate-to-postgres: stopping {', '.join(SERVICES)}")
        compose.ok("stop", *SERVICES)
        step = "postgres start"
        say("migrate-to-postgres: starting PostgreSQL and the migrate service")
        start_postgres(compose, profiles)
        step = "migrate"
        compose.ok("migrate", profiles=profiles, one_off=True)
        step = "copy"
        say("migrate-to-postgres: copying (one transaction, compared before the commit)")
        return compose.agent("copy", profiles)
    except (BundleError, KeyboardInterrupt) as failure:
        error = failure if isinstance(failure, BundleError) else "interrupted"
        try:
            compose.ok("up", "-d", "--wait", "--no-build")
            if stop_postgres:
                compose.ok("stop", PROFILE, profiles=profiles)
        except BundleError as second:
            raise BundleError(
                f"migrate-to-postgres failed at {step} ({error}); the SQLite file was only read, "
                f"but starting the stack again failed too ({second}): docker compose up -d --wait"
            ) from None
        raise BundleError(
            f"migrate-to-postgres failed at {step} ({error}); nothing switched: the SQLite stack "
            "runs again, unchanged"
        ) from None


def _switch(compose: Compose, env: tuple, profiles: str, say, stop_postgres: bool) -> None:
    """Steps 5-6 (``env``: the file, its old bytes or None, the new bytes, its mode); on a
    failure, .env back as it was, the SQLite stack started, BundleError."""
    env_path, old_env, new_env, mode = env
    step = "switch"
    try:
        say(f"migrate-to-postgres: COMPOSE_PROFILES={profiles} in {env_path}; starting")
        write_atomic(env_path, new_env, mode)
        step = "start"
        compose.ok("up", "-d", "--wait", "--no-build")
        store = compose.agent("source").get("store")
        if store != "postgresql":
            raise BundleError(f"the server started on {store}, not PostgreSQL")
    except (BundleError, OSError, KeyboardInterrupt) as failure:
        error = failure if not isinstance(failure, KeyboardInterrupt) else "interrupted"
        try:
            if old_env is None:
                env_path.unlink(missing_ok=True)
            else:
                write_atomic(env_path, old_env, mode)
            compose.ok("up", "-d", "--wait", "--no-build")
            if stop_postgres:
                compose.ok("stop", PROFILE, profiles=profiles)
        except (BundleError, OSError) as second:
            raise BundleError(
                f"migrate-to-postgres failed at {step} ({error}) and so did switching back "
                f"({second}): put .env back (the backup holds it), then docker compose up -d "
                "--wait"
            ) from None
        raise BundleError(
            f"migrate-to-postgres failed at {step} ({error}); switched back: .env as it was, "
            f"the SQLite stack runs again; PostgreSQL keeps the copy: empty it before another "
            f"try ({README})"
        ) from None


def _done_line(report: dict) -> str:
    counts = report["row_counts"]
    backup = f"; backup {report['backup']}" if report["backup"] else ""
    env = "created" if report["env_created"] else "updated"
    return (
        f"migrate-to-postgres: done in {report['seconds']} s: {report['rows']} rows of "
        f"{report['tables']} tables copied and compared equal ({counts.get('experiments', 0)} "
        f"experiments, {counts.get('runs', 0)} runs, {counts.get('registered_models', 0)} "
        f"registered models); {report['env']} {env} (COMPOSE_PROFILES="
        f"{report['compose_profiles']}); the stack runs on PostgreSQL; the SQLite file stays "
        f"in the mlflow-db volume{backup}"
    )
