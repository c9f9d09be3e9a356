"""Issue 10's end-to-end test, on one fresh simulated VM, in order (each step needs the last):

0. ``--check`` on the fresh VM reports work and changes nothing;
1. converge the fresh VM with the ``ship`` path; 2. converge again: changed=0; 3. from outside:
/healthz, a user logs a run, a metric and an artifact with the real MLflow client, a wrong
password gets 401, a viewer 403 on a write, a token works; 4. change the inventory (a password,
a role, a user absent, an .env setting): each change in force within 5 s, the rest untouched,
data kept; 5. reboot the VM: the stack comes back by itself, every run intact; 7. ``--check``
on the converged VM reports no change. Then bad inventory input fails clearly, before anything
changes. (6, the build path, is test_build_path.py.)
"""

import contextlib
import json
import os
import secrets
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from vmtools import (
    assert_converged,
    first_inventory,
    record_time,
    wait_until,
)

ROLE = "ship"
EXPERIMENTS = "/api/2.0/mlflow/experiments/search"


def _password() -> str:
    return secrets.token_urlsafe(18)


# The session's ship VM (conftest.py), under this module's names.


@pytest.fixture(scope="module")
def vm(ship_vm):
    return ship_vm


@pytest.fixture(scope="module")
def site(ship_site):
    return ship_site


@pytest.fixture(scope="module")
def people(ship_people):
    return ship_people


@pytest.fixture(scope="module")
def state(ship_state):
    return ship_state


def need(state, *keys):
    missing = [key for key in keys if key not in state]
    if missing:
        pytest.skip(f"an earlier step did not get as far as {', '.join(missing)}")
    return [state[key] for key in keys]


@contextlib.contextmanager
def mlflow_as(url, username=None, password=None, token=None):
    """A real MLflow client with these credentials (set as a user would: the environment)."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
             "MLFLOW_TRACKING_TOKEN")  # fmt: skip
    saved = {name: os.environ.get(name) for name in names}
    values = dict(zip(names, (url, username, password, token), strict=True))
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield MlflowClient(tracking_uri=url)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def status(vm, auth=None, path=EXPERIMENTS, method="GET", **kwargs) -> int:
    headers = {"Authorization": auth} if isinstance(auth, str) else {}
    auth = None if headers else auth
    if method == "GET":
        kwargs.setdefault("params", {"max_results": 1})
    response = requests.request(
        method, vm.url + path, auth=auth, headers=headers, timeout=15, **kwargs
    )
    return response.status_code


def create_experiment_status(vm, auth, name) -> int:
    return status(
        vm, auth, "/api/2.0/mlflow/experiments/create", method="POST", json={"name": name}
    )


def within(seconds, vm, expected, *args, **kwargs) -> float:
    """The status becomes ``expected`` within ``seconds``; how long it took."""
    seen = []

    def check():
        seen.append(status(vm, *args, **kwargs))
        return seen[-1] == expected

    try:
        return wait_until(check, seconds, what=f"status {expected}")[1]
    except AssertionError:
        raise AssertionError(f"wanted {expected} within {seconds} s, last got {seen[-1]}") from None


def check_runs_intact(vm, people, state):
    """Every run logged so far, with its metric and artifact, read back by dave."""
    dave = people["dave"]
    with mlflow_as(vm.url, dave["name"], dave["password"]) as client:
        run = client.get_run(state["run_id"])
        assert run.data.metrics == {"loss": 0.25}
        assert run.data.params == {"lr": "0.1"}
        text = client.download_artifacts(state["run_id"], "notes/hello.txt", state["download"])
        assert Path(text).read_text() == state["artifact_text"]
        token_run = client.get_run(state["token_run_id"])
        assert token_run.data.metrics == {"accuracy": 0.9}
        found = client.search_runs([state["experiment_id"]])
        assert {r.info.run_id for r in found} == {state["run_id"], state["token_run_id"]}


# --- 0. check mode on the fresh VM ----------------------------------------------------------


def test_00_check_mode_on_the_fresh_vm_changes_nothing(vm, site, people):
    """What a platform engineer runs first: --check --diff reports the work and does none."""
    first_inventory(site, people)
    converge = site.converge("check-fresh", "--check", "--diff")
    record_time(f"{ROLE}: 0. --check --diff on the fresh VM", converge.seconds)
    recap = assert_converged(converge, site.host, "--check on the fresh VM")
    assert recap["changed"] > 0, "check mode on a fresh VM reports no work to do"
    assert vm.ssh("command -v docker", check=False).returncode != 0, "--check installed Docker"
    assert vm.ssh("test -e /opt/mlflow-stack", check=False).returncode != 0, "--check wrote files"


# --- 1. the fresh VM, ship path ---------------------------------------------------------------


def test_01_first_converge_ship_path(vm, site, people, state):
    first_inventory(site, people)
    assert vm.ssh("command -v docker", check=False).returncode != 0, "the fresh VM has Docker"
    converge = site.converge("first")
    record_time(f"{ROLE}: 1. first converge (fresh VM -> running stack)", converge.seconds)
    recap = assert_converged(converge, site.host, "first converge")
    assert recap["changed"] > 0, recap
    assert vm.healthz() == 200
    state["converged"] = True


# --- 2. a second run changes nothing ----------------------------------------------------------


def test_02_second_converge_changes_nothing(vm, site, state):
    need(state, "converged")
    before = vm.snapshot()
    converge = site.converge("second")
    record_time(f"{ROLE}: 2. second converge (nothing to do)", converge.seconds)
    recap = assert_converged(converge, site.host, "second converge")
    assert recap["changed"] == 0, (
        f"second converge reported changed={recap['changed']}: {converge.changed_tasks()}"
        f"\n{converge.tail()}"
    )
    assert vm.snapshot() == before


# --- 3. from outside the VM -------------------------------------------------------------------


def test_03_protected_stack_from_outside(vm, people, state, tmp_path_factory):
    need(state, "converged")
    start = time.monotonic()
    alice, victor, token = people["alice"], people["victor"], people["token"]

    assert vm.healthz() == 200
    assert status(vm) == 401
    assert status(vm, (alice["name"], "not-her-password")) == 401
    assert status(vm, (alice["name"], alice["password"])) == 200

    # A user of the inventory logs a run, a metric and an artifact with the real client.
    state["artifact_text"] = f"logged through the VM's stack {secrets.token_hex(4)}\n"
    with mlflow_as(vm.url, alice["name"], alice["password"]) as client:
        experiment_id = client.create_experiment("vm-e2e")
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "lr", "0.1")
        client.log_metric(run.info.run_id, "loss", 0.25)
        client.log_text(run.info.run_id, state["artifact_text"], "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).info.user_id == "alice"
    state["experiment_id"], state["run_id"] = experiment_id, run.info.run_id
    state["download"] = str(tmp_path_factory.mktemp("downloads"))

    # A viewer reads, and gets 403 on a write.
    assert status(vm, (victor["name"], victor["password"])) == 200
    assert create_experiment_status(vm, (victor["name"], victor["password"]), "by-viewer") == 403
    with mlflow_as(vm.url, victor["name"], victor["password"]) as client:
        with pytest.raises(MlflowException) as refused:
            client.create_experiment("by-viewer-client")
        assert "403" in str(refused.value) or "PERMISSION_DENIED" in str(refused.value)

    # The inventory's token works as MLFLOW_TRACKING_TOKEN.
    with mlflow_as(vm.url, token=token["secret"]) as client:
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "accuracy", 0.9)
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).info.user_id == token["name"]
    state["token_run_id"] = run.info.run_id
    assert status(vm, "Bearer mlst_" + "x" * 43) == 401

    check_runs_intact(vm, people, state)
    record_time(f"{ROLE}: 3. checks from outside (client, 401, 403, token)",
                time.monotonic() - start)  # fmt: skip


# --- 4. the inventory changes -----------------------------------------------------------------


def test_04_inventory_changes_in_force_within_5_s(vm, site, people, state):
    need(state, "converged", "run_id")
    alice, victor, bob, dave = (people[n] for n in ("alice", "victor", "bob", "dave"))
    big_body = json.dumps({"run_id": state["run_id"], "tags": [{"key": "k", "value": "a" * 2**21}]})

    def big_status(auth):
        """A 2 MiB JSON body: under the default REQUEST_BODY_LIMIT (32m), over 1m."""
        return requests.post(
            vm.url + "/api/2.0/mlflow/runs/log-batch", auth=auth, data=big_body, timeout=30,
            headers={"Content-Type": "application/json"},
        ).status_code  # fmt: skip

    dave_auth = (dave["name"], dave["password"])
    assert big_status(dave_auth) != 413, "a 2 MiB body is refused before REQUEST_BODY_LIMIT=1m"
    users_before = vm.users_files()
    auth_before = vm.container_id("auth")

    old_alice_password = alice["password"]
    alice["password"] = _password()
    victor["role"] = "editor"
    bob_password = bob.pop("password")
    bob["state"] = "absent"
    site.write([alice, victor, bob, dave], [people["token"]], env={"REQUEST_BODY_LIMIT": "1m"})
    converge = site.converge("changes")
    record_time(f"{ROLE}: 4. converge with a changed inventory", converge.seconds)
    recap = assert_converged(converge, site.host, "converge with changes")
    assert recap["changed"] > 0

    # Each change in force within 5 s of the playbook's end.
    took = {
        "alice's old password refused": within(5, vm, 401, (alice["name"], old_alice_password)),
        "alice's new password accepted": within(5, vm, 200, (alice["name"], alice["password"])),
        "bob (absent) refused": within(5, vm, 401, (bob["name"], bob_password)),
    }
    _, took["victor (now editor) may write"] = wait_until(
        lambda: (
            create_experiment_status(vm, (victor["name"], victor["password"]), "by-victor") == 200
        ),
        5,
        what="victor's write as editor",
    )
    _, took["REQUEST_BODY_LIMIT=1m refuses 2 MiB"] = wait_until(
        lambda: big_status(dave_auth) == 413, 5, what="413 for 2 MiB with REQUEST_BODY_LIMIT=1m"
    )
    for what, seconds in took.items():
        print(f"[vm] {what}: in force after {seconds:.2f} s")
    assert "REQUEST_BODY_LIMIT=1m" in vm.ssh("cat /opt/mlflow-stack/.env").stdout

    # The rest untouched: dave, the first admin and the token keep their lines; the gate (whose
    # settings did not change) was not recreated; the data is kept.
    users_after = vm.users_files()
    for line in users_before.splitlines():
        if line.startswith(("dave:", "admin:", "#role dave", "#role admin", "==")) or (
            '"ci-nightly"' in line
        ):
            assert line in users_after.splitlines(), f"changed: {line}"
    assert not any(line.startswith("bob:") for line in users_after.splitlines())
    assert vm.container_id("auth") == auth_before, "auth was recreated, its settings did not change"
    assert status(vm, dave_auth) == 200
    assert status(vm, "Bearer " + people["token"]["secret"]) == 200
    check_runs_intact(vm, people, state)
    state["changed"] = True


def test_04b_no_password_or_secret_in_the_vms_files(vm, site, state):
    """The users file holds bcrypt hashes and the tokens file SHA-256 digests: no inventory
    password or token secret is in any file of the VM's system, bundle, logs or containers'
    logs."""
    need(state, "converged")
    places = "/opt /etc /root /home /tmp /var/tmp /var/log /run /var/lib/docker/containers"
    found = vm.ssh(
        f"grep -rlF -f /dev/stdin {places} 2>/dev/null || true",
        input="\n".join(sorted(site.all_secrets)) + "\n",
    ).stdout.split()
    assert not found, f"inventory passwords or secrets in {found}"


# --- 5. a reboot ------------------------------------------------------------------------------


def test_05_stack_comes_back_after_a_reboot(vm, people, state):
    need(state, "converged", "run_id")
    started_before = vm.started_at()
    stop_start = vm.reboot()
    begin = time.monotonic()
    _, healthy = wait_until(lambda: vm.healthz() == 200, 300, interval=1, what="/healthz 200")
    record_time(f"{ROLE}: 5. reboot: docker restart of the VM", stop_start)
    record_time(f"{ROLE}: 5. reboot: from boot to /healthz 200", healthy)
    assert time.monotonic() - begin < 300
    started_after = vm.started_at()
    for service in ("auth", "server", "nginx"):
        assert started_after[service] != started_before[service], f"{service} did not restart"
    assert started_after["systemd"] != started_before["systemd"], "the VM did not boot again"
    alice = people["alice"]
    assert status(vm, (alice["name"], alice["password"])) == 200
    if "changed" in state:
        assert status(vm, ("bob", "anything")) == 401
    check_runs_intact(vm, people, state)


# --- 7. check mode ----------------------------------------------------------------------------


def test_06_check_mode_on_a_converged_vm_reports_no_change(vm, site, state):
    need(state, "converged")
    before = vm.snapshot()
    converge = site.converge("check", "--check", "--diff")
    record_time(f"{ROLE}: 7. --check --diff on the converged VM", converge.seconds)
    recap = assert_converged(converge, site.host, "--check")
    assert recap["changed"] == 0, (
        f"--check reported changed={recap['changed']}: {converge.changed_tasks()}"
        f"\n{converge.tail()}"
    )
    assert vm.snapshot() == before


# --- bad input --------------------------------------------------------------------------------

BAD_INPUTS = {
    "user without a password": (
        lambda users, env: users.append({"name": "eve", "role": "editor"}),
        ["eve", "password"],
    ),
    "unknown role": (
        lambda users, env: users.append(
            {"name": "eve", "password": "eves-password-1", "role": "superuser"}
        ),
        ["eve", "superuser"],
    ),
    "port not a number": (
        lambda users, env: env.update(HTTP_PORT="80a"),
        ["HTTP_PORT", "80a"],
    ),
    "PUBLIC_HOSTNAME with a scheme": (
        lambda users, env: env.update(PUBLIC_HOSTNAME="http://mlflow.example.com"),
        ["PUBLIC_HOSTNAME", "http://mlflow.example.com", "scheme"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_07_bad_input_fails_clearly_before_any_change(vm, site, state, case):
    need(state, "converged")
    good = (list(site.users), list(site.tokens), dict(site.env), site.exclusive)
    change, words = BAD_INPUTS[case]
    users = [dict(user) for user in site.users]
    env = dict(site.env)
    change(users, env)
    before = vm.snapshot()
    site.write(users, list(site.tokens), env=env, exclusive=site.exclusive)
    try:
        converge = site.converge(f"bad-{case.replace(' ', '-')}")
    finally:
        site.write(*good)
    record_time(f"{ROLE}: bad input refused ({case})", converge.seconds)
    assert converge.returncode != 0, f"{case}: the playbook succeeded\n{converge.tail()}"
    recap = converge.host(site.host)
    assert recap.get("changed", 0) == 0, f"{case}: {recap}\n{converge.tail()}"
    # The failure names what is wrong (words searched in the whole output: Ansible prints an
    # assert's message in its own layout).
    for word in words:
        assert word.lower() in converge.output.lower(), (
            f"{case}: the failure does not name {word!r}\n{converge.tail(30)}"
        )
    assert vm.snapshot() == before, f"{case}: something changed on the VM"
