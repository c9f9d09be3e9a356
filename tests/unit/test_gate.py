import base64

import pytest
from mlflowstack import gate as gate_module
from mlflowstack.forwarded import escape_path
from mlflowstack.gate import BUSY, Gate, make_app
from mlflowstack.users import UserStore, bcrypt_cost


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


class RecordingVerify:
    """Wraps the real bcrypt check and records which hashes it was asked to check."""

    def __init__(self):
        self.calls = []

    def __call__(self, password, password_hash):
        self.calls.append(password_hash)
        return gate_module._bcrypt_verify(password, password_hash)


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
def verify():
    return RecordingVerify()


@pytest.fixture
def gate(users_dir, verify):
    return Gate(UserStore(users_dir), bcrypt_slots=1, verify=verify)


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


def test_identify_check_straddling_password_change_not_reused(users_dir, bcrypt_hash):
    """A check that verified the old hash while the file changed must not serve the new one."""
    store = UserStore(users_dir)

    def verify_then_change(password, password_hash):
        ok = gate_module._bcrypt_verify(password, password_hash)
        if not store.users_path.with_name("changed").exists():
            store.users_path.with_name("changed").touch()
            store.set_password("alice", "new-password")
        return ok

    straddled = Gate(store, verify=verify_then_change)
    assert straddled.identify(basic("alice", "right")) == ("alice", "admin")
    assert straddled.identify(basic("alice", "right")) is None


def test_identify_cache_holds_no_plaintext(gate):
    gate.identify(basic("alice", "right"))
    dumped = repr(gate._cache).encode()
    assert b"right" not in dumped and basic("alice", "right").encode() not in dumped


def test_identify_all_slots_busy_returns_busy_but_cached_user_passes(gate):
    assert gate.identify(basic("alice", "right"))
    gate._slots.acquire()
    try:
        assert gate.identify(basic("vera", "right")) == BUSY
        assert gate.identify(basic("alice", "right")) == ("alice", "admin")
    finally:
        gate._slots.release()


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
    gate._slots.acquire()
    try:
        status, headers = call(make_app(gate, SECRET), basic("vera", "right"))
    finally:
        gate._slots.release()
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
