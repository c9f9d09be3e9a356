"""``stackctl upgrade``: backup, build, start (the server migrates), health check; on failure,
the previous images and database back, by itself.

Contract, step by step (:func:`upgrade` reads in this order):

1. preflight: auth, server and nginx run and are healthy, ``/healthz`` answers 200 on nginx's
   published port, and there is room for the backup (on the host) and for the server's own
   pre-upgrade copy of the database (in its volume). Refused: nothing changed.
2. the image each of those services runs now is tagged ``IMAGE:pre-upgrade`` (the way back);
3. ``stackctl backup`` to ``--output FILE`` or a new ``pre-upgrade-TIME.tar`` in
   ``--backup-dir`` (default ``backups/``, where ``stackctl backup`` writes);
4. ``docker compose build auth server nginx`` (compose's own build arguments and the
   EXTRA_CA_BUNDLE secret; never ``--pull``);
5. ``docker compose up -d --wait --no-build``: a newer pin's server migrates the database at
   start, after copying it (server/schema.py);
6. the health check of step 1 again, for up to ``--timeout`` seconds.

A failure at 4-6 rolls back (:func:`rollback`): the ``pre-upgrade`` images get their names back;
after 5 or 6 the server is stopped and, only if the new server began to migrate the database
(it made its copy, or the revision moved), the database is put back: from that copy
(``pre-upgrade/`` in the db volume: the last state the old server wrote, writes made during the
build included), else from the archive of step 3 (the database alone). With the bundled
PostgreSQL there is no such copy (the migrate service upgrades it, in one transaction): a moved
revision puts the archive's dump back (pgstore.load), an unmoved one keeps the database; its
room is checked on the host only (the dump passes through a file beside the archive). An
external database (DATABASE_URI) is refused at the preflight. Artifacts,
users and secrets are never rolled back: a migration does not touch them, so restoring them
would only lose what was written meanwhile. Then ``up -d --wait --no-build`` and the health
check again, and the command fails with one line saying what failed and that it rolled back
(or, if the rollback failed too, how to finish it by hand).

``--dry-run`` runs the preflight (it reads only) and prints the plan. ``--json``: one JSON
object on stdout when it succeeds. The steps act through a :class:`Context` (tests fake it).
"""

import argparse
import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mlflowstack import archive, commands, pgstore, stackio, upgradeagent
from mlflowstack.audit import printable
from mlflowstack.files import BundleError

SERVICES = ("auth", "server", "nginx")
TAG = "pre-upgrade"
# Beyond the database and the artifacts not yet in an earlier archive: tar headers, manifest.
SLACK = 64 << 20

AGENT = Path(__file__).with_name("upgradeagent.py")


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    def reason(self) -> str:
        lines = self.stderr.strip().splitlines()
        return printable(lines[-1])[:300] if lines else f"exit status {self.returncode}"


def run_command(command: list[str]) -> Result:
    """The real runner: no stdin, output captured, never raises for an exit status."""
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise BundleError("docker is not installed here") from None
    return Result(done.returncode, done.stdout, done.stderr)


def http_status(url: str) -> int:
    """The status of GET ``url`` (0: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (our own URL)
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return 0


@dataclasses.dataclass
class Context:
    """What the steps act through; tests replace ``run`` and the rest."""

    args: object
    run: Callable[[list[str]], Result] = run_command
    http_status: Callable[[str], int] = http_status
    take_backup: Callable[[object, Path], object] = lambda args, path: None
    load_database: Callable[[object, Path], None] = lambda args, path: None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    say: Callable[[str], None] = lambda text: None

    def compose(self, *words: str) -> Result:
        return self.run(commands.compose_command(self.args, *words))

    def compose_ok(self, *words: str) -> str:
        result = self.compose(*words)
        if result.returncode:
            raise BundleError(f"docker compose {words[0]} failed: {result.reason()}")
        return result.stdout

    def one_off_ok(self, *run_words: str) -> str:
        """A one-off container's stdout (commands.one_off_command)."""
        result = self.run(commands.one_off_command(self.args, *run_words))
        if result.returncode:
            raise BundleError(f"docker compose run failed: {result.reason()}")
        return result.stdout


@dataclasses.dataclass
class Before:
    """What the preflight found: the way back."""

    project: str
    images: dict[str, str]  # service -> image name
    image_ids: dict[str, str]  # service -> the image its container runs
    healthz: str
    volumes: dict  # upgradeagent inspect's answer


def stack_images(ctx: Context) -> tuple[str, dict[str, str]]:
    """The compose project's name and the image name of each of SERVICES."""
    config = json.loads(ctx.compose_ok("config", "--format", "json"))
    images = {s: config["services"].get(s, {}).get("image") for s in SERVICES}
    missing = [service for service, image in images.items() if not image]
    if missing:
        raise BundleError(f"compose names no image for {', '.join(missing)}")
    return config["name"], images


def running_images(ctx: Context) -> dict[str, str]:
    """The image ID each of SERVICES' containers runs."""
    ids = {}
    for service in SERVICES:
        container = ctx.compose_ok("ps", "-q", service).split()
        if not container:
            raise BundleError(f"{service} is not running: docker compose up -d --wait, then again")
        inspected = ctx.run(["docker", "inspect", "-f", "{{.Image}}", container[0]])
        if inspected.returncode:
            raise BundleError(f"docker inspect {service} failed: {inspected.reason()}")
        ids[service] = inspected.stdout.strip()
    return ids


def healthz_url(ctx: Context) -> str:
    """``/healthz`` on nginx's published plain-HTTP port (it answers there with TLS on too)."""
    published = ctx.compose_ok("port", "nginx", "8080").strip().splitlines()
    if not published:
        raise BundleError("nginx publishes no port")
    host, _, port = published[0].rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"


def unhealthy(ctx: Context, url: str) -> str | None:
    """Why the stack is not healthy now (None: it is): SERVICES running and healthy, then
    ``/healthz`` through nginx (which asks the gate and the server) answering 200."""
    states = {}
    for line in ctx.compose_ok("ps", "--format", "json").splitlines():
        if line.strip().startswith(("{", "[")):
            # One object per line; compose before 2.21 printed one array.
            for item in json.loads(line) if line.strip()[0] == "[" else [json.loads(line)]:
                states[item.get("Service")] = (item.get("State"), item.get("Health"))
    for service in SERVICES:
        state, health = states.get(service, ("missing", ""))
        if state != "running" or health != "healthy":
            return f"{service} is {state}{', ' + health if health else ''}"
    status = ctx.http_status(url)
    return None if status == 200 else f"{url} answered {status or 'nothing'}"


def wait_healthy(ctx: Context, url: str, seconds: float) -> None:
    """Healthy within ``seconds``, else BundleError with the last reason."""
    deadline = ctx.clock() + seconds
    while (problem := unhealthy(ctx, url)) is not None:
        if ctx.clock() >= deadline:
            raise BundleError(f"not healthy after {seconds:.0f} s: {problem}")
        ctx.sleep(2)


def disk_problem(free_host: int, volumes: dict, previous_bytes: int) -> str | None:
    """Why there is not room enough (None: there is). The backup needs the database and the
    artifacts an earlier archive in its directory does not hold; the db volume needs the
    backup's snapshot and the server's pre-upgrade copy, each the database's size. The bundled
    PostgreSQL's dump (about its database's size, counted high: indexes are not dumped) passes
    through a file beside the archive, so twice; its volume needs no copy."""
    postgres = volumes.get("store") == pgstore.POSTGRES
    database = volumes["db_bytes"] * (2 if postgres else 1)
    needed = database + max(0, volumes["artifact_bytes"] - previous_bytes) + SLACK
    if free_host < needed:
        return (
            f"the backup needs about {stackio.human(needed)}, its directory has "
            f"{stackio.human(free_host)} free"
        )
    if not postgres and volumes["db_free"] < 2 * volumes["db_bytes"]:
        return (
            f"the database volume has {stackio.human(volumes['db_free'])} free; its snapshot "
            f"and pre-upgrade copy need {stackio.human(2 * volumes['db_bytes'])}"
        )
    return None


def agent(ctx: Context, running: bool, *words: str) -> dict:
    """upgradeagent's answer (``inspect`` by default) from the server's image: in its
    container while it runs, else in a one-off container with its volumes."""
    script = ("-c", AGENT.read_text(), *(words or ("inspect",)))
    if running:
        stdout = ctx.compose_ok("exec", "-T", "server", "python", *script)
    else:
        stdout = ctx.one_off_ok("--entrypoint", "python", "server", *script)
    return stackio.answer(stdout.encode())


def inspect_database(ctx: Context, running: bool) -> dict:
    """upgradeagent's inspect, with the bundled PostgreSQL's revision and size from psql in its
    container (which runs whether the server does or not); an external database refused."""
    found = agent(ctx, running)
    store = found.get("store", pgstore.SQLITE)
    if store == pgstore.EXTERNAL:
        raise BundleError(pgstore.EXTERNAL_REFUSAL)
    if store == pgstore.POSTGRES:
        stdout = ctx.compose_ok("exec", "-T", "postgres", *pgstore.PSQL, "-At", "-c",
                                pgstore.INSPECT_SQL)  # fmt: skip
        database = stackio.answer(stdout.encode())
        found.update(revision=database["revision"], db_bytes=database["database_bytes"])
    return found


def preflight(ctx: Context, backup_path: Path) -> Before:
    """Step 1 (reads only): the stack is healthy and there is room; what the rollback needs."""
    project, images = stack_images(ctx)
    ids = running_images(ctx)
    url = healthz_url(ctx)
    problem = unhealthy(ctx, url)
    if problem:
        raise BundleError(f"the stack is not healthy ({problem}): fix that first")
    volumes = inspect_database(ctx, True)
    previous = archive.find_previous(backup_path.parent, project)
    previous_bytes = sum(a["size"] for a in previous["artifacts"]) if previous else 0
    existing = next(p for p in (backup_path.parent, *backup_path.parent.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    problem = disk_problem(free, volumes, previous_bytes)
    if problem:
        raise BundleError(f"not enough disk space: {problem}")
    return Before(project, images, ids, url, volumes)


def keep_images(ctx: Context, before: Before) -> None:
    """Step 2: tag what runs now ``IMAGE:pre-upgrade``."""
    for service in SERVICES:
        _tag(ctx, before.image_ids[service], f"{before.images[service]}:{TAG}")


def restore_images(ctx: Context, before: Before) -> None:
    """Give the ``pre-upgrade`` images their names back (the build moved them)."""
    for service in SERVICES:
        _tag(ctx, f"{before.images[service]}:{TAG}", before.images[service])


def _tag(ctx: Context, source: str, target: str) -> None:
    result = ctx.run(["docker", "tag", source, target])
    if result.returncode:
        raise BundleError(f"docker tag {target} failed: {result.reason()}")


def build(ctx: Context) -> None:
    """Step 4: build the images as ``up`` would (compose's build args and CA secret)."""
    ctx.compose_ok("build", *SERVICES)


def start(ctx: Context, timeout: int) -> None:
    """Step 5: start what was built; compose waits for every service to be healthy."""
    ctx.compose_ok("up", "-d", "--wait", "--wait-timeout", str(timeout), "--no-build")


def restore_database(ctx: Context, before: Before, backup_path: Path | None) -> str:
    """With the server stopped: put the database back if the new server began to migrate it;
    what was done, as a phrase. A copy of the old revision made since the preflight says it
    began (server/schema.py copies first), even if a failed migration left the revision as it
    was; without one (always with PostgreSQL), a moved revision says so, and the archive's
    database goes back."""
    now = inspect_database(ctx, False)
    old = before.volumes["revision"]
    copies = [
        name
        for name in now["copies"]
        # The server copies a SQLite file only; any copy beside PostgreSQL is an older one's.
        if now.get("store", pgstore.SQLITE) == pgstore.SQLITE
        and name not in before.volumes["copies"]
        and upgradeagent.COPY_NAME.fullmatch(name)
        and name.startswith(f"pre-upgrade-{old}-")
    ]
    if copies:
        # Names end in their UTC time; a later start found the new revision and made none.
        name = sorted(copies)[-1]
        answer = agent(ctx, False, "put-back", name)
        if answer.get("revision") != old:
            raise BundleError(f"the database put back is at {answer.get('revision')}, not {old}")
        return f"database put back from pre-upgrade/{name}"
    if now["revision"] == old:
        return "database kept (not migrated)"
    if backup_path is None:
        raise BundleError("the database was migrated and there is no copy to put back")
    ctx.load_database(ctx.args, backup_path)
    return f"database restored from {backup_path}"


def rollback(ctx: Context, before: Before, backup_path: Path | None, started: bool) -> str:
    """Step 6 on failure: the previous images (and database, if migrated), started, healthy."""
    restore_images(ctx, before)
    note = "previous images restored"
    if started:
        ctx.compose_ok("stop", "server")
        note += "; " + restore_database(ctx, before, backup_path)
    start(ctx, ctx.args.timeout)
    wait_healthy(ctx, before.healthz, ctx.args.timeout)
    return note


def backup_path_for(args, now: datetime.datetime) -> Path:
    """``--output`` (a directory: a new name in it), or a new ``pre-upgrade-TIME.tar`` in
    ``--backup-dir`` (default ``backups/`` of the bundle)."""
    name = now.strftime("pre-upgrade-%Y%m%dT%H%M%SZ.tar")
    if args.output:
        path = Path(args.output)
        return path / name if path.is_dir() else path
    return Path(args.backup_dir or commands._project_dir(args) / "backups") / name


def who_migrates(before: Before) -> str:
    """Who brings an older schema to the new pin: the server copies a SQLite file first; with
    the bundled PostgreSQL the migrate service upgrades it in one transaction."""
    if before.volumes.get("store") == pgstore.POSTGRES:
        return "the migrate service upgrades an older schema, in one transaction"
    return "the server migrates an older schema, after a copy"


def plan(before: Before, backup_path: Path) -> list[str]:
    images = ", ".join(before.images[s] for s in SERVICES)
    return [
        f"1. preflight: healthy, {before.healthz} answers 200, room for the backup (passed)",
        f"2. tag the images running now as IMAGE:{TAG} ({images})",
        f"3. stackctl backup --output {backup_path}",
        f"4. docker compose build {' '.join(SERVICES)}",
        f"5. docker compose up -d --wait --no-build ({who_migrates(before)}; now at "
        f"{before.volumes['revision']})",
        f"6. health check; on failure at 4-6: the {TAG} images back, the database back if "
        "it was migrated, started again",
    ]


def upgrade(args, ctx: Context | None = None) -> int:
    ctx = ctx or default_context(args)
    started_at = ctx.clock()
    backup_path = backup_path_for(args, datetime.datetime.now(datetime.UTC))
    if backup_path.exists():
        raise BundleError(f"{backup_path} exists, not replaced")
    before = preflight(ctx, backup_path)
    if args.dry_run:
        print("\n".join(plan(before, backup_path)))
        return 0
    ctx.say("upgrade: preflight passed; tagging the running images, taking the backup")
    keep_images(ctx, before)
    try:
        backup_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ctx.take_backup(args, backup_path)
    except (BundleError, OSError) as error:
        raise BundleError(f"backup failed, nothing changed: {error}") from None
    ctx.say(f"upgrade: backup written to {backup_path}")
    step, started = "build", False
    try:
        ctx.say("upgrade: building the images")
        build(ctx)
        step, started = "start", True
        ctx.say(f"upgrade: starting ({who_migrates(before)})")
        start(ctx, args.timeout)
        step = "health check"
        wait_healthy(ctx, before.healthz, args.timeout)
    except (BundleError, KeyboardInterrupt) as failure:
        # Interrupted mid-way is a failure too: the images and database must come back.
        error = failure if isinstance(failure, BundleError) else "interrupted"
        ctx.say(f"upgrade: {step} failed ({error}); rolling back")
        try:
            note = rollback(ctx, before, backup_path, started)
        except BundleError as second:
            raise BundleError(
                f"upgrade failed at {step} ({error}) and so did the rollback ({second}): the "
                f"previous images are tagged IMAGE:{TAG}, the backup is {backup_path} "
                "(README, Upgrading MLflow)"
            ) from None
        raise BundleError(
            f"upgrade failed at {step} ({error}); rolled back: {note}; the stack is healthy "
            f"(backup: {backup_path})"
        ) from None
    after = inspect_database(ctx, True)
    report = {
        "backup": str(backup_path),
        "images_before": {s: before.image_ids[s] for s in SERVICES},
        "images_after": running_images(ctx),
        "revision_before": before.volumes["revision"],
        "revision_after": after["revision"],
        "seconds": round(ctx.clock() - started_at, 1),
    }
    line = (
        f"upgrade: done in {report['seconds']} s, healthy; schema "
        f"{report['revision_before']} -> {report['revision_after']}; backup {backup_path}; "
        f"previous images tagged IMAGE:{TAG}"
    )
    stackio.print_report(args, report, line)
    return 0


def default_context(args) -> Context:
    """The real thing: commands run, ``stackctl backup`` and restore's loader for the archive."""
    from mlflowstack import backup, restore

    def take_backup(args, path: Path) -> None:
        backup.backup(
            argparse.Namespace(
                project_dir=args.project_dir, users_dir=None, output=str(path), force=False,
                full=False, quiet=True, json=False,
            )
        )  # fmt: skip

    def load_database(args, path: Path) -> None:
        plan = archive.verify_backup(path)
        if plan.manifest["database"].get("kind") == pgstore.POSTGRES:
            counts = plan.manifest["database"]["row_counts"]
            pgstore.load(args, plan.database, counts, stackio.Progress(False))
            return
        expect = {"database": plan.database.sha256, "artifacts": {}, "database_only": True}
        progress = stackio.Progress(False)
        restore._load(args, "server-run", "load-server", expect, [plan.database], progress)

    quiet = args.json or args.quiet
    return Context(
        args,
        take_backup=take_backup,
        load_database=load_database,
        say=(lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr)),
    )
