"""server/accel.py: which downloads nginx sends itself, and what the server answers then."""

import asyncio

import accel
import pytest
from starlette.responses import FileResponse

MAPPED = [
    (b"x-sendfile-type", b"X-Accel-Redirect"),
    (b"x-accel-mapping", b"/ROOT/=/_artifact_files/"),
]


def _mapped(directory) -> list[tuple[bytes, bytes]]:
    return [(name, value.replace(b"/ROOT", str(directory).encode())) for name, value in MAPPED]


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "artifacts" / "1" / "run" / "a b?#ü.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"model bytes")
    return path


@pytest.fixture
def installed():
    chunk_size = FileResponse.chunk_size
    accel.install()
    yield
    FileResponse.__call__, FileResponse.chunk_size = accel._starlette_call, chunk_size


def _answer(response: FileResponse, headers) -> tuple[dict, bytes]:
    messages = []

    async def receive():  # a client that stays connected and sends nothing more
        await asyncio.Event().wait()

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "GET", "headers": headers, "path": "/"}
    asyncio.run(response(scope, receive, send))
    start = messages[0]
    answer = {name.decode(): value.decode() for name, value in start["headers"]}
    answer["status"] = start["status"]
    return answer, b"".join(m.get("body", b"") for m in messages[1:])


def test_redirect_uri_mapped_file_returns_percent_encoded_uri(tmp_path, artifact):
    uri = accel.redirect_uri(_mapped(tmp_path / "artifacts"), str(artifact))
    assert uri == "/_artifact_files/1/run/a%20b%3F%23%C3%BC.txt"


def test_redirect_uri_without_sendfile_type_returns_none(tmp_path, artifact):
    headers = _mapped(tmp_path / "artifacts")[1:]
    assert accel.redirect_uri(headers, str(artifact)) is None


def test_redirect_uri_file_beside_directory_returns_none(tmp_path, artifact):
    # "/x/artifacts-old/f" starts with "/x/artifacts" but is not below it.
    sibling = tmp_path / "artifacts-old" / "f"
    sibling.parent.mkdir()
    sibling.write_bytes(b"")
    assert accel.redirect_uri(_mapped(tmp_path / "artifacts"), str(sibling)) is None


def test_redirect_uri_dot_segments_out_of_directory_returns_none(tmp_path, artifact):
    outside = tmp_path / "secret"
    outside.write_bytes(b"")
    path = f"{tmp_path}/artifacts/1/../../secret"
    assert accel.redirect_uri(_mapped(tmp_path / "artifacts"), path) is None


def test_redirect_uri_directory_returns_none(tmp_path, artifact):
    assert accel.redirect_uri(_mapped(tmp_path / "artifacts"), str(artifact.parent)) is None


@pytest.mark.parametrize(
    "mapping", [b"", b"/only/a/directory", b"relative/=/_artifact_files/", b"/ROOT/=relative/"]
)
def test_redirect_uri_malformed_mapping_returns_none(tmp_path, artifact, mapping):
    mapping = mapping.replace(b"/ROOT", str(tmp_path / "artifacts").encode())
    headers = [MAPPED[0], (b"x-accel-mapping", mapping)]
    assert accel.redirect_uri(headers, str(artifact)) is None


def test_file_response_installed_mapped_request_answers_headers_only(tmp_path, artifact, installed):
    response = FileResponse(
        artifact,
        headers={
            "Content-Type": "text/plain",
            "Content-Disposition": "attachment; filename=x.txt",
            "X-Content-Type-Options": "nosniff",
        },
    )
    answer, body = _answer(response, _mapped(tmp_path / "artifacts"))
    assert answer["status"] == 200
    assert answer["x-accel-redirect"] == "/_artifact_files/1/run/a%20b%3F%23%C3%BC.txt"
    assert answer["content-type"].startswith("text/plain")
    assert answer["content-disposition"] == "attachment; filename=x.txt"
    assert answer["content-length"] == "0"
    assert "etag" not in answer
    assert body == b""


def test_file_response_installed_direct_request_sends_the_file(artifact, installed):
    answer, body = _answer(FileResponse(artifact), [])
    assert "x-accel-redirect" not in answer
    assert body == b"model bytes"
