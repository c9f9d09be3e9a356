"""The mlflow_stack role keeps up with the stack's settings, without Docker or a VM: every
setting of .env.example is one the role knows, every compose file travels in the bundle, .env
as the role writes it (COMPOSE_FILE, the files it names) and the preflight's refusals of
settings that need a route out or files the control machine lacks. tests/vm/test_ship_path.py
turns TLS on for real on the simulated VM."""

import re
from pathlib import Path

import yaml
from test_ansible_roles import LOCAL, PASSWORD, _playbook, _preflight

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "ansible" / "roles" / "mlflow_stack"
# `KEY=value` and `# KEY=value` lines: .env.example lists optional settings commented out.
SETTING_LINE = re.compile(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def _role_vars(name: str) -> dict:
    return yaml.safe_load((ROLE / name / "main.yml").read_text())


def test_role_knows_every_setting_of_env_example():
    example = set(SETTING_LINE.findall((REPO / ".env.example").read_text()))
    defaults = _role_vars("defaults")["mlflow_stack_env_defaults"]
    reserved = _role_vars("vars")["mlflow_stack_env_reserved"]
    known = set(defaults) | set(reserved)
    assert not set(defaults) & set(reserved), "a reserved key has a default"
    assert sorted(example - known) == [], "settings of .env.example the role does not know"
    assert sorted(known - example) == [], "settings the role knows that .env.example lacks"


def test_role_defaults_equal_env_example_values():
    text = (REPO / ".env.example").read_text()
    active = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    commented = dict(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    defaults = _role_vars("defaults")["mlflow_stack_env_defaults"]
    for key, value in defaults.items():
        if key in active:
            assert str(value) == active[key], key
        elif key == "BASE_IMAGE":  # the Dockerfiles' default, commented in .env.example
            assert value == commented[key]
        else:  # optional: off unless set
            assert value in ("", "false"), key


def test_bundle_ships_every_compose_file_of_the_repository():
    bundle = _role_vars("vars")["mlflow_stack_bundle_single_files"]
    compose_files = sorted(p.name for p in REPO.glob("compose*.yaml"))
    assert compose_files, "no compose file found"
    assert [name for name in compose_files if name not in bundle] == []


def _render_env(tmp_path: Path, hosts: dict) -> dict[str, dict[str, str]]:
    """.env as the role's template writes it after the preflight, per host: {key: value}."""
    play = _preflight("mlflow_stack")
    # The role's defaults and vars stay visible to the template task after the include.
    play[0]["tasks"][0]["ansible.builtin.include_role"]["public"] = True
    play[0]["tasks"].append(
        {
            "name": "Render",
            "ansible.builtin.template": {
                "src": str(ROLE / "templates" / "env.j2"),
                "dest": str(tmp_path / "{{ inventory_hostname }}.env"),
                "mode": "0600",
            },
        }
    )
    inventory = {"mlflow_servers": {"hosts": hosts}}
    result = _playbook(tmp_path, play, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = {}
    for host in hosts:
        lines = (tmp_path / f"{host}.env").read_text().splitlines()
        rendered[host] = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    return rendered


def test_env_compose_file_follows_egress_and_tls_mode(tmp_path):
    secret = tmp_path / "database-password"
    secret.write_text(PASSWORD + "\n")
    store = tmp_path / "store-credentials"
    store.write_text("[default]\n")
    tls_env = {"TLS_MODE": "self-signed", "HTTPS_PORT": 8443}
    hosts = {
        "plain": {**LOCAL},
        "tls": {**LOCAL, "mlflow_stack_env": tls_env},
        "egress": {
            **LOCAL,
            "mlflow_stack_egress": True,
            "mlflow_stack_database_password_file": str(secret),
            "mlflow_stack_artifact_store_credentials_file": str(store),
            "mlflow_stack_env": {
                "DATABASE_URI": "postgresql://mlflow@db.example.com:5432/mlflow?sslmode=require",
                "ARTIFACTS_DESTINATION": "s3://team-mlflow/artifacts",
                "SERVER_EXTRA_PACKAGES": ["boto3==1.44.8", "xgboost==3.1.1"],
            },
        },
        "both": {**LOCAL, "mlflow_stack_egress": True, "mlflow_stack_env": tls_env},
    }
    env = _render_env(tmp_path, hosts)
    assert env["plain"]["COMPOSE_FILE"] == "compose.yaml"
    assert env["tls"]["COMPOSE_FILE"] == "compose.yaml:compose.tls.yaml"
    assert env["egress"]["COMPOSE_FILE"] == "compose.yaml:compose.egress.yaml"
    assert env["both"]["COMPOSE_FILE"] == "compose.yaml:compose.egress.yaml:compose.tls.yaml"
    assert env["tls"]["HTTPS_PORT"] == "8443"
    # The files .env names are the VM's copies; a file not given is left out (compose: /dev/null).
    assert env["egress"]["DATABASE_PASSWORD_FILE"] == "/opt/mlflow-stack/secrets/database-password"
    assert env["egress"]["ARTIFACT_STORE_CREDENTIALS_FILE"] == (
        "/opt/mlflow-stack/secrets/artifact-store-credentials"
    )
    assert "DATABASE_CA_FILE" not in env["egress"]
    assert "DATABASE_PASSWORD_FILE" not in env["plain"]
    assert env["egress"]["SERVER_EXTRA_PACKAGES"] == '"boto3==1.44.8 xgboost==3.1.1"'
    assert env["egress"]["DATABASE_URI"].endswith("?sslmode=require")
    # Every setting but COMPOSE_PROJECT_NAME is written once.
    text = (tmp_path / "egress.env").read_text()
    keys = [line.split("=", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(keys) == len(set(keys)), keys


def test_stack_preflight_refuses_outside_settings_without_egress_or_files(tmp_path):
    settings = {
        "DATABASE_URI": f"postgresql://mlflow:{PASSWORD}@db.example.com/mlflow",
        "ARTIFACTS_DESTINATION": "s3://team-mlflow/artifacts",
        "TLS_MODE": "files",
        "SERVER_REPLICAS": 3,
        "SERVER_EXTRA_PACKAGES": "boto3==1.44.8; rm -rf /",
    }
    inventory = {
        "mlflow_servers": {
            "hosts": {"here": LOCAL},
            "vars": {
                "mlflow_stack_env": settings,
                "mlflow_stack_tls_key": "/nonexistent/server.key",
                "mlflow_stack_database_ca_file": "/nonexistent/ca.pem",
                "mlflow_stack_artifact_store_credentials_file": "/nonexistent/store",
            },
        }
    }
    result = _playbook(tmp_path, _preflight("mlflow_stack"), inventory)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in (
        "DATABASE_URI needs a route out of the box: set mlflow_stack_egress: true",
        "ARTIFACTS_DESTINATION needs a route out of the box: set mlflow_stack_egress: true",
        "DATABASE_URI holds a password: put it in the file mlflow_stack_database_password_file",
        "TLS_MODE=files needs mlflow_stack_tls_certificate (a file on the control machine)",
        "mlflow_stack_tls_key=/nonexistent/server.key: no such file on the control machine",
        "mlflow_stack_database_ca_file=/nonexistent/ca.pem: no such file on the control machine",
        "mlflow_stack_artifact_store_credentials_file=/nonexistent/store: no such file",
        "SERVER_EXTRA_PACKAGES=boto3==1.44.8; rm -rf /: pip requirements separated by spaces",
    ):
        assert expected in output, expected
    assert PASSWORD not in output


def test_stack_preflight_refuses_bad_tls_and_replica_settings(tmp_path):
    settings = {"TLS_MODE": "on", "HTTPS_PORT": 70000, "SERVER_REPLICAS": 2}
    inventory = {
        "mlflow_servers": {
            "hosts": {"here": LOCAL},
            "vars": {"mlflow_stack_env": settings, "mlflow_stack_egress": "yes"},
        }
    }
    result = _playbook(tmp_path, _preflight("mlflow_stack"), inventory)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in (
        "TLS_MODE=on: off, self-signed or files",
        "HTTPS_PORT=70000: not a port number (1-65535)",
        "SERVER_REPLICAS=2 needs PostgreSQL: postgres in COMPOSE_PROFILES, or DATABASE_URI",
        "mlflow_stack_egress=yes: true or false",
    ):
        assert expected in output, expected
