"""user ensure, token ensure and token secret (scripts/mlflowstack/ensure.py): the converging
commands the Ansible role calls. Hashes come from the session's cache (tests/conftest.py) and
each (password, hash) check is made once per session, so this module adds little time."""

import calendar
import datetime
import io
import json
import os
import re
import subprocess

import pytest
from mlflowstack import commands, ensure, users
from mlflowstack.users import UserStore, token_digest
from test_cli import run

pytestmark = pytest.mark.usefixtures("fast_hashes")

# The real one, before the fixture below replaces it.
_verify_password = users.verify_password

# Passwords whose hashes and checks the gate's tests share (tests/conftest.py).
PASSWORD, NEW_PASSWORD = "right", "new-password"
# Two outputs of users.new_token_secret(), fixed so that runs repeat.
SECRET = "mlst_7XpRU-bXvhH_BFSI-QH_VOUnkH0rBPbMgwhDhZ18TTQ"
OTHER_SECRET = "mlst_3FDXXJhaYYpVum83Iju_BkBiJc-iEkSCTVjTFjIZH-A"


@pytest.fixture(autouse=True)
def checks(monkeypatch, bcrypt_verify):
    """Every password check made, in order; each answered by the gate's real check, made once
    per session (ensure checks only hashes that can log in: see the plaintext-line test)."""
    made = []

    def check(password, password_hash):
        made.append((password, password_hash))
        return bcrypt_verify(password, password_hash)

    monkeypatch.setattr(users, "verify_password", check)
    return made


class UnreadableStdin(io.StringIO):
    """A stdin that fails the test when anything reads it."""

    def read(self, *args):
        pytest.fail("stdin was read")

    readline = read


def stackctl(users_dir, words, stdin=""):
    """``run`` with the arguments as one string of words."""
    return run(users_dir, *words.split(), stdin=stdin)


def ensure_user(users_dir, name, options="", password=PASSWORD):
    """``user ensure NAME --password-stdin --json OPTIONS``; return (status, answered, stderr)."""
    words = f"user ensure {name} --password-stdin --json {options}"
    status, out, err = stackctl(users_dir, words, stdin=password + "\n")
    return status, json.loads(out) if out else None, err


def ensure_token(users_dir, name, options="", secret=SECRET):
    words = f"token ensure {name} --secret-stdin --json {options}"
    status, out, err = stackctl(users_dir, words, stdin=secret + "\n")
    return status, json.loads(out) if out else None, err


def answer(name, kind, state, *changes):
    """The JSON object ``ensure --json`` prints."""
    return {"name": name, "kind": kind, "state": state, "changed": bool(changes)} | {
        "changes": list(changes)
    }


def user(users_dir, name):
    return UserStore(users_dir).load_users().users.get(name)


def file_identity(path, age=False):
    """Bytes, inode and mtime: all three stay when a file is not written again. ``age`` dates
    the file back first, so a rewrite shows in its mtime whatever the clock's resolution."""
    if age:
        os.utime(path, ns=(10**18, 10**18))
    info = path.stat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


# user ensure


def test_user_ensure_missing_user_created_with_default_role_json_only_on_stdout(
    users_dir, bcrypt_verify
):
    words = "user ensure alice --password-stdin --json"
    status, out, err = stackctl(users_dir, words, stdin=PASSWORD + "\n")
    assert status == 0 and err == "" and out.count("\n") == 1
    assert json.loads(out) == answer("alice", "user", "present", "created")
    alice = user(users_dir, "alice")
    assert alice.role == "editor" and alice.can_log_in
    assert bcrypt_verify(PASSWORD, alice.password_hash)


def test_user_ensure_state_already_held_unchanged_file_untouched_one_check(users_dir, checks):
    ensure_user(users_dir, "alice", "--role viewer")
    path = users_dir / "htpasswd"
    before = file_identity(path, age=True)
    checks.clear()
    status, answered, err = ensure_user(users_dir, "alice", "--role viewer")
    assert status == 0 and err == "" and answered["changed"] is False and answered["changes"] == []
    assert file_identity(path) == before and not (users_dir / "htpasswd.bak").exists()
    assert len(checks) == 1


def test_user_ensure_wrong_then_right_password_rehashed_once(users_dir, bcrypt_verify):
    ensure_user(users_dir, "alice")
    status, answered, _ = ensure_user(users_dir, "alice", password=NEW_PASSWORD)
    assert status == 0 and answered["changes"] == ["password"]
    assert bcrypt_verify(NEW_PASSWORD, user(users_dir, "alice").password_hash)
    path = users_dir / "htpasswd"
    before = file_identity(path, age=True)
    assert ensure_user(users_dir, "alice", password=NEW_PASSWORD)[1]["changed"] is False
    assert file_identity(path) == before


def test_user_ensure_role_differs_only_role_changed_hash_kept(users_dir):
    ensure_user(users_dir, "alice")
    old_hash = user(users_dir, "alice").password_hash
    status, answered, _ = ensure_user(users_dir, "alice", "--role admin")
    assert status == 0 and answered["changes"] == ["role"]
    assert user(users_dir, "alice").role == "admin"
    assert user(users_dir, "alice").password_hash == old_hash


def test_user_ensure_password_and_role_differ_both_named_in_human_line(users_dir):
    ensure_user(users_dir, "alice")
    words = "user ensure alice --role viewer --password-stdin"
    status, out, err = stackctl(users_dir, words, stdin=NEW_PASSWORD + "\n")
    assert (status, out, err) == (0, "", "user alice: changed (password, role)\n")


def test_user_ensure_disabled_user_present_enabled_with_same_hash(users_dir):
    ensure_user(users_dir, "alice")
    old_hash = user(users_dir, "alice").password_hash
    run(users_dir, "user", "disable", "alice")
    status, answered, _ = ensure_user(users_dir, "alice")
    assert status == 0 and answered["changes"] == ["enabled"]
    assert user(users_dir, "alice").can_log_in
    assert user(users_dir, "alice").password_hash == old_hash


def test_user_ensure_state_disabled_without_password_disables_keeps_hash_no_check(
    users_dir, checks
):
    ensure_user(users_dir, "alice")
    old_hash = user(users_dir, "alice").password_hash
    checks.clear()
    status, out, err = stackctl(users_dir, "user ensure alice --state disabled")
    assert (status, out, err) == (0, "", "user alice: changed (disabled)\n")
    alice = user(users_dir, "alice")
    assert not alice.enabled and alice.password_hash == old_hash and checks == []
    path = users_dir / "htpasswd"
    before = file_identity(path, age=True)
    status, _, err = stackctl(users_dir, "user ensure alice --state disabled")
    assert status == 0 and err == "user alice: unchanged\n" and file_identity(path) == before


def test_user_ensure_state_disabled_other_password_hash_updated_stays_disabled(
    users_dir, bcrypt_verify
):
    ensure_user(users_dir, "alice", "--state disabled")
    status, answered, _ = ensure_user(users_dir, "alice", "--state disabled", password=NEW_PASSWORD)
    assert status == 0 and answered == answer("alice", "user", "disabled", "password")
    alice = user(users_dir, "alice")
    assert not alice.enabled and bcrypt_verify(NEW_PASSWORD, alice.password_hash)


def test_user_ensure_state_disabled_missing_user_with_password_created_disabled(users_dir):
    words = "user ensure bob --state disabled --password-stdin"
    status, _, err = stackctl(users_dir, words, stdin=PASSWORD + "\n")
    assert status == 0 and err == "user bob: created (role editor, disabled)\n"
    assert user(users_dir, "bob").enabled is False


@pytest.mark.parametrize(
    "line,scheme",
    [("mallory:pw", "plaintext"), ("mallory:$apr1$abcdefgh$0123456789abcdefghijkl", "md5")],
)
def test_user_ensure_hand_added_unloginable_line_gets_bcrypt_hash_without_check(
    users_dir, bcrypt_verify, checks, line, scheme
):
    (users_dir / "htpasswd").write_text(line + "\n")
    assert user(users_dir, "mallory").scheme == scheme
    status, answered, _ = ensure_user(users_dir, "mallory")
    assert status == 0 and answered["changes"] == ["password"] and checks == []
    mallory = user(users_dir, "mallory")
    assert mallory.can_log_in and mallory.role == "editor"
    assert bcrypt_verify(PASSWORD, mallory.password_hash)
    assert ":pw\n" not in (users_dir / "htpasswd").read_text()


def test_user_ensure_absent_removes_without_reading_stdin_then_unchanged(users_dir):
    ensure_user(users_dir, "alice")
    ensure_user(users_dir, "bob")
    argv = ["user", "ensure", "alice", "--state", "absent", "--password-stdin"]
    status, out, err = run(users_dir, *argv, stdin=UnreadableStdin())
    assert (status, out, err) == (0, "", "user alice: removed\n")
    assert user(users_dir, "alice") is None and user(users_dir, "bob") is not None
    path = users_dir / "htpasswd"
    before = file_identity(path, age=True)
    status, out, _ = run(users_dir, *argv, "--json", stdin=UnreadableStdin())
    assert status == 0 and json.loads(out) == answer("alice", "user", "absent")
    assert file_identity(path) == before


def test_user_ensure_absent_no_users_file_unchanged_nothing_created(users_dir):
    status, _, err = stackctl(users_dir, "user ensure ghost --state absent")
    assert status == 0 and err == "user ghost: unchanged\n"
    assert not (users_dir / "htpasswd").exists()


@pytest.mark.parametrize(
    "argv,stdin,message",
    [
        ("alice", "pw\n", "needs the password: pass --password-stdin"),
        ("alice --password-stdin --role root", "pw\n", "unknown role 'root'"),
        ("alice --password-stdin", "", "password is empty"),
        ("alice --password-stdin", "\n", "password is empty"),
        ("alice --password-stdin", "x" * 73 + "\n", "72 bytes"),
        ("a:b --password-stdin", "pw\n", "':'"),
        ("ghost --state disabled", "", "no user 'ghost': creating it needs"),
    ],
)
def test_user_ensure_bad_input_one_line_error_status_1_nothing_written(
    users_dir, argv, stdin, message
):
    ensure_user(users_dir, "alice")
    path = users_dir / "htpasswd"
    before = file_identity(path, age=True)
    status, out, err = stackctl(users_dir, f"user ensure {argv}", stdin=stdin)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("stackctl: ") and message in err
    assert file_identity(path) == before


def test_user_ensure_unknown_state_usage_error_status_2(users_dir):
    status, out, err = stackctl(users_dir, "user ensure alice --state gone")
    assert status == 2 and out == "" and "invalid choice: 'gone'" in err
    assert list(users_dir.iterdir()) == []


def test_user_ensure_admin_password_changed_initial_password_file_removed(users_dir):
    (users_dir / "initial-admin-password").write_text("pw\n")
    ensure_user(users_dir, "admin", "--role admin")
    (users_dir / "initial-admin-password").write_text("pw\n")
    assert ensure_user(users_dir, "admin", "--role admin")[1]["changed"] is False
    assert (users_dir / "initial-admin-password").exists()
    words = "user ensure admin --role admin --password-stdin"
    status, _, err = stackctl(users_dir, words, stdin=NEW_PASSWORD + "\n")
    assert status == 0 and not (users_dir / "initial-admin-password").exists()
    assert err == (
        "user admin: changed (password); the initial password file was removed "
        "(it held the old password)\n"
    )


def test_user_ensure_admin_absent_initial_password_file_removed(users_dir):
    ensure_user(users_dir, "admin", "--role admin")
    (users_dir / "initial-admin-password").write_text("pw\n")
    status, _, err = stackctl(users_dir, "user ensure admin --state absent")
    assert status == 0 and not (users_dir / "initial-admin-password").exists()
    assert "removed" in err


def test_user_remove_admin_initial_password_file_removed(users_dir):
    ensure_user(users_dir, "admin", "--role admin")
    (users_dir / "initial-admin-password").write_text("pw\n")
    status, _, err = stackctl(users_dir, "user remove admin")
    assert status == 0 and not (users_dir / "initial-admin-password").exists()
    assert err == "user admin: removed; the initial password file was removed too\n"


class Calls(list):
    answer = None


@pytest.fixture
def compose(monkeypatch):
    """Stands in for ``docker compose``: records (argv, options) of each run; what it prints
    when its stdout is captured is compose's and a build's noise around ``compose.answer``."""
    calls = Calls()

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        noise = f"#1 building auth\n{json.dumps(calls.answer)}\n Container x-stackctl Removed\n"
        return subprocess.CompletedProcess(command, 0, noise if kwargs["stdout"] else None)

    monkeypatch.setattr(commands.subprocess, "run", fake_run)
    # The image is there (its check is a docker call of its own: test_cli.py tests it).
    monkeypatch.setattr(commands, "_build_auth_image_if_missing", lambda args: None)
    return calls


@pytest.mark.parametrize(
    "words,secret",
    [
        ("user ensure bob --password-stdin --json", "s3cret"),
        ("token ensure ci --json --secret-stdin", SECRET),
    ],
)
def test_ensure_without_users_dir_delegates_secret_on_stdin_only_json_clean(
    users_dir, compose, words, secret
):
    compose.answer = answer("x", words.split()[0], "present", "created")
    status, out, err = stackctl(None, words, stdin=secret + "\n")
    assert status == 0 and out == json.dumps(compose.answer) + "\n"
    assert "building auth" in err and "Removed" in err
    ((command, options),) = compose
    assert command[-6:] == ["stackctl", *words.split()]
    assert secret not in " ".join(command) and "env" not in options
    assert options["input"] == secret + "\n" and options["stdout"] == subprocess.PIPE


@pytest.mark.parametrize("kind", ["user", "token"])
def test_ensure_absent_without_users_dir_delegates_without_stdin(users_dir, compose, kind):
    argv = [kind, "ensure", "bob", "--state", "absent"]
    assert run(None, *argv, stdin=UnreadableStdin())[0] == 0
    ((command, options),) = compose
    assert command[-5:] == argv and options["stdout"] is None
    assert options["input"] is None and options["stdin"] == subprocess.DEVNULL


# token ensure and token secret


def test_token_ensure_missing_created_only_digest_stored(users_dir):
    status, answered, err = ensure_token(users_dir, "ci", "--role viewer")
    assert (status, answered, err) == (0, answer("ci", "token", "present", "created"), "")
    text = (users_dir / "tokens").read_text()
    assert SECRET not in text and token_digest(SECRET) in text
    (token,) = UserStore(users_dir).load_tokens().values()
    assert (token.name, token.role, token.expires) == ("ci", "viewer", None)


def test_token_ensure_state_already_held_unchanged_file_untouched(users_dir):
    options = "--role admin --expires-on 2099-12-31"
    ensure_token(users_dir, "ci", options)
    path = users_dir / "tokens"
    before = file_identity(path, age=True)
    words = f"token ensure ci --secret-stdin {options}"
    status, out, err = stackctl(users_dir, words, stdin=SECRET + "\n")
    assert (status, out, err) == (0, "", "token ci: unchanged\n")
    assert file_identity(path) == before


@pytest.mark.parametrize(
    "options,secret,changes",
    [
        ("--role admin --expires-on 2098-01-01", SECRET, ["role"]),
        ("--expires-on 2099-01-01", SECRET, ["expires"]),
        ("--expires-on 2098-01-01", OTHER_SECRET, ["secret"]),
        ("--role viewer --expires-on 2098-01-01", OTHER_SECRET, ["secret", "role"]),
    ],
)
def test_token_ensure_differences_named_and_applied(users_dir, options, secret, changes):
    ensure_token(users_dir, "ci", "--expires-on 2098-01-01")
    status, answered, _ = ensure_token(users_dir, "ci", options, secret=secret)
    assert status == 0 and answered["changes"] == changes
    (token,) = UserStore(users_dir).load_tokens().values()
    assert token.digest == token_digest(secret)
    assert ensure_token(users_dir, "ci", options, secret=secret)[1]["changed"] is False


def test_token_ensure_expires_on_dropped_token_never_expires(users_dir):
    ensure_token(users_dir, "ci", "--expires-on 2099-12-31")
    status, answered, _ = ensure_token(users_dir, "ci")
    assert status == 0 and answered["changes"] == ["expires"]
    assert next(iter(UserStore(users_dir).load_tokens().values())).expires is None


def test_token_ensure_expires_on_midnight_utc_listed_as_that_date(users_dir):
    ensure_token(users_dir, "ci", "--expires-on 2099-12-31")
    (token,) = UserStore(users_dir).load_tokens().values()
    assert token.expires == calendar.timegm((2099, 12, 31, 0, 0, 0))
    status, out, _ = run(users_dir, "token", "list")
    assert status == 0 and "2099-12-31" in out


def test_token_ensure_past_expiry_applied_with_warning(users_dir):
    words = "token ensure old --secret-stdin --expires-on 2001-01-01"
    status, out, err = stackctl(users_dir, words, stdin=SECRET + "\n")
    assert status == 0 and out == ""
    assert err == (
        "token old: created (role editor, expires on 2001-01-01); warning: 2001-01-01 has come, "
        "so the gate refuses this token\n"
    )


def test_token_ensure_absent_removes_without_reading_stdin_then_unchanged(users_dir):
    ensure_token(users_dir, "ci")
    ensure_token(users_dir, "other", secret=OTHER_SECRET)
    argv = ["token", "ensure", "ci", "--state", "absent", "--json"]
    status, out, _ = run(users_dir, *argv, "--secret-stdin", stdin=UnreadableStdin())
    assert status == 0 and json.loads(out)["changes"] == ["removed"]
    assert [t.name for t in UserStore(users_dir).load_tokens().values()] == ["other"]
    path = users_dir / "tokens"
    before = file_identity(path, age=True)
    status, out, _ = run(users_dir, *argv, stdin=UnreadableStdin())
    assert status == 0 and json.loads(out) == answer("ci", "token", "absent")
    assert file_identity(path) == before


def test_token_ensure_hand_made_duplicate_names_replaced_by_one(users_dir):
    store = UserStore(users_dir)
    lines = [
        {"name": "ci", "role": "editor", "sha256": token_digest(s), "expires": None}
        for s in (SECRET, OTHER_SECRET)
    ]
    store.tokens_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    status, answered, _ = ensure_token(users_dir, "ci")
    assert status == 0 and answered["changes"] == ["duplicates"]
    assert [t.digest for t in store.load_tokens().values()] == [token_digest(SECRET)]


@pytest.mark.parametrize(
    "argv,stdin,message",
    [
        ("ci", SECRET + "\n", "needs the secret: pass --secret-stdin"),
        ("ci --secret-stdin", "", "token secret is empty"),
        ("ci --secret-stdin", SECRET[5:] + "\n", "not in stackctl's format"),
        ("ci --secret-stdin", SECRET[:-1] + "\n", "not in stackctl's format"),
        ("ci --secret-stdin", SECRET + "A\n", "not in stackctl's format"),
        ("ci --secret-stdin", SECRET[:-1] + "B\n", "not in stackctl's format"),
        ("ci --secret-stdin", SECRET[:-2] + "!A\n", "not in stackctl's format"),
        ("ci --secret-stdin", " " + SECRET + "\n", "not in stackctl's format"),
        ("ci --secret-stdin", "mlst_" + "ab" * 21 + "A\n", "too regular"),
        ("ci --secret-stdin --role root", SECRET + "\n", "unknown role 'root'"),
        ("ci --secret-stdin --expires-on 2099-2-3", SECRET + "\n", "YYYY-MM-DD"),
        ("ci --secret-stdin --expires-on 2099-02-30", SECRET + "\n", "YYYY-MM-DD"),
        ("ci --secret-stdin --expires-on 30", SECRET + "\n", "YYYY-MM-DD"),
        ("taken --secret-stdin", OTHER_SECRET + "\n", "belongs to token 'other'"),
    ],
)
def test_token_ensure_bad_input_one_line_error_status_1_nothing_written(
    users_dir, argv, stdin, message
):
    ensure_token(users_dir, "other", secret=OTHER_SECRET)
    path = users_dir / "tokens"
    before = file_identity(path, age=True)
    status, out, err = stackctl(users_dir, f"token ensure {argv}", stdin=stdin)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("stackctl: ") and message in err
    assert SECRET[5:] not in err and OTHER_SECRET[5:] not in err
    assert file_identity(path) == before


def test_token_secret_prints_one_valid_fresh_secret_stores_nothing(users_dir):
    printed = [run(users_dir, "token", "secret") for _ in range(20)]
    secrets_ = {out.strip() for _, out, _ in printed}
    assert all(status == 0 and err == "" for status, _, err in printed) and len(secrets_) == 20
    assert all(re.fullmatch(r"mlst_[A-Za-z0-9_-]{43}", secret) for secret in secrets_)
    for secret in secrets_:
        users.validate_token_secret(secret)
    assert list(users_dir.iterdir()) == []


def test_token_add_secret_accepted_by_token_ensure(users_dir):
    _, out, _ = run(users_dir, "token", "add", "ci")
    status, answered, _ = ensure_token(users_dir, "ci", secret=out.strip())
    assert status == 0 and answered["changed"] is False


def test_parse_expires_on_start_of_that_day_utc():
    expected = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC).timestamp()
    assert ensure.parse_expires_on("2030-06-01") == expected


@pytest.mark.parametrize(
    "password_hash",
    [
        "pw",
        "$apr1$abcdefgh$0123456789abcdefghijkl",
        # passlib's bcrypt of "pw" at cost 4, below the floor: refused without being checked.
        "$2b$04$abcdefghijklmnopqrstuuyvPXIbu7xe6/CED2DzX8z6Si09MlzlW",
    ],
)
def test_verify_password_hash_that_cannot_log_in_false(password_hash):
    assert _verify_password("pw", password_hash) is False


def test_verify_password_right_password_true(bcrypt_hash):
    # The one real check of this module (~0.4 s); the others go through the session's cache.
    assert _verify_password(PASSWORD, bcrypt_hash(PASSWORD)) is True
