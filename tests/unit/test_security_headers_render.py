"""Every answer of the site carries the security headers (nginx/snippets/security-headers.conf).

nginx's add_header (like proxy_hide_header) is inherited only by a block that has none of its
own, so a location that adds one header silently drops all the others. This reads the site
template with its snippets included, as nginx would, and checks each location's effective
headers. tests/stack/test_response_headers.py checks the answers of the running stack.
"""

import re
from pathlib import Path

import pytest

NGINX = Path(__file__).resolve().parents[2] / "nginx"
TEMPLATE = NGINX / "templates" / "mlflow.conf.template"
REQUIRED = (
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    # Its value is empty, so not sent, on plain HTTP (the template's $hsts map).
    "strict-transport-security",
)
# With TLS on, plain HTTP is this server (the entrypoint copies it into conf.d).
REDIRECT_SERVER = NGINX / "tls" / "http-redirect.conf"
# MLflow's copies of what nginx sets itself: hidden wherever nginx proxies to MLflow.
MLFLOW_SENDS = ("x-content-type-options", "x-frame-options")

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{};]|[^\s{};"\']+')


def _tokens(text: str) -> list[str]:
    lines = [re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines()]
    return _TOKEN.findall("\n".join(lines))


class Block:
    def __init__(self, name: list[str]):
        self.name = name
        self.directives: list[list[str]] = []
        self.children: list[Block] = []

    def own(self, directive: str) -> list[list[str]]:
        return [d[1:] for d in self.directives if d[0] == directive]


def _parse(tokens: list[str], block: Block, position: int = 0) -> int:
    statement: list[str] = []
    while position < len(tokens):
        token = tokens[position]
        position += 1
        if token == ";":
            if statement[0] == "include" and statement[1].startswith("/etc/nginx/snippets/"):
                snippet = NGINX / "snippets" / Path(statement[1]).name
                _parse(_tokens(snippet.read_text()), block)
            else:
                block.directives.append(statement)
            statement = []
        elif token == "{":
            child = Block(statement)
            block.children.append(child)
            position = _parse(tokens, child, position)
            statement = []
        elif token == "}":
            return position
        else:
            statement.append(token.strip("\"'") if token[0] in "\"'" else token)
    return position


def _site() -> Block:
    root = Block(["template"])
    # The entrypoint's envsubst settings: any value will do here.
    text = re.sub(r"\$\{[A-Z_]+\}", "1", TEMPLATE.read_text())
    _parse(_tokens(text), root)
    # The site's server: its listener (8080, or 8443 with TLS) is rendered by the entrypoint.
    listener = ["include", "/etc/nginx/conf.d/site/listen.conf"]
    (server,) = [b for b in root.children if b.name == ["server"] and listener in b.directives]
    return server


def _redirect_server() -> Block:
    root = Block(["file"])
    _parse(_tokens(REDIRECT_SERVER.read_text()), root)
    (server,) = [b for b in root.children if b.name == ["server"]]
    return server


def _locations(block: Block, inherited_headers, inherited_hidden):
    """(location name, effective add_header list, effective proxy_hide_header set, block)."""
    for child in block.children:
        if child.name[0] != "location":
            continue
        headers = child.own("add_header") or inherited_headers
        hidden = {h[0].lower() for h in child.own("proxy_hide_header")} or inherited_hidden
        yield " ".join(child.name[1:]), headers, hidden, child
        yield from _locations(child, headers, hidden)


def _all_locations(server: Block | None = None):
    server = server or _site()
    headers = server.own("add_header")
    hidden = {h[0].lower() for h in server.own("proxy_hide_header")}
    return server, list(_locations(server, headers, hidden))


def _id(value) -> str:
    return value if isinstance(value, str) else ""


@pytest.mark.parametrize("server", [_site(), _redirect_server()], ids=["site", "http-redirect"])
def test_site_server_level_sends_required_headers_always(server):
    names = {h[0].lower(): h for h in server.own("add_header")}
    for name in REQUIRED:
        assert name in names and names[name][-1] == "always", name


@pytest.mark.parametrize(
    "name, headers, hidden, block",
    _all_locations()[1] + _all_locations(_redirect_server())[1],
    ids=_id,
)
def test_location_effective_headers_include_required_always(name, headers, hidden, block):
    effective = {}
    for header in headers:
        key = header[0].lower()
        assert key not in effective, f"{name}: {header[0]} added twice"
        assert header[-1] == "always", f"{name}: {header[0]} without always"
        effective[key] = header[1]
    for required in REQUIRED:
        assert required in effective, f"{name}: no {required}"
    assert "frame-ancestors" in effective.get("content-security-policy", ""), name
    assert effective["x-content-type-options"] == "nosniff"
    assert effective["x-frame-options"] in {"SAMEORIGIN", "DENY"}


def _mlflow_locations():
    return [
        entry
        for entry in _all_locations()[1]
        if any(p[0].startswith("http://mlflow_server") for p in entry[3].own("proxy_pass"))
    ]


def test_mlflow_locations_found_all_four():
    assert len(_mlflow_locations()) == 4  # /healthz, /, and the two artifact upload paths


@pytest.mark.parametrize("name, headers, hidden, block", _mlflow_locations(), ids=_id)
def test_location_proxying_to_mlflow_hides_mlflow_copies(name, headers, hidden, block):
    for header in MLFLOW_SENDS:
        assert header in hidden, f"{name}: MLflow's {header} would be sent twice"


def test_site_no_location_passes_upstream_server_header():
    _, locations = _all_locations()
    for name, _headers, _hidden, block in locations:
        passed = {p[0].lower() for p in block.own("proxy_pass_header")}
        assert "server" not in passed, name


def test_artifact_files_location_sends_security_headers():
    _, locations = _all_locations()
    (artifact,) = [entry for entry in locations if entry[0] == "/_artifact_files/"]
    assert {h[0].lower() for h in artifact[1]} >= set(REQUIRED)
