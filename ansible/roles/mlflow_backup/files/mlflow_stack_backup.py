#!/usr/bin/python3
"""The MLflow stack's scheduled backup with retention. The mlflow_backup role installs it as
/usr/local/sbin/mlflow-stack-backup; <project>-backup.service runs it:

    mlflow-stack-backup --stackctl /opt/mlflow-stack/scripts/stackctl \\
        --dir /var/backups/mlflow-stack --chain-length 7 --keep 4

Contract:

- Archives go into chains, directories ``DIR/chain-<UTC time>/``. ``stackctl backup`` makes an
  archive incremental after the newest one in its own directory, so a chain's first archive is
  a full backup and a chain needs nothing outside itself. Once the newest chain holds
  ``--chain-length`` archives, the next backup starts a new chain.
- Only after a backup succeeded are the chains beyond the newest ``--keep`` (the one just
  written to counts) deleted, each whole: a failing backup never removes a good one, and no
  kept archive names a deleted one.
- A failed backup leaves no new empty chain; the exit status is stackctl's (its stderr passes
  through). A bad argument or a DIR that is not a directory: one line on stderr, exit 2.
- One run at a time per DIR (flock on ``DIR/.lock``): a second run waits for the first.
- Success prints one line: the archive written and the chains removed.
"""

import argparse
import datetime
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHAIN = re.compile(r"chain-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?")


def chains(directory: Path) -> list[Path]:
    """The chain directories in ``directory``, oldest first (their names sort by time)."""
    found = [p for p in directory.iterdir() if CHAIN.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (p.name[:22], int(p.name[23:] or 0)))


def archives(chain: Path) -> list[Path]:
    """The finished archives of a chain (stackctl's temporary files start with a dot)."""
    return sorted(
        p
        for p in chain.iterdir()
        if p.suffix == ".tar" and not p.name.startswith(".") and p.is_file()
    )


def chain_for_next(directory: Path, chain_length: int, now: datetime.datetime) -> tuple[Path, bool]:
    """The chain the next backup goes into, and whether it is new (not created yet)."""
    existing = chains(directory)
    if existing and len(archives(existing[-1])) < chain_length:
        return existing[-1], False
    name = now.strftime("chain-%Y%m%dT%H%M%SZ")
    candidate, number = directory / name, 1
    while candidate.exists():
        number += 1
        candidate = directory / f"{name}-{number}"
    return candidate, True


def prune(directory: Path, keep: int) -> list[tuple[str, int]]:
    """Delete every chain but the newest ``keep``, each whole; (name, archives) of each."""
    removed = []
    for chain in chains(directory)[:-keep]:
        count = len(archives(chain))
        shutil.rmtree(chain)
        removed.append((chain.name, count))
    return removed


def run(stackctl: Path, directory: Path, chain_length: int, keep: int) -> int:
    chain, new = chain_for_next(directory, chain_length, datetime.datetime.now(datetime.UTC))
    if new:
        chain.mkdir(mode=0o700)
    before = set(archives(chain))
    command = [str(stackctl), "backup", "--output", str(chain), "--quiet"]
    status = subprocess.run(command, cwd=stackctl.parent.parent, check=False).returncode
    written = sorted(set(archives(chain)) - before)
    if status != 0 or not written:
        if new and not any(chain.iterdir()):
            chain.rmdir()
        if status == 0:
            print(f"mlflow-stack-backup: stackctl wrote no archive in {chain}", file=sys.stderr)
            return 1
        return status
    removed = prune(directory, keep)
    count = len(archives(chain))
    line = (
        f"mlflow-stack-backup: wrote {chain.name}/{written[-1].name} "
        f"({written[-1].stat().st_size} bytes; archive {count} of at most {chain_length} in "
        f"its chain, {'full' if count == 1 else 'incremental'})"
    )
    if removed:
        line += "; removed " + ", ".join(f"{name} ({n} archives)" for name, n in removed)
    print(line)
    return 0


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mlflow-stack-backup", description=__doc__.split("\n")[0])
    parser.add_argument("--stackctl", type=Path, required=True, help="the bundle's stackctl")
    parser.add_argument("--dir", type=Path, required=True, help="where the chains are")
    parser.add_argument("--chain-length", type=positive, required=True, metavar="N")
    parser.add_argument("--keep", type=positive, required=True, metavar="N", help="chains kept")
    args = parser.parse_args(argv)
    if not args.dir.is_dir() or args.dir.is_symlink():
        print(f"mlflow-stack-backup: {args.dir}: not a directory", file=sys.stderr)
        return 2
    if not os.access(args.stackctl, os.X_OK):
        print(f"mlflow-stack-backup: {args.stackctl}: not an executable", file=sys.stderr)
        return 2
    descriptor = os.open(args.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        return run(args.stackctl, args.dir, args.chain_length, args.keep)
    finally:
        os.close(descriptor)


if __name__ == "__main__":
    sys.exit(main())
