"""PUBLIC_PATH and TRUSTED_PROXIES on a live stack (README, "Hosting under a sub-path" and
"Behind another proxy").

A second stack runs with PUBLIC_PATH=/mlflow and TRUSTED_PROXIES covering the private ranges,
where Docker's bridge address (what nginx sees for requests from this host through the
published port) lies: the real MLflow client and a browser work under the prefix, roles hold
there as at the root, paths outside it get nginx's 404 without reaching the gate or MLflow,
and the access log and the login throttling see the address a trusted proxy names. The
session's stack (TRUSTED_PROXIES empty) shows that the same header changes nothing by default.
"""

import base64
import concurrent.futures
import json
import shutil
import socket
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import SecondStack
from mlflow import MlflowClient
from walkthrough import tracking_env, train_two_and_promote

PREFIX = "/mlflow"
PRIVATE = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
CLIENT = "203.0.113.7"  # TEST-NET-3: nobody's real address


@pytest.fixture(scope="module")
def prefixed(stack):
    """The second stack, with its admin's credentials and a viewer's and an editor's token."""
    env = {"PUBLIC_PATH": PREFIX, "TRUSTED_PROXIES": PRIVATE}
    with SecondStack("subpath", env=env) as second:
        second.admin_auth = second.admin()
        second.tokens = {}
        for role in ("viewer", "editor"):
            added = second.compose(
                "run", "--rm", "-T", "stackctl", "token", "add", role, "--role", role
            )
            second.tokens[role] = next(w for w in added.split() if w.startswith("mlst_"))
        yield second


def _bearer(prefixed, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {prefixed.tokens[role]}"}


def _raw_status(port: int, target: str, headers: str = "") -> int:
    """The status of a GET of ``target`` sent exactly as written (no client normalization)."""
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request.encode("latin-1"))
        line = sock.makefile("rb").readline(200).split()
    return int(line[1]) if len(line) > 1 else 0


def _access_log(compose_logs: str) -> list[dict]:
    """nginx's JSON access lines from ``docker compose logs nginx`` (error lines skipped)."""
    entries = []
    for line in compose_logs.splitlines():
        text = line.split("| ", 1)[-1]
        if text.startswith("{"):
            entries.append(json.loads(text))
    return entries


def test_mlflow_client_under_prefix_logs_run_artifact_and_registered_model(
    prefixed, monkeypatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", prefixed.url + PREFIX)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", prefixed.admin_auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", prefixed.admin_auth[1])
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    client = MlflowClient()
    experiment_id = mlflow.create_experiment("under-prefix")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("loss", 0.25)
        mlflow.log_text("hello under a prefix", "notes/hello.txt")
    version = client.create_model_version(
        client.create_registered_model("prefixed-model").name,
        source=f"{run.info.artifact_uri}/notes",
        run_id=run.info.run_id,
    )
    assert version.version == "1"
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.25}
    # Downloaded through the prefix: nginx's X-Accel hand-off sends the file.
    local = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
    assert Path(local).read_text() == "hello under a prefix"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
    logged = _access_log(prefixed.compose("logs", "--no-color", "nginx"))
    # The gate judged (and the log shows) the path MLflow routes: the prefix stripped.
    paths = {e["path"] for e in logged if e["user"] == "admin"}
    assert "/api/2.0/mlflow/runs/log-metric" in paths
    assert not any(path.startswith(PREFIX + "/") for path in paths)


@pytest.mark.parametrize(
    ("role", "method", "path", "expected"),
    [
        ("viewer", "GET", SEARCH, 200),
        ("viewer", "POST", "/api/2.0/mlflow/experiments/create", 403),
        ("viewer", "POST", "/ajax-api/2.0/mlflow/experiments/create", 403),
        ("viewer", "PUT", "/api/2.0/mlflow-artifacts/artifacts/1/x/y.txt", 403),
        ("editor", "GET", "/api/2.0/mlflow/webhooks", 403),
        ("admin", "GET", "/api/2.0/mlflow/webhooks", 200),
    ],
)
def test_roles_under_prefix_as_strict_as_at_root(prefixed, role, method, path, expected):
    if role == "admin":
        kwargs = {"auth": prefixed.admin_auth}
    else:
        kwargs = {"headers": _bearer(prefixed, role)}
    body = {"name": f"role-{uuid.uuid4().hex[:8]}"} if method == "POST" else None
    response = requests.request(method, prefixed.url + PREFIX + path, json=body, **kwargs)
    assert response.status_code == expected, response.text
    # Without the prefix the same call is not MLflow's at all.
    outside = requests.request(method, prefixed.url + path, json=body, **kwargs)
    assert outside.status_code == 404


# Sent as written: what a client may try to step out of, or around, the prefix.
OUTSIDE = [
    "/api/2.0/mlflow/experiments/search",
    "/mlflow/../api/2.0/mlflow/experiments/search",
    "/mlflow/%2E%2E/api/2.0/mlflow/experiments/search",
    "/mlflow%2F../api/2.0/mlflow/experiments/search",
    "/MLFLOW/api/2.0/mlflow/experiments/search",
    "/Mlflow/api/2.0/mlflow/experiments/search",
    "/mlflowx/api/2.0/mlflow/experiments/search",
    "/mlflow.api/2.0/mlflow/experiments/search",
    "/ajax-api/2.0/mlflow/experiments/search",
    "/api/2.0/mlflow-artifacts/artifacts/1/x.txt",
    "/v1/traces",
    "/invocations",
    "/serving/any/invocations",
    "/static-files/favicon.ico",
    "/",
]


@pytest.mark.parametrize("target", OUTSIDE)
def test_path_outside_prefix_404_without_gate_or_mlflow(prefixed, target):
    basic = base64.b64encode(":".join(prefixed.admin_auth).encode()).decode()
    for headers in ("", f"Authorization: Basic {basic}\r\n"):
        assert _raw_status(prefixed.port, target, headers) == 404, (target, headers)
    server = prefixed.compose("logs", "--no-color", "server")
    assert "refused: no verified user" not in server and "not from the proxy" not in server


@pytest.mark.parametrize(
    "target",
    ["//mlflow/api/2.0/mlflow/experiments/search", "/mlflow//api/2.0/mlflow/experiments/search"],
)
def test_merged_slashes_inside_prefix_need_a_login(prefixed, target):
    """nginx merges slashes before it matches: inside the prefix, so the gate decides."""
    assert _raw_status(prefixed.port, target) == 401
    token = f"Authorization: Bearer {prefixed.tokens['viewer']}\r\n"
    assert _raw_status(prefixed.port, target + "?max_results=1", token) == 200


def test_prefix_without_slash_redirects_relative(prefixed):
    response = requests.get(prefixed.url + PREFIX, allow_redirects=False)
    assert response.status_code == 301
    assert response.headers["Location"] == PREFIX + "/"


def test_outside_prefix_answers_carry_security_headers(prefixed):
    for path in ("/", PREFIX):
        response = requests.get(prefixed.url + path, allow_redirects=False)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["X-Frame-Options"] == "SAMEORIGIN", path


def test_healthz_stays_at_root(prefixed):
    assert requests.get(prefixed.url + "/healthz").status_code == 200


def test_ui_under_prefix_shows_experiment_list(prefixed):
    """The page, its scripts and its ajax-api calls all under /mlflow/ (MLflow's UI uses
    relative URLs), and no answer >= 400 but MLflow's own 404s."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("apt-get install chromium")
    name = f"ui-prefix-{uuid.uuid4().hex[:8]}"
    created = requests.post(
        prefixed.url + PREFIX + "/api/2.0/mlflow/experiments/create",
        json={"name": name},
        auth=prefixed.admin_auth,
    )
    assert created.status_code == 200, created.text
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        user, password = prefixed.admin_auth
        context = browser.new_context(http_credentials={"username": user, "password": password})
        page = context.new_page()
        answers = []
        page.on("response", lambda r: answers.append((r.status, r.url)))
        page.goto(prefixed.url + PREFIX + "/#/experiments")
        page.get_by_role("link", name=name, exact=True).wait_for(timeout=90_000)
        browser.close()
    outside = [url for _, url in answers if not url.startswith(prefixed.url + PREFIX + "/")]
    assert outside == []
    refused = [(s, u) for s, u in answers if s >= 400 and s != 404]
    assert refused == []
    assert any("/mlflow/ajax-api/2.0/mlflow/experiments/search" in u for _, u in answers)


def _probe(url: str, forwarded_for: str | None) -> str:
    """A request to a path of its own, so that its log line can be found."""
    path = f"{PREFIX}/probe-{uuid.uuid4().hex}"
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    requests.get(url + path, headers=headers)
    return path.removeprefix(PREFIX)


def _client_of(stack_logs: str, path: str) -> str:
    (entry,) = [e for e in _access_log(stack_logs) if e["path"] == path]
    return entry["client"]


def test_forwarded_for_from_trusted_proxy_is_the_client(prefixed):
    plain = _probe(prefixed.url, None)
    single = _probe(prefixed.url, CLIENT)
    # A client's own left-hand entries are not believed: the right-most untrusted one counts.
    spoofed = _probe(prefixed.url, f"198.51.100.1, {CLIENT}")
    # Trusted hops on the right (another proxy of ours) are skipped.
    through = _probe(prefixed.url, f"{CLIENT}, 10.1.2.3")
    logs = prefixed.compose("logs", "--no-color", "nginx")
    bridge = _client_of(logs, plain)
    assert bridge.startswith(("172.", "192.168.", "10.")), bridge
    assert _client_of(logs, single) == CLIENT
    assert _client_of(logs, spoofed) == CLIENT
    assert _client_of(logs, through) == CLIENT


def test_forwarded_for_without_trusted_proxies_changes_nothing(stack):
    since = stack.now()
    path = f"/probe-{uuid.uuid4().hex}"
    requests.get(stack.url + path, headers={"X-Forwarded-For": CLIENT})
    client = _client_of(stack.logs("nginx", since), path)
    assert client != CLIENT and client.startswith(("172.", "192.168.", "10.")), client


def test_login_throttling_keyed_on_forwarded_client(prefixed):
    """An address with a failed login gets one check at a time; its other attempts are
    throttled at once (429). Through a trusted proxy, that address is the forwarded one: the
    throttled lines name it, not the proxy's (whether a concurrent login from another
    forwarded address is let in depends on how long a check takes on a busy machine, so that
    is test_login_fairness.py's question, asked from two real addresses)."""
    wrong = ("admin", "not-the-password")
    url = prefixed.url + PREFIX + SEARCH

    def attempt() -> int:
        headers = {"X-Forwarded-For": CLIENT}
        return requests.get(url, auth=wrong, headers=headers).status_code

    assert attempt() == 401
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: attempt(), range(4)))
    assert 429 in statuses, statuses
    logged = _access_log(prefixed.compose("logs", "--no-color", "nginx"))
    throttled = [e["client"] for e in logged if e["verdict"] == "throttled"]
    assert throttled and set(throttled) == {CLIENT}, throttled


def test_serving_and_traces_under_prefix(prefixed):
    """The model-serving locations and MLflow's OTLP route answer under the prefix too."""
    viewer = _bearer(prefixed, "viewer")
    served = requests.post(prefixed.url + PREFIX + "/serving/ghost/invocations", headers=viewer)
    assert served.status_code == 404 and "SERVE_MODELS" in served.text, served.text
    assert requests.post(prefixed.url + PREFIX + "/invocations").status_code == 401
    traces = requests.post(
        prefixed.url + PREFIX + "/v1/traces",
        data=b"",
        headers={"Content-Type": "application/x-protobuf"},
        auth=prefixed.admin_auth,
    )
    # An empty export without an experiment header is refused by MLflow itself, not 404.
    assert traces.status_code not in (404, 405, 502), traces.status_code
    refused = requests.post(
        prefixed.url + PREFIX + "/v1/traces",
        data=b"",
        headers={"Content-Type": "application/x-protobuf", **viewer},
    )
    assert refused.status_code == 403


def test_served_model_fetched_and_answering_under_prefix(prefixed):
    """The serve profile under the prefix: the serving container fetches its model through
    nginx at http://nginx:8080/mlflow (compose.yaml) and answers predictions behind the login
    there. Last in this module: it restarts the stack with SERVE_MODELS set."""
    env = tracking_env(prefixed.url + PREFIX, *prefixed.admin_auth)
    name = f"iris-prefixed-{uuid.uuid4().hex[:6]}"
    train_two_and_promote(env, model_name=name)
    prefixed.env["SERVE_MODELS"] = f"{name}@production"
    prefixed.compose("--profile", "serve", "up", "-d", "--wait", "--no-build")
    rows = {"dataframe_split": {"columns": ["sepal length (cm)", "sepal width (cm)",
                                           "petal length (cm)", "petal width (cm)"],
                                "data": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}}  # fmt: skip
    url = f"{prefixed.url}{PREFIX}/serving/{name}/invocations"
    deadline = time.monotonic() + 240
    while True:
        answer = requests.post(url, json=rows, headers=_bearer(prefixed, "viewer"), timeout=30)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert answer.status_code == 200, (answer.status_code, answer.text[:300])
    assert len(answer.json()["predictions"]) == 2
    assert requests.post(url, json=rows, timeout=30).status_code == 401
    # At the root, outside the prefix, the same route is nginx's 404 before any login.
    assert requests.post(f"{prefixed.url}/serving/{name}/invocations", json=rows).status_code == 404
