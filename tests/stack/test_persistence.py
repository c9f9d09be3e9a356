"""Data lives on named volumes: down then up keeps every run, metric and artifact."""

from pathlib import Path

import mlflow
from mlflow import MlflowClient


def test_down_then_up_keeps_runs_metrics_artifacts_and_users(mlflow_env, tmp_path):
    experiment_id = mlflow.create_experiment("survives-restart")
    artifact = tmp_path / "note.txt"
    artifact.write_text("kept")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("acc", 0.9)
        mlflow.log_artifact(str(artifact))

    mlflow_env.compose("down")
    mlflow_env.compose("up", "-d", "--wait")

    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.metrics == {"acc": 0.9}
    downloaded = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == "kept"
