"""The UI in a real browser (Debian's Chromium driven by Playwright): it shows who is logged
in, loads without refused calls, tells a viewer why a write was refused, and a wrong host
name gets a readable page. Screenshots go to test-output/ for a human to look at."""

import shutil

import pytest
from conftest import PORT, ROOT

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
    # A name that is not in the test stack's PUBLIC_HOSTNAME, resolved to the stack.
    "--host-resolver-rules=MAP wrong-name.test 127.0.0.1",
]
SCREENSHOTS = ROOT / "test-output"


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


def open_page(browser, stack, credentials, path="/"):
    """A logged-in page; every answer >= 400 and every console error is recorded."""
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
    page.on(
        "console",
        lambda m: page.problems.append(f"console: {m.text}") if m.type == "error" else None,
    )
    page.goto(stack.url + path)
    return page


def screenshot(page, name):
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


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
    assert page.problems == []
    page.context.close()


def test_ui_viewer_write_refusal_says_why(browser, stack, viewer):
    page = open_page(browser, stack, viewer, "/#/experiments")
    page.get_by_role("button", name="Create").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_placeholder("Input an experiment name").fill("viewer-may-not")
    dialog.get_by_role("button", name="Create").click()
    dialog.get_by_text("has the role 'viewer'").wait_for(timeout=15_000)
    screenshot(page, "ui-viewer-refused")
    assert "needs the role 'editor'" in dialog.inner_text()
    page.context.close()


def test_browser_wrong_host_name_gets_readable_page(browser, stack):
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(f"http://wrong-name.test:{PORT}/")
    assert response.status == 421
    page.get_by_text("Wrong address for this MLflow").wait_for(timeout=10_000)
    screenshot(page, "ui-wrong-host")
    assert f"127.0.0.1:{PORT}" in page.inner_text("body")
    context.close()
