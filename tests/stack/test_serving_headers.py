"""A served model's headers, both ways, seen from the far side: a hostile stand-in scorer.

A model is code that runs in the scoring process, and its answers come from the stack's own
address, where a browser is logged in. So, whatever it answers with, the client gets only the
scorer's Content-Length and nginx's own headers (njs/serving_headers.js, an allow-list); and
whatever the client sends, the scorer gets only what nginx sets itself
(``proxy_pass_request_headers off`` in serving-proxy.conf): no cookie, no credential, no
X-Stack-* header, no forwarding header of the client's.

The stand-in listens on the socket of ``ghost`` (model 1 of the test stack's SERVE_MODELS),
which is never registered, so the supervisor never binds that socket. It is removed at the
end, so ``ghost`` answers 503 again (test_model_serving.py checks that, before or after).
"""

import base64
import json
import secrets
import time

import pytest
import requests
from conftest import MISSING_MODEL

SOCKET = "/run/mlflow-serving/model-1.sock"
PID_FILE = "/tmp/hostile-scorer.pid"
BASE = f"/serving/{MISSING_MODEL}"

# Random names, so that no fixed deny-list could ever have listed them.
RANDOM_RESPONSE_NAMES = [f"X-{secrets.token_hex(4)}", f"Zz{secrets.token_hex(4)}"]
RANDOM_REQUEST_NAME = f"X-{secrets.token_hex(4)}"
MARKER = secrets.token_hex(8)

HOSTILE_RESPONSE_HEADERS = [
    ("NEL", '{"report_to":"evil","max_age":31536000,"include_subdomains":true}'),
    ("Report-To", '{"group":"evil","max_age":31536000,"endpoints":[{"url":"https://e.test/"}]}'),
    ("Reporting-Endpoints", 'default="https://e.test/reports"'),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains; preload"),
    ("Alt-Svc", 'h3=":443"; ma=86400'),
    ("Accept-CH", "Sec-CH-UA-Full-Version-List, Device-Memory"),
    ("Content-Encoding", "gzip"),
    ("Speculation-Rules", '"/evil-rules.json"'),
    ("Permissions-Policy", "camera=*, microphone=*"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
    ("Cross-Origin-Opener-Policy", "unsafe-none"),
    ("Cross-Origin-Embedder-Policy", "unsafe-none"),
    ("Proxy-Authenticate", 'Basic realm="evil"'),
    ("ETag", '"evil-etag"'),
    ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ("Expires", "Wed, 21 Oct 2037 07:28:00 GMT"),
    ("Upgrade", "h2c"),
    ("X-Content-Type-Options", "bogus"),
    ("Set-Cookie", "session=evil; Path=/; HttpOnly"),
    ("Set-Cookie", "other=evil; Path=/"),
    ("Location", "https://e.test/"),
    ("X-Accel-Redirect", "/etc/passwd"),
    ("X-Accel-Buffering", "no"),
    ("X-Accel-Expires", "3600"),
    ("X-Accel-Limit-Rate", "1"),
    ("X-Accel-Charset", "koi8-r"),
    ("Content-Type", "text/html"),
    ("Link", "<https://e.test/x.js>; rel=preload; as=script"),
    ("Refresh", "0; url=https://e.test/"),
    ("WWW-Authenticate", 'Basic realm="evil"'),
    ("Server", "evil-server"),
    ("Date", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ("Content-Security-Policy", "default-src *"),
    ("X-Frame-Options", "ALLOWALL"),
    ("Referrer-Policy", "unsafe-url"),
    ("Cache-Control", "public, max-age=31536000"),
    ("Vary", "Cookie"),
    ("Content-Disposition", "attachment; filename=evil.html"),
    ("Content-Language", "de"),
    ("Clear-Site-Data", '"*"'),
    ("Service-Worker-Allowed", "/"),
    ("Access-Control-Allow-Origin", "https://e.test"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Timing-Allow-Origin", "*"),
    ("Origin-Agent-Cluster", "?0"),
    ("Document-Policy", "force-load-at-top"),
    ("X-XSS-Protection", "1"),
    ("X-Powered-By", "evil"),
    ("Age", "100"),
    ("Accept-Ranges", "bytes"),
    ("Retry-After", "3600"),
    ("Keep-Alive", "timeout=999"),
    *[(name, "evil") for name in RANDOM_RESPONSE_NAMES],
]

# Runs in the serving container: answers every request with the headers above and, as its
# body, what it received (the serving secret's value left out: it is not this test's to show).
# /version answers chunked, so that nginx's own framing of the body is seen too.
STAND_IN = r"""
import json, os, socketserver, sys
SOCKET, PID_FILE, HEADERS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        request_line = self.rfile.readline(65536).decode("latin-1").strip()
        received, length = [], 0
        while True:
            line = self.rfile.readline(65536).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            value = value.strip()
            if name.strip().lower() == "content-length":
                length = int(value)
            if name.strip().lower() == "x-serving-secret":
                value = value if value.startswith("forged-") else "present" if value else ""
            received.append([name.strip(), value])
        self.rfile.read(length)
        body = json.dumps({"request_line": request_line, "headers": received}).encode()
        head = ["HTTP/1.1 200 OK", "Connection: close"]
        head += [f"{name}: {value}" for name, value in HEADERS]
        if request_line.split(" ")[1:2] == ["/version"]:
            head.append("Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:
            head.append(f"Content-Length: {len(body)}")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

try:
    os.unlink(SOCKET)
except FileNotFoundError:
    pass
server = socketserver.ThreadingUnixStreamServer(SOCKET, Handler)
os.chmod(SOCKET, 0o666)
with open(PID_FILE, "w") as pid_file:
    pid_file.write(str(os.getpid()))
server.serve_forever()
"""

STOP_STAND_IN = r"""
import os, signal, sys
SOCKET, PID_FILE = sys.argv[1], sys.argv[2]
try:
    os.kill(int(open(PID_FILE).read()), signal.SIGKILL)
except (FileNotFoundError, ProcessLookupError, ValueError):
    pass
for path in (SOCKET, PID_FILE):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
"""

# What the client may see: the scorer's Content-Length, nginx's framing and its own headers.
ALLOWED_RESPONSE = {
    "date", "server", "connection", "keep-alive", "content-length", "transfer-encoding",
    "content-type", "x-content-type-options", "content-security-policy", "cache-control",
    "x-frame-options", "referrer-policy",
}  # fmt: skip
NGINX_OWN = {
    "date", "content-type", "x-content-type-options", "content-security-policy",
    "cache-control", "x-frame-options", "referrer-policy",
}  # fmt: skip
# What the scorer may receive: only what serving-proxy.conf sets.
ALLOWED_REQUEST = {
    "host", "content-type", "content-length", "connection", "x-forwarded-for", "x-serving-secret",
}  # fmt: skip

FORGED = "forged-" + MARKER
CLIENT_HEADERS = {
    "Cookie": f"session={MARKER}; other={MARKER}",
    "Proxy-Authorization": f"Basic {MARKER}",
    "X-Stack-User": f"admin-{MARKER}",
    "X-Stack-Role": "admin",
    "X-Stack-Proxy-Secret": FORGED,
    "X-Serving-Secret": FORGED,
    "Forwarded": f"for=6.6.6.6;by={MARKER}",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": f"{MARKER}.test",
    "X-Real-IP": "6.6.6.6",
    "User-Agent": f"agent-{MARKER}",
    "Referer": f"https://{MARKER}.test/",
    "Origin": f"https://{MARKER}.test",
    RANDOM_REQUEST_NAME: MARKER,
}


@pytest.fixture(scope="module")
def hana(stack):
    stack.add_user("hdrs-hana", "hana-password-7", "editor")
    return ("hdrs-hana", "hana-password-7")


def _call(stack, auth, method: str, call: str, headers=None):
    """The answer's status, its headers as sent (repeated ones kept), its body undecoded (a
    Content-Encoding that got through must fail an assertion, not the decoding)."""
    answer = requests.request(
        method,
        stack.url + f"{BASE}/{call}",
        auth=auth,
        headers=headers,
        json={"inputs": [[1, 2, 3, 4]]} if method == "post" else None,
        stream=True,
        timeout=10,
    )
    with answer:
        return answer.status_code, answer.raw.headers, answer.raw.read(decode_content=False)


def _ghost_status(stack, auth) -> int:
    return _call(stack, auth, "get", "ping")[0]


@pytest.fixture(scope="module")
def stand_in(stack, hana):
    """The serve profile up (started here if no test has yet) and the hostile stand-in on
    ghost's socket; afterwards, the stand-in gone and ghost answering 503 again."""
    stack.compose("--profile", "serve", "up", "-d", "--no-build", "serving")
    deadline = time.monotonic() + 60
    while not _serving_running(stack):
        assert time.monotonic() < deadline, "the serving container does not run"
        time.sleep(1)
    headers = json.dumps(HOSTILE_RESPONSE_HEADERS)
    try:
        stack.compose("exec", "-d", "serving", "python", "-c", STAND_IN, SOCKET, PID_FILE, headers)
        deadline = time.monotonic() + 20
        while _ghost_status(stack, hana) != 200:
            assert time.monotonic() < deadline, "the stand-in does not answer through nginx"
            time.sleep(0.3)
        yield
    finally:
        stack.compose("exec", "-T", "serving", "python", "-c", STOP_STAND_IN, SOCKET, PID_FILE)
    deadline = time.monotonic() + 10
    while (status := _ghost_status(stack, hana)) != 503:
        assert time.monotonic() < deadline, f"ghost still answers {status} without a scorer"
        time.sleep(0.3)


def _serving_running(stack) -> bool:
    command = ["exec", "-T", "serving", "python", "-c", "print('up')"]
    return stack.compose(*command, check=False).strip() == "up"


CALLS = [
    ("post", "invocations", "application/json"),
    ("get", "ping", "application/json"),
    ("get", "version", "text/plain; charset=utf-8"),
]


@pytest.mark.parametrize("method, call, content_type", CALLS, ids=[c[1] for c in CALLS])
def test_client_sees_only_content_length_of_scorer_and_nginx_own_headers(
    stack, hana, stand_in, method, call, content_type
):
    status, raw_headers, body = _call(stack, hana, method, call, CLIENT_HEADERS)
    names = {name.lower() for name in raw_headers}
    assert status == 200
    assert names <= ALLOWED_RESPONSE, f"from the scorer: {sorted(names - ALLOWED_RESPONSE)}"
    assert names >= NGINX_OWN, f"nginx's own missing: {sorted(NGINX_OWN - names)}"
    assert ("content-length" in names) != ("transfer-encoding" in names)
    for name in ALLOWED_RESPONSE:
        assert len(raw_headers.getlist(name)) <= 1, f"{name}: {raw_headers.getlist(name)}"
    assert raw_headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert raw_headers["Content-Type"] == content_type
    assert raw_headers.get("Server") in (None, "nginx")  # nginx's own, if it sends one
    assert raw_headers["Cache-Control"] == "no-store"
    assert raw_headers["X-Frame-Options"] == "DENY"
    assert raw_headers["Referrer-Policy"] == "same-origin"
    assert "sandbox" in raw_headers["Content-Security-Policy"]
    assert "2015" not in raw_headers["Date"]
    if call == "version":
        # The scorer answered chunked: nginx frames the body itself.
        assert raw_headers["Transfer-Encoding"] == "chunked"
    else:
        assert raw_headers["Content-Length"] == str(len(body))
    # The stand-in's own answer (X-Accel-Redirect did not act), unchanged.
    seen = json.loads(body)
    assert seen["request_line"] == f"{method.upper()} /{call} HTTP/1.1"


@pytest.mark.parametrize("method, call, content_type", CALLS, ids=[c[1] for c in CALLS])
def test_scorer_receives_none_of_client_headers(stack, hana, stand_in, method, call, content_type):
    status, _headers, body = _call(stack, hana, method, call, CLIENT_HEADERS)
    assert status == 200
    received = json.loads(body)["headers"]
    names = [name.lower() for name, _value in received]
    extra = set(names) - ALLOWED_REQUEST
    assert not extra, f"reached the model: {sorted(extra)}"
    assert len(names) == len(set(names)), f"sent twice: {names}"
    assert set(names) >= {"host", "x-forwarded-for", "x-serving-secret"}
    values = dict((name.lower(), value) for name, value in received)
    assert values["host"] == "serving"
    assert values["x-forwarded-for"] != "6.6.6.6" and "," not in values["x-forwarded-for"]
    assert values["x-serving-secret"] == "present"  # nginx's own, not the forged one
    if method == "post":
        assert values["content-type"] == "application/json"
        assert int(values["content-length"]) == len(b'{"inputs": [[1, 2, 3, 4]]}')
    # Nothing of what the client sent (cookies, credentials, its address claims) arrived.
    assert MARKER not in json.dumps(received)
    assert "6.6.6.6" not in json.dumps(received)
    credentials = base64.b64encode(f"{hana[0]}:{hana[1]}".encode()).decode()
    assert credentials not in json.dumps(received) and hana[1] not in json.dumps(received)
