"""Artifact downloads that nginx sends itself (server/accel.py + /_artifact_files/).

What a client sees must be MLflow's answer: its type, disposition and nosniff, the exact
bytes, ranges and HEAD, whatever the artifact's name. nginx's own ETag format
("<hex mtime>-<hex size>"; Starlette's is an MD5) shows that nginx, not Python, sent the body.
"""

import re
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from mlflow import MlflowClient

# The MLflow client sends names unquoted (it would cut one at "#" or "?", proxy or not); the
# second name still needs percent-encoding in X-Accel-Redirect and nginx's unescaping.
NAMES = ("notes.txt", "with space, ü & +=;.txt")
CONTENT = b"0123456789abcdef" * 4096  # 64 KiB
NGINX_ETAG = re.compile(r'^"[0-9a-f]+-[0-9a-f]+"$')


@pytest.fixture(scope="module")
def logged(stack, admin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("downloads")
    client = MlflowClient(stack.url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        experiment = client.create_experiment("accel-downloads")
        run = client.create_run(experiment)
        for name in NAMES:
            (folder / name).write_bytes(CONTENT)
            client.log_artifact(run.info.run_id, str(folder / name), artifact_path="out")
        client.set_terminated(run.info.run_id)
    return experiment, run.info.run_id


def _url(stack, logged, name):
    experiment, run_id = logged
    path = quote(f"{experiment}/{run_id}/artifacts/out/{name}")
    return f"{stack.url}/api/2.0/mlflow-artifacts/artifacts/{path}"


@pytest.mark.parametrize("name", NAMES)
def test_download_through_proxy_sent_by_nginx_with_mlflow_headers(stack, admin, logged, name):
    answer = requests.get(_url(stack, logged, name), auth=admin)
    assert answer.status_code == 200
    assert answer.content == CONTENT
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert answer.headers["Content-Disposition"].startswith("attachment")
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert NGINX_ETAG.match(answer.headers["ETag"])
    assert "X-Accel-Redirect" not in answer.headers


def test_download_range_request_gets_partial_content(stack, admin, logged):
    answer = requests.get(
        _url(stack, logged, NAMES[0]), auth=admin, headers={"Range": "bytes=16-31"}
    )
    assert answer.status_code == 206
    assert answer.content == CONTENT[16:32]


def test_download_head_request_gets_length_without_body(stack, admin, logged):
    answer = requests.head(_url(stack, logged, NAMES[0]), auth=admin)
    assert answer.status_code == 200
    assert int(answer.headers["Content-Length"]) == len(CONTENT)
    assert answer.content == b""


def test_download_without_credentials_is_refused(stack, logged):
    assert requests.get(_url(stack, logged, NAMES[0])).status_code == 401


def test_download_client_supplied_mapping_is_overridden(stack, admin, logged):
    headers = {"X-Accel-Mapping": "/=/_artifact_files/", "X-Sendfile-Type": "X-Accel-Redirect"}
    answer = requests.get(_url(stack, logged, NAMES[0]), auth=admin, headers=headers)
    assert answer.status_code == 200
    assert answer.content == CONTENT


def test_artifact_files_location_is_not_reachable_from_outside(stack, admin, logged):
    experiment, run_id = logged
    url = f"{stack.url}/_artifact_files/{experiment}/{run_id}/artifacts/out/{NAMES[0]}"
    assert requests.get(url, auth=admin).status_code == 404
    assert requests.get(url).status_code == 404


def test_download_missing_artifact_is_not_served(stack, admin, logged):
    answer = requests.get(_url(stack, logged, "missing.txt"), auth=admin)
    assert answer.status_code >= 400
    assert answer.content != CONTENT


def test_mlflow_client_downloads_every_name_intact(mlflow_env, logged, tmp_path):
    _, run_id = logged
    for name in NAMES:
        local = MlflowClient().download_artifacts(run_id, f"out/{name}", str(tmp_path))
        assert Path(local).read_bytes() == CONTENT
