import contextlib
import io
import itertools
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mlflowstack import cabundle, cli, commands
from mlflowstack.users import UserStore

pytestmark = pytest.mark.usefixtures("fast_hashes")


@pytest.fixture(autouse=True)
def no_host_ca_bundle(monkeypatch):
    """init looks at this host's CA bundle and the shell's COMPOSE_PROJECT_NAME (which the stack
    tests set for their session); tests give it their own instead."""
    for name in ("EXTRA_CA_BUNDLE", "COMPOSE_PROJECT_NAME", *cabundle.CA_BUNDLE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", ())


@pytest.fixture
def counted_passwords(monkeypatch):
    """generate_password() gives generated-1, generated-2, ... in each test: distinct within a
    test, as random ones are, yet hashed once per session (tests/conftest.py). Its own contract
    has a test of its own."""
    counter = itertools.count(1)
    monkeypatch.setattr(commands, "generate_password", lambda: f"generated-{next(counter)}")


def run(users_dir, *argv, stdin=""):
    """Run stackctl in-process on ``users_dir`` (None: none given); return (status, stdout,
    stderr). ``stdin`` is its text, or a file object."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin) if isinstance(stdin, str) else stdin
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


def test_user_add_password_stdin_strips_only_newline(users_dir, bcrypt_verify):
    status, _, _ = run(users_dir, "user", "add", "alice", "--password-stdin", stdin=" pw \n")
    assert status == 0
    user = UserStore(users_dir).load_users().users["alice"]
    assert user.role == "editor" and bcrypt_verify(" pw ", user.password_hash)


def test_generate_password_24_url_safe_characters_new_each_time():
    passwords = {commands.generate_password() for _ in range(100)}
    assert len(passwords) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", password) for password in passwords)


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


def test_bootstrap_no_users_creates_admin_and_0600_password_file(users_dir, counted_passwords):
    status, out, err = run(users_dir, "bootstrap")
    password_file = users_dir / "initial-admin-password"
    password = password_file.read_text().strip()
    assert status == 0 and password not in out + err
    assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
    assert UserStore(users_dir).load_users().users["admin"].role == "admin"


def test_bootstrap_twice_changes_nothing(users_dir, counted_passwords):
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


def test_user_passwd_admin_removes_initial_password_file_and_says_so(users_dir, counted_passwords):
    run(users_dir, "bootstrap")
    status, _, err = run(
        users_dir, "user", "passwd", "admin", "--password-stdin", stdin="long-password\n"
    )
    assert status == 0 and not (users_dir / "initial-admin-password").exists()
    assert err == (
        "user admin: password changed; the initial password file was removed "
        "(it held the old password)\n"
    )


def test_user_passwd_admin_without_initial_password_file_claims_no_removal(users_dir):
    run(users_dir, "user", "add", "admin", "--role", "admin", "--password-stdin", stdin="pw\n")
    status, _, err = run(
        users_dir, "user", "passwd", "admin", "--password-stdin", stdin="long-password\n"
    )
    assert status == 0 and err == "user admin: password changed\n"


def test_user_passwd_other_user_keeps_initial_password_file(users_dir, counted_passwords):
    run(users_dir, "bootstrap")
    run(users_dir, "user", "add", "alice", "--password-stdin", stdin="pw\n")
    status, _, err = run(
        users_dir, "user", "passwd", "alice", "--password-stdin", stdin="long-password\n"
    )
    assert status == 0 and err == "user alice: password changed\n"
    assert (users_dir / "initial-admin-password").exists()


def test_user_passwd_short_password_set_with_one_warning_line(users_dir):
    """Newcomer review: a 1-character password passed in silence."""
    run(users_dir, "user", "add", "alice", "--password-stdin", stdin="x\n")
    status, _, err = run(users_dir, "user", "passwd", "alice", "--password-stdin", stdin="y\n")
    assert status == 0
    assert err.splitlines() == [
        "user alice: password changed",
        "stackctl: warning: that password is shorter than 12 characters, which resist "
        "guessing better (or --generate one)",
    ]


def test_init_writes_env_once_and_keeps_it_without_force(users_dir, tmp_path, counted_passwords):
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

    def fake_compose(args, *compose_args, stdin_text=None, json_stdout=False):
        seen["args"], seen["stdin"] = compose_args, stdin_text
        assert not json_stdout
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


@pytest.mark.parametrize(
    ("setting", "value"), [("PUBLIC_PATH", "/mlflow/"), ("TRUSTED_PROXIES", "10.0.0.1/8")]
)
def test_config_check_bad_edge_setting_one_line_error_before_nginx(monkeypatch, setting, value):
    from mlflowstack import tlsctl

    settings = {"PUBLIC_PATH": "", "TRUSTED_PROXIES": "", setting: value}
    monkeypatch.setattr(tlsctl, "nginx_settings", lambda args: settings)
    calls = []
    monkeypatch.setattr(commands, "_compose", lambda args, *words, **_: calls.append(words) or 0)
    status, _, err = run(None, "config", "check")
    assert status == 1 and err.count("\n") == 1 and f"stackctl: {setting}: " in err
    assert calls == [("config", "--quiet")]


# init and EXTRA_CA_BUNDLE

PEM = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
EXAMPLE_LINE = "# EXTRA_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
EXAMPLE = f"HTTP_PORT=80\n# The CA bundle pip trusts.\n{EXAMPLE_LINE}\nBASE=x\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A bundle with an .env.example; init's bootstrap goes to a fake `docker compose`."""
    directory = tmp_path / "bundle"
    directory.mkdir()
    (directory / ".env.example").write_text(EXAMPLE)
    monkeypatch.delenv("USERS_DIR", raising=False)
    monkeypatch.setattr(commands, "_compose", lambda args, *compose_args, **_: 0)
    return directory


def init(project, *argv):
    return run(None, "--project-dir", str(project), "init", *argv)


def bundle(path: Path, content: bytes = PEM) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_init_host_bundle_found_written_in_place_of_example_line(project, tmp_path, monkeypatch):
    found = bundle(tmp_path / "etc" / "ca.crt")
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", (str(tmp_path / "absent.crt"), str(found)))
    status, out, err = init(project)
    assert status == 0 and out == ""
    assert (project / ".env").read_text() == EXAMPLE.replace(
        EXAMPLE_LINE, f"EXTRA_CA_BUNDLE={found}"
    )
    lines = err.splitlines()
    assert lines[0].startswith("init: wrote ") and lines[1] == (
        f"init: EXTRA_CA_BUNDLE={found} in .env, this host's CA bundle: pip in the image builds "
        "then trusts what this host trusts, needed behind a TLS-inspecting proxy and harmless "
        "otherwise (--no-ca-bundle leaves it unset)"
    )


def test_init_no_host_bundle_keeps_example_line_and_says_so(project):
    status, _, err = init(project)
    assert status == 0 and (project / ".env").read_text() == EXAMPLE
    assert "init: found no CA bundle on this host, so EXTRA_CA_BUNDLE is unset" in err


def test_init_ca_bundle_option_relative_path_written_absolute(project, tmp_path, monkeypatch):
    bundle(tmp_path / "certs" / "corp.pem")
    monkeypatch.chdir(tmp_path)
    status, _, err = init(project, "--ca-bundle", "certs/corp.pem")
    assert status == 0
    assert f"EXTRA_CA_BUNDLE={tmp_path / 'certs' / 'corp.pem'}\n" in (project / ".env").read_text()
    assert "(from --ca-bundle)" in err


def test_init_no_ca_bundle_option_leaves_example_line(project, tmp_path, monkeypatch):
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", (str(bundle(tmp_path / "ca.crt")),))
    status, _, err = init(project, "--no-ca-bundle")
    assert status == 0 and (project / ".env").read_text() == EXAMPLE
    assert err.splitlines() == [f"init: wrote {project / '.env'} from .env.example"]


def test_init_shell_sets_extra_ca_bundle_written_to_env(project, tmp_path, monkeypatch):
    """The README's promise: step 1 records the bundle in .env, also when the shell exports
    it (a later shell without the variable must still build)."""
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", (str(bundle(tmp_path / "ca.crt")),))
    corporate = bundle(tmp_path / "corp" / "ca.pem")
    monkeypatch.setenv("EXTRA_CA_BUNDLE", str(corporate))
    status, _, err = init(project)
    assert status == 0
    assert (project / ".env").read_text() == EXAMPLE.replace(
        EXAMPLE_LINE, f"EXTRA_CA_BUNDLE={corporate}"
    )
    assert "as this shell sets it" in err


def test_init_shell_extra_ca_bundle_missing_refused_no_env(project, tmp_path, monkeypatch):
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", (str(bundle(tmp_path / "ca.crt")),))
    monkeypatch.setenv("EXTRA_CA_BUNDLE", "/elsewhere/ca.pem")
    status, _, err = init(project)
    assert status == 1 and err.count("\n") == 1
    assert "EXTRA_CA_BUNDLE='/elsewhere/ca.pem' in this shell: no such file" in err
    assert not (project / ".env").exists()


def test_init_example_already_sets_bundle_keeps_it(project, tmp_path, monkeypatch):
    monkeypatch.setattr(cabundle, "CA_BUNDLE_PATHS", (str(bundle(tmp_path / "ca.crt")),))
    (project / ".env.example").write_text("EXTRA_CA_BUNDLE=/corp/ca.pem\n")
    status, _, err = init(project)
    assert status == 0 and (project / ".env").read_text() == "EXTRA_CA_BUNDLE=/corp/ca.pem\n"
    assert err.splitlines() == [f"init: wrote {project / '.env'} from .env.example"]


def test_init_existing_env_ca_bundle_option_refused_env_unchanged(project, tmp_path):
    (project / ".env").write_text("HTTP_PORT=8080\n")
    status, _, err = init(project, "--ca-bundle", str(bundle(tmp_path / "ca.crt")))
    assert status == 1 and err.count("\n") == 1 and "--force" in err
    assert (project / ".env").read_text() == "HTTP_PORT=8080\n"


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("absent.pem", None, "no such file"),
        ("", "directory", "not a regular file"),
        ("empty.pem", b"", "empty file"),
        ("hosts", b"127.0.0.1 localhost\n", "not a PEM CA bundle"),
        ("dir", "directory", "not a regular file"),
        ("with space.pem", PEM, "white space"),
        ("dollar$HOME.pem", PEM, "'$'"),
        ("hash#.pem", PEM, "'#'"),
        ("quote'.pem", PEM, '"\'"'),
        ('dquote".pem', PEM, "'\"'"),
        ("back\\slash.pem", PEM, "'\\\\'"),
        ("new\nline.pem", PEM, "control character"),
    ],
)
def test_init_bad_ca_bundle_option_one_line_error_nothing_written(
    project, tmp_path, monkeypatch, name, content, message
):
    path = tmp_path / name
    if content == "directory":
        path.mkdir(exist_ok=True)
    elif content is not None:
        path.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    status, out, err = init(project, "--ca-bundle", name)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("stackctl: ") and message in err
    assert not (project / ".env").exists()


def test_init_host_bundle_path_env_cannot_hold_refused_nothing_written(
    project, tmp_path, monkeypatch
):
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle(tmp_path / "my certs" / "ca.pem")))
    status, _, err = init(project)
    assert status == 1 and err.count("\n") == 1
    assert "named by $SSL_CERT_FILE" in err and "--no-ca-bundle" in err
    assert not (project / ".env").exists()


def test_main_ca_bundle_and_no_ca_bundle_together_usage_error(project, tmp_path):
    status, _, err = init(
        project, "--ca-bundle", str(bundle(tmp_path / "ca.crt")), "--no-ca-bundle"
    )
    assert status == 2 and "not allowed with" in err
    assert not (project / ".env").exists()


def test_find_ca_bundle_variables_in_order_before_paths(tmp_path):
    paths = [str(bundle(tmp_path / "system.crt"))]
    environ = {
        "PIP_CERT": str(bundle(tmp_path / "pip.pem")),
        "REQUESTS_CA_BUNDLE": str(bundle(tmp_path / "requests.pem")),
    }
    assert cabundle.find_ca_bundle(environ, paths) == (
        tmp_path / "requests.pem",
        "REQUESTS_CA_BUNDLE",
    )
    assert cabundle.find_ca_bundle({}, paths) == (tmp_path / "system.crt", "")


def test_find_ca_bundle_missing_empty_and_non_pem_passed_over(tmp_path):
    environ = {
        "SSL_CERT_FILE": str(tmp_path / "absent.pem"),
        "REQUESTS_CA_BUNDLE": str(bundle(tmp_path / "empty.pem", b"")),
        "PIP_CERT": str(bundle(tmp_path / "text.pem", b"not a certificate\n")),
    }
    paths = [str(tmp_path), str(bundle(tmp_path / "ok.crt"))]
    assert cabundle.find_ca_bundle(environ, paths) == (tmp_path / "ok.crt", "")


def test_find_ca_bundle_nothing_usable_returns_none(tmp_path):
    assert cabundle.find_ca_bundle({"SSL_CERT_FILE": ""}, [str(tmp_path / "absent")]) is None


def test_find_ca_bundle_relative_variable_returned_absolute(tmp_path, monkeypatch):
    bundle(tmp_path / "ca.pem")
    monkeypatch.chdir(tmp_path)
    assert cabundle.find_ca_bundle({"SSL_CERT_FILE": "ca.pem"}, []) == (
        tmp_path / "ca.pem",
        "SSL_CERT_FILE",
    )


def test_ca_bundle_problem_unreadable_file_reported(tmp_path, monkeypatch):
    path = bundle(tmp_path / "ca.pem")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # (Tests may run as root, whom file modes do not stop.)
    monkeypatch.setattr(Path, "open", refuse)
    assert cabundle.ca_bundle_problem(path) == "cannot be read (Permission denied)"


def test_ca_bundle_problem_bundle_with_leading_comments_accepted(tmp_path):
    assert cabundle.ca_bundle_problem(bundle(tmp_path / "ca.crt", b"# ACCVRAIZ1\n" + PEM)) is None


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"A=1\n# X=/old\nB=2\n", b"A=1\nX=/new\nB=2\n"),
        (b"X=/set\n# X=/old\n", b"X=/new\n# X=/old\n"),
        (b"A=1\n#XX=1\n# X_Y=1", b"A=1\n#XX=1\n# X_Y=1\nX=/new\n"),
        (b"", b"X=/new\n"),
    ],
)
def test_env_with_setting_replaces_line_or_appends(content, expected):
    assert cabundle.env_with_setting(content, "X", "/new") == expected


def test_project_name_setting_from_shell_or_refused():
    assert commands.project_name_setting({}) is None
    assert commands.project_name_setting({"COMPOSE_PROJECT_NAME": "staging-2"}) == "staging-2"
    with pytest.raises(commands.BundleError, match="COMPOSE_PROJECT_NAME"):
        commands.project_name_setting({"COMPOSE_PROJECT_NAME": "Bad Name"})


def test_kept_env_ca_warning_only_without_setting(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    environ = {"SSL_CERT_FILE": str(ca)}
    warning = cabundle.kept_env_ca_warning(b"HTTP_PORT=80\n# EXTRA_CA_BUNDLE=x\n", environ)
    assert warning and f"EXTRA_CA_BUNDLE={ca}" in warning
    assert cabundle.kept_env_ca_warning(b"EXTRA_CA_BUNDLE=/x\n", environ) is None
    assert cabundle.kept_env_ca_warning(b"", {**environ, "EXTRA_CA_BUNDLE": "/y"}) is None


@pytest.mark.parametrize("name", ["../x", "-rf", "a b", "iris;id", "", "x" * 65])
def test_serve_rollout_bad_model_name_refused_before_docker(name, monkeypatch):
    monkeypatch.setattr(
        "mlflowstack.commands._compose", lambda *a, **k: pytest.fail("docker was called")
    )
    status, _, err = run(None, "serve", "rollout", "--", name)
    assert status == 1 and "is not a model name" in err


def _serving_ps(monkeypatch, running: str):
    """Stand in for `docker compose ps` of the serving container (its id, or nothing)."""
    monkeypatch.setattr(
        "mlflowstack.serve.subprocess.run",
        lambda command, **_: subprocess.CompletedProcess(command, 0, running, ""),
    )


@pytest.mark.parametrize("words", [["status"], ["rollout", "iris"]])
def test_serve_serving_not_running_one_line_and_no_exec(monkeypatch, words):
    _serving_ps(monkeypatch, "")
    monkeypatch.setattr(
        "mlflowstack.commands._compose", lambda *a, **k: pytest.fail("docker exec was called")
    )
    status, _, err = run(None, "serve", *words)
    assert status == 1 and "serving container is not running" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_rollout_passes_checked_name_to_serving_container(monkeypatch):
    calls = []
    _serving_ps(monkeypatch, "0123abcd\n")
    monkeypatch.setattr("mlflowstack.commands._compose", lambda args, *a, **k: calls.append(a) or 0)
    assert run(None, "serve", "rollout", "iris.v2", "--force")[0] == 0
    assert calls == [
        (
            "exec", "-T", "serving", "python", "/opt/mlflow-stack/serving.py",
            "rollout", "iris.v2", "--force",
        )
    ]  # fmt: skip


@pytest.mark.parametrize("image_exists, built", [(True, False), (False, True)])
def test_build_auth_image_if_missing_builds_as_auth_service_only_when_missing(
    monkeypatch, image_exists, built
):
    import subprocess
    from types import SimpleNamespace

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if command[-2:] == ["config", "--images"]:
            return subprocess.CompletedProcess(command, 0, "p-auth\np-auth\np-server\n")
        return subprocess.CompletedProcess(command, 0 if image_exists else 1, b"")

    monkeypatch.setattr(commands.subprocess, "run", fake_run)
    commands._build_auth_image_if_missing(SimpleNamespace(project_dir="/bundle"))
    assert calls[1] == ["docker", "image", "inspect", "p-auth"]
    builds = [c for c in calls if "build" in c]
    assert builds == ([["docker", "compose", "--project-directory", "/bundle", "build",
                        "--quiet", "auth"]] if built else [])  # fmt: skip
