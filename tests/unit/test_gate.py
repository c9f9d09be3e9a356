import base64
import threading
import time

import pytest
from mlflowstack import gate as gate_module
from mlflowstack.forwarded import escape_path
from mlflowstack.gate import BUSY, CheckTimer, Gate, make_app, waiters_for
from mlflowstack.users import UserStore, bcrypt_cost


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


pytestmark = pytest.mark.usefixtures("fast_hashes")


class RecordingVerify:
    """Wraps the real bcrypt check (made once per password and hash in a session: see
    conftest.py) and records which hashes it was asked to check."""

    def __init__(self, bcrypt_verify):
        self.calls = []
        self._bcrypt_verify = bcrypt_verify

    def __call__(self, password, password_hash):
        self.calls.append(password_hash)
        return self._bcrypt_verify(password, password_hash)


@pytest.fixture
def users_dir(tmp_path, bcrypt_hash):
    directory = tmp_path / "users"
    directory.mkdir()
    (directory / "htpasswd").write_text(
        f"#role alice admin\nalice:{bcrypt_hash('right')}\n"
        f"#role vera viewer\nvera:{bcrypt_hash('right')}\n"
        f"off:!{bcrypt_hash('right')}\n"
        "plain:right\n"
    )
    return directory


@pytest.fixture
def verify(bcrypt_verify):
    return RecordingVerify(bcrypt_verify)


def no_sleep(seconds):
    """Failures are padded by sleeping; tests of the credential logic need not wait for it."""


@pytest.fixture
def gate(users_dir, verify):
    return Gate(UserStore(users_dir), bcrypt_slots=1, verify=verify, sleep=no_sleep)


def test_identify_right_password_returns_user_and_role(gate):
    assert gate.identify(basic("alice", "right")) == ("alice", "admin")


def test_identify_second_request_served_from_cache(gate, verify):
    gate.identify(basic("alice", "right"))
    gate.identify(basic("alice", "right"))
    assert len(verify.calls) == 1


def test_identify_wrong_password_never_cached(gate, verify):
    for _ in range(3):
        assert gate.identify(basic("alice", "wrong")) is None
    assert len(verify.calls) == 3


def test_identify_wrong_password_after_right_one_refused(gate):
    assert gate.identify(basic("alice", "right"))
    assert gate.identify(basic("alice", "wrong")) is None


@pytest.mark.parametrize(
    "name,password",
    [("nobody", "right"), ("off", "right"), ("plain", "right"), ("alice", "right\0extra")],
)
def test_identify_unusable_credentials_cost_one_check_at_full_cost(gate, verify, name, password):
    assert gate.identify(basic(name, password)) is None
    assert len(verify.calls) == 1
    assert bcrypt_cost(verify.calls[0]) == 12


def test_identify_unknown_user_costs_same_as_wrong_password(gate, verify):
    gate.identify(basic("alice", "wrong"))
    gate.identify(basic("nobody", "wrong"))
    assert [bcrypt_cost(h) for h in verify.calls] == [12, 12]


def test_identify_password_past_72_bytes_refused(gate, bcrypt_hash, users_dir):
    long_password = "p" * 72
    (users_dir / "htpasswd").write_text(f"long:{bcrypt_hash(long_password)}\n")
    assert gate.identify(basic("long", long_password)) == ("long", "editor")
    assert gate.identify(basic("long", long_password + "EXTRA")) is None
    assert gate.identify(basic("long", long_password + "é")) is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Digest abc",
        "Bearer nope",
    ],
)
def test_identify_malformed_header_refused(gate, header):
    assert gate.identify(header) is None


def test_identify_cached_user_refused_after_removal(gate, users_dir):
    assert gate.identify(basic("alice", "right"))
    text = (users_dir / "htpasswd").read_text()
    replacement = users_dir / "new"
    replacement.write_text(text.replace("alice:", "#gone:"))
    replacement.replace(users_dir / "htpasswd")
    assert gate.identify(basic("alice", "right")) is None


def test_identify_cached_user_kept_when_another_user_added(gate, users_dir, verify):
    gate.identify(basic("alice", "right"))
    UserStore(users_dir).add_user("bob", "bobs-password")
    assert gate.identify(basic("alice", "right")) == ("alice", "admin")
    assert len(verify.calls) == 1


def test_identify_cached_user_refused_after_password_change(gate, users_dir):
    gate.identify(basic("alice", "right"))
    UserStore(users_dir).set_password("alice", "new-password")
    assert gate.identify(basic("alice", "right")) is None
    assert gate.identify(basic("alice", "new-password")) == ("alice", "admin")


def test_identify_cached_user_refused_after_disable(gate, users_dir):
    gate.identify(basic("alice", "right"))
    UserStore(users_dir).set_enabled("alice", False)
    assert gate.identify(basic("alice", "right")) is None


def test_identify_cached_user_gets_new_role_without_new_check(gate, users_dir, verify):
    gate.identify(basic("alice", "right"))
    UserStore(users_dir).set_role("alice", "viewer")
    assert gate.identify(basic("alice", "right")) == ("alice", "viewer")
    assert len(verify.calls) == 1


def test_identify_check_straddling_password_change_not_reused(users_dir, bcrypt_verify):
    """A check that verified the old hash while the file changed must not serve the new one."""
    store = UserStore(users_dir)

    def verify_then_change(password, password_hash):
        ok = bcrypt_verify(password, password_hash)
        if not store.users_path.with_name("changed").exists():
            store.users_path.with_name("changed").touch()
            store.set_password("alice", "new-password")
        return ok

    straddled = Gate(store, verify=verify_then_change, sleep=no_sleep)
    assert straddled.identify(basic("alice", "right")) == ("alice", "admin")
    assert straddled.identify(basic("alice", "right")) is None


def test_identify_cache_holds_no_plaintext(gate):
    gate.identify(basic("alice", "right"))
    dumped = repr(gate._cache).encode()
    assert b"right" not in dumped and basic("alice", "right").encode() not in dumped


def test_identify_all_slots_busy_no_queue_returns_busy_but_cached_user_passes(users_dir, verify):
    gate = Gate(UserStore(users_dir), verify=verify, max_waiters=0, sleep=no_sleep)
    assert gate.identify(basic("alice", "right"), "192.0.2.7")
    assert gate._slots.acquire("198.51.100.1", 0)
    try:
        assert gate.identify(basic("vera", "right"), "192.0.2.7") == BUSY
        assert gate.identify(basic("alice", "right"), "192.0.2.7") == ("alice", "admin")
    finally:
        gate._slots.release("198.51.100.1")


def test_identify_bearer_token_valid_and_revoked(gate, users_dir):
    store = UserStore(users_dir)
    secret = store.add_token("ci", "viewer", None)
    assert gate.identify(f"Bearer {secret}") == ("ci", "viewer")
    store.remove_token("ci")
    assert gate.identify(f"Bearer {secret}") is None


def test_identify_expired_token_refused(gate, users_dir, monkeypatch):
    secret = UserStore(users_dir).add_token("ci", "editor", 1)
    monkeypatch.setattr(gate_module.time, "time", lambda: 10**12)
    assert gate.identify(f"Bearer {secret}") is None


NONCE = "0123456789abcdef0123456789abcdef"
SECRET = b"5e" * 32


def call(app, authorization="", method="GET", path="/api/2.0/mlflow/experiments/search", **extra):
    """Ask the app as nginx does: the path escaped, a nonce, the client's address."""
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, dict(headers)

    environ = {
        "PATH_INFO": "/auth",
        "HTTP_AUTHORIZATION": authorization,
        "HTTP_X_ORIGINAL_METHOD": method,
        "HTTP_X_ORIGINAL_PATH": escape_path(path.encode("utf-8")),
        "HTTP_X_GATE_NONCE": NONCE,
        "HTTP_X_CLIENT_ADDRESS": "192.0.2.7",
        "HTTP_X_STACK_PROXY_SECRET": SECRET.decode(),
        **extra,
    }
    app(environ, start_response)
    return seen["status"].split()[0], seen["headers"]


def test_app_no_credentials_401_with_challenge(gate):
    status, headers = call(make_app(gate, SECRET))
    assert status == "401" and headers["WWW-Authenticate"].startswith("Basic ")


def test_app_viewer_write_403_and_read_204(gate):
    app = make_app(gate, SECRET)
    assert call(app, basic("vera", "right"), "POST", "/api/2.0/mlflow/runs/create")[0] == "403"
    status, headers = call(app, basic("vera", "right"), "GET", "/api/2.0/mlflow/runs/get")
    assert status == "204" and headers["X-Gate-User"] == "vera"


@pytest.mark.parametrize("status_of", ["grant", "refusal", "challenge", "malformed"])
def test_app_every_answer_echoes_nonce(gate, status_of):
    app = make_app(gate, SECRET)
    cases = {
        "grant": lambda: call(app, basic("vera", "right")),
        "refusal": lambda: call(app, basic("vera", "right"), "POST", "/api/2.0/mlflow/runs/create"),
        "challenge": lambda: call(app),
        "malformed": lambda: call(app, basic("vera", "right"), HTTP_X_ORIGINAL_METHOD="get"),
    }
    assert cases[status_of]()[1]["X-Gate-Nonce"] == NONCE


@pytest.mark.parametrize(
    "field,value",
    [
        ("HTTP_X_ORIGINAL_PATH", "/api/2.0/mlflow/runs/get\r\nGET /health HTTP/1.1"),
        ("HTTP_X_ORIGINAL_PATH", "/x%0D%0AGET%20/health"),
        ("HTTP_X_ORIGINAL_PATH", "/x%00"),
        ("HTTP_X_ORIGINAL_PATH", "/a/../api/2.0/mlflow/runs/get"),
        ("HTTP_X_ORIGINAL_PATH", ""),
        ("HTTP_X_ORIGINAL_METHOD", "GET\r\n"),
        ("HTTP_X_GATE_NONCE", ""),
        ("HTTP_X_GATE_NONCE", "X" * 32),
        ("HTTP_X_CLIENT_ADDRESS", "not-an-address"),
        ("HTTP_X_STACK_PROXY_SECRET", ""),
        ("HTTP_X_STACK_PROXY_SECRET", "5e" * 31 + "5f"),
    ],
)
def test_app_malformed_field_400_before_credentials(gate, field, value):
    checks = []
    gate._verify = lambda *args: checks.append(args) or True
    status, headers = call(make_app(gate, SECRET), basic("vera", "right"), **{field: value})
    assert status == "400" and "X-Gate-User" not in headers and checks == []


def test_app_user_name_non_ascii_quote_percent_escaped_in_header(gate, users_dir, bcrypt_hash):
    (users_dir / "htpasswd").write_text(f'r\u00e9n"%\\@x:{bcrypt_hash("pw")}\n')
    status, headers = call(make_app(gate, SECRET), basic('r\u00e9n"%\\@x', "pw"))
    assert status == "204" and headers["X-Gate-User"] == "r%C3%A9n%22%25%5C@x"


def test_app_busy_403_with_reason(gate):
    # The address of call()'s client failed recently and has a check under way.
    gate._slots.failed("192.0.2.7")
    assert gate._slots.acquire("192.0.2.7", 0)
    try:
        status, headers = call(make_app(gate, SECRET), basic("vera", "right"))
    finally:
        gate._slots.release("192.0.2.7")
    assert status == "403" and headers["X-Gate-Reason"] == "busy"


def test_identify_latin1_header_from_requests_accepted(gate, users_dir, bcrypt_hash):
    (users_dir / "htpasswd").write_text(f"rene:{bcrypt_hash('café')}\n")
    latin1 = "Basic " + base64.b64encode("rene:café".encode("latin-1")).decode()
    assert gate.identify(latin1) == ("rene", "editor")
    assert gate.identify(basic("rene", "café")) == ("rene", "editor")


def test_identify_failed_check_pauses_holding_its_slot(users_dir, verify):
    slot_taken_while_paused = []

    def sleep(seconds):
        slot_taken_while_paused.append((seconds > 0, gate.identify(basic("vera", "right"))))

    gate = Gate(UserStore(users_dir), verify=verify, failure_pause=1.0, sleep=sleep)
    assert gate.identify(basic("alice", "wrong")) is None
    assert slot_taken_while_paused == [(True, BUSY)]
    assert gate.identify(basic("vera", "right")) == ("vera", "viewer")


def test_identify_right_password_never_pauses(users_dir, verify):
    pauses = []
    gate = Gate(UserStore(users_dir), verify=verify, failure_pause=1.0, sleep=pauses.append)
    assert gate.identify(basic("alice", "right")) == ("alice", "admin")
    assert pauses == []


class FakeClock:
    """monotonic() and sleep() for a gate: sleeping only moves the clock."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class TimedVerify:
    """A fake bcrypt check: "right" is the password, and a check at cost c moves the clock by
    ``seconds_at_12`` x 2**(c - 12), as bcrypt's time doubles per cost step."""

    def __init__(self, clock, seconds_at_12=0.25):
        self.clock = clock
        self.seconds_at_12 = seconds_at_12
        self.costs = []

    def __call__(self, password, password_hash):
        cost = bcrypt_cost(password_hash)
        self.costs.append(cost)
        self.clock.now += self.seconds_at_12 * 2 ** (cost - 12)
        return password == "right"


@pytest.fixture
def timing_dir(tmp_path, bcrypt_hash):
    """alice at cost 12, heavy at cost 14 (a cost-12 hash relabelled: only the fake checks it)."""
    directory = tmp_path / "timing"
    directory.mkdir()
    heavy = bcrypt_hash("right").replace("$12$", "$14$", 1)
    (directory / "htpasswd").write_text(
        f"#role alice admin\nalice:{bcrypt_hash('right')}\n"
        f"heavy:{heavy}\n"
        f"off:!{bcrypt_hash('right')}\n"
    )
    return directory


def timed_gate(directory, clock, failure_pause=0.0, **options):
    return Gate(
        UserStore(directory),
        verify=TimedVerify(clock),
        failure_pause=failure_pause,
        sleep=clock.sleep,
        monotonic=clock,
        **options,
    )


def duration(gate, clock, authorization, client="192.0.2.7"):
    started = clock.now
    answer = gate.identify(authorization, client)
    return answer, clock.now - started


@pytest.mark.parametrize("failure_pause", [0.0, 1.0])
def test_identify_failures_unknown_disabled_cost12_cost14_same_total_duration(
    timing_dir, failure_pause
):
    clock = FakeClock()
    gate = timed_gate(timing_dir, clock, failure_pause, padding_margin=1.1)
    # Padded to one cost-14 check (4 x 0.25 s) x the margin, then the pause on top of that.
    expected = 0.25 * 4 * 1.1 * (1 + failure_pause)
    for name, password in [
        ("nobody", "right"),
        ("off", "right"),
        ("alice", "wrong"),
        ("heavy", "wrong"),
        ("nobody", "wrong"),
    ]:
        answer, took = duration(gate, clock, basic(name, password))
        assert answer is None and took == pytest.approx(expected), name
    assert len(clock.sleeps) == 5  # padding and pause are one sleep, never CPU work


def test_identify_unknown_user_checked_at_minimum_cost_even_with_cost14_user(timing_dir):
    clock = FakeClock()
    gate = timed_gate(timing_dir, clock)
    gate.identify(basic("nobody", "x"))
    gate.identify(basic("off", "right"))
    assert gate._verify.costs == [12, 12]


def test_identify_success_not_padded(timing_dir):
    clock = FakeClock()
    gate = timed_gate(timing_dir, clock, failure_pause=1.0)
    gate.identify(basic("alice", "wrong"))  # an estimate exists and failures are padded
    clock.sleeps.clear()
    answer, took = duration(gate, clock, basic("heavy", "right"))
    assert answer == ("heavy", "editor") and took == pytest.approx(1.0)
    answer, took = duration(gate, clock, basic("alice", "right"))
    assert answer == ("alice", "admin") and took == pytest.approx(0.25)
    assert clock.sleeps == []


def test_identify_failure_slower_than_target_only_paused(timing_dir):
    clock = FakeClock()
    gate = timed_gate(timing_dir, clock, failure_pause=1.0, padding_margin=1.0)
    gate.identify(basic("alice", "wrong"))  # estimate: 0.25 s at cost 12
    gate._verify.seconds_at_12 = 0.3  # this one check overruns the target of 1.0 s
    answer, took = duration(gate, clock, basic("heavy", "wrong"))
    assert answer is None and took == pytest.approx(1.2 * 2)


def test_check_timer_scales_by_cost_and_resists_one_stall():
    timer = CheckTimer(weight=0.2)
    assert timer.duration(12) is None
    timer.observe(1.0, 14)
    assert timer.duration(12) == pytest.approx(0.25) and timer.duration(13) == pytest.approx(0.5)
    timer.observe(30.0, 12)  # a stalled check counts as at most twice the estimate
    assert timer.duration(12) == pytest.approx(0.25 + 0.2 * 0.25)


def test_identify_valid_login_during_flood_waits_instead_of_busy(users_dir):
    attacker, user = "203.0.113.66", "198.51.100.5"
    in_check, finish = threading.Event(), threading.Event()

    def verify(password, password_hash):
        if password == "slow-wrong":
            in_check.set()
            finish.wait(5)
        return password == "right"

    clock = FakeClock()
    gate = Gate(
        UserStore(users_dir), verify=verify, failure_pause=1.0, sleep=clock.sleep, monotonic=clock
    )
    assert gate.identify(basic("alice", "wrong"), attacker) is None
    answers = {}
    flood = threading.Thread(
        target=lambda: answers.update(flood=gate.identify(basic("alice", "slow-wrong"), attacker))
    )
    flood.start()
    assert in_check.wait(5)
    # The attacker's address has a check under way: its other connections are refused at once.
    assert gate.identify(basic("vera", "wrong"), attacker) == BUSY
    login = threading.Thread(
        target=lambda: answers.update(login=gate.identify(basic("alice", "right"), user))
    )
    login.start()
    wait_until(lambda: gate._slots.waiting == 1)
    finish.set()
    flood.join(5)
    login.join(5)
    assert answers == {"flood": None, "login": ("alice", "admin")}


def test_identify_wait_for_slot_runs_out_busy(users_dir):
    clock = FakeClock()
    gate = Gate(
        UserStore(users_dir),
        verify=lambda password, password_hash: True,
        queue_wait=0.05,
        sleep=clock.sleep,
        monotonic=clock,
    )
    assert gate._slots.acquire("198.51.100.1", 0)
    try:
        started = time.monotonic()
        assert gate.identify(basic("alice", "right"), "192.0.2.7") == BUSY
        assert 0.04 <= time.monotonic() - started < 2
    finally:
        gate._slots.release("198.51.100.1")
    assert gate.identify(basic("alice", "right"), "192.0.2.7") == ("alice", "admin")


def test_identify_concurrent_logins_never_exceed_bcrypt_slots(users_dir):
    lock, running, peak = threading.Lock(), [0], [0]

    def counting_verify(password, password_hash):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return password == "right"

    gate = Gate(
        UserStore(users_dir), bcrypt_slots=2, verify=counting_verify, max_waiters=32, sleep=no_sleep
    )
    answers = []

    def login(n):
        password = "right" if n % 2 else "wrong"
        answers.append(gate.identify(basic("alice", password), f"192.0.2.{n}"))

    threads = [threading.Thread(target=login, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert 1 <= peak[0] <= 2 and BUSY not in answers and len(answers) == 12


@pytest.mark.parametrize("threads,slots,waiters", [(8, 1, 6), (8, 2, 5), (2, 1, 0), (64, 1, 32)])
def test_waiters_for_leaves_threads_for_cached_logins(threads, slots, waiters):
    assert waiters_for(threads, slots) == waiters


def wait_until(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)
