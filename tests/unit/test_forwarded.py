"""The gate's reading of what nginx forwards: nothing it accepts can carry a control character."""

import random
from urllib.parse import quote

import pytest
from mlflowstack.forwarded import decode_path, escape_path, parse

NONCE = "00112233445566778899aabbccddeeff"
SECRET = b"ab" * 32


def environ(
    path="/api/2.0/mlflow/runs/get", method="GET", nonce=NONCE, client="10.0.0.9", secret=SECRET
):
    return {
        "HTTP_X_STACK_PROXY_SECRET": secret.decode(),
        "HTTP_X_ORIGINAL_PATH": path,
        "HTTP_X_ORIGINAL_METHOD": method,
        "HTTP_X_GATE_NONCE": nonce,
        "HTTP_X_CLIENT_ADDRESS": client,
    }


def test_escape_path_only_safe_ascii_and_percent():
    escaped = escape_path(bytes(range(256)))
    allowed = set("%/._~-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    assert set(escaped) <= allowed


def test_decode_path_round_trip_utf8():
    path = "/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/na me ü &+=;?#.txt"
    assert decode_path(escape_path(path.encode("utf-8"))) == path


def test_decode_path_invalid_utf8_replaced_like_the_server():
    # uvicorn decodes the path with urllib.parse.unquote: UTF-8, undecodable bytes replaced.
    assert decode_path(escape_path(b"/a\xff\xfeb")) == "/a\ufffd\ufffdb"


@pytest.mark.parametrize(
    "value",
    [
        "/x\r\nGET /health HTTP/1.1",
        "/x%0D%0A%0D%0AGET%20/health%20HTTP/1.1",
        "/x%0a",
        "/x%0d",
        "/x%00",
        "/%7F",
        "/x%0A",
        "/x%1F/y",
        "x",
        "",
        "/a//b",
        "/a/./b",
        "/a/../b",
        "/a/..",
        "/a%2",
        "/a%zz",
        "/a b",
        "/a?b=1",
        "/a%2f",  # lower-case hex is never what njs writes
        "/" + "a" * 30000,
    ],
)
def test_decode_path_not_from_nginx_none(value):
    assert decode_path(value) is None


def test_decode_path_fuzz_never_yields_control_characters():
    rng = random.Random(9)
    alphabet = "/%0123456789ABCDEFabcdefxyz.~-_\r\n\x00 "
    accepted = 0
    for _ in range(20000):
        value = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        path = decode_path(value)
        if path is not None:
            accepted += 1
            assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in path)
            assert "//" not in path
    assert accepted > 1000  # the fuzzing reached the accepting side too


def test_decode_path_fuzz_random_bytes_round_trip():
    rng = random.Random(3)
    for _ in range(5000):
        raw = b"/" + bytes(rng.randrange(0x20, 0x100) for _ in range(rng.randrange(0, 40)))
        raw = raw.replace(b"\x7f", b"x")
        while b"//" in raw:
            raw = raw.replace(b"//", b"/")
        if decode_path(escape_path(raw)) is None:
            # Only dot segments are refused among control-free bytes.
            assert b"/./" in raw + b"/" or b"/../" in raw + b"/"
        else:
            assert decode_path(escape_path(raw)) == quote_roundtrip(raw)


def quote_roundtrip(raw: bytes) -> str:
    from urllib.parse import unquote

    return unquote(quote(raw, safe="/"), errors="replace")


def test_parse_well_formed_fields():
    request = parse(environ(path="/ajax-api/2.0/mlflow/runs/search", method="POST"), SECRET)
    assert request is not None
    assert (request.method, request.path, request.nonce, request.client) == (
        "POST",
        "/ajax-api/2.0/mlflow/runs/search",
        NONCE,
        "10.0.0.9",
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("method", "get"),
        ("method", "GET /x"),
        ("method", ""),
        ("method", "G" * 33),
        ("nonce", NONCE.upper()),
        ("nonce", NONCE[:-1]),
        ("nonce", NONCE + "\r\n"),
        ("client", ""),
        ("client", "10.0.0.9\r\nX: y"),
        ("path", "/x%0D%0A"),
        ("secret", b""),
        ("secret", b"ab" * 31),
        ("secret", b"ab" * 32 + b"\r\n"),
    ],
)
def test_parse_malformed_field_none(field, value):
    assert parse(environ(**{field: value}), SECRET) is None


def test_parse_missing_fields_none():
    assert parse({}, SECRET) is None
