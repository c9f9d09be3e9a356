"""A full artifact volume (issue 14), on a second stack whose artifact volume is a 24 MiB tmpfs
(compose.small-artifacts.yaml).

Invariants, from the client's side: an upload that does not fit fails at once with a message
that says the store is full (server/storefull.py: 507, which the MLflow client does not retry),
and nothing half-written lists; the server stays up and metrics keep working; once space is
freed, uploads work again.
"""

import os
from pathlib import Path

import pytest
import requests
from conftest import SecondStack
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

OVERRIDE = Path(__file__).with_name("compose.small-artifacts.yaml")
CHUNK = 4 * 1024 * 1024
VOLUME = 24 * 1024 * 1024  # the override's size


@pytest.fixture(scope="module")
def small_disk(stack):
    """(The session's stack first: its images are the ones this stack runs.)"""
    with SecondStack("disk", OVERRIDE) as second:
        yield second


@pytest.fixture
def client(small_disk, monkeypatch):
    name, password = small_disk.admin()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=small_disk.url)


def test_full_artifact_volume_refuses_upload_clearly_and_recovers(small_disk, client, tmp_path):
    run_id = client.create_run(client.create_experiment("disk-full")).info.run_id
    stored, refusal = [], None
    for number in range(12):  # 48 MiB offered to a 24 MiB volume
        path = tmp_path / f"part-{number}.bin"
        path.write_bytes(os.urandom(CHUNK))
        try:
            client.log_artifact(run_id, str(path), "parts")
        except (MlflowException, requests.HTTPError) as error:  # the client raises the latter
            refusal = str(error)
            break
        stored.append(path.name)
    assert refusal is not None, "the volume never filled"
    assert "507" in refusal and "artifact store is full" in refusal, refusal[:300]
    assert 2 <= len(stored) <= VOLUME // CHUNK, stored

    # Only whole files list; the server still answers, and metrics (the database's volume) work.
    listed = {info.path: info.file_size for info in client.list_artifacts(run_id, "parts")}
    assert listed == {f"parts/{name}": CHUNK for name in stored}, listed
    assert requests.get(small_disk.url + "/healthz", timeout=5).status_code == 200
    client.log_metric(run_id, "loss", 0.5, step=1)
    assert client.get_metric_history(run_id, "loss")[0].value == 0.5

    # Space freed (the way an operator would, in the volume), then the refused upload fits.
    small_disk.compose(
        "exec", "-T", "server", "sh", "-c", "rm -rf /var/lib/mlflow/artifacts/*/*/artifacts/parts"
    )
    client.log_artifact(run_id, str(tmp_path / f"part-{len(stored)}.bin"), "again")
    assert [info.file_size for info in client.list_artifacts(run_id, "again")] == [CHUNK]
