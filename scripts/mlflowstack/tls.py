"""HTTPS certificates: a self-signed CA and server certificate, the checks nginx's files must
pass, and the one file nginx reads.

Where the work happens: on the host, with the ``openssl`` command (every host that runs Docker
has it, and a stock python3 has no X.509 parser; the auth image has neither, so only the
install of checked bytes runs there). The operator's files live in ``tls/`` of the bundle
(``server.crt``: the chain, leaf first; ``server.key``); nginx runs as uid 10001 and cannot
read a root-owned key from a bind mount, so ``stackctl tls reload`` checks them and installs
them, joined in one mode-0600 file (``server.pem``: one rename, so nginx never sees a new
certificate with an old key), into the ``tls`` volume through the auth image, then has nginx
reload. Keys reach that container on stdin only.

Contract: every problem is a BundleError with one line; nothing is written unless every check
passed; generated files are written atomically (files.write_atomic), keys with mode 0600, and
never over existing ones unless ``force``.
"""

import datetime
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflowstack.files import PUBLIC_MODE, SECRET_MODE, BundleError, write_atomic

TLS_MODES = ("off", "self-signed", "files")
DEFAULT_NAMES = ("localhost", "127.0.0.1")
# Browsers refuse server certificates valid longer than 398 days, even from a private CA.
SERVER_DAYS = 397
CA_DAYS = 3650
WARN_DAYS = 30
# In the tls volume (compose.yaml), where nginx/tls/tls.conf reads it.
INSTALLED_NAME = "server.pem"

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----\r?\n?"
)


@dataclass(frozen=True)
class Files:
    """The operator-facing files in ``tls/``."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def key(self) -> Path:
        return self.directory / "server.key"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"


def tls_mode(value: str | None) -> str:
    mode = (value or "off").strip()
    if mode not in TLS_MODES:
        raise BundleError(f"TLS_MODE: {mode!r} is not off, self-signed or files")
    return mode


def certificate_names(public_hostname: str | None) -> list[str]:
    """The names a certificate must cover: PUBLIC_HOSTNAME's hosts without their ports (as
    nginx's entrypoint reads it), or localhost and 127.0.0.1 when it is empty."""
    names = []
    for entry in (public_hostname or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        match = re.fullmatch(r"(\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?", entry)
        if not match:
            raise BundleError(f"PUBLIC_HOSTNAME: {entry!r} is not host[:port]")
        name = (match.group(2) or match.group(1)).lower()
        if name not in names:
            names.append(name)
    return names or list(DEFAULT_NAMES)


def port_warnings(public_hostname: str | None, https_port: str | None) -> list[str]:
    """PUBLIC_HOSTNAME entries whose port is not HTTPS_PORT: over HTTPS a client's Host names
    HTTPS_PORT, so nginx would answer 421 to exactly the name the redirect sends it to."""
    port = (https_port or "443").strip()
    found = re.findall(r"(?:^|,)\s*([^,\s]*?):([0-9]{1,5})\s*(?=,|$)", public_hostname or "")
    return [
        f"PUBLIC_HOSTNAME: {host}:{entry_port} allows only port {entry_port}, but HTTPS is on "
        f"{port}: list {host} without a port (or with :{port})"
        for host, entry_port in found
        if entry_port != port
    ]


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def openssl(*args: str, stdin: bytes | None = None) -> bytes:
    """stdout of ``openssl ARGS``; BundleError with openssl's last line when it fails."""
    try:
        done = subprocess.run(
            ["openssl", *args], input=stdin, capture_output=True, check=False, timeout=60
        )
    except FileNotFoundError:
        raise BundleError("openssl is not installed here (apt-get install openssl)") from None
    if done.returncode:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BundleError(f"openssl {args[0]}: {lines[-1] if lines else 'failed'}")
    return done.stdout


# --- generation -------------------------------------------------------------------------


def _new_key() -> bytes:
    return openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")


def make_self_signed(directory: Path, names: list[str], *, force: bool = False) -> list[Path]:
    """A CA (kept when ``ca.key`` and ``ca.crt`` exist, so clients keep trusting it) and a
    server certificate for ``names``, signed by it. Returns the files written.

    Refused, with nothing written, when ``server.crt`` or ``server.key`` exists and ``force``
    is not given, or when only one of the CA's two files exists.
    """
    files = Files(directory)
    existing = [p for p in (files.cert, files.key) if p.exists()]
    if existing and not force:
        raise BundleError(
            f"{existing[0]} exists: keep it, or add --force to replace the server certificate "
            "and key (the CA is kept)"
        )
    if files.ca_cert.exists() != files.ca_key.exists():
        present = files.ca_cert if files.ca_cert.exists() else files.ca_key
        raise BundleError(f"{present} exists without its pair: move it away, or restore both")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    # openssl reads keys from files: a private directory next to the targets, removed after.
    work = Path(tempfile.mkdtemp(dir=directory, prefix=".tls-"))
    try:
        if files.ca_key.exists():
            ca_key = files.ca_key.read_bytes()
            ca_cert = files.ca_cert.read_bytes()
            _write_private(work / "ca.key", ca_key)
            if _public_key_of_key(work / "ca.key") != _public_key_of_cert(files.ca_cert):
                raise BundleError(f"{files.ca_key} does not belong to {files.ca_cert}")
            (work / "ca.crt").write_bytes(ca_cert)
        else:
            ca_key = _new_key()
            _write_private(work / "ca.key", ca_key)
            ca_cert = openssl(
                "req", "-x509", "-new", "-key", str(work / "ca.key"), "-sha256",
                "-days", str(CA_DAYS),
                "-subj", f"/CN=MLflow stack CA {secrets.token_hex(4)}",
                "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash",
            )  # fmt: skip
            (work / "ca.crt").write_bytes(ca_cert)
        server_key = _new_key()
        _write_private(work / "server.key", server_key)
        csr = openssl(
            "req", "-new", "-key", str(work / "server.key"), "-subj", f"/CN={names[0]}"
        )  # fmt: skip
        (work / "server.csr").write_bytes(csr)
        alt = ",".join(f"IP:{n}" if _ip(n) else f"DNS:{n}" for n in names)
        (work / "ext.cnf").write_text(
            "[v3]\n"
            f"subjectAltName={alt}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        server_cert = openssl(
            "x509", "-req", "-in", str(work / "server.csr"), "-sha256",
            "-CA", str(work / "ca.crt"), "-CAkey", str(work / "ca.key"),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(SERVER_DAYS),
            "-extfile", str(work / "ext.cnf"), "-extensions", "v3",
        )  # fmt: skip
        if not files.ca_key.exists():
            write_atomic(files.ca_key, ca_key, SECRET_MODE)
            write_atomic(files.ca_cert, ca_cert, PUBLIC_MODE)
            written += [files.ca_key, files.ca_cert]
        write_atomic(files.key, server_key, SECRET_MODE)
        write_atomic(files.cert, server_cert, PUBLIC_MODE)
        written += [files.key, files.cert]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _write_private(path: Path, data: bytes) -> None:
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    with os.fdopen(handle, "wb") as out:
        out.write(data)


# --- checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    not_before: datetime.datetime
    not_after: datetime.datetime
    dns: tuple[str, ...]
    ips: tuple[str, ...]


def _public_key_of_cert(path: Path) -> bytes:
    return openssl("x509", "-in", str(path), "-noout", "-pubkey").strip()


def _public_key_of_key(path: Path) -> bytes:
    # -passin pass: an encrypted key fails here instead of prompting (nginx could not read it).
    return openssl("pkey", "-in", str(path), "-passin", "pass:", "-pubout").strip()


def _date(text: str) -> datetime.datetime:
    # openssl's "Nov  8 04:45:00 2026 GMT"; strptime's single space matches any run of them.
    return datetime.datetime.strptime(text.strip(), "%b %d %H:%M:%S %Y %Z").replace(
        tzinfo=datetime.UTC
    )


def read_leaf(path: Path) -> Leaf:
    """The first certificate of ``path``: its validity and subject alternative names."""
    text = openssl(
        "x509", "-in", str(path), "-noout", "-startdate", "-enddate", "-ext", "subjectAltName"
    ).decode()
    fields = dict(
        line.split("=", 1) for line in text.splitlines() if line.startswith("not")
    )  # fmt: skip
    dns, ips = [], []
    for item in re.split(r",\s*", text.partition("Subject Alternative Name:")[2].strip()):
        kind, _, value = item.partition(":")
        if kind == "DNS":
            dns.append(value.strip().lower())
        elif kind == "IP Address":
            ips.append(str(ipaddress.ip_address(value.strip())))
    return Leaf(_date(fields["notBefore"]), _date(fields["notAfter"]), tuple(dns), tuple(ips))


def _dns_covers(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == name


def _certificates(path: Path) -> list[bytes]:
    blocks = _PEM_BLOCK.finditer(path.read_bytes())
    return [m.group(0) for m in blocks if m.group(1) == b"CERTIFICATE"]


def check_files(
    files: Files,
    names: list[str],
    *,
    now: datetime.datetime | None = None,
    warn_days: int = WARN_DAYS,
) -> list[str]:
    """Check ``server.crt`` and ``server.key`` for nginx; return warnings, raise BundleError
    with the first problem: a file missing or unreadable, not PEM, a key that is not the
    leaf's, a leaf not yet or no longer valid, a name of ``names`` it does not cover."""
    for path in (files.cert, files.key):
        if not path.is_file():
            raise BundleError(f"{path}: missing (scripts/stackctl tls self-signed makes one)")
        if not os.access(path, os.R_OK):
            raise BundleError(f"{path}: not readable by this user")
    if not _certificates(files.cert):
        raise BundleError(f"{files.cert}: no PEM certificate in it (BEGIN CERTIFICATE)")
    try:
        leaf = read_leaf(files.cert)
    except BundleError as error:
        raise BundleError(f"{files.cert}: not a certificate nginx can read ({error})") from None
    try:
        key_public = _public_key_of_key(files.key)
    except BundleError:
        raise BundleError(
            f"{files.key}: not an unencrypted PEM private key (nginx cannot ask for a passphrase)"
        ) from None
    if key_public != _public_key_of_cert(files.cert):
        raise BundleError(
            f"{files.key} does not belong to {files.cert} (the chain's first certificate): "
            "nothing changed"
        )
    now = now or datetime.datetime.now(datetime.UTC)
    if now < leaf.not_before:
        raise BundleError(f"{files.cert}: not valid before {leaf.not_before:%Y-%m-%d %H:%M} UTC")
    if now >= leaf.not_after:
        raise BundleError(f"{files.cert}: expired on {leaf.not_after:%Y-%m-%d %H:%M} UTC")
    for name in names:
        address = _ip(name)
        covered = (
            str(address) in leaf.ips
            if address
            else any(_dns_covers(pattern, name) for pattern in leaf.dns)
        )
        if not covered:
            listed = ", ".join([*leaf.dns, *leaf.ips]) or "none"
            raise BundleError(
                f"{files.cert}: does not cover {name!r} of PUBLIC_HOSTNAME (its names: {listed})"
            )
    warnings = []
    left = leaf.not_after - now
    if left < datetime.timedelta(days=warn_days):
        warnings.append(
            f"{files.cert}: expires on {leaf.not_after:%Y-%m-%d} ({left.days} days): renew it"
        )
    if files.key.stat().st_mode & 0o077:
        warnings.append(f"{files.key}: readable by others than its owner (chmod 600 it)")
    return warnings


def installed_pem(files: Files) -> bytes:
    """What nginx reads: the chain as given, then the key (check_files first)."""
    chain = b"".join(_certificates(files.cert))
    return chain + files.key.read_bytes().strip() + b"\n"


def install(directory: Path, data: bytes) -> Path:
    """In the auth image: write the checked chain and key nginx reads, mode 0600, in one
    rename. The host checked them; this only refuses what is plainly not a chain and a key."""
    kinds = [m.group(1) for m in _PEM_BLOCK.finditer(data)]
    if b"CERTIFICATE" not in kinds or not any(k.endswith(b"PRIVATE KEY") for k in kinds):
        raise BundleError("tls install: stdin holds no PEM certificate and private key")
    target = directory / INSTALLED_NAME
    write_atomic(target, data, SECRET_MODE)
    return target
