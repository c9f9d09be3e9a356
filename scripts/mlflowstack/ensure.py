"""Commands that converge a user or a token to a desired state, for provisioning (the Ansible
role calls them): ``user ensure``, ``token ensure`` and ``token secret``.

Contract, for both ``ensure`` commands:

- Only what differs from the request is changed; a file is written (atomically, by the store)
  only when something changed, so a run that finds the state already held leaves the users and
  tokens files' bytes, inode and mtime as they were (and the gate reloads nothing).
- The report is one line on stderr, ``KIND NAME: unchanged`` / ``created (role R)`` /
  ``changed (a, b)`` / ``removed``; with ``--json`` it is instead exactly one JSON line on
  stdout and nothing else there:
  ``{"name": N, "kind": "user"|"token", "state": S, "changed": bool, "changes": [...]}``
  (a note, the removed initial-password file or an expiry date that has come, then goes to
  stderr as its own line).
  Change names: ``created``, ``removed``, ``password``, ``role``, ``enabled``, ``disabled``
  (users); ``created``, ``removed``, ``secret``, ``role``, ``expires``, ``duplicates`` (tokens).
- Exit status 0 whether or not something changed; bad input is one line ``stackctl: ...`` on
  stderr, status 1 and nothing changed (2 for usage errors, from argparse).
- A password or token secret is one line on stdin (its newline dropped), never an argument.
  ``--state absent`` never reads stdin. Run from the host, the line is read there and handed to
  stackctl in the auth image on stdin, as ``user add`` does.
"""

import calendar
import dataclasses
import datetime
import json
import re
import sys
import time

from mlflowstack import commands
from mlflowstack import users as userstore
from mlflowstack.files import BundleError
from mlflowstack.users import (
    Token,
    User,
    UserStore,
    token_digest,
    validate_name,
    validate_password,
    validate_role,
    validate_token_secret,
)


def _stdin_line() -> str:
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _delegate(args, secret: str | None) -> int:
    """Run this command again in the auth image, the secret (if any) on its stdin only."""
    return commands._in_auth_image(
        args,
        args.argv,
        stdin_text=None if secret is None else secret + "\n",
        json_stdout=args.json,
    )


def _report(args, kind: str, changes: list[str], created: str = "", note: str = "") -> int:
    if args.json:
        answer = {"name": args.name, "kind": kind, "state": args.state}
        answer.update(changed=bool(changes), changes=changes)
        print(json.dumps(answer))
        if note:
            print(f"{kind} {args.name}: {note}", file=sys.stderr)
        return 0
    if not changes:
        what = "unchanged"
    elif changes == ["created"]:
        what = f"created ({created})"
    elif changes == ["removed"]:
        what = "removed"
    else:
        what = f"changed ({', '.join(changes)})"
    print(f"{kind} {args.name}: {what}" + (f"; {note}" if note else ""), file=sys.stderr)
    return 0


def converge_user(
    store: UserStore, name: str, role: str, state: str, password: str | None
) -> list[str]:
    """Make user ``name`` as asked and return the names of the changes made (none: nothing
    written).

    ``present``/``disabled``: a missing user is created (``password`` required); an existing
    one keeps its hash when ``password`` is None or logs in with it (one bcrypt check, the
    gate's), else gets a new hash at the floor cost, as ``user add`` makes; a line that cannot
    log in (plaintext, crypt, low cost) therefore gets a new hash. ``absent``: removed if there.
    """
    validate_name(name)
    validate_role(role)

    def change(users) -> list[str]:
        existing = users.users.get(name)
        if state == "absent":
            if existing is None:
                return []
            del users.users[name]
            return ["removed"]
        enabled = state == "present"
        if existing is None:
            if password is None:
                raise BundleError(f"no user {name!r}: creating it needs --password-stdin")
            store.check_name_free(name, "user")
            users.users[name] = User(name, role, userstore.hash_password(password), enabled)
            return ["created"]
        changes, fields = [], {}
        # A line that cannot log in (plaintext, crypt, low cost) costs no check: new hash.
        if password is not None and (
            existing.problem is not None
            or not userstore.verify_password(password, existing.password_hash)
        ):
            fields.update(password_hash=userstore.hash_password(password), problem=None)
            changes.append("password")
        if existing.role != role:
            fields["role"] = role
            changes.append("role")
        if existing.enabled != enabled:
            fields["enabled"] = enabled
            changes.append("enabled" if enabled else "disabled")
        if fields:
            users.users[name] = dataclasses.replace(existing, **fields)
        return changes

    return store.converge_users(change)


def user_ensure(args) -> int:
    """``user ensure NAME [--role R] [--state present|disabled|absent] [--password-stdin]``.

    The password is required for ``present`` (and to create a user ``disabled``). When
    ``admin``'s password is set, the initial-password file is removed, as ``user passwd`` does.
    """
    validate_name(args.name)
    validate_role(args.role)
    if args.state == "present" and not args.password_stdin:
        raise BundleError(
            "user ensure --state present needs the password: pass --password-stdin and write it "
            "on stdin"
        )
    password = None
    if args.state != "absent" and args.password_stdin:
        password = _stdin_line()
        validate_password(password)
    store = commands._local_store(args)
    if store is None:
        return _delegate(args, password)
    if password is not None:
        commands._require_bcrypt()
    changes = converge_user(store, args.name, args.role, args.state, password)
    note = ""
    password_set = "password" in changes or "created" in changes or "removed" in changes
    # The first-run password file no longer tells the truth (as in user passwd), or names a
    # user that is gone.
    if (
        args.name == commands.INITIAL_ADMIN
        and password_set
        and commands._remove(store.initial_password_path)
    ):
        note = "the initial password file was removed (it held the old password)"
    disabled = ", disabled" if args.state == "disabled" else ""
    return _report(args, "user", changes, f"role {args.role}{disabled}", note)


def parse_expires_on(text: str) -> int:
    """The Unix time at which a token given ``--expires-on YYYY-MM-DD`` stops working: 00:00 UTC
    of that date, so ``token list`` shows the same date and every run computes the same time."""
    try:
        if not re.fullmatch(r"\d{4}-\d\d-\d\d", text):
            raise ValueError
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise BundleError(f"--expires-on {text!r} is not a date YYYY-MM-DD") from None
    return calendar.timegm(day.timetuple())


def converge_token(
    store: UserStore, name: str, role: str, state: str, secret: str | None, expires: int | None
) -> list[str]:
    """Make token ``name`` as asked (``secret`` validated, stored as its SHA-256 only) and
    return the names of the changes made (none: nothing written).

    A token already holding that digest, role and expiry is left alone; otherwise any token of
    that name is replaced by one. A secret that is another token's is refused.
    """
    validate_name(name)
    validate_role(role)
    if state != "absent":
        validate_token_secret(secret or "")
    digest = None if secret is None else token_digest(secret)

    def change(tokens: dict[str, Token]) -> list[str]:
        mine = [t for t in tokens.values() if t.name == name]
        for token in mine:
            del tokens[token.digest]
        if state == "absent":
            return ["removed"] if mine else []
        holder = tokens.get(digest)
        if holder is not None:
            raise BundleError(
                f"that secret belongs to token {holder.name!r} already: each token needs its own "
                "('scripts/stackctl token secret' makes one)"
            )
        wanted = Token(name, role, digest, expires)
        if not mine:
            store.check_name_free(name, "token")
        tokens[digest] = wanted
        if not mine:
            return ["created"]
        old = mine[0]
        differs = {
            "secret": old.digest != digest,
            "role": old.role != role,
            "expires": old.expires != expires,
            "duplicates": len(mine) > 1,
        }
        return [what for what, yes in differs.items() if yes]

    return store.converge_tokens(change)


def token_ensure(args) -> int:
    """``token ensure NAME [--role R] [--state present|absent] [--secret-stdin]
    [--expires-on YYYY-MM-DD]``: no ``--expires-on`` means the token never expires."""
    validate_name(args.name)
    validate_role(args.role)
    expires = None if args.expires_on is None else parse_expires_on(args.expires_on)
    if args.state == "present" and not args.secret_stdin:
        raise BundleError(
            "token ensure --state present needs the secret: pass --secret-stdin and write it on "
            "stdin ('scripts/stackctl token secret' makes one)"
        )
    secret = None
    if args.state == "present":
        secret = _stdin_line()
        validate_token_secret(secret)
    store = commands._local_store(args)
    if store is None:
        return _delegate(args, secret)
    changes = converge_token(store, args.name, args.role, args.state, secret, expires)
    note = ""
    if args.state == "present" and expires is not None and expires <= time.time():
        note = f"warning: {args.expires_on} has come, so the gate refuses this token"
    when = "" if expires is None else f", expires on {args.expires_on}"
    return _report(args, "token", changes, f"role {args.role}{when}", note)


def token_secret(args) -> int:
    """Print one fresh token secret in ``token add``'s format; nothing is stored."""
    print(userstore.new_token_secret())
    return 0
