"""The host's way into the stack's volumes, shared by ``backup``, ``restore`` and ``gc``.

The data stays in the volumes and crosses as tar streams on stdin/stdout of ``python -c``
running :mod:`mlflowstack.volumeagent` in the stack's own images (psql and pg_dump in the
bundled PostgreSQL's: :mod:`mlflowstack.pgstore`): ``docker compose exec server``
for the database snapshot and the artifacts while the stack runs, ``docker compose run server``
(``--pull never``: never a build, whose output would land on stdout) while it is stopped, and
``docker compose run stackctl`` (the auth image) for the users and secrets. Nothing is written
into a container's file system outside its volumes.

Contract: :func:`agent` yields the agent's process; when the agent fails, BundleError carries
its last stderr line (its own reason, not the broken stream it left behind). :func:`answer`
takes the agent's JSON answer from its stdout's last JSON line. :class:`Progress` writes only
to a terminal.
"""

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from mlflowstack import commands
from mlflowstack.audit import printable
from mlflowstack.files import BundleError

AGENT = Path(__file__).with_name("volumeagent.py")


class Progress:
    """One updating line on stderr, only when stderr is a terminal and not ``--quiet``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def update(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _agent_command(args, place: str, words: tuple[str, ...], script: Path) -> list[str]:
    """``python -c SCRIPT WORDS...`` where ``place`` says: ``server``, the running server
    (``exec``); ``server-run``, a one-off container of the server's image with its volumes
    (the server stopped; commands.one_off_command: never built there); ``files``, the auth
    image's stackctl service (users, secrets); ``postgres``, the running bundled PostgreSQL,
    where ``words`` are the command itself (its image has no Python: pgstore.py)."""
    if place == "postgres":
        return commands.compose_command(args, "exec", "-T", "postgres", *words)
    if place == "server":
        where = ["exec", "-T", "server", "python"]
    elif place == "server-run":
        run_words = ("--entrypoint", "python", "server", "-c", script.read_text(), *words)
        return commands.one_off_command(args, *run_words)
    else:
        commands._build_auth_image_if_missing(args)
        where = ["run", "--rm", "-T", "--no-deps", "--entrypoint", "python", "stackctl"]
    return commands.compose_command(args, *where, "-c", script.read_text(), *words)


@contextlib.contextmanager
def agent(args, place: str, *words: str, script: Path = AGENT):
    """The agent as a process (stdin, stdout pipes; ``words[0]`` names what it does); its
    failure raises BundleError with its last stderr line."""
    mode = words[0]
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                _agent_command(args, place, words, script),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        except FileNotFoundError:
            raise BundleError("docker is not installed here") from None
        try:
            yield process
        except BaseException:
            # The agent's own reason beats what its early end did to us (a broken stream).
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.returncode is None:
                process.kill()
                process.wait()
            elif process.returncode:
                raise BundleError(_agent_failure(mode, process, errors)) from None
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        rest = process.stdout.read()
        if process.wait():
            raise BundleError(_agent_failure(mode, process, errors))
        process.stdout.close()
        process.rest = rest


def _agent_failure(mode: str, process, errors) -> str:
    errors.seek(0)
    lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    # printable(): the line may quote a name a client chose (an artifact's, a run's).
    reason = printable(lines[-1]) if lines else f"exit status {process.returncode}"
    return f"{mode} in the stack failed: {reason[:300]}"


def agent_json(args, place: str, *words: str, script: Path = AGENT) -> dict:
    """Run the agent with nothing on stdin; its JSON answer."""
    with agent(args, place, *words, script=script) as process:
        process.stdin.close()
    return answer(process.rest)


def answer(stdout: bytes) -> dict:
    """The agent's JSON answer: its last line (anything docker printed before it is not)."""
    lines = [line for line in stdout.splitlines() if line.startswith(b"{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BundleError(f"the agent in the stack gave no answer: {stdout[-200:]!r}") from None


def require_running(args) -> None:
    command = commands.compose_command(args, "ps", "--status", "running", "--quiet", "server")
    try:
        running = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BundleError("docker is not installed here") from None
    if running.returncode or not running.stdout.strip():
        raise BundleError("the stack is not running: docker compose up -d --wait, then again")


def project_name(args) -> str:
    command = commands.compose_command(args, "config", "--format", "json")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise BundleError("docker compose config failed: " + result.stderr.strip()[-300:])
    return json.loads(result.stdout)["name"]


class Hasher(io.RawIOBase):
    """A reader that hashes what passes through (the host checks the stream it got)."""

    def __init__(self, source):
        self.source, self.digest, self.count = source, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data


def copy_member(out: tarfile.TarFile, name: str, size: int, source) -> str:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    reader = Hasher(source)
    out.addfile(info, reader)
    return reader.digest.hexdigest()


def print_report(args, report: dict, line: str) -> None:
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        print(line, file=sys.stderr)


def compose_checked(args, *compose_args: str) -> None:
    command = commands.compose_command(args, *compose_args)
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if result.returncode:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = printable(lines[-1]) if lines else f"exit status {result.returncode}"
        raise BundleError(f"docker compose {compose_args[0]} failed: {reason[:300]}")
