"""Shared fixtures: bcrypt hashes are slow by design, so tests make each one once."""

import functools

import pytest
from mlflowstack.users import hash_password


@functools.cache
def cached_hash(password: str, cost: int = 12) -> str:
    return hash_password(password, cost)


@pytest.fixture
def bcrypt_hash():
    return cached_hash
