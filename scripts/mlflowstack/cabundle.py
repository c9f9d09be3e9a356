"""The build CA that ``stackctl init`` writes into a new .env as ``EXTRA_CA_BUNDLE``.

Why: behind a TLS-inspecting proxy, pip inside the image builds fails until it trusts the
proxy's CA. compose hands the file that ``EXTRA_CA_BUNDLE`` names to pip as a BuildKit secret
(``PIP_CERT``, which *replaces* pip's own list, so it must be a whole system bundle). This host's
bundle is what it trusts, so init offers that: needed behind such a proxy, harmless elsewhere.

Contract: reads files, never writes them; a path goes into .env only if compose's .env parser
reads it back unchanged (:func:`env_value_problem`); anything unusable is a BundleError with
the one line to show.
"""

import json
import os
import re
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflowstack.files import BundleError

# Where a host's CA bundle is named or kept, in the order init looks (see find_ca_bundle).
CA_BUNDLE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT")
CA_BUNDLE_PATHS = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora
    "/etc/ssl/cert.pem",  # Alpine, macOS
)
# Bundles are a few hundred kB; a file with no certificate in its first MiB is not one.
_PEM_SCAN_BYTES = 1 << 20
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (TRUSTED )?CERTIFICATE-----")


def ca_bundle_setting(
    args, example: bytes, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """The EXTRA_CA_BUNDLE a new .env gets and the line that says why; None for either if none.

    ``--ca-bundle`` wins and must be a usable bundle (ca_bundle_problem). Otherwise nothing is
    set when ``--no-ca-bundle`` is given or when ``example`` sets it already; then the
    shell's $EXTRA_CA_BUNDLE (a BundleError if it is no usable bundle); else this host's bundle
    (find_ca_bundle), if there is one. Raises BundleError for a bundle whose path .env cannot
    hold unchanged (env_value_problem).
    """
    if args.ca_bundle is not None:
        path = Path(os.path.abspath(args.ca_bundle))
        problem = ca_bundle_problem(path)
        if problem:
            raise BundleError(f"--ca-bundle {args.ca_bundle!r}: {problem}")
        _check_env_value(path, "from --ca-bundle")
        return str(path), (
            f"EXTRA_CA_BUNDLE={path} in .env (from --ca-bundle): pip in the image builds trusts "
            "the CAs it holds, in place of its own list"
        )
    if args.no_ca_bundle or sets_ca_bundle(example):
        return None, None
    if environ.get("EXTRA_CA_BUNDLE"):
        # Written down, so that a later shell without the variable (a new login, cron, a
        # colleague) still builds: compose prefers the shell's value while it is set.
        path = Path(os.path.abspath(environ["EXTRA_CA_BUNDLE"]))
        problem = ca_bundle_problem(path)
        if problem:
            raise BundleError(
                f"EXTRA_CA_BUNDLE={environ['EXTRA_CA_BUNDLE']!r} in this shell: {problem}; "
                "compose hands it to every image build: fix or unset it"
            )
        _check_env_value(path, "named by $EXTRA_CA_BUNDLE")
        return str(path), (
            f"EXTRA_CA_BUNDLE={path} in .env, as this shell sets it, so that builds from a "
            "shell without it trust the same CAs"
        )
    found = find_ca_bundle(environ, CA_BUNDLE_PATHS)
    if found is None:
        return None, (
            "found no CA bundle on this host, so EXTRA_CA_BUNDLE is unset; behind a "
            "TLS-inspecting proxy, image builds need it (init --force --ca-bundle PATH)"
        )
    path, named_by = found
    via = f" (named by ${named_by})" if named_by else ""
    _check_env_value(path, f"named by ${named_by}" if named_by else "this host's")
    return str(path), (
        f"EXTRA_CA_BUNDLE={path} in .env, this host's CA bundle{via}: pip in the image builds "
        "then trusts what this host trusts, needed behind a TLS-inspecting proxy and harmless "
        "otherwise (--no-ca-bundle leaves it unset)"
    )


def sets_ca_bundle(env: bytes) -> bool:
    """Whether .env text sets EXTRA_CA_BUNDLE (a commented example line does not)."""
    return re.search(rb"(?m)^EXTRA_CA_BUNDLE=", env) is not None


def kept_env_ca_warning(env: bytes, environ: Mapping[str, str]) -> str | None:
    """What to say when a kept .env sets no EXTRA_CA_BUNDLE although this host has a CA
    bundle (builds behind a TLS-inspecting proxy would fail), or None."""
    if environ.get("EXTRA_CA_BUNDLE") or sets_ca_bundle(env):
        return None
    found = find_ca_bundle(environ)
    if found is None:
        return None
    return (
        f"the kept .env sets no EXTRA_CA_BUNDLE: behind a TLS-inspecting proxy, image builds "
        f"will fail; add EXTRA_CA_BUNDLE={found[0]} to it"
    )


def find_ca_bundle(
    environ: Mapping[str, str], paths: Sequence[str] = CA_BUNDLE_PATHS
) -> tuple[Path, str] | None:
    """This host's CA bundle, as (absolute path, the variable that named it or ""), or None.

    Candidates, in order: the files named by $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE and $PIP_CERT
    in ``environ`` (relative to the current directory), then ``paths``. The first one that
    ca_bundle_problem accepts wins; missing, empty and non-PEM files are passed over. Reads,
    never writes.
    """
    candidates = [(environ[name], name) for name in CA_BUNDLE_VARIABLES if environ.get(name)]
    candidates += [(path, "") for path in paths]
    for raw, named_by in candidates:
        path = Path(os.path.abspath(raw))
        if ca_bundle_problem(path) is None:
            return path, named_by
    return None


def ca_bundle_problem(path: Path) -> str | None:
    """Why ``path`` cannot be EXTRA_CA_BUNDLE, or None: it must be a readable, non-empty
    regular file with a PEM certificate in its first MiB."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file"
    try:
        with path.open("rb") as handle:
            head = handle.read(_PEM_SCAN_BYTES)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not _PEM_CERTIFICATE.search(head):
        return "not a PEM CA bundle (no '-----BEGIN CERTIFICATE-----' line)"
    return None


def env_value_problem(value: str) -> str | None:
    """What in ``value`` compose's .env parser would not read back unchanged, or None.

    Unquoted, a value loses white space at its ends, ends at `` #``, and expands ``$``; quotes
    and backslashes start quoting or escapes. Rather than quote for one parser's rules, such
    values are refused: a CA bundle can always be copied to a plain path.
    """
    for char in value:
        if char.isspace() or not char.isprintable():
            return "white space or a control character"
        if char in "'\"`$#\\":
            return f"{char!r}"
    return None


def _check_env_value(path: Path, source: str) -> None:
    problem = env_value_problem(str(path))
    if problem:
        raise BundleError(
            f"the CA bundle {str(path)!r} ({source}) cannot go into .env, as its path has "
            f"{problem}: copy it to a plain path and pass --ca-bundle PATH, or --no-ca-bundle"
        )


def env_with_setting(content: bytes, name: str, value: str) -> bytes:
    """``content`` (.env text) with ``name=value`` set: in place of its first ``name=`` line, else
    of its first commented example ``# name=...``, else appended. Other bytes are unchanged."""
    line = f"{name}={value}".encode()
    escaped = re.escape(name.encode())
    for pattern in (rb"(?m)^" + escaped + rb"=.*$", rb"(?m)^#[ \t]*" + escaped + rb"=.*$"):
        match = re.search(pattern, content)
        if match:
            return content[: match.start()] + line + content[match.end() :]
    if content and not content.endswith(b"\n"):
        content += b"\n"
    return content + line + b"\n"


def compose_build_ca_bundle(compose_file: Path) -> str | None:
    """EXTRA_CA_BUNDLE as ``docker compose up`` next to ``compose_file`` resolves it (the
    environment, else that directory's .env; a relative path made absolute), or None when none
    is set. For tools that run compose with their own settings (the stack tests, the
    benchmark) but must build the way the README's ``up`` does.
    """
    result = subprocess.run(
        ["docker", "compose", "-f", str(compose_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        return None
    path = json.loads(result.stdout).get("secrets", {}).get("extra_ca", {}).get("file")
    return path if path and path != os.devnull else None
