"""server/storefull.py: a full artifact volume answers 507 with its reason, after the body."""

import asyncio
import errno
import os

import pytest
import storefull
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A local artifact repository whose staging file is ``target`` (set by each test)."""
    storefull.install()
    repository = LocalArtifactRepository(str(tmp_path))

    def staging(name, path=None):
        descriptor = os.open(repository.target, repository.flags)
        return descriptor, str(tmp_path / ".staged"), str(tmp_path / name)

    monkeypatch.setattr(repository, "_create_staging_artifact", staging)
    return repository


def _upload(repository, sent):
    async def body():
        for number in range(5):
            sent.append(number)
            yield b"x" * 70_000  # more than a file buffer: each chunk reaches the disk

    return asyncio.run(repository.log_artifact_from_async_stream(body(), "model.bin"))


def test_log_artifact_from_async_stream_volume_full_raises_507_after_reading_body(repository):
    repository.target, repository.flags = "/dev/full", os.O_WRONLY  # every write: ENOSPC
    sent = []
    with pytest.raises(storefull.ArtifactStoreFull) as caught:
        _upload(repository, sent)
    assert caught.value.get_http_status_code() == 507
    assert "artifact store is full" in caught.value.message
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert sent == [0, 1, 2, 3, 4]


def test_log_artifact_from_async_stream_other_os_error_passes_unchanged(repository, tmp_path):
    (tmp_path / "read-only").write_bytes(b"")
    repository.target, repository.flags = str(tmp_path / "read-only"), os.O_RDONLY  # EBADF
    with pytest.raises(OSError) as caught:
        _upload(repository, [])
    assert not isinstance(caught.value, storefull.ArtifactStoreFull)
    assert caught.value.errno == errno.EBADF


def test_log_artifact_from_async_stream_room_left_stores_file(tmp_path):
    storefull.install()
    repository = LocalArtifactRepository(str(tmp_path))
    _upload(repository, [])
    assert [path.name for path in tmp_path.iterdir()] == ["model.bin"]
    assert (tmp_path / "model.bin").stat().st_size == 5 * 70_000
