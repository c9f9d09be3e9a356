"""The UI in a real browser (Debian's Chromium driven by Playwright): it shows who is logged
in, loads without refused calls, walks an editor through a run of the example project (runs,
metric chart, artifact image, registry), lets an editor create an experiment with
PUBLIC_HOSTNAME set and empty, tells a viewer why a write was refused, and a wrong host name
gets a readable page. Screenshots go to test-output/ for a human to look at, one per step.

Every page records each answer >= 400 and each console error (``page.problems``); a test
ends with none left but those it names as expected."""

import os
import shutil
import struct
import uuid
import warnings
from types import SimpleNamespace

import pytest
import requests
from conftest import PORT, ROOT
from walkthrough import client_as, run_project, tracking_env, unique_model_name, version_of_run

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")

# Known-good flags on these machines (no sandbox inside a container, nothing fetched at start).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Names that are not in the test stack's PUBLIC_HOSTNAME, resolved to the stack.
    "--host-resolver-rules=MAP *.test 127.0.0.1",
]
SCREENSHOTS = ROOT / "test-output"
# The UI keeps polling (no network idle) and the machine may be busy: wait for what a step
# shows, generously.
UI_WAIT = 60_000
# Chromium fails the requests in flight whenever this host's interfaces change, which Docker
# does each time a container of any project on the engine starts or stops: not an answer from
# the stack, so kept apart (and warned about). A step whose data it cut off still fails on
# what the step must show.
NETWORK_CHANGED = "net::ERR_NETWORK_CHANGED"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def viewer(stack):
    stack.add_user("ui-vera", "vera-password-3", "viewer")
    return ("ui-vera", "vera-password-3")


@pytest.fixture(scope="module")
def editor(stack):
    stack.add_user("ui-edda", "edda-password-5", "editor")
    return ("ui-edda", "edda-password-5")


@pytest.fixture(scope="module")
def project_run(stack, editor):
    """The example project run once by the editor, in an experiment of its own."""
    env = tracking_env(stack.url, *editor)
    experiment, model = f"ui-walk-{uuid.uuid4().hex[:8]}", unique_model_name("ui-iris")
    run_id = run_project(env, 2, model, experiment)
    with client_as(env) as client:
        run = client.get_run(run_id)
        version = version_of_run(client, model, run_id)
    return SimpleNamespace(
        experiment=experiment,
        run_id=run_id,
        run_name=run.info.run_name,
        accuracy=run.data.metrics["accuracy"],
        model=model,
        version=version,
    )


def open_page(browser, stack, credentials, path="/", base=None):
    """A logged-in page; every answer >= 400 and every console error is recorded (a console
    error with the address it is about: Chromium logs each failed load as one)."""
    name, password = credentials
    context = browser.new_context(
        http_credentials={"username": name, "password": password},
        viewport={"width": 1400, "height": 900},
    )
    page = context.new_page()
    page.problems = []
    page.on(
        "response",
        lambda r: page.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    page.network_changes = []

    def console(message):
        if message.type == "error":
            entry = f"console: {message.text} ({message.location.get('url')})"
            dropped = NETWORK_CHANGED in message.text
            (page.network_changes if dropped else page.problems).append(entry)

    page.on("console", console)
    page.goto((base or stack.url) + path)
    return page


def screenshot(page, name):
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def unexpected(page, expected=frozenset()):
    """The page's recorded problems that are not in ``expected``."""
    if page.network_changes:
        warnings.warn(f"dropped on a network change here: {page.network_changes}", stacklevel=2)
    return [problem for problem in page.problems if problem not in expected]


def failed_load(status: int, url: str) -> set[str]:
    """How one expected refusal shows in ``page.problems``: the answer and Chromium's console
    line about it."""
    reason = {403: "Forbidden", 404: "Not Found"}[status]
    console = f"the server responded with a status of {status} ({reason})"
    return {f"{status} {url}", f"console: Failed to load resource: {console} ({url})"}


def name_check(base: str, name: str) -> set[str]:
    """MLflow's create dialog asks whether the typed name is taken (GET get-by-name): a free
    name gets MLflow's own 404 RESOURCE_DOES_NOT_EXIST. Expected; nothing else is."""
    return failed_load(
        404, f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
    )


def create_experiment_in_ui(page, name, shot):
    """Fill the experiment list's Create dialog and submit it; the dialog and the answer to
    the create call. ``shot``: the screenshot's name for the filled dialog."""
    page.get_by_role("button", name="Create").first.click(timeout=UI_WAIT)
    dialog = page.get_by_role("dialog")
    dialog.get_by_placeholder("Input an experiment name").fill(name)
    screenshot(page, shot)
    with page.expect_response(lambda r: r.url.endswith("/mlflow/experiments/create")) as answer:
        dialog.get_by_role("button", name="Create").click()
    return dialog, answer.value


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    return struct.unpack(">II", data[16:24])


def test_ui_shows_logged_in_user_and_loads_without_refusals(browser, stack, viewer):
    page = open_page(browser, stack, viewer)
    # The account control at the bottom of the sidebar names the verified user.
    page.get_by_text("ui-vera", exact=True).wait_for(timeout=30_000)
    page.get_by_text("Recent Experiments").wait_for(timeout=30_000)
    page.wait_for_timeout(2000)  # the page's later calls (assistant, telemetry)
    screenshot(page, "ui-logged-in-viewer")
    page.get_by_text("ui-vera", exact=True).click()
    page.get_by_text("Account", exact=True).click()
    page.get_by_text("Logged in as").wait_for(timeout=15_000)
    page.get_by_role("cell", name="viewer").wait_for(timeout=15_000)
    screenshot(page, "ui-account-viewer")
    assert unexpected(page) == []
    page.context.close()


def test_ui_walkthrough_of_a_project_run(browser, stack, editor, project_run):
    """An editor follows the example project's run through the UI, a screenshot per step."""
    run = project_run
    page = open_page(browser, stack, editor, "/#/experiments")
    experiment_link = page.get_by_role("link", name=run.experiment, exact=True)
    experiment_link.wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-1-experiment-list")

    # The sidebar's switch from MLflow's GenAI views to the model-training ones.
    page.get_by_text("Model training", exact=True).click()
    experiment_link.click()
    run_link = page.get_by_role("link", name=run.run_name, exact=True)
    run_link.wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-2-experiment-runs")

    run_link.click()
    page.get_by_text(run.run_id, exact=True).wait_for(timeout=UI_WAIT)
    page.get_by_text("Created by").wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-3-run")

    page.get_by_role("tab", name="Model metrics").click()
    chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.get_by_role("heading", name="accuracy", exact=True)
    )
    bar_label = chart.locator("text.bartext")  # the value plotly writes on the run's bar
    bar_label.wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-4-accuracy-chart")
    assert float(bar_label.text_content()) == pytest.approx(run.accuracy, abs=0.005)

    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("confusion_matrix.png", exact=True).first.click(timeout=UI_WAIT)
    image = page.get_by_role("img", name="confusion_matrix.png", exact=True)
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0",
        arg=image.element_handle(timeout=UI_WAIT),
        timeout=UI_WAIT,
    )
    screenshot(page, "ui-walk-5-artifact-image")
    artifact = requests.get(
        stack.url + "/get-artifact",
        params={"path": "confusion_matrix.png", "run_uuid": run.run_id},
        auth=editor,
    )
    assert artifact.status_code == 200
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(natural) == png_size(artifact.content)  # the whole PNG, decoded

    page.get_by_role("link", name="Model registry").click()
    # MLflow introduces its new registry UI once per browser, over the list.
    page.get_by_role("button", name="Try it now").click(timeout=UI_WAIT)
    model_link = page.get_by_role("link", name=run.model, exact=True)
    model_link.wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-6-model-registry")

    model_link.click()
    version_link = page.get_by_role("link", name=f"Version {run.version}", exact=True)
    version_link.wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-7-registered-model")

    version_link.click()
    page.get_by_text("Source Run").wait_for(timeout=UI_WAIT)
    page.get_by_role("link", name=run.run_name, exact=True).wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-walk-8-model-version")
    assert page.url.endswith(f"#/models/{run.model}/versions/{run.version}")
    assert unexpected(page) == []
    page.context.close()


def editor_creates_experiment(browser, stack, editor, base, shot):
    """The editor creates an experiment in the UI at ``base``; it exists afterwards."""
    name = f"ui-made-{uuid.uuid4().hex[:8]}"
    page = open_page(browser, stack, editor, "/#/experiments", base=base)
    _, response = create_experiment_in_ui(page, name, f"{shot}-dialog")
    assert response.status == 200, response.text()
    # A write from the page: MLflow's CORS and the server guard's Origin checks saw this.
    assert response.request.headers.get("origin") == base
    experiment_id = response.json()["experiment_id"]
    # Its own page (MLflow opens the GenAI overview of a new experiment), loaded: no traces.
    page.get_by_text(name, exact=True).first.wait_for(timeout=UI_WAIT)
    page.get_by_text("No data available for the selected time range").first.wait_for(
        timeout=UI_WAIT
    )
    screenshot(page, f"{shot}-created")
    assert f"#/experiments/{experiment_id}/" in page.url
    found = requests.get(
        stack.url + "/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": name},
        auth=editor,
    )
    assert found.status_code == 200, found.text
    assert found.json()["experiment"]["experiment_id"] == experiment_id
    assert unexpected(page, name_check(base, name)) == []
    page.context.close()


def test_ui_editor_creates_experiment(browser, stack, editor):
    """With the test stack's PUBLIC_HOSTNAME (127.0.0.1:PORT,localhost)."""
    editor_creates_experiment(browser, stack, editor, stack.url, "ui-create-listed-host")


def test_ui_viewer_write_refusal_says_why(browser, stack, viewer):
    name = f"viewer-may-not-{uuid.uuid4().hex[:8]}"
    page = open_page(browser, stack, viewer, "/#/experiments")
    dialog, response = create_experiment_in_ui(page, name, "ui-viewer-create-dialog")
    assert response.status == 403
    dialog.get_by_text("has the role 'viewer'").wait_for(timeout=UI_WAIT)
    screenshot(page, "ui-viewer-refused")
    assert "needs the role 'editor'" in dialog.inner_text()
    refused = failed_load(403, f"{stack.url}/ajax-api/2.0/mlflow/experiments/create")
    assert unexpected(page, refused | name_check(stack.url, name)) == []
    page.context.close()
    found = requests.get(
        stack.url + "/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": name},
        auth=viewer,
    )
    assert found.status_code == 404


def test_browser_wrong_host_name_gets_readable_page(browser, stack):
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(f"http://wrong-name.test:{PORT}/")
    assert response.status == 421
    page.get_by_text("Wrong address for this MLflow").wait_for(timeout=10_000)
    screenshot(page, "ui-wrong-host")
    assert f"127.0.0.1:{PORT}" in page.inner_text("body")
    context.close()


def host_refused(stack, host: str) -> bool:
    """Whether nginx answers a request naming ``host`` with 421 (before any login)."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    return stack.raw(request.encode()) == 421


@pytest.fixture
def public_hostname(stack):
    """A function that recreates nginx and the server of the running test stack with another
    PUBLIC_HOSTNAME; after the test, they are recreated with the session's setting."""
    recreate = ("up", "-d", "--wait", "--no-build", "nginx", "server")
    saved = os.environ["PUBLIC_HOSTNAME"]  # compose reads the process environment

    def apply(value: str) -> None:
        os.environ["PUBLIC_HOSTNAME"] = value
        stack.compose(*recreate)
        for service in ("nginx", "server"):
            seen = stack.compose("exec", "-T", service, "printenv", "PUBLIC_HOSTNAME")
            assert seen.strip() == value, (service, seen)

    try:
        yield apply
    finally:
        if os.environ["PUBLIC_HOSTNAME"] != saved:
            apply(saved)
    assert host_refused(stack, f"wrong-name.test:{PORT}"), "the session's setting is back"


def test_ui_editor_creates_experiment_with_any_host_name(browser, stack, editor, public_hostname):
    """With PUBLIC_HOSTNAME empty (as on a fresh clone): from the usual address and from a
    name no list holds."""
    public_hostname("")
    assert not host_refused(stack, f"wrong-name.test:{PORT}")
    editor_creates_experiment(browser, stack, editor, stack.url, "ui-create-any-host")
    other = f"http://wrong-name.test:{PORT}"
    editor_creates_experiment(browser, stack, editor, other, "ui-create-any-host-other-name")


# MLflow exempts loopback origins (localhost, 127.0.0.1) from its origin check, so the test
# stack's own names never meet it: a write from a page at a real name does.
def test_ui_editor_creates_experiment_at_a_name_listed_with_its_port(
    browser, stack, editor, public_hostname
):
    public_hostname(f"127.0.0.1:{PORT},localhost,named.test:{PORT}")
    base = f"http://named.test:{PORT}"
    editor_creates_experiment(browser, stack, editor, base, "ui-create-name-with-port")


def test_ui_editor_creates_experiment_at_a_name_listed_without_port(
    browser, stack, editor, public_hostname
):
    """README: an entry without a port allows that host on any port."""
    public_hostname(f"127.0.0.1:{PORT},localhost,named.test")
    base = f"http://named.test:{PORT}"
    editor_creates_experiment(browser, stack, editor, base, "ui-create-name-without-port")
