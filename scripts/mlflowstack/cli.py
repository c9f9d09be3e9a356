"""stackctl's command line: the parser and the dispatch, no logic (that is in commands.py and,
for the converging ``ensure`` commands, ensure.py).

Contract: every failure is one line ``stackctl: ...`` on stderr and exit status 1 (2 for usage
errors, from argparse); nothing is written when a command fails.
"""

import argparse
import sys

from mlflowstack import (
    audit,
    backup,
    commands,
    ensure,
    gc,
    pgmove,
    restore,
    serve,
    tlsctl,
    upgrade,
)
from mlflowstack.files import BundleError
from mlflowstack.users import DEFAULT_ROLE, MIN_BCRYPT_COST, ROLES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackctl",
        description="Users, API tokens and settings of the MLflow stack.",
        epilog="User and token commands run inside the stack's auth image through "
        "'docker compose run' unless --users-dir (or USERS_DIR) names a directory here.",
    )
    parser.add_argument("--users-dir", help="work on this users directory directly")
    parser.add_argument("--project-dir", default=None, help="the bundle (default: this repo)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create what a fresh install lacks (.env, first admin)")
    init.add_argument("--force", action="store_true", help="replace .env from .env.example")
    ca = init.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca-bundle",
        metavar="PATH",
        help="EXTRA_CA_BUNDLE for the new .env: the CA bundle pip trusts in image builds "
        "(default: this host's)",
    )
    ca.add_argument(
        "--no-ca-bundle", action="store_true", help="leave EXTRA_CA_BUNDLE unset in the new .env"
    )
    init.set_defaults(run=commands.init)

    bootstrap = sub.add_parser("bootstrap", help="create the first admin if there is no user")
    bootstrap.set_defaults(run=commands.bootstrap)

    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = user.add_parser("add", help="add a user (prompts for the password)")
    add.add_argument("name")
    add.add_argument("--role", default=DEFAULT_ROLE, help=f"{'|'.join(ROLES)} ({DEFAULT_ROLE})")
    _password_options(add)
    add.set_defaults(run=commands.user_add)
    passwd = user.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    _password_options(passwd)
    passwd.set_defaults(run=commands.user_passwd)
    role = user.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", help="|".join(ROLES))
    role.set_defaults(run=commands.user_role)
    for action, run, text in (
        ("remove", commands.user_remove, "remove a user"),
        ("disable", commands.user_disable, "refuse a user, keeping the password"),
        ("enable", commands.user_enable, "accept a disabled user again"),
    ):
        parser_ = user.add_parser(action, help=text)
        parser_.add_argument("name")
        parser_.set_defaults(run=run)
    user_ensure = user.add_parser(
        "ensure", help="make a user as asked, changing only what differs (for provisioning)"
    )
    user_ensure.add_argument("name")
    user_ensure.add_argument(
        "--role", default=DEFAULT_ROLE, help=f"{'|'.join(ROLES)} ({DEFAULT_ROLE})"
    )
    user_ensure.add_argument(
        "--state", choices=("present", "disabled", "absent"), default="present"
    )
    user_ensure.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password, one line, from stdin (needed unless the state is absent)",
    )
    user_ensure.add_argument("--json", action="store_true", help="report as one JSON object")
    user_ensure.set_defaults(run=ensure.user_ensure)
    listing = user.add_parser("list", help="list users (never hashes)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=commands.user_list)

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    token_add = token.add_parser("add", help="create a token; it is printed once")
    token_add.add_argument("name")
    token_add.add_argument("--role", default=DEFAULT_ROLE, help=f"{'|'.join(ROLES)}")
    token_add.add_argument("--expires", type=int, metavar="DAYS", help="expire after DAYS")
    token_add.set_defaults(run=commands.token_add)
    token_remove = token.add_parser("remove", help="revoke a token")
    token_remove.add_argument("name")
    token_remove.set_defaults(run=commands.token_remove)
    token_ensure = token.add_parser(
        "ensure", help="make a token as asked, changing only what differs (for provisioning)"
    )
    token_ensure.add_argument("name")
    token_ensure.add_argument("--role", default=DEFAULT_ROLE, help=f"{'|'.join(ROLES)}")
    token_ensure.add_argument("--state", choices=("present", "absent"), default="present")
    token_ensure.add_argument(
        "--secret-stdin",
        action="store_true",
        help="read the secret ('token secret' makes one), one line, from stdin",
    )
    token_ensure.add_argument(
        "--expires-on",
        metavar="YYYY-MM-DD",
        help="stop working at 00:00 UTC of that date (default: never)",
    )
    token_ensure.add_argument("--json", action="store_true", help="report as one JSON object")
    token_ensure.set_defaults(run=ensure.token_ensure)
    token.add_parser(
        "secret", help="print a fresh secret for 'token ensure'; nothing is stored"
    ).set_defaults(run=ensure.token_secret)
    token_list = token.add_parser("list", help="list tokens (never secrets)")
    token_list.add_argument("--json", action="store_true")
    token_list.set_defaults(run=commands.token_list)

    serving = sub.add_parser(
        "serve", help="the served models (the serve profile must be up)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    serving.add_parser("status", help="what each model serves, or why not").set_defaults(
        run=serve.serve_status
    )
    rollout = serving.add_parser(
        "rollout", help="serve the version the model's alias names now, failing no request"
    )
    rollout.add_argument("model", help="a model name of SERVE_MODELS")
    rollout.add_argument(
        "--force", action="store_true", help="reload even if that version is served already"
    )
    rollout.set_defaults(run=serve.serve_rollout)

    auditing = sub.add_parser(
        "audit",
        help="who called which route when, from nginx's access log",
        description="Requests from nginx's JSON access log (docker compose logs nginx): "
        "time, user or token, method, path (never a query string or a body), status, "
        "the gate's verdict. WHEN: an ISO time (UTC unless it has an offset) or a time "
        "before now: 30m, 2h, 1d.",
    )
    auditing.add_argument("--since", metavar="WHEN", help="requests at or after WHEN")
    auditing.add_argument("--until", metavar="WHEN", help="requests at or before WHEN")
    auditing.add_argument("--user", metavar="NAME", help="only this user or token")
    auditing.add_argument("--method", metavar="M", help="only this HTTP method")
    auditing.add_argument("--path-contains", metavar="S", help="only paths containing S")
    auditing.add_argument("--json", action="store_true", help="one JSON object per request")
    auditing.set_defaults(run=audit.audit)

    backing = sub.add_parser(
        "backup",
        help="one archive of the database, artifacts, users, secrets and .env",
        description="A consistent snapshot while the stack runs and clients write. Artifacts "
        "an earlier archive in the same directory holds are not copied again (--full copies "
        "all). The archive holds the stack's secrets: mode 0600, keep it so. --encrypt "
        "encrypts it with a passphrase (always a full archive; lose the passphrase and the "
        "backup is lost).",
    )
    backing.add_argument(
        "--output", metavar="FILE", help="archive path or directory (default: backups/)"
    )
    backing.add_argument("--force", action="store_true", help="replace an existing FILE")
    backing.add_argument("--full", action="store_true", help="copy every artifact again")
    backing.add_argument(
        "--encrypt", action="store_true",
        help="encrypt with a passphrase (asked twice on the terminal, or --passphrase-file)",
    )  # fmt: skip
    _passphrase_option(backing)
    _report_options(backing)
    backing.set_defaults(run=backup.backup)

    restoring = sub.add_parser(
        "restore",
        help="restore an archive onto an empty stack (verified before anything changes)",
        description="Verifies FILE (and the earlier archives it names, beside it) completely, "
        "then stops nginx, auth and server, writes, and starts them again.",
    )
    restoring.add_argument("file", metavar="FILE", help="an archive stackctl backup wrote")
    restoring.add_argument("--force", action="store_true", help="replace a stack that is not empty")
    _passphrase_option(restoring)
    restoring.add_argument(
        "--tmp-dir", metavar="DIR",
        help="where an encrypted FILE is decrypted, privately (default: FILE's directory)",
    )  # fmt: skip
    _report_options(restoring)
    restoring.set_defaults(run=restore.restore)

    upgrading = sub.add_parser(
        "upgrade",
        help="backup, build, start (the server migrates), health check; rolls back on failure",
        description="Run after changing the checkout (a new MLflow pin, a git pull). Checks the "
        "stack is healthy and has room, tags the running images IMAGE:pre-upgrade, takes a "
        "backup, builds, starts and checks health. If build, start or health check fails, "
        "it puts the previous images (and the database, if it was migrated) back and starts "
        "them, then exits 1 saying so.",
    )
    where = upgrading.add_mutually_exclusive_group()
    where.add_argument("--output", metavar="FILE", help="the backup archive's path")
    where.add_argument(
        "--backup-dir", metavar="DIR", help="a new pre-upgrade-TIME.tar here (default: backups/)"
    )
    upgrading.add_argument(
        "--timeout", type=int, default=300, metavar="S",
        help="seconds to wait for the stack to be healthy after a start (default 300)",
    )  # fmt: skip
    upgrading.add_argument("--dry-run", action="store_true", help="check, print the plan, stop")
    _report_options(upgrading)
    upgrading.set_defaults(run=upgrade.upgrade)

    moving = sub.add_parser(
        "migrate-to-postgres",
        help="move a SQLite stack's data into the bundled PostgreSQL (the postgres profile)",
        description="Checks first (SQLite at MLflow's head, an empty PostgreSQL), takes a "
        "backup, stops nginx, auth and server, starts PostgreSQL and migrate, copies every "
        "table in one transaction and compares counts and contents, then sets "
        "COMPOSE_PROFILES in .env and starts the stack. A failure before the switch starts "
        "the SQLite stack again, unchanged. The SQLite file stays in its volume.",
    )
    keeping = moving.add_mutually_exclusive_group()
    keeping.add_argument(
        "--output", metavar="FILE", help="the backup's path or directory (default: backups/)"
    )
    keeping.add_argument("--no-backup", action="store_true", help="take no backup first")
    moving.add_argument("--dry-run", action="store_true", help="check, print the plan, stop")
    _report_options(moving)
    moving.set_defaults(run=pgmove.migrate_to_postgres)

    collecting = sub.add_parser(
        "gc",
        help="delete for good what was deleted more than DAYS days ago (mlflow gc)",
        description="MLflow's mlflow gc in the server container: runs, experiments and logged "
        "models in the deleted stage for more than DAYS days go for good, with their artifacts.",
    )
    collecting.add_argument(
        "--older-than", metavar="DAYS", type=int, required=True, help="deleted before DAYS days"
    )
    collecting.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    collecting.add_argument("--json", action="store_true", help="report as one JSON object")
    collecting.set_defaults(run=gc.gc)

    config = sub.add_parser("config", help="render or check the settings").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    config.add_parser(
        "render", help="print nginx's site config as rendered from .env"
    ).set_defaults(run=commands.config_render)
    config_check = config.add_parser(
        "check", help="validate compose and nginx settings (and, with TLS on, tls/)"
    )
    _warn_days_option(config_check)
    _tls_dir_option(config_check)
    config_check.set_defaults(run=commands.config_check)

    tls_commands = sub.add_parser("tls", help="HTTPS certificates (README, HTTPS)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    self_signed = tls_commands.add_parser(
        "self-signed",
        help="make a CA (kept if tls/ has one) and a certificate for PUBLIC_HOSTNAME in tls/",
    )
    self_signed.add_argument(
        "--force", action="store_true", help="replace tls/server.crt and server.key"
    )
    _tls_dir_option(self_signed)
    self_signed.set_defaults(run=tlsctl.tls_self_signed)
    reload = tls_commands.add_parser(
        "reload",
        help="check tls/server.crt and server.key, install them for nginx, reload nginx "
        "(nothing changes if a check fails)",
    )
    _tls_dir_option(reload)
    _warn_days_option(reload)
    reload.set_defaults(run=tlsctl.tls_reload)
    # Inside the auth image only (tls reload runs it): stdin -> the tls volume.
    install = tls_commands.add_parser("install")
    install.add_argument("--volume-dir", default=str(tlsctl.VOLUME_DIR))
    install.set_defaults(run=tlsctl.tls_install)
    return parser


def _tls_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-dir", metavar="DIR", help="the certificate files (default: tls/ of the bundle)"
    )


def _warn_days_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--warn-days",
        type=int,
        default=30,
        metavar="N",
        help="warn when the certificate expires within N days (default 30)",
    )


def _password_options(parser: argparse.ArgumentParser) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read one line from stdin")
    how.add_argument("--generate", action="store_true", help="print a random password once")
    parser.add_argument(
        "--cost", type=int, default=MIN_BCRYPT_COST, help=f"bcrypt cost (>= {MIN_BCRYPT_COST})"
    )


def _passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file", metavar="FILE",
        help="the passphrase is this file's first line (mode 0600 or stricter); "
        "default: asked on the terminal",
    )  # fmt: skip


def _report_options(parser: argparse.ArgumentParser) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--quiet", action="store_true", help="print nothing (errors aside)")
    how.add_argument("--json", action="store_true", help="report as one JSON object")


def _command_words(argv: list[str]) -> list[str]:
    """The words after the global options, to hand on to stackctl inside the auth image."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--project-dir", "--users-dir"):
            skip = True
        elif not word.startswith(("--project-dir=", "--users-dir=")):
            words.append(word)
    return words


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = _command_words(argv)
    try:
        return args.run(args) or 0
    except BundleError as error:
        print(f"stackctl: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stackctl: interrupted, nothing changed", file=sys.stderr)
        return 130
