"""stackctl's ``tls`` commands and the TLS part of ``config check`` (the work is in tls.py).

The settings (TLS_MODE, PUBLIC_HOSTNAME) are read from ``docker compose config``: exactly what
compose hands nginx, from .env or the shell.
"""

import json
import subprocess
import sys
from pathlib import Path

from mlflowstack import tls
from mlflowstack.commands import _compose, _in_auth_image, _project_dir, compose_command
from mlflowstack.files import BundleError

VOLUME_DIR = Path("/var/lib/mlflow-stack/tls")


def _tls_dir(args) -> Path:
    return Path(args.tls_dir) if getattr(args, "tls_dir", None) else _project_dir(args) / "tls"


def nginx_settings(args) -> dict[str, str]:
    """nginx's environment as compose resolves it (.env, the shell, compose files)."""
    try:
        done = subprocess.run(
            [*compose_command(args, "config", "--format", "json")],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise BundleError(
            "docker is not installed here (tls commands read compose's settings)"
        ) from None
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise BundleError(f"docker compose config failed: {lines[-1] if lines else '?'}")
    environment = json.loads(done.stdout)["services"]["nginx"].get("environment") or {}
    return {key: value or "" for key, value in environment.items()}


def check(args, settings: dict[str, str] | None = None) -> tls.Files:
    """The checks of tls.check_files against PUBLIC_HOSTNAME; warnings go to stderr."""
    settings = settings if settings is not None else nginx_settings(args)
    files = tls.Files(_tls_dir(args))
    names = tls.certificate_names(settings.get("PUBLIC_HOSTNAME"))
    warnings = tls.port_warnings(settings.get("PUBLIC_HOSTNAME"), settings.get("HTTPS_PORT"))
    warnings += tls.check_files(files, names, warn_days=args.warn_days)
    for warning in warnings:
        print(f"stackctl: warning: {warning}", file=sys.stderr)
    return files


def tls_self_signed(args) -> int:
    settings = nginx_settings(args)
    names = tls.certificate_names(settings.get("PUBLIC_HOSTNAME"))
    directory = _tls_dir(args)
    written = tls.make_self_signed(directory, names, force=args.force)
    for path in written:
        print(f"tls self-signed: wrote {path}", file=sys.stderr)
    ca = tls.Files(directory).ca_cert.resolve()
    print(
        f"tls self-signed: a certificate for {', '.join(names)}, signed by the CA {ca}; "
        "install it with: scripts/stackctl tls reload. Clients trust the CA with:",
        file=sys.stderr,
    )
    print(f"export MLFLOW_TRACKING_SERVER_CERT_PATH={ca}")
    return 0


def tls_reload(args) -> int:
    """Check tls/, install it into the tls volume, have a running nginx reload it."""
    settings = nginx_settings(args)
    files = check(args, settings)
    if tls.tls_mode(settings.get("TLS_MODE")) == "off":
        print(
            "tls reload: TLS_MODE is off: installing, but nginx serves plain HTTP until it is "
            "set (README, HTTPS)",
            file=sys.stderr,
        )
    status = _in_auth_image(args, ["tls", "install"], stdin_text=tls.installed_pem(files).decode())
    if status:
        raise BundleError("installing into the tls volume failed (see above); nginx unchanged")
    running = subprocess.run(
        compose_command(args, "ps", "--status", "running", "-q", "nginx"),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not running:
        print("tls reload: installed; nginx is not running and loads it at start", file=sys.stderr)
        return 0
    # A graceful reload: new workers get the certificate, old ones finish their requests.
    if _compose(args, "exec", "-T", "nginx", "nginx", "-s", "reload"):
        raise BundleError("nginx -s reload failed (see above); nginx keeps its certificate")
    print(f"tls reload: nginx reloaded with {files.cert}", file=sys.stderr)
    return 0


def tls_install(args) -> int:
    """In the auth image (the stackctl service, with the tls volume): stdin -> server.pem."""
    target = tls.install(Path(args.volume_dir), sys.stdin.buffer.read())
    print(f"tls install: wrote {target}", file=sys.stderr)
    return 0


def config_check_tls(args, settings: dict[str, str] | None = None) -> None:
    """config check's TLS part: the mode, and with TLS on, the files of tls/."""
    settings = settings if settings is not None else nginx_settings(args)
    mode = tls.tls_mode(settings.get("TLS_MODE"))
    if mode == "off":
        return
    files = check(args, settings)
    print(f"config check: {files.cert} and {files.key} fit TLS_MODE={mode}", file=sys.stderr)
