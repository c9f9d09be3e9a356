"""Artifacts in an object store (README, "Scaling out"): a second stack whose server image is
built with one extra package (boto3, SERVER_EXTRA_PACKAGES, constrained by the lock) and whose
artifacts go to an S3 bucket (ARTIFACTS_DESTINATION, ARTIFACTS_S3_ENDPOINT_URL, credentials from
a file). The S3 service is moto's server on the backend network (tests/stack/s3): the only
S3 implementation this machine can install. The real MLflow client, holding only its MLflow
login, uploads and downloads through nginx; the bytes are in the bucket, none in the volume.
"""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import PROJECT, ROOT, SecondStack
from mlflow import MlflowClient

BOTO3 = "boto3==1.44.8"
BUCKET = "team-artifacts"
CREDENTIALS = (
    "[default]\naws_access_key_id = stacktest\naws_secret_access_key = stacktest-secret\n"
    "region = us-east-1\n"
)
IN_CONTAINER = "/run/secrets/artifact_store_credentials"
# Over boto3's 8 MiB multipart threshold: the server uploads it in parts.
LARGE = os.urandom(9 << 20)


class ObjectStoreStack(SecondStack):
    """A SecondStack with its own server image (the session's plus boto3) and the S3 service;
    the auth and nginx images are the session's."""

    IMAGES = ("auth", "nginx")

    def __init__(self, credentials_file):
        super().__init__(
            "s3",
            ROOT / "tests/stack/compose.object-store.yaml",
            env={
                "SERVER_EXTRA_PACKAGES": BOTO3,
                "ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
                "ARTIFACTS_S3_ENDPOINT_URL": "http://s3:5000",
                "ARTIFACT_STORE_CREDENTIALS_FILE": str(credentials_file),
            },
        )

    def __enter__(self):
        self.compose("build", "server", "s3")
        entered = super().__enter__()
        self.boto3(f"s3.create_bucket(Bucket={BUCKET!r})")
        return entered

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for image in ("server", "s3"):
            subprocess.run(["docker", "rmi", f"{self.project}-{image}"], capture_output=True)

    def boto3(self, statement: str) -> str:
        """Run ``statement`` (``s3`` is a client of the bucket's service) in the server
        container, with the credentials file the server itself reads."""
        script = (
            "import boto3, json; "
            "s3 = boto3.client('s3', endpoint_url='http://s3:5000'); "
            f"print(json.dumps({statement}, default=str))"
        )
        return self.compose(
            "exec", "-T", "-e", f"AWS_SHARED_CREDENTIALS_FILE={IN_CONTAINER}",
            "-e", f"AWS_CONFIG_FILE={IN_CONTAINER}", "server", "python", "-c", script,
        )  # fmt: skip


@pytest.fixture(scope="module")
def store(stack, tmp_path_factory):
    credentials = tmp_path_factory.mktemp("s3") / "credentials"
    credentials.write_text(CREDENTIALS)
    # Read by uid 10001 in the server container (a real one: chown 10001, mode 0600; README).
    credentials.chmod(0o644)
    with ObjectStoreStack(credentials) as second:
        yield second


@pytest.fixture
def client(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", store.admin()[1])
    for name in list(os.environ):
        # The client holds no cloud credentials at all.
        if name.startswith(("AWS_", "MLFLOW_S3_")):
            monkeypatch.delenv(name)
    return MlflowClient(store.url)


def test_server_image_extra_package_installed_lock_unchanged(store):
    frozen = set(store.compose("exec", "-T", "server", "pip", "freeze").split())
    assert BOTO3 in frozen
    lock = (ROOT / "server/requirements.txt").read_text().splitlines()
    pinned = {line.strip() for line in lock if line.strip() and not line.startswith("#")}
    assert pinned <= frozen, sorted(pinned - frozen)


def test_server_info_advertises_no_presigned_transfers(store):
    """MLflow would hand clients presigned URLs to the bucket (which they may not reach, and
    which bypass the access log); artifactstore.install() turns that off by default."""
    answer = requests.get(f"{store.url}/api/3.0/mlflow/server-info", auth=store.admin(), timeout=30)
    answer.raise_for_status()
    info = answer.json()
    assert info["multipart_uploads_enabled"] is info["multipart_downloads_enabled"] is False


def test_client_artifacts_through_proxy_land_in_bucket_not_volume(store, client, tmp_path):
    experiment = client.create_experiment("object-store")
    run = client.create_run(experiment)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    (tmp_path / "notes.txt").write_text("kept in the bucket\n")
    (tmp_path / "weights.bin").write_bytes(LARGE)
    client.log_artifact(run.info.run_id, str(tmp_path / "notes.txt"))
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), artifact_path="model")
    client.set_terminated(run.info.run_id)

    listed = {f.path: f.file_size for f in client.list_artifacts(run.info.run_id, "model")}
    assert listed == {"model/weights.bin": len(LARGE)}
    back = client.download_artifacts(run.info.run_id, "model/weights.bin", str(tmp_path / "d"))
    assert hashlib.sha256(Path(back).read_bytes()).digest() == hashlib.sha256(LARGE).digest()

    keys = store.boto3(f"[o['Key'] for o in s3.list_objects_v2(Bucket={BUCKET!r})['Contents']]")
    prefix = f"mlflow/{experiment}/{run.info.run_id}/artifacts"
    assert f"{prefix}/notes.txt" in keys and f"{prefix}/model/weights.bin" in keys
    files = store.compose("exec", "-T", "server", "find", "/var/lib/mlflow/artifacts", "-type", "f")
    assert files.strip() == ""


def test_stackctl_gc_deletes_a_deleted_runs_objects_only(store, client, tmp_path):
    experiment = client.create_experiment("object-store-gc")
    kept, doomed = client.create_run(experiment), client.create_run(experiment)
    (tmp_path / "a.txt").write_text("a")
    for run in (kept, doomed):
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    client.delete_run(doomed.info.run_id)

    result = subprocess.run(
        ["python3", str(ROOT / "scripts/stackctl"), "gc", "--older-than", "0", "--json"],
        capture_output=True, text=True, env=store.env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys = store.boto3(f"[o['Key'] for o in s3.list_objects_v2(Bucket={BUCKET!r})['Contents']]")
    assert f"mlflow/{experiment}/{kept.info.run_id}/artifacts/a.txt" in keys
    assert f"{doomed.info.run_id}" not in keys


def test_stackctl_backup_warns_artifacts_not_in_archive(store, tmp_path):
    result = subprocess.run(
        ["python3", str(ROOT / "scripts/stackctl"), "backup", "--output", str(tmp_path),
         "--quiet"],
        capture_output=True, text=True, env=store.env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"backup: warning: the artifacts are in s3://{BUCKET}/mlflow, not in the volume: this "
        "archive holds none of them; back the bucket up with its own tools"
    ]
    assert len(list(tmp_path.glob("mlflow-backup-*.tar"))) == 1


def test_server_without_sdk_refuses_object_store_with_one_line(stack):
    """The session's server image has no boto3: the start stops with the package to add."""
    result = subprocess.run(
        ["docker", "run", "--rm", "-e", "ARTIFACTS_DESTINATION=s3://bucket-1",
         f"{PROJECT}-server"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "start: ARTIFACTS_DESTINATION s3://: the server image lacks boto3; add "
        f'SERVER_EXTRA_PACKAGES="{BOTO3}" (pinned) to .env and rebuild'
    )
