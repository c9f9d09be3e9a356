import contextlib
import io
import json
import os
import stat
import sys

import pytest
from mlflowstack import cli, commands, users
from mlflowstack.users import UserStore


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch, bcrypt_hash):
    real = users.hash_password
    monkeypatch.setattr(
        users,
        "hash_password",
        lambda pw, cost=12: bcrypt_hash(pw) if cost == 12 else real(pw, cost),
    )


@pytest.fixture
def users_dir(tmp_path, monkeypatch):
    directory = tmp_path / "users"
    directory.mkdir()
    monkeypatch.delenv("USERS_DIR", raising=False)
    return directory


def run(users_dir, *argv, stdin=""):
    """Run stackctl in-process on ``users_dir`` (None: none given); return (status, stdout,
    stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    where = [] if users_dir is None else ["--users-dir", str(users_dir)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main([*where, *argv])
            except SystemExit as exit_:
                status = exit_.code
    finally:
        sys.stdin = old_stdin
    return status, out.getvalue(), err.getvalue()


def test_user_add_password_stdin_strips_only_newline(users_dir):
    status, _, _ = run(users_dir, "user", "add", "alice", "--password-stdin", stdin=" pw \n")
    assert status == 0
    user = UserStore(users_dir).load_users().users["alice"]
    from passlib.hash import bcrypt

    assert user.role == "editor" and bcrypt.verify(" pw ", user.password_hash)


def test_user_add_generate_prints_password_once(users_dir):
    status, out, err = run(users_dir, "user", "add", "bot", "--role", "viewer", "--generate")
    password = out.strip()
    assert status == 0 and len(password) >= 20 and password not in err
    assert err == "user bot: added (role viewer); the generated password follows, shown only now:\n"


@pytest.mark.parametrize(
    "argv,stdin,message",
    [
        (["user", "add", "a:b", "--password-stdin"], "pw\n", "':'"),
        (["user", "add", "a b", "--password-stdin"], "pw\n", "white space"),
        (["user", "add", "x" * 65, "--password-stdin"], "pw\n", "64 bytes"),
        (["user", "add", "bob", "--password-stdin"], "\n", "empty"),
        (["user", "add", "bob", "--password-stdin"], "x" * 73 + "\n", "72 bytes"),
        (["user", "add", "bob", "--password-stdin"], "a\0b\n", "NUL"),
        (["user", "add", "bob", "--role", "root", "--password-stdin"], "pw\n", "unknown role"),
        (["user", "add", "bob", "--cost", "10", "--password-stdin"], "pw\n", "below"),
        (["user", "passwd", "ghost", "--password-stdin"], "pw\n", "no user"),
        (["user", "remove", "ghost"], "", "no user"),
        (["user", "disable", "ghost"], "", "no user"),
        (["token", "remove", "ghost"], "", "no token"),
        (["token", "add", "t", "--expires", "0"], "", "positive"),
    ],
)
def test_main_bad_input_one_line_error_nonzero_nothing_written(users_dir, argv, stdin, message):
    run(users_dir, "user", "add", "keep", "--password-stdin", stdin="pw\n")
    before = (users_dir / "htpasswd").read_bytes()
    status, out, err = run(users_dir, *argv, stdin=stdin)
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("stackctl: ") and message in err
    assert (users_dir / "htpasswd").read_bytes() == before


def test_main_missing_users_dir_one_line_error(tmp_path):
    status, _, err = run(tmp_path / "absent", "user", "list")
    assert status == 1 and "does not exist" in err


def test_user_list_json_has_no_hashes_and_reports_bad_lines(users_dir, bcrypt_hash):
    (users_dir / "htpasswd").write_text(f"alice:{bcrypt_hash('pw')}\nmallory:plain\n")
    status, out, err = run(users_dir, "user", "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert status == 0 and "$2y$12$" not in out
    assert rows["alice"]["enabled"] and not rows["mallory"]["enabled"]
    assert rows["mallory"]["scheme"] == "plaintext" and "line 2" in err


def test_user_disable_enable_role_round_trip(users_dir):
    run(users_dir, "user", "add", "alice", "--password-stdin", stdin="pw\n")
    assert run(users_dir, "user", "disable", "alice")[0] == 0
    assert not UserStore(users_dir).load_users().users["alice"].can_log_in
    assert run(users_dir, "user", "enable", "alice")[0] == 0
    assert run(users_dir, "user", "role", "alice", "admin")[0] == 0
    user = UserStore(users_dir).load_users().users["alice"]
    assert user.can_log_in and user.role == "admin"


def test_bootstrap_no_users_creates_admin_and_0600_password_file(users_dir):
    status, out, err = run(users_dir, "bootstrap")
    password_file = users_dir / "initial-admin-password"
    password = password_file.read_text().strip()
    assert status == 0 and password not in out + err
    assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
    assert UserStore(users_dir).load_users().users["admin"].role == "admin"


def test_bootstrap_twice_changes_nothing(users_dir):
    run(users_dir, "bootstrap")
    before = (
        (users_dir / "htpasswd").read_bytes(),
        (users_dir / "initial-admin-password").read_bytes(),
    )
    assert run(users_dir, "bootstrap")[0] == 0
    after = (
        (users_dir / "htpasswd").read_bytes(),
        (users_dir / "initial-admin-password").read_bytes(),
    )
    assert before == after


def test_user_passwd_admin_removes_initial_password_file_and_says_so(users_dir):
    run(users_dir, "bootstrap")
    status, _, err = run(users_dir, "user", "passwd", "admin", "--password-stdin", stdin="new\n")
    assert status == 0 and not (users_dir / "initial-admin-password").exists()
    assert err == (
        "user admin: password changed; the initial password file was removed "
        "(it held the old password)\n"
    )


def test_user_passwd_admin_without_initial_password_file_claims_no_removal(users_dir):
    run(users_dir, "user", "add", "admin", "--role", "admin", "--password-stdin", stdin="pw\n")
    status, _, err = run(users_dir, "user", "passwd", "admin", "--password-stdin", stdin="new\n")
    assert status == 0 and err == "user admin: password changed\n"


def test_user_passwd_other_user_keeps_initial_password_file(users_dir):
    run(users_dir, "bootstrap")
    run(users_dir, "user", "add", "alice", "--password-stdin", stdin="pw\n")
    status, _, err = run(users_dir, "user", "passwd", "alice", "--password-stdin", stdin="new\n")
    assert status == 0 and err == "user alice: password changed\n"
    assert (users_dir / "initial-admin-password").exists()


def test_init_writes_env_once_and_keeps_it_without_force(users_dir, tmp_path):
    project = tmp_path / "bundle"
    project.mkdir()
    (project / ".env.example").write_text("HTTP_PORT=80\n")
    argv = ["--project-dir", str(project), "init"]
    assert run(users_dir, *argv)[0] == 0
    (project / ".env").write_text("HTTP_PORT=8080\n")
    status, _, err = run(users_dir, *argv)
    assert status == 0 and "kept" in err
    assert (project / ".env").read_text() == "HTTP_PORT=8080\n"
    assert run(users_dir, *argv, "--force")[0] == 0
    assert (project / ".env").read_text() == "HTTP_PORT=80\n"
    assert "admin" in UserStore(users_dir).load_users().users


def test_token_add_list_remove(users_dir):
    status, out, _ = run(users_dir, "token", "add", "ci", "--role", "viewer", "--expires", "7")
    secret = out.strip()
    assert status == 0 and secret.startswith("mlst_")
    status, out, _ = run(users_dir, "token", "list", "--json")
    assert json.loads(out)[0]["name"] == "ci" and secret not in out
    assert run(users_dir, "token", "remove", "ci")[0] == 0
    assert json.loads(run(users_dir, "token", "list", "--json")[1]) == []


def test_command_words_drop_global_options():
    argv = ["--project-dir", "/x", "user", "add", "bob", "--users-dir=/y"]
    assert cli._command_words(argv) == ["user", "add", "bob"]


def test_user_add_without_users_dir_delegates_password_on_stdin(monkeypatch):
    monkeypatch.delenv("USERS_DIR", raising=False)
    seen = {}

    def fake_compose(args, *compose_args, stdin_text=None):
        seen["args"], seen["stdin"] = compose_args, stdin_text
        return 0

    monkeypatch.setattr(commands, "_compose", fake_compose)
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert cli.main(["user", "add", "bob", "--password-stdin"]) == 0
    assert "s3cret" not in " ".join(seen["args"])
    assert seen["args"][-4:] == ("user", "add", "bob", "--password-stdin")
    assert seen["stdin"] == "s3cret\n"


def test_user_list_no_users_says_how_the_first_comes(users_dir):
    status, out, err = run(users_dir, "user", "list")
    assert status == 0 and out.startswith("NAME") and "first start creates admin" in err


@pytest.mark.parametrize("argv", [["user", "add", "bob"], ["bootstrap"]])
def test_main_users_dir_without_passlib_one_line_error_nothing_written(
    users_dir, monkeypatch, argv
):
    # What a stock python3 on the host looks like: no passlib to import.
    monkeypatch.setitem(sys.modules, "passlib", None)
    monkeypatch.setitem(sys.modules, "passlib.hash", None)
    status, _, err = run(users_dir, *argv)
    assert status == 1 and err.count("\n") == 1 and "passlib is not installed here" in err
    assert list(users_dir.iterdir()) == []


def test_user_add_no_terminal_one_line_error_instead_of_prompt(users_dir, monkeypatch):
    monkeypatch.setattr(commands, "_terminal_available", lambda: False)
    monkeypatch.setattr(commands.getpass, "getpass", pytest.fail)
    status, _, err = run(users_dir, "user", "add", "bob")
    assert status == 1 and err == (
        "stackctl: no terminal to ask for the password: pass --password-stdin or --generate\n"
    )


@pytest.mark.parametrize(
    "stop,status,message",
    [
        (EOFError, 1, "stackctl: no password entered, nothing changed"),
        (KeyboardInterrupt, 130, "stackctl: interrupted, nothing changed"),
    ],
)
def test_user_add_prompt_ended_line_ended_before_one_line_error(
    users_dir, monkeypatch, stop, status, message
):
    def getpass(prompt):
        raise stop

    monkeypatch.setattr(commands, "_terminal_available", lambda: True)
    monkeypatch.setattr(commands.getpass, "getpass", getpass)
    assert run(users_dir, "user", "add", "bob") == (status, "", f"\n{message}\n")
    assert list(users_dir.iterdir()) == []


def test_config_check_without_docker_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    status, _, err = run(None, "config", "check")
    assert status == 1 and err.count("\n") == 1 and "docker is not installed here" in err
