"""Issue 14 on the ship path's VM (after test_ship_path.py, on the same VM; run alone, it
converges the VM first): the scheduled backup that site.yml installs (a systemd timer and a
sandboxed service writing chains of archives, with retention), ansible/backup-fetch.yml
(archives copied to the control machine) and ansible/restore.yml (an archive from the control
machine restored onto the VM's stack after its data changed).

The inventory (conftest.ship_site) sets chains of 2 archives and keeps 2 chains, so five
backups leave chains [3, 4] and [5]: the first chain is deleted whole.
"""

import time
from pathlib import Path

import pytest
import requests
from vmtools import PROJECT, assert_converged, first_inventory, record_time

ROLE = "ship"
UNIT = f"{PROJECT}-backup"
BACKUP_DIR = f"/var/backups/{PROJECT}"
NEW_EXPERIMENT = "made-after-the-backup"


@pytest.fixture(scope="module")
def vm(ship_vm, ship_site, ship_people, ship_state):
    """The ship path's VM, converged (by test_ship_path.py, or here when run alone)."""
    if "converged" not in ship_state:
        first_inventory(ship_site, ship_people)
        converge = ship_site.converge("first")
        assert_converged(converge, ship_site.host, "first converge")
        ship_state["converged"] = True
    return ship_vm


@pytest.fixture(scope="module")
def site(ship_site):
    return ship_site


@pytest.fixture(scope="module")
def alice(ship_people):
    alice = ship_people["alice"]
    return (alice["name"], alice["password"])


@pytest.fixture(scope="module")
def progress():
    """What earlier steps of this module made, for later steps."""
    return {}


def need(progress, *keys):
    missing = [key for key in keys if key not in progress]
    if missing:
        pytest.skip(f"an earlier step did not get as far as {', '.join(missing)}")
    return [progress[key] for key in keys]


def archives_on_vm(vm) -> dict[str, tuple[str, str, int]]:
    """chain/archive -> (mode, owner, size) of every archive in the backup directory."""
    out = vm.ssh(f"find {BACKUP_DIR} -name '*.tar' -printf '%P %m %u %s\\n'").stdout
    return {
        path: (mode, owner, int(size))
        for path, mode, owner, size in (line.split() for line in out.splitlines())
    }


def chains(listing) -> list[list[str]]:
    """The archive names of each chain, oldest chain first."""
    by_chain: dict[str, list[str]] = {}
    for path in sorted(listing):
        chain, name = path.split("/")
        by_chain.setdefault(chain, []).append(name)
    return [by_chain[chain] for chain in sorted(by_chain)]


def start_backup(vm) -> float:
    """One run of the backup service, as the timer starts it; its duration."""
    begin = time.monotonic()
    result = vm.ssh(f"systemctl start {UNIT}.service", check=False, timeout=600)
    seconds = time.monotonic() - begin
    journal = vm.ssh(f"journalctl -u {UNIT}.service -n 30 --no-pager -o cat", check=False).stdout
    assert result.returncode == 0, f"{UNIT}.service failed:\n{result.stderr}\n{journal}"
    return seconds


def experiment_names(vm, auth) -> set[str]:
    answer = requests.get(
        vm.url + "/api/2.0/mlflow/experiments/search", params={"max_results": 1000},
        auth=auth, timeout=30,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    return {e["name"] for e in answer.json().get("experiments", [])}


def test_10_timer_is_enabled_and_scheduled(vm, progress):
    assert vm.ssh(f"systemctl is-enabled {UNIT}.timer").stdout.strip() == "enabled"
    assert vm.ssh(f"systemctl is-active {UNIT}.timer").stdout.strip() == "active"
    next_run = vm.ssh(
        f"systemctl show {UNIT}.timer --property=NextElapseUSecRealtime --value"
    ).stdout.strip()
    assert next_run and next_run != "n/a", f"{UNIT}.timer has no next run"
    calendar = vm.ssh(f"systemctl show {UNIT}.timer --property=TimersCalendar --value").stdout
    assert "03:15:00" in calendar, calendar
    assert vm.ssh(f"stat -c '%a %U' {BACKUP_DIR}").stdout.split() == ["700", "root"]
    exposure = vm.ssh(f"systemd-analyze security {UNIT}.service --no-pager | tail -1", check=False)
    print(f"[vm] systemd-analyze security {UNIT}.service: {exposure.stdout.strip()}")
    progress["timer"] = True


def test_11_backup_service_writes_one_archive_mode_0600(vm, progress):
    seconds = start_backup(vm)
    record_time(f"{ROLE}: backup service, first (full) backup", seconds)
    listing = archives_on_vm(vm)
    assert len(listing) == 1, listing
    ((path, (mode, owner, size)),) = listing.items()
    assert (mode, owner) == ("600", "root") and size > 0, listing
    chain = path.split("/")[0]
    assert vm.ssh(f"stat -c '%a %U' {BACKUP_DIR}/{chain}").stdout.split() == ["700", "root"]
    journal = vm.ssh(f"journalctl -u {UNIT}.service -n 20 --no-pager -o cat").stdout
    assert f"wrote {path}" in journal and "full" in journal, journal
    progress["first"] = path


def test_12_retention_deletes_the_oldest_chain_whole(vm, progress):
    (first,) = need(progress, "first")
    durations = [start_backup(vm) for _ in range(4)]
    record_time(f"{ROLE}: backup service, 4 more backups (each)", max(durations))
    listing = archives_on_vm(vm)
    assert [len(chain) for chain in chains(listing)] == [2, 1], listing
    assert first not in listing, "the first chain was kept beyond mlflow_backup_keep=2"
    assert {(mode, owner) for mode, owner, _ in listing.values()} == {("600", "root")}
    journal = vm.ssh(f"journalctl -u {UNIT}.service -n 40 --no-pager -o cat").stdout
    assert f"removed {first.split('/')[0]} (2 archives)" in journal, journal
    progress["retained"] = listing


def test_13_fetch_copies_every_archive_to_the_control_machine(vm, site, progress):
    need(progress, "retained")
    converge = site.converge("backup-fetch", playbook="ansible/backup-fetch.yml")
    record_time(f"{ROLE}: backup-fetch.yml (a backup, then 4 archives)", converge.seconds)
    recap = assert_converged(converge, site.host, "backup-fetch.yml")
    assert recap["changed"] > 0
    listing = archives_on_vm(vm)
    assert [len(chain) for chain in chains(listing)] == [2, 2], listing
    fetched = Path(site.extra_vars["mlflow_backup_copy_to"]) / site.host
    here = {str(path.relative_to(fetched)): path.stat() for path in sorted(fetched.rglob("*.tar"))}
    assert {path: st.st_size for path, st in here.items()} == {
        path: size for path, (_, _, size) in listing.items()
    }
    assert {oct(st.st_mode & 0o777) for st in here.values()} == {"0o600"}
    for folder in [fetched, *{path.parent for path in fetched.rglob("*.tar")}]:
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
    assert vm.ssh("ls /var/tmp | grep -c mlflow-backup-fetch", check=False).stdout.strip() == "0"

    again = site.converge(
        "backup-fetch-again", "-e", "mlflow_backup_fetch_now=false",
        playbook="ansible/backup-fetch.yml",
    )  # fmt: skip
    recap = assert_converged(again, site.host, "backup-fetch.yml again")
    assert recap["changed"] == 0, f"{again.changed_tasks()}\n{again.tail()}"
    progress["fetched"] = max(fetched.rglob("*.tar"))


def test_14_restore_from_the_control_machine_after_the_data_changed(
    vm, site, alice, ship_people, ship_state, progress
):
    (newest,) = need(progress, "fetched")
    restore = [
        "--limit", site.host, "-e", f"mlflow_backup_restore_archive={newest}",
        "-e", "mlflow_backup_restore_from=controller",
    ]  # fmt: skip
    requests.post(
        vm.url + "/api/2.0/mlflow/experiments/create", json={"name": NEW_EXPERIMENT},
        auth=alice, timeout=30,
    ).raise_for_status()  # fmt: skip
    assert NEW_EXPERIMENT in experiment_names(vm, alice)

    # Without mlflow_backup_restore_force the stack, which holds data, is refused as it is.
    refused = site.converge("restore-refused", *restore, playbook="ansible/restore.yml")
    assert refused.returncode != 0, refused.tail()
    assert "mlflow_backup_restore_force=true" in refused.output, refused.tail()
    assert NEW_EXPERIMENT in experiment_names(vm, alice)

    converge = site.converge(
        "restore", *restore, "-e", "mlflow_backup_restore_force=true",
        playbook="ansible/restore.yml",
    )  # fmt: skip
    record_time(f"{ROLE}: restore.yml from the control machine (chain of 2)", converge.seconds)
    recap = assert_converged(converge, site.host, "restore.yml")
    assert recap["changed"] > 0
    assert vm.healthz() == 200
    assert NEW_EXPERIMENT not in experiment_names(vm, alice), "the restore left newer data"
    if "run_id" in ship_state:
        # The artifact logged before the chain's first (full) archive comes back from it,
        # through the incremental archive restored.
        from test_ship_path import check_runs_intact

        check_runs_intact(vm, ship_people, ship_state)
    assert vm.ssh(f"test -e {BACKUP_DIR}/restore-upload", check=False).returncode != 0

    again = site.converge(
        "restore-again", *restore, "-e", "mlflow_backup_restore_force=true",
        playbook="ansible/restore.yml",
    )  # fmt: skip
    recap = assert_converged(again, site.host, "restore.yml again")
    assert recap["changed"] == 0, f"{again.changed_tasks()}\n{again.tail()}"
    # The YAML callback wraps long messages: compare with the lines joined.
    assert "restore.yml: nothing to do" in " ".join(again.output.split())
    progress["restored"] = True


def test_15_restore_of_a_missing_archive_on_the_vm_fails_clearly(vm, site):
    converge = site.converge(
        "restore-missing", "--limit", site.host,
        "-e", "mlflow_backup_restore_archive=chain-20000101T000000Z/none.tar",
        playbook="ansible/restore.yml",
    )  # fmt: skip
    assert converge.returncode != 0
    assert f"{BACKUP_DIR}/chain-20000101T000000Z/none.tar: no such file" in converge.output, (
        converge.tail()
    )
    assert converge.host(site.host).get("changed", 0) == 0


def test_16_converge_after_the_restore_changes_nothing(vm, site, progress):
    need(progress, "restored")
    converge = site.converge("after-restore")
    record_time(f"{ROLE}: converge after the restore", converge.seconds)
    recap = assert_converged(converge, site.host, "converge after the restore")
    assert recap["changed"] == 0, f"{converge.changed_tasks()}\n{converge.tail()}"
