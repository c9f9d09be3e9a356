import errno
import os
import shutil
import stat
import subprocess
import threading

import pytest
from mlflowstack.files import BundleError
from mlflowstack.users import (
    UserStore,
    hash_password,
    parse_users,
    render_users,
    validate_name,
    validate_password,
)


@pytest.fixture
def store(tmp_path, monkeypatch, bcrypt_hash):
    # Hashing is the slow part; the tests here are about the file, not bcrypt.
    monkeypatch.setattr("mlflowstack.users.hash_password", lambda pw, cost=12: bcrypt_hash(pw))
    directory = tmp_path / "users"
    directory.mkdir()
    return UserStore(directory)


@pytest.mark.parametrize(
    "name", ["", "a:b", "a b", "tab\tname", "ctl\x07", "x" * 65, "#comment", "!bang", "é" * 33]
)
def test_validate_name_bad_name_raises(name):
    with pytest.raises(BundleError):
        validate_name(name)


@pytest.mark.parametrize("name", ["alice", "ci-bot.1", "é" * 32, "x" * 64])
def test_validate_name_good_name_passes(name):
    validate_name(name)


@pytest.mark.parametrize("password", ["", "a\0b", "x" * 73, "é" * 37])
def test_validate_password_bad_password_raises(password):
    with pytest.raises(BundleError):
        validate_password(password)


def test_hash_password_floor_cost_fresh_hash_verifies(bcrypt_verify):
    # The other tests share hashes made once (tests/conftest.py); this one is made here.
    password_hash = hash_password("fresh pw")
    assert password_hash.startswith("$2y$12$")
    assert bcrypt_verify("fresh pw", password_hash)


def test_hash_password_cost_below_floor_raises():
    with pytest.raises(BundleError, match="below the floor"):
        hash_password("secret", cost=10)


def test_parse_users_non_bcrypt_lines_reported_and_disabled(bcrypt_hash):
    good = bcrypt_hash("pw")
    text = (
        f"#role alice admin\nalice:{good}\n"
        "plain:hunter2\n"
        "md5:$apr1$abc$0123456789012345678901\n"
        "sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"
        "des:abJnggxhB/yWI\n"
        f"low:{good.replace('$12$', '$10$')}\n"
        "no colon here\n"
    )
    users = parse_users(text)
    assert users.users["alice"].can_log_in and users.users["alice"].role == "admin"
    for name, scheme in [("plain", "plaintext"), ("md5", "md5"), ("sha", "sha1"), ("des", "des")]:
        assert users.users[name].scheme == scheme
        assert not users.users[name].can_log_in
    assert not users.users["low"].can_log_in
    assert any(p.startswith("line 3:") and "plaintext" in p for p in users.problems)
    assert any(p.startswith("line 8:") for p in users.problems)


def test_parse_users_user_without_role_line_gets_default_role(bcrypt_hash):
    assert parse_users(f"bob:{bcrypt_hash('pw')}\n").users["bob"].role == "editor"


def test_render_users_round_trip_keeps_roles_and_disabled(bcrypt_hash):
    text = f"#role a viewer\na:!{bcrypt_hash('pw')}\n#role b admin\nb:{bcrypt_hash('pw')}\n"
    again = parse_users(render_users(parse_users(text)))
    assert (again.users["a"].role, again.users["a"].enabled) == ("viewer", False)
    assert (again.users["b"].role, again.users["b"].enabled) == ("admin", True)


def test_add_user_new_user_written_with_role_and_mode_0600(store):
    store.add_user("alice", "pw", "viewer")
    user = store.load_users().users["alice"]
    assert (user.role, user.enabled, user.scheme) == ("viewer", True, "bcrypt")
    assert stat.S_IMODE(os.stat(store.users_path).st_mode) == 0o600
    lines = store.users_path.read_text().splitlines()
    assert "#role alice viewer" in lines
    assert any(line.startswith("alice:$2y$12$") for line in lines)


def test_add_user_existing_user_raises_and_changes_nothing(store):
    store.add_user("alice", "pw")
    before = store.users_path.read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        store.add_user("alice", "other")
    assert store.users_path.read_bytes() == before


def test_add_user_unknown_role_raises(store):
    with pytest.raises(BundleError, match="unknown role"):
        store.add_user("alice", "pw", "root")
    assert not store.users_path.exists()


def test_add_user_second_write_keeps_backup_with_same_mode(store):
    store.add_user("alice", "pw")
    first = store.users_path.read_bytes()
    store.add_user("bob", "pw")
    backup = store.directory / "htpasswd.bak"
    assert backup.read_bytes() == first
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600


def test_set_enabled_disable_then_enable_keeps_hash(store):
    store.add_user("alice", "pw")
    original = store.load_users().users["alice"].password_hash
    store.set_enabled("alice", False)
    assert ":!$2y$" in store.users_path.read_text()
    assert not store.load_users().users["alice"].can_log_in
    store.set_enabled("alice", True)
    assert store.load_users().users["alice"].password_hash == original


@pytest.mark.parametrize("action", ["remove", "passwd", "disable"])
def test_change_unknown_user_raises(store, action):
    store.add_user("alice", "pw")
    before = store.users_path.read_bytes()
    with pytest.raises(BundleError, match="no user"):
        {
            "remove": lambda: store.remove_user("bob"),
            "passwd": lambda: store.set_password("bob", "pw"),
            "disable": lambda: store.set_enabled("bob", False),
        }[action]()
    assert store.users_path.read_bytes() == before


def test_hand_edited_bad_line_other_users_keep_working(store, bcrypt_hash):
    store.users_path.write_text(f"alice:{bcrypt_hash('pw')}\nbroken line\nmallory:plain\n")
    store.add_user("bob", "pw")
    users = store.load_users()
    assert users.users["alice"].can_log_in and users.users["bob"].can_log_in
    assert not users.users["mallory"].can_log_in


def test_missing_directory_raises_clear_error(tmp_path):
    store = UserStore(tmp_path / "absent")
    with pytest.raises(BundleError, match="does not exist"):
        store.load_users()


def test_read_only_directory_raises_and_keeps_file(store, monkeypatch):
    store.add_user("alice", "pw")
    before = store.users_path.read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    # Root ignores directory modes, so the read-only mount is simulated where it would fail.
    monkeypatch.setattr("mlflowstack.files.tempfile.mkstemp", read_only)
    with pytest.raises(BundleError, match="Read-only"):
        store.add_user("bob", "pw")
    assert store.users_path.read_bytes() == before


def test_concurrent_writers_lose_no_user(store):
    names = [f"user{i}" for i in range(8)]
    threads = [threading.Thread(target=store.add_user, args=(n, "pw")) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(store.load_users().users) == set(names)


def test_add_token_stores_only_digest(store):
    secret = store.add_token("ci", "viewer", days=30)
    text = store.tokens_path.read_text()
    assert secret not in text and '"ci"' in text
    assert stat.S_IMODE(os.stat(store.tokens_path).st_mode) == 0o600
    (token,) = store.load_tokens().values()
    assert token.role == "viewer" and token.expires is not None


def test_remove_token_unknown_raises(store):
    with pytest.raises(BundleError, match="no token"):
        store.remove_token("ci")


@pytest.mark.skipif(not shutil.which("htpasswd"), reason="apache2-utils not installed")
def test_users_file_verified_by_apache_htpasswd(store):
    store.add_user("alice", "pw", "admin")
    store.add_user("bob", "pw")
    store.set_enabled("bob", False)
    verify = ["htpasswd", "-v", "-i", str(store.users_path)]
    assert subprocess.run([*verify, "alice"], input=b"pw", capture_output=True).returncode == 0
    assert subprocess.run([*verify, "alice"], input=b"no", capture_output=True).returncode != 0
    assert subprocess.run([*verify, "bob"], input=b"pw", capture_output=True).returncode != 0
