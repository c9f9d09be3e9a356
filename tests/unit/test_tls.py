"""HTTPS certificates (scripts/mlflowstack/tls.py, tlsctl.py) and nginx's TLS files, without
Docker: the host's openssl makes and reads the certificates, as stackctl does.
tests/stack/test_tls_stack.py checks the running stack."""

import datetime
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflowstack import cli, tls, tlsctl
from mlflowstack.files import BundleError

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")

NGINX = Path(__file__).resolve().parents[2] / "nginx"
NAMES = ["mlflow.example.com", "10.0.0.5", "localhost", "::1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tls.Files:
    """One CA and server certificate for NAMES, shared (making one costs ~0.1 s)."""
    directory = tmp_path_factory.mktemp("tls") / "tls"
    tls.make_self_signed(directory, NAMES)
    return tls.Files(directory)


@pytest.fixture
def files(made, tmp_path) -> tls.Files:
    """A copy of ``made`` that a test may change."""
    directory = tmp_path / "tls"
    shutil.copytree(made.directory, directory)
    return tls.Files(directory)


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_make_self_signed_names_in_subject_alternative_names(made):
    leaf = tls.read_leaf(made.cert)
    assert leaf.dns == ("mlflow.example.com", "localhost")
    assert leaf.ips == ("10.0.0.5", "::1")


def test_make_self_signed_keys_0600_certificates_0644(made):
    assert _mode(made.key) == _mode(made.ca_key) == 0o600
    assert _mode(made.cert) == _mode(made.ca_cert) == 0o644


def test_make_self_signed_server_certificate_verifies_against_ca_strictly(made):
    out = _openssl(
        "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(made.ca_cert),
        str(made.cert),
    )  # fmt: skip
    assert out.strip().endswith("OK")


def test_make_self_signed_valid_397_days(made):
    leaf = tls.read_leaf(made.cert)
    assert (leaf.not_after - leaf.not_before).days == tls.SERVER_DAYS


def test_make_self_signed_leaves_no_temporary_files(made):
    assert sorted(p.name for p in made.directory.iterdir()) == [
        "ca.crt", "ca.key", "server.crt", "server.key",
    ]  # fmt: skip


def test_make_self_signed_existing_certificate_refused_without_force(files):
    before = {p: p.read_bytes() for p in files.directory.iterdir()}
    with pytest.raises(BundleError, match="exists.*--force"):
        tls.make_self_signed(files.directory, NAMES)
    assert {p: p.read_bytes() for p in files.directory.iterdir()} == before


def test_make_self_signed_force_replaces_server_keeps_ca(files):
    ca, cert, key = files.ca_cert.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()
    written = tls.make_self_signed(files.directory, ["other.example.com"], force=True)
    assert written == [files.key, files.cert]
    assert files.ca_cert.read_bytes() == ca
    assert files.cert.read_bytes() != cert and files.key.read_bytes() != key
    assert tls.check_files(files, ["other.example.com"]) == []
    _openssl("verify", "-CAfile", str(files.ca_cert), str(files.cert))


def test_make_self_signed_ca_certificate_without_key_refused(tmp_path):
    directory = tmp_path / "tls"
    directory.mkdir()
    (directory / "ca.crt").write_text("x")
    with pytest.raises(BundleError, match="without its pair"):
        tls.make_self_signed(directory, NAMES)
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt"]


def test_certificate_names_ports_dropped_lower_case_ipv6_unbracketed():
    names = tls.certificate_names(
        " MLflow.Example.com:8443, 10.0.0.5 ,[::1]:443,mlflow.example.com"
    )
    assert names == ["mlflow.example.com", "10.0.0.5", "::1"]


def test_certificate_names_empty_localhost_and_loopback():
    assert tls.certificate_names("") == ["localhost", "127.0.0.1"]


def test_certificate_names_bad_entry_refused():
    with pytest.raises(BundleError, match="not host"):
        tls.certificate_names("evil.example/path")


def test_port_warnings_entry_with_other_port_warns():
    (warning,) = tls.port_warnings("a.example.com:8080, b.example.com,[::1]:8443", "8443")
    assert warning.startswith("PUBLIC_HOSTNAME: a.example.com:8080 allows only port 8080")


def test_port_warnings_no_port_or_https_port_silent():
    assert tls.port_warnings("a.example.com,b.example.com:443", None) == []


def test_check_files_fresh_certificate_no_warning(files):
    assert tls.check_files(files, NAMES) == []


def test_check_files_mismatched_key_refused(files, made, tmp_path):
    other = tmp_path / "other"
    tls.make_self_signed(other, NAMES)
    shutil.copy(other / "server.key", files.key)
    with pytest.raises(BundleError, match="does not belong to"):
        tls.check_files(files, NAMES)


def test_check_files_expired_refused(files):
    later = tls.read_leaf(files.cert).not_after + datetime.timedelta(seconds=1)
    with pytest.raises(BundleError, match="expired on"):
        tls.check_files(files, NAMES, now=later)


def test_check_files_not_yet_valid_refused(files):
    earlier = tls.read_leaf(files.cert).not_before - datetime.timedelta(days=1)
    with pytest.raises(BundleError, match="not valid before"):
        tls.check_files(files, NAMES, now=earlier)


def test_check_files_expiring_within_warn_days_warns(files):
    soon = tls.read_leaf(files.cert).not_after - datetime.timedelta(days=10)
    (warning,) = tls.check_files(files, NAMES, now=soon, warn_days=30)
    assert "renew" in warning


def test_check_files_name_not_covered_refused(files):
    with pytest.raises(BundleError, match="does not cover 'mlflow.other.com'"):
        tls.check_files(files, [*NAMES, "mlflow.other.com"])


def test_check_files_ip_not_covered_refused(files):
    with pytest.raises(BundleError, match="does not cover '10.0.0.6'"):
        tls.check_files(files, ["10.0.0.6"])


def test_dns_covers_wildcard_one_label_only():
    assert tls._dns_covers("*.example.com", "mlflow.example.com")
    assert not tls._dns_covers("*.example.com", "a.mlflow.example.com")
    assert not tls._dns_covers("*.example.com", "example.com")


def test_check_files_garbage_certificate_refused(files):
    files.cert.write_bytes(b"this is not a certificate\n")
    with pytest.raises(BundleError, match="no PEM certificate"):
        tls.check_files(files, NAMES)


def test_check_files_corrupt_pem_certificate_refused(files):
    files.cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(BundleError, match="not a certificate nginx can read"):
        tls.check_files(files, NAMES)


def test_check_files_garbage_key_refused(files):
    files.key.write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not an unencrypted PEM private key"):
        tls.check_files(files, NAMES)


def test_check_files_encrypted_key_refused(files):
    encrypted = subprocess.run(
        ["openssl", "pkey", "-in", str(files.key), "-aes256", "-passout", "pass:secret"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    files.key.write_bytes(encrypted)
    with pytest.raises(BundleError, match="unencrypted"):
        tls.check_files(files, NAMES)


def test_check_files_missing_key_refused(files):
    files.key.unlink()
    with pytest.raises(BundleError, match="server.key: missing"):
        tls.check_files(files, NAMES)


def test_check_files_key_readable_by_others_warns(files):
    files.key.chmod(0o644)
    (warning,) = tls.check_files(files, NAMES)
    assert "chmod 600" in warning


def test_installed_pem_chain_first_then_key(files):
    pem = tls.installed_pem(files)
    kinds = re.findall(rb"-----BEGIN ([A-Z ]+)-----", pem)
    assert kinds == [b"CERTIFICATE", b"PRIVATE KEY"]


def test_install_pem_written_0600(files, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    target = tls.install(volume, tls.installed_pem(files))
    assert target == volume / "server.pem" and _mode(target) == 0o600


def test_install_without_key_refused(files, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    with pytest.raises(BundleError, match="no PEM certificate and private key"):
        tls.install(volume, files.cert.read_bytes())
    assert list(volume.iterdir()) == []


def test_tls_mode_unknown_refused():
    with pytest.raises(BundleError, match="not off, self-signed or files"):
        tls.tls_mode("on")


def _stackctl(monkeypatch, capsys, settings, *argv):
    """stackctl's main with compose's settings given, and no container ever run."""
    monkeypatch.setattr(tlsctl, "nginx_settings", lambda args: settings)
    calls = []
    monkeypatch.setattr(tlsctl, "_in_auth_image", lambda *a, **k: calls.append(a) or 0)
    status = cli.main(list(argv))
    return status, capsys.readouterr(), calls


def test_main_tls_reload_mismatched_key_one_line_exit_1(files, tmp_path, monkeypatch, capsys):
    tls.make_self_signed(tmp_path / "other", NAMES)
    shutil.copy(tmp_path / "other" / "server.key", files.key)
    settings = {"TLS_MODE": "files", "PUBLIC_HOSTNAME": "mlflow.example.com"}
    status, out, calls = _stackctl(
        monkeypatch, capsys, settings, "tls", "reload", "--tls-dir", str(files.directory)
    )
    assert status == 1 and calls == []
    assert out.err.count("\n") == 1 and out.err.startswith("stackctl: ")


def test_main_tls_self_signed_prints_ca_for_client(tmp_path, monkeypatch, capsys):
    settings = {"PUBLIC_HOSTNAME": "mlflow.example.com:8443"}
    status, out, _ = _stackctl(
        monkeypatch, capsys, settings, "tls", "self-signed", "--tls-dir", str(tmp_path / "t")
    )
    assert status == 0
    assert out.out == f"export MLFLOW_TRACKING_SERVER_CERT_PATH={tmp_path / 't' / 'ca.crt'}\n"
    assert tls.read_leaf(tmp_path / "t" / "server.crt").dns == ("mlflow.example.com",)


def test_main_tls_self_signed_existing_one_line_exit_1(files, monkeypatch, capsys):
    status, out, _ = _stackctl(
        monkeypatch, capsys, {}, "tls", "self-signed", "--tls-dir", str(files.directory)
    )
    assert status == 1 and out.err.count("\n") == 1 and "--force" in out.err


# nginx's side, read as files (the stack test checks the answers).


def _directives(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.strip()]


def test_tls_conf_protocols_12_and_13_only_tickets_off_http2():
    lines = _directives(NGINX / "tls" / "tls.conf")
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in lines
    assert "ssl_session_tickets off;" in lines
    assert "http2 on;" in lines
    (ciphers,) = [line for line in lines if line.startswith("ssl_ciphers ")]
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c)
               for c in ciphers[len("ssl_ciphers "):-1].split(":"))  # fmt: skip


def test_site_template_hsts_at_least_a_year_on_https_only():
    text = (NGINX / "templates" / "mlflow.conf.template").read_text()
    hsts_map = re.search(r"map \$https \$hsts \{(.*?)\}", text, re.S).group(1)
    assert re.search(r'default "";', hsts_map)
    assert int(re.search(r'on "max-age=(\d+)";', hsts_map).group(1)) >= 365 * 24 * 3600


def test_http_redirect_never_names_client_host():
    lines = _directives(NGINX / "tls" / "http-redirect.conf")
    (redirect,) = [line for line in lines if line.startswith("return 308")]
    assert redirect == "return 308 https://$tls_redirect_host$tls_redirect_port$tls_redirect_path;"
    assert not any("$http_host" in line or "$host " in line for line in lines)
