"""Model-version downloads that work for versions registered from a ``runs:/`` URI.

Contract: after ``install()``, the server's model registry store answers
``get_model_version_download_uri`` for a version whose source is ``runs:/<run>/<path>`` with
the run's real artifact URI (``mlflow-artifacts:/...``) instead of the ``runs:/`` URI itself.
Every other version is answered as before.

Why: MLflow's ``/model-versions/get-artifact`` (the UI's model-version files) serves proxied
``mlflow-artifacts:`` locations itself, but hands any other URI to a client-side artifact
repository. For ``runs:/`` that repository resolves to ``mlflow-artifacts:`` again and then
needs an http tracking URI, which a server does not have: the request failed with 500 and an
error naming the database URI. Resolved here, the server serves the file from its artifact
store like any other. ``get-download-uri`` then names the same real location, which every
MLflow client downloads from as usual. tests/stack/test_edge_findings.py checks both.
"""

from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository


def install() -> None:
    from mlflow.server.handlers import _get_model_registry_store

    store = _get_model_registry_store()  # the worker's one store, made here if not yet
    original = store.get_model_version_download_uri

    def download_uri(name, version):
        uri = original(name, version)
        if RunsArtifactRepository.is_runs_uri(uri):
            return RunsArtifactRepository.get_underlying_uri(uri)
        return uri

    store.get_model_version_download_uri = download_uri
