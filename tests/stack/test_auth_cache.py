"""What the speed rests on: remembered answers (nginx's and the gate's) never outlive the truth.

Each test first makes a user's answer remembered (a few requests on the same call), then changes
the users file with stackctl and requires the change to bite within 5 s, measured from the end
of the stackctl command. Timings are only bounds here; speed is scripts/benchmark's business.
"""

import base64
import json
import subprocess
import threading
import time

import requests

SEARCH = "/api/2.0/mlflow/experiments/search"
CREATE = "/api/2.0/mlflow/experiments/create"
ONE = {"max_results": 1}


def _warm(stack, auth, path=SEARCH, times=5) -> None:
    """Make the answer for (auth, path) remembered, and prove it was a yes."""
    for _ in range(times):
        response = requests.get(stack.url + path, auth=auth, params=ONE)
        assert response.status_code == 200


def test_password_change_refuses_old_password_within_5_seconds(stack):
    old, new = ("cache-pw", "old-password"), ("cache-pw", "new-password")
    stack.add_user(*old)
    _warm(stack, old)
    stack.stackctl("user", "passwd", "cache-pw", "--password-stdin", input=new[1] + "\n")
    assert stack.wait_for_status(401, old) < 5
    assert stack.wait_for_status(200, new) < 5


def test_disabled_user_refused_within_5_seconds(stack):
    auth = ("cache-off", "some-password")
    stack.add_user(*auth)
    _warm(stack, auth)
    stack.stackctl("user", "disable", "cache-off")
    assert stack.wait_for_status(401, auth) < 5


def test_role_lowered_refuses_writes_within_5_seconds(stack):
    auth = ("cache-role", "some-password")
    stack.add_user(*auth, role="editor")

    def create(n: int) -> int:
        body = {"name": f"cache-role-{n}-{time.monotonic_ns()}"}
        return requests.post(stack.url + CREATE, auth=auth, json=body).status_code

    assert [create(n) for n in range(3)] == [200, 200, 200]
    stack.stackctl("user", "role", "cache-role", "viewer")
    start = time.monotonic()
    while create(99) != 403:
        assert time.monotonic() - start < 5, "a viewer could still write after 5 s"
        time.sleep(0.2)
    _warm(stack, auth, times=1)  # reading is still allowed


def test_revoked_token_refused_within_5_seconds(stack):
    secret = stack.stackctl("token", "add", "cache-token", "--role", "viewer").strip().split()[-1]
    header = f"Bearer {secret}"
    for _ in range(5):
        response = requests.get(stack.url + SEARCH, headers={"Authorization": header}, params=ONE)
        assert response.status_code == 200
    stack.stackctl("token", "remove", "cache-token")
    assert stack.wait_for_status(401, header) < 5


def test_wrong_passwords_between_right_ones_always_refused(stack):
    auth = ("cache-wrong", "the-right-password")
    stack.add_user(*auth)
    wrong = [
        ("cache-wrong", "the-right-passwor"),
        ("cache-wrong", "the-right-password "),
        ("cache-wrong", "THE-RIGHT-PASSWORD"),
        ("Cache-wrong", "the-right-password"),
        ("admin", "the-right-password"),
    ]
    with requests.Session() as session:
        for attempt in wrong:
            response = session.get(stack.url + SEARCH, auth=auth, params=ONE)
            assert response.status_code == 200
            response = session.get(stack.url + SEARCH, auth=attempt, params=ONE)
            assert response.status_code == 401, attempt


def test_password_flood_gets_429_while_verified_user_passes(stack):
    """With every bcrypt slot taken, new attempts are turned away at once; known users are not."""
    auth = ("cache-flood", "flood-password")
    stack.add_user(*auth)
    _warm(stack, auth)
    statuses: list[int] = []
    refusals: list = []
    stop = threading.Event()

    def attacker(n: int) -> None:
        while not stop.is_set():
            bad = ("cache-flood", f"guess-{n}-{len(statuses)}")
            try:
                # The 429 trickles out (tarpit); its status line arrives at once.
                with requests.get(stack.url + SEARCH, auth=bad, stream=True, timeout=10) as r:
                    statuses.append(r.status_code)
                    if r.status_code == 429 and not refusals:
                        refusals.append((r.headers, r.content))  # trickles in over ~2 s
            except requests.RequestException:
                pass

    attackers = [threading.Thread(target=attacker, args=(n,)) for n in range(8)]
    for thread in attackers:
        thread.start()
    try:
        valid = []
        deadline = time.monotonic() + 20
        while 429 not in statuses and time.monotonic() < deadline:
            valid.append(requests.get(stack.url + SEARCH, auth=auth, params=ONE).status_code)
            time.sleep(0.05)
        valid += [
            requests.get(stack.url + SEARCH, auth=auth, params=ONE).status_code for _ in range(5)
        ]
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=15)
    assert 429 in statuses, f"no 429 among {len(statuses)} flood answers"
    assert set(statuses) <= {401, 429}
    assert set(valid) == {200}
    # The 429 says when to retry, in MLflow's error shape (the client shows its message).
    headers, body = refusals[0]
    assert headers["Retry-After"] == "1" and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error_code"] == "RESOURCE_EXHAUSTED"
    assert "retry in 1 second" in json.loads(body)["message"]


# Prints every printable run of 4+ bytes in nginx's shared-memory zones (shown in the maps as
# "/dev/zero (deleted)": the njs dictionaries live there), read through /proc/1/mem.
_DUMP_SHARED_ZONES = r"""
set -eu
grep ' /dev/zero' /proc/1/maps | while read -r range _; do
    start=$((16#${range%-*})) end=$((16#${range#*-}))
    dd if=/proc/1/mem bs=65536 iflag=skip_bytes,count_bytes skip="$start" \
        count=$((end - start)) status=none
done | tr -c '[:print:]' '\n' | grep -E '.{4,}' | sort -u
"""


def test_nginx_remembered_answers_hold_no_credentials(stack):
    """The shared memory holds the user's name (proof we read the right place), never the
    password or the Authorization header."""
    name, password = "cache-plain", "Plain-Secret-4711"
    stack.add_user(name, password)
    _warm(stack, (name, password))
    header = base64.b64encode(f"{name}:{password}".encode()).decode()
    nginx = stack.compose("ps", "-q", "nginx").strip()
    dump = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            f"--pid=container:{nginx}",
            "--cap-add",
            "SYS_PTRACE",
            "--entrypoint",
            "bash",
            stack.image("nginx"),
            "-c",
            _DUMP_SHARED_ZONES,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert name in dump
    assert password not in dump
    assert header not in dump and header[:16] not in dump
