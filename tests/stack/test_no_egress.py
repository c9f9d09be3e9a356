"""The stack without a route out (compose.yaml's backend network): the gate, the tracking
server and the served models reach nothing beyond the stack, the Docker host included, and no
route of the pinned MLflow waits on the internet for it (on such a box a remote fetch waits
~10 s for DNS, then fails).

Invariants, from outside: a server-side request to the internet fails at once or not at all;
the server reaches no address of the host, and the host does not reach the server; every
route of MLflow answers through nginx within 5 s.
"""

import json
import re
import socket
import subprocess
import threading
import time

import pytest
import requests
from conftest import PROJECT
from test_routes import _routes_in_server_image

ROUTE_SECONDS = 5.0
# A value no object has: routes answer "not found" or "invalid", never act on something real.
ABSENT = "999999999"
# Work, not waiting: the UI's "generate demo data" runs an evaluation over generated traces,
# about 25 s here with no network call at all (checked by watching getaddrinfo in the server).
LONG_BY_NATURE = {"/mlflow/demo/generate"}


def _networks_of(stack, service: str) -> dict[str, bool]:
    """The service container's networks, each with whether it is internal (no route out)."""
    container = stack.compose("ps", "-q", service).split()[0]
    names = subprocess.run(
        ["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", container],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    internal = {}
    for name in json.loads(names):
        flag = subprocess.run(
            ["docker", "network", "inspect", "-f", "{{.Internal}}", name],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        internal[name] = flag == "true"
    return internal


@pytest.mark.parametrize("service", ["server", "auth"])
def test_backend_services_only_on_internal_networks(stack, service):
    networks = _networks_of(stack, service)
    assert networks and all(networks.values()), networks


def test_nginx_alone_on_a_network_with_a_route_out(stack):
    networks = _networks_of(stack, "nginx")
    assert sorted(networks.values()) == [False, True], networks


def test_server_cannot_reach_the_internet(stack):
    probe = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
        "    print('reached')\n"
        "except OSError as error:\n"
        "    print('refused', type(error).__name__)\n"
    )
    answer = stack.compose("exec", "-T", "server", "python", "-c", probe)
    assert answer.strip().startswith("refused"), answer


# Tries each address on a port, from wherever it runs: {address: "reached" or the error}.
_REACH = """
import json, socket, sys
port, addresses = int(sys.argv[1]), sys.argv[2:]
seen = {}
for address in addresses:
    try:
        socket.create_connection((address, port), timeout=3).close()
        seen[address] = "reached"
    except OSError as error:
        seen[address] = type(error).__name__
print(json.dumps(seen))
"""


@pytest.fixture
def host_listener():
    """A TCP listener on every IPv4 address of this host (the Docker host, as the stack tests
    assume), as sshd or another project's published port would be: its port and the
    addresses of the peers it accepted."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            peers.append(peer[0])
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], peers
    stop.set()
    thread.join()
    server.close()


def _gateway(network: str) -> str:
    """The address the host has (or, for the backend network, would have) on a network."""
    template = "{{range .IPAM.Config}}{{.Gateway}} {{end}}"
    result = subprocess.run(
        ["docker", "network", "inspect", "-f", template, network],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return (result.stdout.split() or [""])[0]


def _host_addresses() -> dict[str, str]:
    """This host's addresses a container might try: its gateways on the stack's networks and on
    Docker's default bridge, and its main address (the source of its default route)."""
    addresses = {
        "backend gateway": _gateway(f"{PROJECT}_backend"),
        "edge gateway": _gateway(f"{PROJECT}_edge"),
        "docker0": _gateway("bridge"),
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: the route is looked up
            addresses["main address"] = probe.getsockname()[0]
        except OSError:
            pass  # no default route: nothing to try
    return {what: address for what, address in addresses.items() if address}


def test_server_cannot_reach_the_host(stack, host_listener):
    """compose.yaml's backend network gives the host no address (inhibit_ipv4): the server
    reaches none of the host's addresses on a port where the host listens on all of them."""
    port, peers = host_listener
    addresses = _host_addresses()
    assert {"backend gateway", "edge gateway"} <= addresses.keys(), addresses
    # The check can tell: the same probe from a container on the edge network reaches the host.
    control = subprocess.run(
        ["docker", "run", "--rm", "--network", f"{PROJECT}_edge", "--entrypoint", "python",
         stack.image("auth"), "-c", _REACH, str(port), addresses["edge gateway"]],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert json.loads(control) == {addresses["edge gateway"]: "reached"}, (
        f"no container reaches this host's listener on port {port} (a firewall here?): {control}"
    )
    peers.clear()
    answer = stack.compose(
        "exec", "-T", "server", "python", "-c", _REACH, str(port), *addresses.values()
    )
    reached = json.loads(answer)
    seen = {what: reached[address] for what, address in addresses.items()}
    assert "reached" not in seen.values(), seen
    assert peers == [], peers


def test_host_cannot_reach_the_server(stack):
    """Nor does the host reach the server: a request from here to the server's backend address
    never arrives (a request without the proxy secret would be logged as refused)."""
    marker = f"/from-the-host-{time.time_ns()}"
    since = stack.now()
    try:
        with socket.create_connection((stack.backend_ip("server"), 5000), timeout=3) as sock:
            sock.sendall(f"GET {marker} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.settimeout(3)
            sock.recv(100)
    except OSError:
        pass  # no route, or nothing answers: what matters is whether the server saw it
    time.sleep(1)
    assert marker not in stack.logs("server", since)
    # The same request from the backend network does arrive (the check can tell).
    assert stack.backend_request("server", 5000, marker).status_code == 403
    time.sleep(1)
    assert marker in stack.logs("server", since)


def _call(route: tuple[str, str], url: str, admin) -> tuple[str, str, float, int]:
    method, path = route
    concrete = re.sub(r"\{[^}]+\}|<[^>]+>", ABSENT, path)  # FastAPI's and Flask's parameters
    started = time.monotonic()
    try:
        answer = requests.request(
            method, url + concrete, auth=admin, timeout=ROUTE_SECONDS + 5,
            json=None if method in ("GET", "HEAD") else {},
        )  # fmt: skip
        status = answer.status_code
    except requests.RequestException:
        status = 0
    return method, concrete, time.monotonic() - started, status


def test_every_mlflow_route_answers_within_5_seconds(stack, admin):
    routes, _ = _routes_in_server_image(stack)
    assert len(routes) > 300
    routes = [r for r in routes if not any(r[1].endswith(path) for path in LONG_BY_NATURE)]
    # One at a time: concurrent writes would wait for SQLite's lock, not for the internet.
    results = [_call(route, stack.url, admin) for route in routes]
    slow = [r for r in results if r[2] > ROUTE_SECONDS or r[3] == 0]
    slowest = sorted(results, key=lambda r: -r[2])[:5]
    print(f"{len(results)} routes; slowest: {slowest}")
    assert slow == [], slow
