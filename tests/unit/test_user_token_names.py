"""One name stands for one user or one token: MLflow records creators by name alone."""

import pytest
from mlflowstack import ensure
from mlflowstack.files import BundleError
from mlflowstack.users import UserStore, new_token_secret


@pytest.fixture
def store(tmp_path, fast_hashes):
    directory = tmp_path / "users"
    directory.mkdir()
    return UserStore(directory)


def test_add_token_named_like_user_refused(store):
    store.add_user("alice", "right")
    with pytest.raises(BundleError, match="a user is already named 'alice'"):
        store.add_token("alice", "editor", None)
    assert store.load_tokens() == {}


def test_add_user_named_like_token_refused(store):
    store.add_token("ci", "editor", None)
    with pytest.raises(BundleError, match="a token is already named 'ci'"):
        store.add_user("ci", "right")
    assert "ci" not in store.load_users().users


def test_converge_token_named_like_user_refused_nothing_written(store):
    store.add_user("alice", "right")
    with pytest.raises(BundleError, match="already named 'alice'"):
        ensure.converge_token(store, "alice", "editor", "present", new_token_secret(), None)
    assert not store.tokens_path.exists() or store.load_tokens() == {}


def test_converge_user_named_like_token_refused(store):
    store.add_token("ci", "viewer", None)
    with pytest.raises(BundleError, match="already named 'ci'"):
        ensure.converge_user(store, "ci", "editor", "present", "right")
    assert "ci" not in store.load_users().users
