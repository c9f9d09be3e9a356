import pytest
import start
from backendstore import SettingError


def test_security_environment_unset_allows_any_host():
    env = start.security_environment("")
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"] == "*"


def test_security_environment_host_without_port_matches_any_port():
    env = start.security_environment("mlflow.example.com")
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"] == "mlflow.example.com,mlflow.example.com:*"
    origins = env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"].split(",")
    assert origins == [
        "http://mlflow.example.com",
        "http://mlflow.example.com:*",
        "https://mlflow.example.com",
        "https://mlflow.example.com:*",
    ]


def test_security_environment_port_less_name_ui_write_from_any_port_passes_mlflow_check():
    from mlflow.server.security_utils import should_block_cors_request

    origins = start.security_environment("box.example,[::1]")[
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"
    ].split(",")
    for origin in ("http://box.example:18080", "https://box.example", "http://[::1]:8080"):
        assert not should_block_cors_request(origin, "POST", origins), origin
    for origin in ("http://evil.example:18080", "http://box.example.evil:80", "http://[::2]:1"):
        assert should_block_cors_request(origin, "POST", origins), origin


def test_security_environment_name_with_port_origin_exact():
    origins = start.security_environment("box:8080")["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"]
    assert origins.split(",") == ["http://box:8080", "https://box:8080"]


def test_security_environment_host_with_port_exact():
    env = start.security_environment(" Box.Local:8080 , [::1]")
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert hosts == ["box.local:8080", "[::1]", "[[]::1]:*"]


@pytest.mark.parametrize("value", ["http://host", "host/path", "host:99999", "a b", "host:"])
def test_parse_public_hostnames_bad_entry_raises(value):
    with pytest.raises(start.SettingError):
        start.parse_public_hostnames(value)


def test_server_environment_sets_mlflow_internals():
    env = start.server_environment(
        {"MLFLOW_BACKEND_STORE_URI": "sqlite:////db", "MLFLOW_ARTIFACTS_DESTINATION": "/a"}
    )
    assert env["_MLFLOW_SERVER_FILE_STORE"] == "sqlite:////db"
    assert env["_MLFLOW_SERVER_REGISTRY_STORE"] == "sqlite:////db"
    assert env["_MLFLOW_SERVER_SERVE_ARTIFACTS"] == "true"
    assert env["_MLFLOW_SERVER_ARTIFACT_DESTINATION"] == "/a"
    # Routes that open the default tracking URI reach the same store, never ./mlflow.db.
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////db"


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("", False)])
def test_job_execution_enabled_values(value, expected):
    assert start.job_execution_enabled({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": value}) is expected


def test_job_execution_enabled_bad_value_raises():
    with pytest.raises(start.SettingError):
        start.job_execution_enabled({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "yes please"})


def test_telemetry_environment_default_off():
    env = start.telemetry_environment("")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true"


def test_telemetry_environment_on_enables():
    assert start.telemetry_environment(" ON ") == {"MLFLOW_DISABLE_TELEMETRY": "false"}


def test_telemetry_environment_other_value_refused():
    with pytest.raises(start.SettingError, match="MLFLOW_TELEMETRY"):
        start.telemetry_environment("yes")


def test_gunicorn_command_serves_the_guarded_app():
    assert start.gunicorn_command()[-1] == "guard:create_app()"


def test_security_environment_serving_allows_nginx_service_host_not_as_origin():
    env = start.security_environment("mlflow.example.com", serving=True)
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")[0] == "nginx:8080"
    assert "nginx" not in env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"]


def test_server_environment_serve_models_empty_keeps_only_public_names():
    env = start.server_environment(
        {
            "MLFLOW_BACKEND_STORE_URI": "sqlite:////tmp/x.db",
            "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a",
            "PUBLIC_HOSTNAME": "box",
            "SERVE_MODELS": " ",
        }
    )
    assert "nginx" not in env["MLFLOW_SERVER_ALLOWED_HOSTS"]


PG = "postgresql+psycopg://mlflow:pw@postgres:5432/mlflow"
SQLITE = "sqlite:////var/lib/mlflow/db/mlflow.db"


@pytest.mark.parametrize(
    ("value", "uri", "replicas"), [("", SQLITE, 1), ("1", SQLITE, 1), ("3", PG, 3), ("16", PG, 16)]
)
def test_check_replicas_allowed_counts(value, uri, replicas):
    env = {"SERVER_REPLICAS": value, "MLFLOW_BACKEND_STORE_URI": uri}
    assert start.check_replicas(env, with_jobs=False) == replicas


@pytest.mark.parametrize("value", ["0", "17", "-1", "3x", "three", "1e2", " 2 3"])
def test_check_replicas_not_a_count_refused(value):
    env = {"SERVER_REPLICAS": value, "MLFLOW_BACKEND_STORE_URI": PG}
    with pytest.raises(SettingError, match="^SERVER_REPLICAS: .* is not a number from 1 to 16"):
        start.check_replicas(env, with_jobs=False)


def test_check_replicas_several_on_sqlite_refused():
    env = {"SERVER_REPLICAS": "2", "MLFLOW_BACKEND_STORE_URI": SQLITE}
    with pytest.raises(SettingError, match="needs PostgreSQL"):
        start.check_replicas(env, with_jobs=False)


def test_check_replicas_several_with_job_runner_refused():
    env = {"SERVER_REPLICAS": "2", "MLFLOW_BACKEND_STORE_URI": PG}
    with pytest.raises(SettingError, match="job runner would run in every replica"):
        start.check_replicas(env, with_jobs=True)
    assert start.check_replicas({**env, "SERVER_REPLICAS": "1"}, with_jobs=True) == 1
