"""A model's life through the proxy, with the real MLflow client: the example project
(examples/decision-tree) run with ``mlflow run``, its versions registered, aliased, tagged,
described and moved through the legacy stages by an editor, loaded by alias, a bad parameter
refused, and what a viewer may and may not do to all of it (a viewer reads and loads; every
registry write is refused with 403 and changes nothing)."""

import uuid
from dataclasses import dataclass

import matplotlib.image
import mlflow
import pytest
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_iris
from walkthrough import client_as, mlflow_run, tracking_env, train_two_and_promote

SUFFIX = uuid.uuid4().hex[:8]
EXPERIMENT = f"lifecycle-{SUFFIX}"
METRICS = {"precision", "recall", "accuracy"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Trained:
    """The walkthrough's outcome as it stood right after train_two_and_promote."""

    name: str
    better: str  # version numbers, as MLflow's client gives them
    other: str
    run_of: dict[str, str]  # version -> run ID
    production: str  # the version the alias pointed to right after the walkthrough


@pytest.fixture(scope="module")
def people(stack):
    """Tracking envs of an editor and a viewer made for this module (the stack is shared)."""
    editor = (f"lc-editor-{SUFFIX}", "editor-password-1")
    viewer = (f"lc-viewer-{SUFFIX}", "viewer-password-1")
    stack.add_user(*editor, "editor")
    stack.add_user(*viewer, "viewer")
    stack.wait_for_status(200, editor)
    stack.wait_for_status(200, viewer)
    return {
        "editor": tracking_env(stack.url, *editor),
        "viewer": tracking_env(stack.url, *viewer),
    }


@pytest.fixture(scope="module")
def trained(people):
    """The first project (examples/decision-tree) run by the editor: depths 1 and 3 into one
    model, production on the more accurate version."""
    name, better, other = train_two_and_promote(people["editor"], EXPERIMENT)
    with client_as(people["editor"]) as client:
        run_of = {v: client.get_model_version(name, v).run_id for v in (better, other)}
        production = client.get_model_version_by_alias(name, "production").version
    return Trained(name, better, other, run_of, production)


def registry_state(client, name: str) -> tuple:
    """Everything a registry write could change about the model, plus whether a model the
    viewer tries to create exists."""
    model = client.get_registered_model(name)
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    viewer_made = client.search_registered_models(filter_string=f"name = 'viewer-{SUFFIX}'")
    return (
        model.description,
        model.tags,
        model.aliases,
        [(v.version, v.description, v.tags, v.current_stage, sorted(v.aliases)) for v in versions],
        [m.name for m in viewer_made],
    )


def register_copy(client, trained: Trained):
    """A new version of the better version's logged model, in the one create call that
    ``mlflow.register_model`` makes. MLflow 3.17 refuses a ``models:/m-...`` source without
    its logged model's ID, and leaves ``model_id`` out of its model-version answers, so the ID
    comes from the source."""
    better = client.get_model_version(trained.name, trained.better)
    model_id = better.source.removeprefix("models:/")
    return client.create_model_version(
        trained.name, better.source, run_id=better.run_id, model_id=model_id
    )


def test_project_run_each_depth_logs_param_metrics_and_confusion_matrix(people, trained, tmp_path):
    with client_as(people["editor"]) as client:
        experiment = client.get_experiment_by_name(EXPERIMENT)  # made by --experiment-name
        for version, depth in ((trained.other, "1"), (trained.better, "3")):
            run = client.get_run(trained.run_of[version])
            assert run.info.status == "FINISHED"
            assert run.info.experiment_id == experiment.experiment_id
            assert run.info.user_id == people["editor"]["MLFLOW_TRACKING_USERNAME"]
            assert run.data.params["tree_depth"] == depth
            assert set(run.data.metrics) == METRICS
            assert all(0 < value <= 1 for value in run.data.metrics.values())
            target = tmp_path / depth
            target.mkdir()
            png = client.download_artifacts(run.info.run_id, "confusion_matrix.png", str(target))
            with open(png, "rb") as image:
                assert image.read(8) == PNG_SIGNATURE
            height, width, _channels = matplotlib.image.imread(png).shape  # decodes whole
            assert height >= 100 and width >= 100


def test_project_run_registers_version_with_signature_and_creator(people, trained):
    iris = load_iris(as_frame=True)
    with client_as(people["editor"]) as client:
        for version in (trained.better, trained.other):
            stored = client.get_model_version(trained.name, version)
            assert stored.status == "READY"
            assert stored.user_id == people["editor"]["MLFLOW_TRACKING_USERNAME"]
            info = mlflow.models.get_model_info(f"models:/{trained.name}/{version}")
            assert info.signature.inputs.input_names() == list(iris.feature_names)
            assert info.signature.outputs is not None
            assert info.saved_input_example_info is not None


def test_walkthrough_two_depths_production_on_more_accurate_version(people, trained):
    with client_as(people["editor"]) as client:
        accuracy = {
            version: client.get_run(run_id).data.metrics["accuracy"]
            for version, run_id in trained.run_of.items()
        }
    # Depth 1 can separate one iris class only (accuracy 2/3); depth 3 nearly all.
    assert accuracy[trained.better] > accuracy[trained.other]
    assert trained.production == trained.better


def test_production_alias_loaded_with_pyfunc_predicts_iris(people, trained):
    iris = load_iris(as_frame=True)
    with client_as(people["editor"]):
        model = mlflow.pyfunc.load_model(f"models:/{trained.name}@production")
        predicted = model.predict(iris.data)
    assert len(predicted) == len(iris.target)
    assert (predicted == iris.target.to_numpy()).mean() > 0.9


def test_project_run_bad_tree_depth_fails_before_logging_anything(people, trained):
    """``-P tree_depth=abc``: MLflow 3.17 creates the run without checking the int, main.py
    refuses the value in one line, and ``mlflow run`` marks the run FAILED and exits 1. No
    experiment given: the run lands in Default."""
    with client_as(people["editor"]) as client:
        versions_before = client.search_model_versions(f"name = '{trained.name}'")
        run = mlflow_run(people["editor"], "abc", trained.name)
        assert run.returncode != 0, run.output
        message = "tree_depth must be a positive integer, got 'abc'"
        assert [line for line in run.output.splitlines() if message in line] == [
            f"decision-tree: error: {message}"
        ], run.output
        assert "Traceback" not in run.output
        assert run.run_id, run.output  # created by mlflow run before main.py started
        stored = client.get_run(run.run_id)
        assert stored.info.status == "FAILED"
        assert stored.info.experiment_id == "0"
        assert stored.data.metrics == {}
        # mlflow run logs the params itself, as given, before main.py sees them.
        assert stored.data.params == {"tree_depth": "abc", "model_name": trained.name}
        assert client.list_artifacts(run.run_id) == []
        versions_after = client.search_model_versions(f"name = '{trained.name}'")
    assert {v.version for v in versions_after} == {v.version for v in versions_before}


def test_editor_new_version_gets_aliases_tags_and_descriptions(people, trained):
    name = trained.name
    with client_as(people["editor"]) as client:
        new = register_copy(client, trained)
        assert int(new.version) > int(trained.better)
        client.set_registered_model_alias(name, "champion", new.version)
        client.set_registered_model_alias(name, "production", new.version)
        assert client.get_model_version_by_alias(name, "champion").version == new.version
        assert client.get_model_version_by_alias(name, "production").version == new.version
        # And back, as a rollback would: the other tests expect production on the better run.
        client.set_registered_model_alias(name, "production", trained.better)
        assert client.get_model_version_by_alias(name, "production").version == trained.better

        client.set_registered_model_tag(name, "team", "walkthrough")
        client.set_model_version_tag(name, new.version, "validated", "true")
        client.update_registered_model(name, description="Iris decision trees")
        client.update_model_version(name, new.version, description="Copy of the depth-3 tree")
        model = client.get_registered_model(name)
        assert model.tags["team"] == "walkthrough"
        assert model.description == "Iris decision trees"
        assert model.aliases == {"champion": new.version, "production": trained.better}
        stored = client.get_model_version(name, new.version)
        assert stored.tags == {"validated": "true"}
        assert stored.description == "Copy of the depth-3 tree"
        assert stored.user_id == people["editor"]["MLFLOW_TRACKING_USERNAME"]


def test_editor_legacy_stage_transitions_staging_then_production(people, trained):
    """Stages are deprecated since MLflow 2.9 (a FutureWarning) but 3.17.2 still serves them."""
    name, version = trained.name, trained.better
    with client_as(people["editor"]) as client:
        with pytest.warns(FutureWarning):
            staged = client.transition_model_version_stage(name, version, "Staging")
        assert staged.current_stage == "Staging"
        with pytest.warns(FutureWarning):
            client.transition_model_version_stage(name, version, "Production")
        assert client.get_model_version(name, version).current_stage == "Production"
        # A stage URI resolves to the version now in that stage.
        resolved = mlflow.models.get_model_info(f"models:/{name}/Production")
        assert resolved.run_id == trained.run_of[version]


def test_viewer_reads_registry_and_loads_model_by_alias(people, trained, tmp_path):
    name = trained.name
    iris = load_iris(as_frame=True)
    with client_as(people["viewer"]) as client:
        found = client.search_registered_models(filter_string=f"name = '{name}'")
        assert [model.name for model in found] == [name]
        assert client.get_registered_model(name).aliases["production"] == trained.better
        versions = {v.version for v in client.search_model_versions(f"name = '{name}'")}
        assert {trained.better, trained.other} <= versions
        assert client.get_model_version(name, trained.other).run_id == trained.run_of[trained.other]
        assert client.get_model_version_by_alias(name, "production").version == trained.better
        run_id = trained.run_of[trained.better]
        png = client.download_artifacts(run_id, "confusion_matrix.png", str(tmp_path))
        with open(png, "rb") as image:
            assert image.read(8) == PNG_SIGNATURE
        model = mlflow.pyfunc.load_model(f"models:/{name}@production")
        assert len(model.predict(iris.data.head(5))) == 5


# Each registry write a viewer might try, as (client, Trained) -> call. Each is a call that
# succeeds for an editor, so that the role is the only reason for a refusal.
VIEWER_WRITES = {
    "register_version": register_copy,
    "create_registered_model": lambda c, t: c.create_registered_model(f"viewer-{SUFFIX}"),
    "set_alias": lambda c, t: c.set_registered_model_alias(t.name, "production", t.other),
    "delete_alias": lambda c, t: c.delete_registered_model_alias(t.name, "production"),
    "set_model_tag": lambda c, t: c.set_registered_model_tag(t.name, "team", "viewer"),
    "set_version_tag": lambda c, t: c.set_model_version_tag(t.name, t.better, "ok", "no"),
    "update_model_description": lambda c, t: c.update_registered_model(t.name, "by a viewer"),
    "update_version_description": lambda c, t: c.update_model_version(
        t.name, t.better, "by a viewer"
    ),
    "transition_stage": lambda c, t: c.transition_model_version_stage(t.name, t.other, "Archived"),
    "delete_version": lambda c, t: c.delete_model_version(t.name, t.other),
    "delete_registered_model": lambda c, t: c.delete_registered_model(t.name),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transition_model_version_stage
@pytest.mark.parametrize("write", VIEWER_WRITES.values(), ids=VIEWER_WRITES.keys())
def test_viewer_registry_write_refused_403_and_nothing_changed(people, trained, write):
    viewer = people["viewer"]["MLFLOW_TRACKING_USERNAME"]
    with client_as(people["viewer"]) as client:
        before = registry_state(client, trained.name)
        with pytest.raises(MlflowException) as refused:
            write(client, trained)
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
        # The gate's reason names the user and the role (nginx/njs/refusals.js).
        assert viewer in str(refused.value) and "viewer" in str(refused.value)
        assert registry_state(client, trained.name) == before
