"""The users store: the only code that reads or writes the htpasswd file and the tokens file.

The users file is a standard htpasswd file of bcrypt lines, so ``htpasswd -v`` and nginx read
it too. What htpasswd has no field for is kept where both tools skip it:

- a role is a comment line ``#role NAME ROLE`` (users without one get ``DEFAULT_ROLE``);
- a disabled user's hash is prefixed with ``!`` (as in /etc/shadow), so it matches nothing and
  re-enabling restores the same password.

Hashes, roles and the disabled flag therefore change in one atomic rename: there is no moment
where a new user has no role or a demoted user keeps the old one.

Only ``$2b$``/``$2y$`` bcrypt lines at or above ``MIN_BCRYPT_COST`` can authenticate. Any other
line (plaintext, crypt, MD5, SHA1, a lower cost, a malformed line) is reported with its line
number and its user counts as disabled; every other user keeps working.
"""

import dataclasses
import hashlib
import json
import re
import secrets
import time
from pathlib import Path

from mlflowstack.files import SECRET_MODE, BundleError, copy_atomic, exclusive_lock, write_atomic

ROLES = ("viewer", "editor", "admin")
DEFAULT_ROLE = "editor"
MIN_BCRYPT_COST = 12
MAX_NAME_BYTES = 64
MAX_PASSWORD_BYTES = 72  # bcrypt ignores what follows; refuse instead of truncating.
TOKEN_PREFIX = "mlst_"
TOKEN_BYTES = 32  # 256 random bits: 43 URL-safe base64 characters after the prefix
# A random secret has fewer distinct characters than this once in ~2e13 (43 draws of 64).
MIN_TOKEN_DISTINCT_CHARACTERS = 16

USERS_FILE = "htpasswd"
TOKENS_FILE = "tokens"
INITIAL_PASSWORD_FILE = "initial-admin-password"

_BCRYPT = re.compile(r"^\$2[by]\$(?P<cost>\d\d)\$[./A-Za-z0-9]{53}$")
_TOKEN_SECRET = re.compile(rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{42}}[AEIMQUYcgkosw048]$")
_HEADER = (
    "# MLflow stack users: htpasswd with bcrypt. Change it with scripts/stackctl.\n"
    "# '#role NAME ROLE' lines hold roles; a '!' before a hash disables that user.\n"
)


@dataclasses.dataclass(frozen=True)
class User:
    """One user of the users file. ``problem`` says why the line cannot authenticate."""

    name: str
    role: str
    password_hash: str
    enabled: bool = True
    problem: str | None = None

    @property
    def scheme(self) -> str:
        return hash_scheme(self.password_hash)

    @property
    def can_log_in(self) -> bool:
        return self.enabled and self.problem is None


@dataclasses.dataclass(frozen=True)
class Token:
    """An API token: only the SHA-256 of the secret is stored."""

    name: str
    role: str
    digest: str
    expires: int | None  # Unix time; None never expires

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


@dataclasses.dataclass
class Users:
    """The parsed users file: users in file order plus a line-numbered list of problems."""

    users: dict[str, User]
    problems: list[str]


def validate_name(name: str) -> None:
    """Raise BundleError unless ``name`` can be a user or token name."""
    if not name:
        raise BundleError("user name is empty")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise BundleError(f"user name is longer than {MAX_NAME_BYTES} bytes")
    if ":" in name or any(ch.isspace() or not ch.isprintable() for ch in name):
        raise BundleError(f"user name {name!r} has ':', white space or a control character")
    if name[0] in "#!":
        raise BundleError(f"user name {name!r} starts with '{name[0]}'")


def validate_password(password: str) -> None:
    """Raise BundleError unless bcrypt can hash ``password`` whole."""
    if not password:
        raise BundleError("password is empty")
    if "\0" in password:
        raise BundleError("password contains a NUL byte")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise BundleError(f"password is longer than {MAX_PASSWORD_BYTES} bytes in UTF-8")


def validate_role(role: str) -> None:
    if role not in ROLES:
        raise BundleError(f"unknown role {role!r} (choose from {', '.join(ROLES)})")


def hash_scheme(password_hash: str) -> str:
    """Name the scheme of an htpasswd hash, for reports (never the hash itself)."""
    if _BCRYPT.match(password_hash):
        return "bcrypt"
    for prefix, scheme in (("$2", "bcrypt-variant"), ("$apr1$", "md5"), ("{SHA}", "sha1")):
        if password_hash.startswith(prefix):
            return scheme
    if password_hash.startswith(("$1$", "$5$", "$6$", "$y$")):
        return "crypt"
    if len(password_hash) == 13 and re.fullmatch(r"[./A-Za-z0-9]{13}", password_hash):
        return "des"
    return "plaintext"


def bcrypt_cost(password_hash: str) -> int | None:
    match = _BCRYPT.match(password_hash)
    return int(match["cost"]) if match else None


def hash_password(password: str, cost: int = MIN_BCRYPT_COST) -> str:
    """A ``$2y$`` bcrypt hash of ``password`` (validated first) at ``cost`` >= the floor."""
    validate_password(password)
    if cost < MIN_BCRYPT_COST:
        raise BundleError(f"bcrypt cost {cost} is below the floor of {MIN_BCRYPT_COST}")
    from passlib.hash import bcrypt

    return bcrypt.using(rounds=cost, ident="2y").hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` logs in with ``password_hash``: the gate's bcrypt check, and False
    for any hash that cannot log in (not bcrypt, or below the cost floor)."""
    if _line_problem(password_hash):
        return False
    from passlib.hash import bcrypt

    return bcrypt.verify(password, password_hash)


def new_token_secret() -> str:
    """A fresh token secret: ``mlst_`` and 43 URL-safe base64 characters (32 random bytes)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def validate_token_secret(secret: str) -> None:
    """Raise BundleError unless ``secret`` has the shape ``new_token_secret`` gives: the
    prefix, then 32 bytes in unpadded URL-safe base64 (so the last character carries 4 bits),
    with at least 16 distinct characters (a placeholder or pattern typed by hand has fewer; a
    random secret once in ~2e13). The error never quotes the secret."""
    if not secret:
        raise BundleError("token secret is empty")
    if not _TOKEN_SECRET.match(secret):
        raise BundleError(
            f"token secret is not in stackctl's format ('{TOKEN_PREFIX}' and 43 URL-safe base64 "
            "characters, 32 random bytes): make one with 'scripts/stackctl token secret'"
        )
    if len(set(secret.removeprefix(TOKEN_PREFIX))) < MIN_TOKEN_DISTINCT_CHARACTERS:
        raise BundleError(
            "token secret is too regular to be random (fewer than "
            f"{MIN_TOKEN_DISTINCT_CHARACTERS} distinct characters): make one with "
            "'scripts/stackctl token secret'"
        )


def _line_problem(password_hash: str) -> str | None:
    scheme = hash_scheme(password_hash)
    if scheme != "bcrypt":
        return f"{scheme} hash is not accepted, only bcrypt ($2b$/$2y$)"
    cost = bcrypt_cost(password_hash)
    if cost < MIN_BCRYPT_COST:
        return f"bcrypt cost {cost} is below {MIN_BCRYPT_COST}"
    return None


def parse_users(text: str) -> Users:
    """Parse users-file text; never raises for content, reports it in ``problems`` instead."""
    roles: dict[str, str] = {}
    entries: list[tuple[int, str, str]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            words = line.split()
            if words[0] == "#role":
                if len(words) == 3 and words[2] in ROLES:
                    roles[words[1]] = words[2]
                else:
                    problems.append(f"line {number}: malformed role line, ignored")
            continue
        name, colon, password_hash = line.partition(":")
        try:
            validate_name(name)
        except BundleError as error:
            problems.append(f"line {number}: malformed line ({error}), ignored")
            continue
        if not colon:
            problems.append(f"line {number}: malformed line (no ':'), ignored")
            continue
        entries.append((number, name, password_hash))

    users: dict[str, User] = {}
    for number, name, password_hash in entries:
        if name in users:
            problems.append(f"line {number}: user {name!r} appears again, later line ignored")
            continue
        enabled = not password_hash.startswith("!")
        bare_hash = password_hash.removeprefix("!")
        problem = _line_problem(bare_hash)
        if problem:
            problems.append(f"line {number}: user {name!r}: {problem}; user disabled")
        users[name] = User(name, roles.get(name, DEFAULT_ROLE), bare_hash, enabled, problem)
    return Users(users, problems)


def render_users(users: Users) -> str:
    lines = [_HEADER]
    for user in users.users.values():
        flag = "" if user.enabled else "!"
        lines.append(f"#role {user.name} {user.role}\n{user.name}:{flag}{user.password_hash}\n")
    return "".join(lines)


def parse_tokens(text: str) -> dict[str, Token]:
    """Parse the tokens file (one JSON object a line), keyed by digest; bad lines are skipped."""
    tokens = {}
    for line in text.splitlines():
        try:
            item = json.loads(line)
            token = Token(item["name"], item["role"], item["sha256"], item.get("expires"))
        except (ValueError, KeyError, TypeError):
            continue
        if token.role in ROLES:
            tokens[token.digest] = token
    return tokens


def render_tokens(tokens: dict[str, Token]) -> str:
    return "".join(
        json.dumps({"name": t.name, "role": t.role, "sha256": t.digest, "expires": t.expires})
        + "\n"
        for t in tokens.values()
    )


def token_digest(token: str) -> str:
    """SHA-256 is right here: tokens are 256 random bits, so nothing is left to brute-force."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UserStore:
    """The users directory: ``htpasswd``, its ``.bak``, ``tokens``, and a writer's lock.

    Readers never lock (every write is an atomic rename). Writers go through ``_change`` so a
    second writer waits, then works on what the first one wrote.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.users_path = self.directory / USERS_FILE
        self.tokens_path = self.directory / TOKENS_FILE
        self.initial_password_path = self.directory / INITIAL_PASSWORD_FILE

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not self.directory.is_dir():
                raise BundleError(f"{self.directory}: users directory does not exist") from None
            return ""
        except UnicodeDecodeError:
            raise BundleError(f"{path}: not UTF-8 text") from None
        except OSError as error:
            raise BundleError(f"{path}: cannot read ({error.strerror})") from error

    def load_users(self) -> Users:
        return parse_users(self._read(self.users_path))

    def load_tokens(self) -> dict[str, Token]:
        return parse_tokens(self._read(self.tokens_path))

    def _save_users(self, users: Users) -> None:
        if self.users_path.exists():
            copy_atomic(self.users_path, self.directory / f"{USERS_FILE}.bak")
        write_atomic(self.users_path, render_users(users).encode("utf-8"), SECRET_MODE)

    def converge_users(self, change):
        """Apply ``change(users)`` under the lock and save only if it returns a true value
        (returned), so a file that already holds what is asked keeps its bytes, inode and
        mtime."""
        with exclusive_lock(self.directory):
            users = self.load_users()
            result = change(users)
            if result:
                self._save_users(users)
            return result

    def converge_tokens(self, change):
        """``converge_users`` for the tokens file: ``change(tokens_by_digest)``."""
        with exclusive_lock(self.directory):
            tokens = self.load_tokens()
            result = change(tokens)
            if result:
                write_atomic(self.tokens_path, render_tokens(tokens).encode(), SECRET_MODE)
            return result

    def check_name_free(self, name: str, kind: str) -> None:
        """BundleError unless ``name`` may be a new ``kind`` ("user" or "token"): MLflow records
        a run's or model's creator by name alone, so one name stands for one user or token."""
        if kind == "user":
            taken = any(token.name == name for token in self.load_tokens().values())
        else:
            taken = name in self.load_users().users
        if taken:
            other = "a token" if kind == "user" else "a user"
            raise BundleError(
                f"{other} is already named {name!r}: MLflow records creators by name, so a "
                f"{kind} needs another name"
            )

    def _change_user(self, name: str, change) -> User | None:
        """Apply ``change(users, current_user_or_None)`` under the lock and save the result."""
        validate_name(name)
        with exclusive_lock(self.directory):
            users = self.load_users()
            result = change(users, users.users.get(name))
            self._save_users(users)
            return result

    def add_user(
        self, name: str, password: str, role: str = DEFAULT_ROLE, cost: int = MIN_BCRYPT_COST
    ) -> User:
        validate_role(role)
        password_hash = hash_password(password, cost)

        def add(users: Users, existing: User | None) -> User:
            if existing:
                raise BundleError(f"user {name!r} already exists")
            self.check_name_free(name, "user")
            users.users[name] = User(name, role, password_hash)
            return users.users[name]

        return self._change_user(name, add)

    def _update_user(self, name: str, **fields) -> User:
        def update(users: Users, existing: User | None) -> User:
            if existing is None:
                raise BundleError(f"no user {name!r}")
            if "password_hash" in fields:
                fields["problem"] = None
            users.users[name] = dataclasses.replace(existing, **fields)
            return users.users[name]

        return self._change_user(name, update)

    def set_password(self, name: str, password: str, cost: int = MIN_BCRYPT_COST) -> User:
        return self._update_user(name, password_hash=hash_password(password, cost))

    def set_role(self, name: str, role: str) -> User:
        validate_role(role)
        return self._update_user(name, role=role)

    def set_enabled(self, name: str, enabled: bool) -> User:
        return self._update_user(name, enabled=enabled)

    def remove_user(self, name: str) -> None:
        def remove(users: Users, existing: User | None) -> None:
            if existing is None:
                raise BundleError(f"no user {name!r}")
            del users.users[name]

        self._change_user(name, remove)

    def add_token(self, name: str, role: str, days: int | None) -> str:
        """Create a token and return its secret, which is stored nowhere."""
        validate_name(name)
        validate_role(role)
        if days is not None and days <= 0:
            raise BundleError("--expires takes a positive number of days")
        secret = new_token_secret()
        expires = int(time.time()) + days * 86400 if days else None
        with exclusive_lock(self.directory):
            tokens = self.load_tokens()
            if any(t.name == name for t in tokens.values()):
                raise BundleError(f"token {name!r} already exists")
            self.check_name_free(name, "token")
            token = Token(name, role, token_digest(secret), expires)
            tokens[token.digest] = token
            write_atomic(self.tokens_path, render_tokens(tokens).encode(), SECRET_MODE)
        return secret

    def remove_token(self, name: str) -> None:
        with exclusive_lock(self.directory):
            tokens = self.load_tokens()
            kept = {d: t for d, t in tokens.items() if t.name != name}
            if len(kept) == len(tokens):
                raise BundleError(f"no token {name!r}")
            write_atomic(self.tokens_path, render_tokens(kept).encode(), SECRET_MODE)
