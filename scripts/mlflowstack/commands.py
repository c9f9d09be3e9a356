"""What each stackctl command does. Each function takes the parsed arguments and returns an
exit status, or raises BundleError with the one line to show.

Where the work happens: user and token commands need the users volume and bcrypt, which a
host with only Docker and a stock python3 lacks. So, unless a users directory is given
(``--users-dir`` or ``USERS_DIR``, as inside the auth image), they run themselves again inside
the auth image with ``docker compose run --rm -T stackctl ...``. Passwords typed at a prompt
cross that boundary on stdin only, never in arguments or the environment.
"""

import getpass
import importlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

from mlflowstack.cabundle import ca_bundle_setting, env_with_setting, kept_env_ca_warning
from mlflowstack.files import PUBLIC_MODE, SECRET_MODE, BundleError, create_file
from mlflowstack.stacksecrets import ensure_proxy_secret
from mlflowstack.users import UserStore, validate_name, validate_password

INITIAL_ADMIN = "admin"
REPO_ROOT = Path(__file__).resolve().parents[2]


def generate_password() -> str:
    """24 URL-safe characters: 144 random bits, and no character a shell or .env mangles."""
    return secrets.token_urlsafe(18)


def _local_store(args) -> UserStore | None:
    directory = args.users_dir or os.environ.get("USERS_DIR")
    return UserStore(Path(directory)) if directory else None


def _project_dir(args) -> Path:
    return Path(args.project_dir) if args.project_dir else REPO_ROOT


def compose_command(args, *compose_args: str) -> list[str]:
    """``docker compose`` of the bundle, as every stackctl command runs it."""
    return ["docker", "compose", "--project-directory", str(_project_dir(args)), *compose_args]


def one_off_command(args, *run_words: str) -> list[str]:
    """``docker compose run --rm -T --no-deps RUN_WORDS`` of a one-off container of the
    server's image that is there: the service's ``pull_policy: build`` would have ``run``
    build first and print the build on stdout, where an agent's answer goes. ``--pull never``
    says so only from Compose 2.32.2 on (Debian 13's 2.26, which the Ansible roles install,
    refuses it); compose.yaml reads the policy from SERVER_PULL_POLICY, which every version
    honours, so the command sets that (through ``env``: the command stays one argv)."""
    return [
        "env",
        "SERVER_PULL_POLICY=never",
        *compose_command(args, "run", "--rm", "-T", "--no-deps", *run_words),
    ]


def _compose(
    args, *compose_args: str, stdin_text: str | None = None, json_stdout: bool = False
) -> int:
    """Run ``docker compose``; with ``json_stdout`` only the JSON lines of its stdout stay on
    stdout and any other line goes to stderr, so a ``--json`` answer stays parseable whatever
    compose or a build prints."""
    command = compose_command(args, *compose_args)
    try:
        completed = subprocess.run(
            command,
            input=stdin_text,
            stdin=None if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if json_stdout else None,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise BundleError(
            "docker is not installed here (config commands need it; user and token commands "
            "do too, unless --users-dir names the users directory)"
        ) from None
    if json_stdout:
        for line in completed.stdout.splitlines(keepends=True):
            (sys.stdout if line.startswith("{") else sys.stderr).write(line)
    return completed.returncode


def _build_auth_image_if_missing(args) -> None:
    """Build the auth image as the ``auth`` service does, when it is missing. ``run`` would
    build it as the ``stackctl`` service: another image (compose labels each with its service),
    whose tag the first ``up`` takes away, leaving it behind untagged after ``down --rmi all``.
    Never builds an image that exists (a shipped VM has no build context to spare)."""
    command = compose_command(args)
    try:
        listed = subprocess.run(
            [*command, "config", "--images"], capture_output=True, text=True, check=False
        ).stdout.split()
    except FileNotFoundError:
        return  # _compose says that docker is missing
    image = next((name for name in listed if name.endswith("-auth")), None)
    missing = (
        image
        and subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        ).returncode
    )
    if missing:
        _compose(args, "build", "--quiet", "auth")


def _in_auth_image(
    args, argv: list[str], stdin_text: str | None = None, json_stdout: bool = False
) -> int:
    _build_auth_image_if_missing(args)
    return _compose(
        args,
        "run",
        "--rm",
        "-T",
        "--no-deps",
        "stackctl",
        *argv,
        stdin_text=stdin_text,
        json_stdout=json_stdout,
    )


def _terminal_available() -> bool:
    """Whether getpass can prompt on a terminal (without one it would echo the password)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _prompt(text: str) -> str:
    try:
        return getpass.getpass(text)
    except (EOFError, KeyboardInterrupt) as stop:
        # getpass leaves the cursor after its prompt: end that line before any message.
        print(file=sys.stderr)
        if isinstance(stop, EOFError):
            raise BundleError("no password entered, nothing changed") from None
        raise


SHORT_PASSWORD_CHARS = 12


def _read_new_password(args) -> str | None:
    """The password from stdin or two prompts; None when one is to be generated."""
    if args.generate:
        return None
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    else:
        if not _terminal_available():
            raise BundleError(
                "no terminal to ask for the password: pass --password-stdin or --generate"
            )
        password = _prompt("New password: ")
        if _prompt("Repeat it: ") != password:
            raise BundleError("the two passwords differ")
    validate_password(password)
    return password


def _require_bcrypt() -> None:
    """Raise BundleError unless this Python can make bcrypt hashes (a stock python3 cannot)."""
    try:
        for module in ("passlib.hash", "bcrypt"):
            importlib.import_module(module)
    except ImportError as error:
        package = (error.name or "passlib").partition(".")[0]
        raise BundleError(
            f"{package} is not installed here, so this python cannot hash passwords: "
            "drop --users-dir (the command then runs in the auth image), or run stackctl "
            "with a python that has passlib and bcrypt"
        ) from None


def _change_password(args, apply) -> int:
    """Shared by add and passwd: read the password where the user is, apply it in the store.

    ``apply(store, password)`` makes the change and returns the line that reports it.
    """
    validate_name(args.name)
    store = _local_store(args)
    if store is not None:
        _require_bcrypt()
    password = _read_new_password(args)
    if store is None:
        argv = [a for a in args.argv if a not in ("--password-stdin", "--generate")]
        if password is None:
            return _in_auth_image(args, [*argv, "--generate"])
        return _in_auth_image(args, [*argv, "--password-stdin"], stdin_text=password + "\n")
    shown = password is None
    password = password or generate_password()
    report = apply(store, password)
    if shown:
        # The one place the password ever appears: say so, or it looks like any other output.
        report += "; the generated password follows, shown only now:"
    print(report, file=sys.stderr)
    if shown:
        print(password)
    elif len(password) < SHORT_PASSWORD_CHARS:
        # Not refused: the login throttle slows guessing over the network, and the choice is
        # the operator's; but a 1-character password must not pass in silence.
        print(
            f"stackctl: warning: that password is shorter than {SHORT_PASSWORD_CHARS} "
            "characters, which resist guessing better (or --generate one)",
            file=sys.stderr,
        )
    return 0


def user_add(args) -> int:
    def apply(store: UserStore, password: str) -> str:
        user = store.add_user(args.name, password, args.role, args.cost)
        return f"user {user.name}: added (role {user.role})"

    return _change_password(args, apply)


def user_passwd(args) -> int:
    def apply(store: UserStore, password: str) -> str:
        store.set_password(args.name, password, args.cost)
        report = f"user {args.name}: password changed"
        # The first-run password file no longer tells the truth: remove it, and say so, as the
        # README sends newcomers to that file.
        if args.name == INITIAL_ADMIN and _remove(store.initial_password_path):
            report += "; the initial password file was removed (it held the old password)"
        return report

    return _change_password(args, apply)


def _remove(path: Path) -> bool:
    """Remove ``path``; return whether there was one to remove."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _store_or_delegate(args):
    store = _local_store(args)
    if store is None:
        sys.exit(_in_auth_image(args, args.argv))
    return store


def user_role(args) -> int:
    _store_or_delegate(args).set_role(args.name, args.role)
    print(f"user {args.name}: role {args.role}", file=sys.stderr)
    return 0


def user_remove(args) -> int:
    store = _store_or_delegate(args)
    store.remove_user(args.name)
    report = f"user {args.name}: removed"
    # A password of a user that no longer exists is no one's to keep.
    if args.name == INITIAL_ADMIN and _remove(store.initial_password_path):
        report += "; the initial password file was removed too"
    print(report, file=sys.stderr)
    return 0


def user_disable(args) -> int:
    _store_or_delegate(args).set_enabled(args.name, False)
    print(f"user {args.name}: disabled", file=sys.stderr)
    return 0


def user_enable(args) -> int:
    _store_or_delegate(args).set_enabled(args.name, True)
    print(f"user {args.name}: enabled", file=sys.stderr)
    return 0


def user_list(args) -> int:
    users = _store_or_delegate(args).load_users()
    rows = [
        {
            "name": u.name,
            "role": u.role,
            "enabled": u.can_log_in,
            "scheme": u.scheme,
            "problem": u.problem,
        }
        for u in users.users.values()
    ]
    for problem in users.problems:
        print(f"stackctl: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("user list: no users yet (the stack's first start creates admin)", file=sys.stderr)
    print(f"{'NAME':<24} {'ROLE':<7} {'ENABLED':<8} SCHEME")
    for row in rows:
        enabled = "yes" if row["enabled"] else "no"
        print(f"{row['name']:<24} {row['role']:<7} {enabled:<8} {row['scheme']}")
    return 0


def token_add(args) -> int:
    secret = _store_or_delegate(args).add_token(args.name, args.role, args.expires)
    print(f"token {args.name} ({args.role}) created; it is shown only now:", file=sys.stderr)
    print(secret)
    return 0


def token_remove(args) -> int:
    _store_or_delegate(args).remove_token(args.name)
    print(f"token {args.name}: removed", file=sys.stderr)
    return 0


def token_list(args) -> int:
    tokens = _store_or_delegate(args).load_tokens().values()
    rows = [{"name": t.name, "role": t.role, "expires": t.expires} for t in tokens]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<24} {'ROLE':<7} EXPIRES")
    for row in rows:
        expires = row["expires"]
        when = time.strftime("%Y-%m-%d", time.gmtime(expires)) if expires else "never"
        print(f"{row['name']:<24} {row['role']:<7} {when}")
    return 0


def bootstrap(args) -> int:
    """Create what a first start needs and is missing: the proxy secret (when ``SECRETS_DIR``
    is set, as in the stack's ``init`` service) and, if the users file has no user at all, the
    first admin with a random password.

    The password goes to a mode-0600 file in the users directory, never to a log.
    """
    store = _store_or_delegate(args)
    secrets_dir = os.environ.get("SECRETS_DIR")
    if secrets_dir and ensure_proxy_secret(Path(secrets_dir)):
        print(f"bootstrap: created the proxy secret in {secrets_dir}", file=sys.stderr)
    serving_dir = os.environ.get("SERVING_TOKEN_DIR")
    if serving_dir:
        _keep_serving_token(store, Path(serving_dir))
    if store.load_users().users:
        print("bootstrap: users exist, nothing to do", file=sys.stderr)
        return 0
    _require_bcrypt()
    password = generate_password()
    create_file(store.initial_password_path, (password + "\n").encode(), SECRET_MODE, force=True)
    try:
        store.add_user(INITIAL_ADMIN, password, role="admin")
    except BaseException:
        store.initial_password_path.unlink(missing_ok=True)
        raise
    print(
        f"bootstrap: created user {INITIAL_ADMIN!r} (admin); its password is in "
        f"{store.initial_password_path}",
        file=sys.stderr,
    )
    return 0


def _keep_serving_token(store: UserStore, directory: Path) -> None:
    """The serving profile's viewer token (servingtoken.py); a problem is reported, and the
    rest of the stack still starts."""
    from mlflowstack.servingtoken import keep_serving_token  # ensure.py imports this module

    try:
        wanted = bool(os.environ.get("SERVE_MODELS", "").strip())
        done = keep_serving_token(store, directory, wanted)
    except BundleError as error:
        print(f"bootstrap: warning: {error}", file=sys.stderr)
        return
    if done:
        print(f"bootstrap: {done}", file=sys.stderr)


def init(args) -> int:
    """Create .env from .env.example if missing (or with ``--force``), then the first admin if
    there is no user.

    A new .env gets ``EXTRA_CA_BUNDLE`` (see ca_bundle_setting): ``--ca-bundle PATH``, else
    this host's CA bundle unless the shell or .env.example already sets it or
    ``--no-ca-bundle`` is given. A bad ``--ca-bundle`` is refused before anything is written.
    """
    project = _project_dir(args)
    example = project / ".env.example"
    if not example.is_file():
        raise BundleError(f"{example}: missing; is --project-dir the bundle?")
    env_file = project / ".env"
    if env_file.exists() and not args.force:
        if args.ca_bundle is not None:
            raise BundleError(
                f"{env_file} exists and is kept, so --ca-bundle cannot go into it: add --force "
                "to write it again from .env.example, or set EXTRA_CA_BUNDLE in it yourself"
            )
        print(f"init: {env_file} exists, kept (--force replaces it)", file=sys.stderr)
        warning = kept_env_ca_warning(env_file.read_bytes(), os.environ)
        if warning:
            print(f"init: {warning}", file=sys.stderr)
    else:
        content = example.read_bytes()
        value, report = ca_bundle_setting(args, content, os.environ)
        if value is not None:
            content = env_with_setting(content, "EXTRA_CA_BUNDLE", value)
        project_name = project_name_setting(os.environ)
        if project_name:
            content = env_with_setting(content, "COMPOSE_PROJECT_NAME", project_name)
        create_file(env_file, content, PUBLIC_MODE, force=True)
        print(f"init: wrote {env_file} from .env.example", file=sys.stderr)
        if report:
            print(f"init: {report}", file=sys.stderr)
        if project_name:
            print(
                f"init: COMPOSE_PROJECT_NAME={project_name} in .env (from this shell): this "
                "stack's containers, volumes and images are named after it",
                file=sys.stderr,
            )
    taken = project_taken_elsewhere(args)
    if taken:
        name, elsewhere = taken
        raise BundleError(
            f"the compose project {name!r} runs from {elsewhere}: this checkout would act on "
            f"its containers and volumes; set COMPOSE_PROJECT_NAME in {env_file} to another "
            "name, then init again (README, Two stacks on one engine)"
        )
    if _local_store(args) is not None:
        return bootstrap(args)
    return _in_auth_image(args, ["bootstrap"])


def project_taken_elsewhere(args) -> tuple[str, Path] | None:
    """(project name, directory) when the compose project this checkout resolves to exists on
    the engine from another checkout: compose names the project ``mlflow-stack`` in every
    checkout, so a second clone without its own name would run the first one's stack. None
    when not, or when compose or the engine cannot tell (init works without an engine)."""
    project = _project_dir(args).resolve()
    if not (project / "compose.yaml").is_file():
        return None
    try:
        config = subprocess.run(
            compose_command(args, "config", "--no-interpolate", "--format", "json"),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        listed = subprocess.run(
            ["docker", "compose", "ls", "--all", "--format", "json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        name = json.loads(config.stdout)["name"]
        projects = json.loads(listed.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    for entry in projects if isinstance(projects, list) else ():
        if not isinstance(entry, dict) or entry.get("Name") != name:
            continue
        files = [f for f in str(entry.get("ConfigFiles", "")).split(",") if f]
        directories = {Path(f).parent.resolve() for f in files}
        if directories and project not in directories:
            return name, min(directories)
    return None


def project_name_setting(environ) -> str | None:
    """COMPOSE_PROJECT_NAME from the shell for a new .env (a second stack on one engine is
    started so), or None; BundleError if compose would refuse it."""
    name = environ.get("COMPOSE_PROJECT_NAME", "")
    if not name:
        return None
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
        raise BundleError(
            f"COMPOSE_PROJECT_NAME {name!r}: compose wants lower-case letters, digits, '_' and "
            "'-', starting with a letter or digit"
        )
    return name


def config_render(args) -> int:
    """Print the nginx site config as the nginx image renders it from .env."""
    return _compose(
        args,
        "run",
        "--rm",
        "-T",
        "--no-deps",
        "nginx",
        "sh",
        "-c",
        "cat /etc/nginx/conf.d/*.conf /etc/nginx/conf.d/site/*.conf",
    )


def config_check(args) -> int:
    """``docker compose config -q``, PUBLIC_PATH and TRUSTED_PROXIES (edgesettings.py), with
    TLS on the files of tls/ (tlsctl.py), then ``nginx -t`` on the config rendered from .env.

    Upstreams point at loopback for the check: nginx resolves them at load, and the other
    services need not run.
    """
    from mlflowstack import edgesettings
    from mlflowstack.tlsctl import config_check_tls, nginx_settings  # tlsctl imports this module

    status = _compose(args, "config", "--quiet")
    if status:
        raise BundleError("docker compose config failed (see above)")
    settings = nginx_settings(args)
    edgesettings.check(settings)
    config_check_tls(args, settings)
    status = _compose(
        args,
        "run",
        "--rm",
        "-T",
        "--no-deps",
        "-e",
        "SERVER_UPSTREAM=127.0.0.1:5000",
        "-e",
        "GATE_UPSTREAM=127.0.0.1:8000",
        "nginx",
        "nginx",
        "-t",
    )
    if status:
        raise BundleError("nginx -t failed (see above)")
    print("config check: compose and nginx settings are valid", file=sys.stderr)
    return 0
