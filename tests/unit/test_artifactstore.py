"""Where the server keeps artifacts (server/artifactstore.py): the volume by default, or an
object store whose URI, endpoint and credentials file are checked before the server starts."""

import artifactstore
import pytest
import start
from backendstore import SettingError

LOCAL = "/var/lib/mlflow/artifacts"


@pytest.fixture
def sdk_present(monkeypatch):
    """Every scheme's SDK importable (the dev venv has none of them): ``json`` stands in."""
    monkeypatch.setattr(artifactstore, "SDKS", {k: ("json", "x==1") for k in artifactstore.SDKS})


def _env(tmp_path, destination, credentials="", **extra):
    path = tmp_path / "credentials"
    path.write_text(credentials)
    return {
        "MLFLOW_ARTIFACTS_DESTINATION": LOCAL,
        "ARTIFACTS_DESTINATION": destination,
        "ARTIFACT_STORE_CREDENTIALS_FILE": str(path),
        **extra,
    }


def test_artifact_store_environment_empty_destination_keeps_volume(tmp_path):
    env = _env(tmp_path, "")
    assert artifactstore.artifact_store_environment(env) == {"MLFLOW_ARTIFACTS_DESTINATION": LOCAL}
    assert artifactstore.is_local(env)


def test_artifact_store_environment_s3_with_credentials_names_file_for_both_sdk_variables(
    tmp_path, sdk_present
):
    env = _env(tmp_path, "s3://team-bucket/mlflow", "[default]\naws_access_key_id = x\n",
               ARTIFACTS_S3_ENDPOINT_URL="http://minio:9000/")  # fmt: skip
    result = artifactstore.artifact_store_environment(env)
    assert result == {
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://team-bucket/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "AWS_SHARED_CREDENTIALS_FILE": env["ARTIFACT_STORE_CREDENTIALS_FILE"],
        "AWS_CONFIG_FILE": env["ARTIFACT_STORE_CREDENTIALS_FILE"],
    }
    assert not artifactstore.is_local(env)


def test_artifact_store_environment_empty_credentials_file_leaves_sdk_defaults(
    tmp_path, sdk_present
):
    result = artifactstore.artifact_store_environment(_env(tmp_path, "gs://bucket-1"))
    assert result == {"MLFLOW_ARTIFACTS_DESTINATION": "gs://bucket-1"}


def test_artifact_store_environment_azure_connection_string_read_into_process_only(
    tmp_path, sdk_present
):
    destination = "wasbs://models@teamstore.blob.core.windows.net/mlflow"
    result = artifactstore.artifact_store_environment(
        _env(tmp_path, destination, "DefaultEndpointsProtocol=https;AccountKey=secret\n")
    )
    assert result["AZURE_STORAGE_CONNECTION_STRING"] == (
        "DefaultEndpointsProtocol=https;AccountKey=secret"
    )


@pytest.mark.parametrize(
    "destination",
    [
        "file:///etc",
        "/var/lib/other",
        "s3://",
        "s3://UPPER-case",
        "s3://b",
        "s3://bucket/../escape",
        "s3://bucket/./x",
        "s3://bucket/a b",
        "s3://bucket/x\nAWS_X=1",
        "s3://bucket?x=1",
        "gs://bucket/a;b",
        "wasbs://models@evil.example.com/x",
        "http://bucket",
    ],
)
def test_artifact_store_environment_malformed_destination_refused(
    tmp_path, sdk_present, destination
):
    with pytest.raises(SettingError, match="^ARTIFACTS_DESTINATION: "):
        artifactstore.artifact_store_environment(_env(tmp_path, destination))


@pytest.mark.parametrize(
    "endpoint", ["minio:9000", "http://minio:9000/path", "ftp://minio", "http://a b", "http://x\ny"]
)
def test_artifact_store_environment_malformed_endpoint_refused(tmp_path, sdk_present, endpoint):
    env = _env(tmp_path, "s3://bucket-1", ARTIFACTS_S3_ENDPOINT_URL=endpoint)
    with pytest.raises(SettingError, match="^ARTIFACTS_S3_ENDPOINT_URL: "):
        artifactstore.artifact_store_environment(env)


def test_artifact_store_environment_endpoint_without_destination_refused(tmp_path):
    env = _env(tmp_path, "", ARTIFACTS_S3_ENDPOINT_URL="http://minio:9000")
    with pytest.raises(SettingError, match="ARTIFACTS_DESTINATION is not"):
        artifactstore.artifact_store_environment(env)


def test_artifact_store_environment_missing_sdk_names_the_package_to_add(tmp_path, monkeypatch):
    monkeypatch.setattr(artifactstore, "SDKS", {"s3": ("no_such_sdk_here", "boto3==1.44.8")})
    with pytest.raises(SettingError, match='SERVER_EXTRA_PACKAGES="boto3==1.44.8"'):
        artifactstore.artifact_store_environment(_env(tmp_path, "s3://bucket-1"))


def test_artifact_store_environment_unreadable_credentials_refused_without_content(
    tmp_path, sdk_present
):
    env = _env(tmp_path, "s3://bucket-1")
    env["ARTIFACT_STORE_CREDENTIALS_FILE"] = str(tmp_path / "missing")
    with pytest.raises(SettingError, match="cannot read the artifact store's credentials"):
        artifactstore.artifact_store_environment(env)


def test_server_environment_object_store_is_mlflows_destination(tmp_path, sdk_present):
    env = {
        **_env(tmp_path, "s3://bucket-1/runs"),
        "MLFLOW_BACKEND_STORE_URI": "sqlite:////var/lib/mlflow/db/mlflow.db",
    }
    derived = start.server_environment(env)
    assert derived["_MLFLOW_SERVER_ARTIFACT_DESTINATION"] == "s3://bucket-1/runs"
    # Clients still get proxied URIs: they never talk to the bucket.
    assert derived["_MLFLOW_SERVER_ARTIFACT_ROOT"] == "mlflow-artifacts:/"


@pytest.fixture
def handlers(monkeypatch):
    """MLflow's handlers module, its capability classes restored after the test."""
    from mlflow.server import handlers

    for name in ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin"):
        monkeypatch.setattr(handlers, name, getattr(handlers, name))
    return handlers


def _s3_repository():
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    return object.__new__(S3ArtifactRepository)  # the class's capabilities, no client


def test_install_default_s3_repository_presigns_nothing(handlers):
    repository = _s3_repository()
    handlers._validate_support_multipart_download(repository)  # MLflow's own: it could
    artifactstore.install({})
    for check in ("multipart_download", "multipart_upload", "presigned_upload",
                  "presigned_download"):  # fmt: skip
        with pytest.raises(Exception, match="(?i)not support|unsupported|multipart|presigned"):
            getattr(handlers, f"_validate_support_{check}")(repository)


def test_install_presigned_urls_true_leaves_mlflow_as_is(handlers):
    artifactstore.install({"ARTIFACTS_PRESIGNED_URLS": "true"})
    handlers._validate_support_multipart_download(_s3_repository())


def test_artifact_store_environment_presigned_urls_not_boolean_refused(tmp_path, sdk_present):
    env = _env(tmp_path, "s3://bucket-1", ARTIFACTS_PRESIGNED_URLS="yes please")
    with pytest.raises(SettingError, match="^ARTIFACTS_PRESIGNED_URLS: "):
        artifactstore.artifact_store_environment(env)


@pytest.mark.parametrize(
    ("uri", "destination"),
    [
        (LOCAL, LOCAL),
        (f"{LOCAL}/1/abc/artifacts", LOCAL),
        (f"file://{LOCAL}/1/abc/artifacts/model", LOCAL),
        (f"file://localhost{LOCAL}/1", f"file://{LOCAL}"),
        ("s3://team-bucket/mlflow/1/abc/artifacts", "s3://team-bucket/mlflow"),
        ("s3://team-bucket/anything", "s3://team-bucket"),
        ("runs:/abc/model", LOCAL),  # resolved to a location, which is checked in turn
        ("models:/m-123", LOCAL),
    ],
)
def test_confinement_problem_inside_destination_none(uri, destination):
    assert artifactstore.confinement_problem(uri, destination) is None


@pytest.mark.parametrize(
    ("uri", "destination"),
    [
        # The attacker review: a restored run whose artifact_uri lists the server's secrets.
        ("file:///var/lib/mlflow-stack", LOCAL),
        ("file:///run/secrets", LOCAL),
        ("/var/lib/mlflow/artifacts-other/x", LOCAL),
        (f"{LOCAL}/../../../etc", LOCAL),
        (f"file://{LOCAL}/%2e%2e/%2e%2e/db", LOCAL),
        (f"file://evil.example{LOCAL}/1", LOCAL),
        ("s3://team-bucket/mlflow/1", LOCAL),
        # ... and a model version's free-text source read with the server's cloud credentials.
        ("s3://another-bucket/other-team/model", "s3://team-bucket/mlflow"),
        ("s3://team-bucket/mlflow-other/model", "s3://team-bucket/mlflow"),
        ("gs://team-bucket/mlflow/1", "s3://team-bucket/mlflow"),
        ("s3://team-bucket/mlflow/../x", "s3://team-bucket/mlflow"),
        ("http://169.254.169.254/latest", LOCAL),
        ("mlflow-artifacts://elsewhere.example/x", LOCAL),
        (None, LOCAL),
    ],
)
def test_confinement_problem_outside_destination_refused(uri, destination):
    assert artifactstore.confinement_problem(uri, destination) == artifactstore.CONFINED


def test_confine_registry_refuses_outside_builds_inside(tmp_path, monkeypatch):
    """Through MLflow's real registry, as the server's handlers reach it."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact import artifact_repository_registry as module

    registry = module._artifact_repository_registry
    monkeypatch.setattr(registry, "get_artifact_repository", registry.get_artifact_repository)
    root = tmp_path / "artifacts"
    root.mkdir()
    artifactstore.confine({"MLFLOW_ARTIFACTS_DESTINATION": str(root)})
    assert module.get_artifact_repository(str(root / "1")).artifact_dir == str(root / "1")
    with pytest.raises(MlflowException, match="only in its own artifact store") as refused:
        module.get_artifact_repository(f"file://{tmp_path}")
    assert refused.value.get_http_status_code() == 403
