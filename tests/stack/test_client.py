"""The MLflow client, unchanged, through nginx and the gate: what a data scientist does."""

import hashlib
import os

import mlflow
import pytest
from mlflow import MlflowClient

MB = 1024 * 1024


class AddN(mlflow.pyfunc.PythonModel):
    def __init__(self, n):
        self.n = n

    def predict(self, context, model_input, params=None):
        return model_input + self.n


def _random_file(path, size):
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for _ in range(size // MB):
            chunk = os.urandom(MB)
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    return {
        name: (folder / name, _random_file(folder / name, size))
        for name, size in (("ten.bin", 10 * MB), ("three-hundred.bin", 300 * MB))
    }


def test_tracking_artifacts_and_registry_round_trip(mlflow_env, big_files, tmp_path):
    client = MlflowClient()
    experiment_id = mlflow.create_experiment("client-round-trip")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"lr": "0.1", "layers": "3"})
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.set_tags({"team": "vision"})
        batch = [mlflow.entities.Metric("m", i * 0.5, 0, i) for i in range(1000)]
        client.log_batch(run.info.run_id, metrics=batch)
        for path, _ in big_files.values():
            mlflow.log_artifact(str(path), artifact_path="data")
        mlflow.pyfunc.log_model(
            name="model",
            python_model=AddN(1),
            registered_model_name="adder",
            pip_requirements=["mlflow==3.17.2"],
        )
    run_id = run.info.run_id

    fetched = client.get_run(run_id)
    assert fetched.data.params == {"lr": "0.1", "layers": "3"}
    assert fetched.data.tags["team"] == "vision"
    assert len(client.get_metric_history(run_id, "m")) == 1000

    listed = {f.path: f.file_size for f in client.list_artifacts(run_id, "data")}
    assert listed == {f"data/{n}": p.stat().st_size for n, (p, _) in big_files.items()}
    for name, (_, digest) in big_files.items():
        local = client.download_artifacts(run_id, f"data/{name}", str(tmp_path))
        assert _sha256(local) == digest

    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=AddN(2),
            registered_model_name="adder",
            pip_requirements=["mlflow==3.17.2"],
        )
    versions = client.search_model_versions("name='adder'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    client.set_registered_model_alias("adder", "champion", "2")

    found = mlflow.search_runs([experiment_id], filter_string="params.lr = '0.1'")
    assert list(found["run_id"]) == [run_id]

    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/adder@champion")
    assert list(model.predict(pd.DataFrame({"x": [1, 2]}))["x"]) == [3, 4]
