"""The VM tier: ansible/site.yml, run for real against a simulated Debian 13 VM.

The "VM" is a container of tests/vm/Dockerfile (systemd as PID 1, sshd, sudo, python3, nothing
of this project's) booted with the flags that run systemd and a nested Docker engine here
(VM_RUN_FLAGS). The test makes an SSH key pair and hands the public key to the container at
start; Ansible reaches the VM over SSH on a 127.0.0.1 port, exactly as it would a real one.

Names: containers and volumes start with ``vmtest-`` and a run id (two runs on one engine do
not collide); ports are taken from 18800-18899 on 127.0.0.1 only. Everything started here is
removed at the end of its module (the VM, its /var/lib/docker volume) or of the session (the
ship path's images, which the playbook builds on this machine under VM_TEST_PROJECT). The VM
image itself (``vmtest-vm``) is kept: it is rebuilt from the build cache in a second.

The ship path's VM is the session's (ship_vm and its site, people and state): test_ship_path.py
converges it, test_ship_tls.py turns HTTPS on and off again, test_ship_backup.py then backs it
up and restores it; it is removed before the build path's VM starts. The build path (a second
VM builds the images itself) runs only with VM_TEST_BUILD=1, as .ci/run sets it. Every
converge's output is kept in test-output/vm/, and the time of each phase is printed at the end
of the run.
"""

import secrets
import shutil
import time
from pathlib import Path

import pytest
from vmtools import (
    BASE_IMAGE,
    BIN,
    HERE,
    PROJECT,
    ROOT,
    SHIP_VMS,
    TIMINGS,
    VM,
    VM_IMAGE,
    Site,
    make_token_secret,
    record_time,
    run,
)

# The order the modules run in: each ship module needs the one before; the build path's VM
# starts after the ship path's is gone.
MODULE_ORDER = [
    "test_ship_path.py",
    "test_ship_tls.py",
    "test_ship_backup.py",
    "test_build_path.py",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            # `stack` too: the unit tier (-m "not stack") needs no Docker and stays fast.
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.stack)

    def rank(item):
        name = Path(str(item.fspath)).name
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.section("VM end-to-end: time of each phase")
    for phase, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{seconds:8.1f} s  {phase}")


@pytest.fixture(scope="session")
def vm_tools():
    """The control machine's tools; missing ones fail here with what to do."""
    problems = [
        f"{BIN / tool} is missing (pip install -r requirements-dev.txt)"
        for tool in ("ansible-playbook", "ansible-vault")
        if not (BIN / tool).exists()
    ]
    if not shutil.which("ssh"):
        problems.append("ssh is missing (apt-get install openssh-client)")
    if not (ROOT / "ansible" / "site.yml").exists():
        problems.append("ansible/site.yml does not exist")
    if run(["docker", "image", "inspect", BASE_IMAGE], check=False).returncode:
        problems.append(f"no {BASE_IMAGE} image (../shared/docker-sandbox/up builds it)")
    if problems:
        pytest.fail("the VM tests cannot run:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def vm_image(vm_tools):
    start = time.monotonic()
    run(
        ["docker", "build", "--quiet", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", VM_IMAGE,
         str(HERE)],
        timeout=900,
    )  # fmt: skip
    record_time("VM image build (docker build tests/vm)", time.monotonic() - start)
    return VM_IMAGE


@pytest.fixture(scope="session")
def vm_workdir(tmp_path_factory):
    """Keys, inventories, vault files and archives of this session: removed at its end."""
    folder = tmp_path_factory.mktemp("vm")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_key(vm_workdir) -> Path:
    key = vm_workdir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmtest", "-f", str(key)])
    return key


@pytest.fixture(scope="session")
def ship_images_cleanup():
    """The images the playbook builds on this machine in ship mode, removed at the end."""
    yield
    names = [f"{PROJECT}-{service}" for service in ("auth", "server", "nginx")]
    run(["docker", "image", "rm", *names], check=False)


@pytest.fixture(scope="session")
def make_vm(vm_image, ssh_key):
    """Start a fresh VM (its boot timed); every VM is removed at the latest at session end."""
    started: list[VM] = []

    def make(role: str) -> VM:
        vm = VM(role, ssh_key)
        started.append(vm)
        begin = time.monotonic()
        vm.start()
        record_time(f"{role}: boot the fresh VM (systemd, sshd)", time.monotonic() - begin)
        return vm

    yield make
    for vm in started:
        vm.remove()


# --- the ship path's VM, shared by test_ship_path.py and test_ship_backup.py ------------------

SHIP = "ship"


@pytest.fixture(scope="session")
def ship_vm(make_vm, ship_images_cleanup):
    vm = make_vm(SHIP)
    SHIP_VMS.append(vm)
    yield vm
    vm.remove()


@pytest.fixture(scope="session")
def ship_site(ship_vm, vm_workdir):
    """The inventory of the ship path's VM. Backups: chains of 2 archives, 2 chains kept, so
    that a few runs show the retention; backup-fetch.yml copies to the session's folder."""
    folder = vm_workdir / SHIP
    folder.mkdir()
    return Site(
        ship_vm, folder, images="ship", mlflow_backup_chain_length=2, mlflow_backup_keep=2,
        mlflow_backup_copy_to=str(folder / "fetched"),
    )  # fmt: skip


def _password() -> str:
    return secrets.token_urlsafe(18)


@pytest.fixture(scope="session")
def ship_people():
    """The inventory's users and token, and what each step changes."""
    return {
        "alice": {"name": "alice", "password": _password(), "role": "editor"},
        "victor": {"name": "victor", "password": _password(), "role": "viewer"},
        "bob": {"name": "bob", "password": _password(), "role": "editor"},
        "dave": {"name": "dave", "password": _password(), "role": "editor"},
        "token": {"name": "ci-nightly", "secret": make_token_secret(), "role": "editor"},
    }


@pytest.fixture(scope="session")
def ship_state():
    """What earlier steps made, for later steps (a step skips when what it needs is missing)."""
    return {}
