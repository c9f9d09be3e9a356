"""Shared fixtures: bcrypt is slow by design (cost 12: about 0.4 s a hash or a check here), so
tests make each hash, and check each password against each hash, once per session. Both are
the real bcrypt answers: a hash is as valid the second time, and a check's answer never changes.
"""

import functools

import pytest
from mlflowstack import users
from mlflowstack.users import MIN_BCRYPT_COST, hash_password

# Real hash_password() output for the passwords most tests use, made once by hand: every test
# that logs in with one checks it with real bcrypt, and test_users.py checks a fresh hash.
_PRECOMPUTED = {
    ("right", 12): "$2y$12$Sn4S0qMON53PrkaD5ryCfesEQPmIvAnfrCnMLAfWwV6IkHdYcbxmq",
    ("pw", 12): "$2y$12$s4yp478OK9aRZ3rxzM06MeW1RTneb6SV/M9kPTZLdyCYxY/YhbQv2",
    (" pw ", 12): "$2y$12$czu4w1h4BcIO62Q8GBsKo.zlay4/O6a50vjdoaotmCcRnzgi9jdEu",
    ("new", 12): "$2y$12$PD0rlR/v06TLq/fhRiaT/uvhoioNrIhxyh8Uz873MuP93EgE33oYi",
    ("new-password", 12): "$2y$12$5L3V6Jr6n8blbRdx251J4.p1.IU0uhjWFR0W5u0gjPd0seP63KYsC",
    ("bobs-password", 12): "$2y$12$kvQY2Jy3zLoJPIHXRY.09.eX52N/1IkTSmfremqkfPUhnYriYS2de",
    ("other", 12): "$2y$12$aH8eOvtbPeB6SrK8QYX1YupkmSAllOrS9a0/Q1Y9IiDkIyvsDqsXi",
    ("café", 12): "$2y$12$yysINOinxr6DrcVH0DuCJ.tMIlONzRE5l.Mt2rZ9iUZdsfKpHnwim",
    ("p" * 72, 12): "$2y$12$m95Any.wBgkyXNxkrGKAMOKNY3LoJEck5LqHoAXoOsBQM3Pux2xAm",
}


@functools.cache
def cached_hash(password: str, cost: int = MIN_BCRYPT_COST) -> str:
    return _PRECOMPUTED.get((password, cost)) or hash_password(password, cost)


@functools.cache
def cached_verify(password: str, password_hash: str) -> bool:
    """The gate's real bcrypt check, once per (password, hash)."""
    from mlflowstack.gate import _bcrypt_verify

    return _bcrypt_verify(password, password_hash)


@pytest.fixture
def bcrypt_hash():
    return cached_hash


@pytest.fixture
def bcrypt_verify():
    return cached_verify


@pytest.fixture
def fast_hashes(monkeypatch):
    """The users store hashes at the floor cost through cached_hash, after the same validation
    as hash_password; other costs are hashed as usual."""
    real = users.hash_password

    def hash_once(password: str, cost: int = MIN_BCRYPT_COST) -> str:
        if cost != MIN_BCRYPT_COST:
            return real(password, cost)
        users.validate_password(password)
        return cached_hash(password)

    monkeypatch.setattr(users, "hash_password", hash_once)


def pytest_collection_finish(session):
    """Call ``start_early()`` of each test module with a selected test, once: a module's slow
    subprocess then runs on another core while the tests before it run."""
    if session.config.option.collectonly:
        return
    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module not in started and hasattr(module, "start_early"):
            started.add(module)
            module.start_early()


@pytest.fixture
def users_dir(tmp_path, monkeypatch):
    """An empty users directory given by argument, never by a USERS_DIR of the environment."""
    directory = tmp_path / "users"
    directory.mkdir()
    monkeypatch.delenv("USERS_DIR", raising=False)
    return directory
