"""The mlflow_backup role without a VM: its backup program (chains and retention, with a
stand-in for stackctl), its unit files as rendered, and the refusals of its preflight and of
restore.yml. tests/vm/test_ship_backup.py runs it all for real on the simulated VM."""

import datetime
import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest
from test_ansible_roles import LOCAL, _playbook

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "ansible" / "roles" / "mlflow_backup"
NOW = datetime.datetime(2026, 11, 28, 3, 15, 7, tzinfo=datetime.UTC)

_spec = importlib.util.spec_from_file_location(
    "mlflow_stack_backup", ROLE / "files" / "mlflow_stack_backup.py"
)
program = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(program)

# Stands in for scripts/stackctl: `backup --output DIR --quiet` writes one archive (0600) named
# by a counter, or fails when the file FAIL exists beside it.
FAKE_STACKCTL = """#!{python}
import os, sys
from pathlib import Path
here = Path(__file__).parent
assert sys.argv[1:3] == ["backup", "--output"] and sys.argv[4:] == ["--quiet"], sys.argv
if (here / "FAIL").exists():
    sys.exit("stackctl: the stack is not running")
counter = here / "counter"
number = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(number))
path = Path(sys.argv[3]) / f"mlflow-backup-{{number:04d}}.tar"
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"x" * number)
os.close(fd)
"""


@pytest.fixture
def stackctl(tmp_path) -> Path:
    scripts = tmp_path / "bundle" / "scripts"
    scripts.mkdir(parents=True)
    path = scripts / "stackctl"
    path.write_text(FAKE_STACKCTL.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture
def backups(tmp_path) -> Path:
    path = tmp_path / "backups"
    path.mkdir(mode=0o700)
    return path


def _layout(directory: Path) -> dict[str, list[str]]:
    return {c.name: [a.name for a in program.archives(c)] for c in program.chains(directory)}


def _run(stackctl, backups, chain_length, keep) -> int:
    return program.main(
        ["--stackctl", str(stackctl), "--dir", str(backups), "--chain-length", str(chain_length),
         "--keep", str(keep)]
    )  # fmt: skip


def test_main_repeated_starts_a_chain_every_n_archives_and_keeps_the_newest_chains(
    stackctl, backups, capsys
):
    for _ in range(5):
        assert _run(stackctl, backups, chain_length=2, keep=2) == 0
    layout = _layout(backups)
    assert list(layout.values()) == [
        ["mlflow-backup-0003.tar", "mlflow-backup-0004.tar"],
        ["mlflow-backup-0005.tar"],
    ]
    assert all(stat.S_IMODE(c.stat().st_mode) == 0o700 for c in program.chains(backups))
    lines = capsys.readouterr().out.splitlines()
    assert "archive 1 of at most 2 in its chain, full" in lines[-1]
    assert "removed chain-" in lines[-1] and "(2 archives)" in lines[-1]
    assert "incremental" in lines[1] and "removed" not in lines[1]


def test_main_failed_backup_removes_nothing_and_leaves_no_empty_chain(stackctl, backups):
    for _ in range(2):
        assert _run(stackctl, backups, chain_length=1, keep=1) == 0
    before = _layout(backups)
    (stackctl.parent / "FAIL").touch()
    assert _run(stackctl, backups, chain_length=1, keep=1) == 1
    assert _layout(backups) == before, "a failed backup changed the kept chains"
    assert len(before) == 1


def test_main_missing_directory_exits_2_with_one_line(stackctl, tmp_path, capsys):
    assert _run(stackctl, tmp_path / "absent", chain_length=7, keep=4) == 2
    assert capsys.readouterr().err.strip().endswith("not a directory")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_main_bad_numbers_exit_2(stackctl, backups, value):
    with pytest.raises(SystemExit) as exited:
        _run(stackctl, backups, chain_length=value, keep=1)
    assert exited.value.code == 2


def test_chain_for_next_same_second_gets_a_new_name(backups):
    first, new = program.chain_for_next(backups, 1, NOW)
    assert (first.name, new) == ("chain-20261128T031507Z", True)
    first.mkdir()
    (first / "a.tar").touch()
    second, new = program.chain_for_next(backups, 1, NOW)
    assert (second.name, new) == ("chain-20261128T031507Z-2", True)
    second.mkdir()
    assert program.chains(backups) == [first, second]
    # An empty newest chain (a crash before its first archive) is used, not left behind.
    assert program.chain_for_next(backups, 1, NOW) == (second, False)


def test_archives_ignore_temporary_and_foreign_files(backups):
    chain = backups / "chain-20261128T031507Z"
    chain.mkdir()
    for name in ("mlflow-backup-1.tar", ".mlflow-backup-2.tar.x1y2.tmp", "notes.txt"):
        (chain / name).touch()
    (backups / "restore-upload").mkdir()
    assert [a.name for a in program.archives(chain)] == ["mlflow-backup-1.tar"]
    assert program.chains(backups) == [chain]


# --- the role, rendered and checked by ansible-playbook (local connection) -----------------


def _role_play(tasks_from: str, extra_tasks=()) -> list:
    return [
        {
            "name": "mlflow_backup",
            "hosts": "mlflow_servers",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Role",
                    "ansible.builtin.include_role": {
                        "name": "mlflow_backup",
                        "tasks_from": tasks_from,
                        "public": True,  # the role's variables for the tasks after it
                    },
                },
                *extra_tasks,
            ],
        }
    ]


def _inventory(**variables) -> dict:
    return {"mlflow_servers": {"hosts": {"here": LOCAL}, "vars": variables}}


def test_units_render_schedule_sandbox_and_command(tmp_path):
    render = [
        {
            "name": f"Render {name}",
            "ansible.builtin.template": {
                "src": str(ROLE / "templates" / f"backup.{name}.j2"),
                "dest": str(tmp_path / f"unit.{name}"),
                "mode": "0600",
            },
        }
        for name in ("service", "timer")
    ]
    inventory = _inventory(
        mlflow_stack_project="mlflow-a", mlflow_backup_schedule="Sun *-*-* 02:00",
        mlflow_backup_keep=3, mlflow_backup_chain_length=5,
    )  # fmt: skip
    result = _playbook(tmp_path, _role_play("preflight.yml", render), inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    service = (tmp_path / "unit.service").read_text()
    timer = (tmp_path / "unit.timer").read_text()
    assert (
        "ExecStart=/usr/local/sbin/mlflow-stack-backup --stackctl "
        "/opt/mlflow-stack/scripts/stackctl --dir /var/backups/mlflow-a --chain-length 5 "
        "--keep 3\n"
    ) in service
    for line in ("Type=oneshot", "Environment=COMPOSE_PROJECT_NAME=mlflow-a",
                 "ReadWritePaths=/var/backups/mlflow-a", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "RestrictAddressFamilies=AF_UNIX",
                 "NoNewPrivileges=yes", "After=docker.service"):  # fmt: skip
        assert line in service, line
    for line in ("OnCalendar=Sun *-*-* 02:00\n", "RandomizedDelaySec=30min\n", "Persistent=true"):
        assert line in timer, line


def test_preflight_accepts_the_defaults(tmp_path):
    result = _playbook(tmp_path, _role_play("preflight.yml"), _inventory())
    assert result.returncode == 0, result.stdout + result.stderr


def test_preflight_names_every_bad_setting(tmp_path):
    inventory = _inventory(
        mlflow_backup_schedule="every full moon",
        mlflow_backup_randomized_delay="5 parsecs",
        mlflow_backup_keep=0,
        mlflow_backup_chain_length="seven",
        mlflow_backup_dir="/opt/mlflow-stack/backups",
    )
    result = _playbook(tmp_path, _role_play("preflight.yml"), inventory)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in (
        "mlflow_backup_keep=0: a whole number, 1 or more",
        "mlflow_backup_chain_length=seven: a whole number",
        "mlflow_backup_dir=/opt/mlflow-stack/backups: inside the bundle",
    ):
        assert expected in output, expected
    # systemd's parser, once the settings above are fixed.
    inventory["mlflow_servers"]["vars"].update(
        mlflow_backup_keep=2, mlflow_backup_chain_length=7, mlflow_backup_dir="/srv/backups"
    )
    result = _playbook(tmp_path, _role_play("preflight.yml"), inventory)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "mlflow_backup_schedule: Failed to parse calendar specification" in output
    assert "mlflow_backup_randomized_delay: Failed to parse time span" in output


def test_restore_without_an_archive_says_what_to_set(tmp_path):
    result = _playbook(tmp_path, _role_play("restore.yml"), _inventory())
    assert result.returncode != 0
    assert "mlflow_backup_restore_archive: the archive to restore" in result.stdout


def test_restore_of_a_file_that_is_not_a_backup_stops_before_any_change(tmp_path):
    fake = tmp_path / "chain-x" / "mlflow-backup-1.tar"
    fake.parent.mkdir()
    fake.write_bytes(os.urandom(2048))
    marker_dir = tmp_path / "bundle"
    inventory = _inventory(
        mlflow_backup_restore_archive=str(fake), mlflow_backup_restore_from="controller",
        mlflow_backup_stack_dir=str(marker_dir),
    )  # fmt: skip
    result = _playbook(tmp_path, _role_play("restore.yml"), inventory)
    assert result.returncode != 0
    assert "cannot be restored: " in result.stdout and "not a readable tar" in result.stdout
    assert not marker_dir.exists()


FLAGS = (
    "mlflow_backup_enabled",
    "mlflow_backup_fetch_now",
    "mlflow_backup_restore_force",
    "mlflow_backup_restore_repeat",
)


def test_role_flags_read_through_bool_so_extra_var_strings_mean_what_they_say():
    """`-e mlflow_backup_restore_force=false` is the string "false", which a bare `if` or
    `when:` takes as true (it would force a restore), and `is boolean` refuses "true": no
    task reads a flag bare."""
    import re

    for flag in FLAGS:
        bare = re.compile(
            rf"when:\s*(not\s+)?{flag}\s*$|\bif\s+(not\s+)?{flag}\s+else\b"
            rf"|{{{{\s*{flag}\s*($|}}}}|or\b|and\b)|\b(or|and)\s+{flag}\s*($|\)|}})"
            rf"|{flag}\s+is\s+(not\s+)?boolean",
            re.M,
        )
        for path in sorted((ROLE / "tasks").glob("*.yml")):
            found = bare.search(path.read_text())
            assert not found, f"{path.name}: {found[0]!r} reads {flag} without | bool"
