"""server/identity.py: what MLflow records as the user is the identity nginx vouched for.

Runs MLflow's own SQLAlchemy stores (the pinned version) on a SQLite file, as the server does.
"""

import identity
import pytest
from mlflow.entities import RunTag
from mlflow.entities.model_registry import RegisteredModelTag
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

ALICE = identity.Identity("alice", "editor", "password")
BOB = identity.Identity("bob", "editor", "password")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    identity.install()
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = TrackingStore(uri, str(root / "artifacts"))
    return tracking, RegistryStore(uri)


@pytest.fixture
def as_user():
    tokens = []

    def serve(who):
        tokens.append(identity.serve_as(who))

    yield serve
    for token in reversed(tokens):
        identity.reset(token)


def user_tag(run):
    return run.data.tags.get(identity.USER_TAG)


def test_create_run_client_claim_replaced_by_verified_user(stores, as_user):
    tracking, _ = stores
    as_user(ALICE)
    claimed = [RunTag(identity.USER_TAG, "mallory")]
    run = tracking.create_run("0", "mallory", 0, claimed, "r1")
    assert run.info.user_id == "alice" and user_tag(run) == "alice"  # the answer too
    stored = tracking.get_run(run.info.run_id)
    assert stored.info.user_id == "alice" and user_tag(stored) == "alice"


def test_create_run_without_user_tag_gets_one(stores, as_user):
    tracking, _ = stores
    as_user(ALICE)
    run = tracking.create_run("0", "", 0, [], "r2")
    assert user_tag(tracking.get_run(run.info.run_id)) == "alice"


def test_set_tag_user_tag_never_changes_creator(stores, as_user):
    tracking, _ = stores
    as_user(ALICE)
    run_id = tracking.create_run("0", "", 0, [], "r3").info.run_id
    as_user(BOB)
    tracking.set_tag(run_id, RunTag(identity.USER_TAG, "bob-says-mallory"))
    tracking.log_batch(run_id, [], [], [RunTag(identity.USER_TAG, "x"), RunTag("note", "kept")])
    stored = tracking.get_run(run_id)
    assert user_tag(stored) == "alice" and stored.data.tags["note"] == "kept"


def test_set_tag_user_tag_on_run_without_one_gets_verified_user(stores, as_user):
    tracking, _ = stores
    run_id = tracking.create_run("0", "job", 0, [], "r4").info.run_id  # no identity: as MLflow
    assert user_tag(tracking.get_run(run_id)) is None
    as_user(BOB)
    tracking.set_tag(run_id, RunTag(identity.USER_TAG, "mallory"))
    assert user_tag(tracking.get_run(run_id)) == "bob"


def test_without_identity_mlflow_behaviour_unchanged(stores):
    tracking, _ = stores
    run = tracking.create_run("0", "ci", 0, [RunTag(identity.USER_TAG, "ci")], "r5")
    stored = tracking.get_run(run.info.run_id)
    assert stored.info.user_id == "ci" and user_tag(stored) == "ci"


def test_model_version_and_registered_model_record_creator(stores, as_user):
    _, registry = stores
    as_user(identity.Identity("ci-nightly", "editor", "token"))
    claimed = [RegisteredModelTag(identity.USER_TAG, "mallory")]
    model = registry.create_registered_model("iris", tags=claimed)
    assert model.tags[identity.USER_TAG] == "ci-nightly"
    version = registry.create_model_version("iris", "mlflow-artifacts:/0/x/artifacts/model")
    assert version.user_id == "ci-nightly"
    assert registry.get_model_version("iris", version.version).user_id == "ci-nightly"
    as_user(BOB)
    registry.set_registered_model_tag("iris", RegisteredModelTag(identity.USER_TAG, "bob"))
    assert registry.get_registered_model("iris").tags[identity.USER_TAG] == "ci-nightly"


def test_from_headers_decodes_name_and_distrusts_unknown_labels():
    who = identity.from_headers(b"j%C3%B6rg", b"superuser", b"cookie")
    assert who == identity.Identity("jörg", "unknown", "password")


def test_log_batch_second_creator_tag_after_delete_still_verified_user(stores, as_user):
    tracking, _ = stores
    run_id = tracking.create_run("0", "job", 0, [], "r6").info.run_id  # no creator tag yet
    as_user(BOB)
    claims = [RunTag(identity.USER_TAG, "x"), RunTag(identity.USER_TAG, "admin")]
    tracking.log_batch(run_id, [], [], claims)
    assert user_tag(tracking.get_run(run_id)) == "bob"


def test_delete_creator_tag_refused(stores, as_user):
    tracking, registry = stores
    as_user(ALICE)
    run_id = tracking.create_run("0", "", 0, [], "r7").info.run_id
    registry.create_registered_model("kept-creator")
    as_user(BOB)
    with pytest.raises(MlflowException, match="cannot be deleted") as refused:
        tracking.delete_tag(run_id, identity.USER_TAG)
    assert refused.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(MlflowException, match="cannot be deleted"):
        registry.delete_registered_model_tag("kept-creator", identity.USER_TAG)
    assert user_tag(tracking.get_run(run_id)) == "alice"
    registry.delete_registered_model("kept-creator")  # the model itself may go
