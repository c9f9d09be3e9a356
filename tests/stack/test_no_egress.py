"""The stack without a route out (compose.yaml's backend network): the gate, the tracking
server and the served models reach nothing beyond the stack, and no route of the pinned MLflow
waits on the internet for it (on such a box a remote fetch waits ~10 s for DNS, then fails).

Invariants, from outside: a server-side request to the internet fails at once or not at all;
every route of MLflow answers through nginx within 5 s.
"""

import json
import re
import subprocess
import time

import pytest
import requests
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
