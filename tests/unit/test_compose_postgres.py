"""compose.yaml's postgres profile and migrate service, read as YAML (no Docker): the server
waits for migrate, migrate waits for the bundled PostgreSQL only when the profile is on, and the
PostgreSQL service is hardened like the others, on the backend network only."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_compose_server_waits_for_migrate_to_complete(services):
    assert services["server"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }


def test_compose_migrate_always_present_postgres_dependency_optional(services):
    migrate = services["migrate"]
    assert "profiles" not in migrate
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    assert migrate["restart"] == "no"
    assert migrate["entrypoint"] == ["python", "/opt/mlflow-stack/migrate.py"]


@pytest.mark.parametrize("name", ["migrate", "postgres"])
def test_compose_new_service_hardened_with_limits(services, name):
    service = services[name]
    assert service["user"] == "10001:10001"
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert service["mem_limit"].startswith("${") and service["pids_limit"].startswith("${")
    assert any(mount.startswith("/tmp:") for mount in service["tmpfs"])


def test_compose_postgres_profile_backend_only_own_volume(services):
    postgres = services["postgres"]
    assert postgres["profiles"] == ["postgres"]
    assert list(postgres["networks"]) == ["backend"]
    assert "ports" not in postgres
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert postgres["stop_signal"] == "SIGINT"


def test_compose_database_settings_hold_no_password(services):
    for name in ("server", "migrate"):
        environment = services[name]["environment"]
        assert environment["DATABASE_PASSWORD_FILE"] == "/run/secrets/database_password"
        assert environment["COMPOSE_PROFILES"] == "${COMPOSE_PROFILES:-}"
        assert not any("PASSWORD" in key and "FILE" not in key for key in environment)


@pytest.mark.parametrize(
    "setting",
    ["POSTGRES_MEMORY_LIMIT", "POSTGRES_PIDS_LIMIT", "MIGRATE_MEMORY_LIMIT", "MIGRATE_PIDS_LIMIT"],
)
def test_env_example_limit_documented_with_compose_default(setting):
    example = (ROOT / ".env.example").read_text()
    value = next(line.split("=", 1)[1] for line in example.splitlines()
                 if line.startswith(f"{setting}="))  # fmt: skip
    assert f"${{{setting}:-{value}}}" in (ROOT / "compose.yaml").read_text()
