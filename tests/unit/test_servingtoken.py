"""The serving profile's viewer token, as bootstrap keeps it (mlflowstack/servingtoken.py)."""

import re
import stat

import pytest
from mlflowstack.files import BundleError
from mlflowstack.servingtoken import SERVING_TOKEN_NAME, keep_serving_token
from mlflowstack.users import UserStore, token_digest


@pytest.fixture
def store(users_dir):
    return UserStore(users_dir)


def serving_tokens(store):
    return [t for t in store.load_tokens().values() if t.name == SERVING_TOKEN_NAME]


def test_keep_serving_token_wanted_creates_viewer_token_and_0600_file(store, tmp_path):
    said = keep_serving_token(store, tmp_path, wanted=True)
    secret = (tmp_path / "token").read_text().strip()
    [token] = serving_tokens(store)
    assert (token.role, token.expires, token.digest) == ("viewer", None, token_digest(secret))
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert "created" in said and secret not in said


def test_keep_serving_token_twice_changes_nothing(store, tmp_path):
    keep_serving_token(store, tmp_path, wanted=True)
    before = (store.tokens_path.read_bytes(), (tmp_path / "token").read_bytes())
    assert keep_serving_token(store, tmp_path, wanted=True) == ""
    assert (store.tokens_path.read_bytes(), (tmp_path / "token").read_bytes()) == before


def test_keep_serving_token_revoked_token_is_made_again_with_a_fresh_secret(store, tmp_path):
    """`stackctl token remove serving` revokes for good: the next `up` must not register the
    old secret again (a model's code could have copied it)."""
    keep_serving_token(store, tmp_path, wanted=True)
    revoked = (tmp_path / "token").read_text().strip()
    store.remove_token(SERVING_TOKEN_NAME)
    assert keep_serving_token(store, tmp_path, wanted=True)
    secret = (tmp_path / "token").read_text().strip()
    assert secret != revoked
    assert [t.digest for t in serving_tokens(store)] == [token_digest(secret)]


def test_keep_serving_token_lost_or_bad_file_gets_fresh_secret(store, tmp_path):
    keep_serving_token(store, tmp_path, wanted=True)
    (tmp_path / "token").write_text("mlst_placeholder\n")
    keep_serving_token(store, tmp_path, wanted=True)
    secret = (tmp_path / "token").read_text().strip()
    assert secret != "mlst_placeholder"
    assert [t.digest for t in serving_tokens(store)] == [token_digest(secret)]


def test_keep_serving_token_role_changed_by_hand_is_reset_to_viewer(store, tmp_path):
    keep_serving_token(store, tmp_path, wanted=True)
    secret = (tmp_path / "token").read_text().strip()
    store.remove_token(SERVING_TOKEN_NAME)
    from mlflowstack.ensure import converge_token

    converge_token(store, SERVING_TOKEN_NAME, "admin", "present", secret, None)
    keep_serving_token(store, tmp_path, wanted=True)
    assert [t.role for t in serving_tokens(store)] == ["viewer"]


def test_keep_serving_token_wanted_makes_serving_secret_once(store, tmp_path):
    keep_serving_token(store, tmp_path, wanted=True)
    secret = (tmp_path / "serving-secret").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", secret)
    assert stat.S_IMODE((tmp_path / "serving-secret").stat().st_mode) == 0o600
    (tmp_path / "token").unlink()
    keep_serving_token(store, tmp_path, wanted=True)
    assert (tmp_path / "serving-secret").read_text() == secret


def test_keep_serving_token_not_wanted_removes_token_and_files(store, tmp_path):
    keep_serving_token(store, tmp_path, wanted=True)
    said = keep_serving_token(store, tmp_path, wanted=False)
    assert serving_tokens(store) == [] and not (tmp_path / "token").exists()
    assert not (tmp_path / "serving-secret").exists()
    assert "removed" in said
    assert keep_serving_token(store, tmp_path, wanted=False) == ""


def test_keep_serving_token_user_named_serving_refused_and_user_kept(store, tmp_path):
    store.add_user(SERVING_TOKEN_NAME, "right", role="editor")
    with pytest.raises(BundleError, match="serving profile's token"):
        keep_serving_token(store, tmp_path, wanted=True)
    assert SERVING_TOKEN_NAME in store.load_users().users
    assert serving_tokens(store) == [] and not (tmp_path / "token").exists()


def test_bootstrap_serve_models_set_keeps_token_and_never_prints_it(
    users_dir, tmp_path, monkeypatch
):
    from test_cli import run

    monkeypatch.setenv("SERVING_TOKEN_DIR", str(tmp_path))
    monkeypatch.setenv("SERVE_MODELS", "iris@production")
    status, out, err = run(users_dir, "bootstrap")
    secret = (tmp_path / "token").read_text().strip()
    assert status == 0 and "serving token: created" in err
    assert secret not in out + err


def test_bootstrap_user_named_serving_warns_and_still_succeeds(users_dir, tmp_path, monkeypatch):
    from test_cli import run

    UserStore(users_dir).add_user(SERVING_TOKEN_NAME, "right", role="viewer")
    monkeypatch.setenv("SERVING_TOKEN_DIR", str(tmp_path))
    monkeypatch.setenv("SERVE_MODELS", "iris@production")
    status, _, err = run(users_dir, "bootstrap")
    assert status == 0 and "warning: the serving profile's token" in err
