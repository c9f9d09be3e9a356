"""Unit tests for mlflowstack.access: the per-request read/write/admin classification."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflowstack import access

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TWINS = ("/api/", "/ajax-api/")


def sample_path(template: str) -> str:
    """A concrete request path for a route template (either template syntax)."""
    return access._PARAM.sub(lambda m: "seg/ment" if "path" in (m[1], m[2]) else "x1", template)


def twin(path: str, prefix: str) -> str:
    return prefix + path.removeprefix("/api/")


@pytest.mark.parametrize("prefix", TWINS)
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/api/2.0/mlflow/experiments/get", "read"),
        ("GET", "/api/2.0/mlflow/runs/get", "read"),
        ("GET", "/api/2.0/mlflow/metrics/get-history", "read"),
        ("GET", "/api/3.0/mlflow/traces/tr-0123abcd", "read"),
        ("GET", "/api/2.0/mlflow/logged-models/m-123/artifacts/files", "read"),
        ("POST", "/api/2.0/mlflow/runs/create", "write"),
        ("POST", "/api/2.0/mlflow/runs/log-batch", "write"),
        ("POST", "/api/2.0/mlflow/registered-models/create", "write"),
        ("POST", "/api/2.0/mlflow/registered-models/alias", "write"),
        ("PATCH", "/api/2.0/mlflow/logged-models/m-123", "write"),
        ("DELETE", "/api/2.0/mlflow/logged-models/m-123/tags/k", "write"),
        ("PATCH", "/api/3.0/mlflow/traces/tr-1/tags", "write"),
        ("POST", "/api/3.0/mlflow/traces/tr-1/assessments", "write"),
        ("POST", "/api/3.0/mlflow/scorers/register", "write"),
        ("POST", "/api/3.0/mlflow/datasets/d-1/records", "write"),
        ("POST", "/api/3.0/mlflow/mcp-servers/team/server/versions", "write"),
        ("POST", "/api/3.0/mlflow/gateway/secrets/create", "admin"),
        ("GET", "/api/3.0/mlflow/gateway/secrets/list", "admin"),
        ("POST", "/api/3.0/mlflow/gateway/endpoints/create", "admin"),
        ("POST", "/api/3.0/mlflow/gateway/budgets/create", "admin"),
        ("POST", "/api/3.0/mlflow/gateway/model-definitions/create", "admin"),
        ("POST", "/api/3.0/mlflow/workspaces", "admin"),
        ("DELETE", "/api/3.0/mlflow/workspaces/team-a", "admin"),
    ],
)
def test_classify_api_and_ajax_twin_get_the_same_class(prefix, method, path, expected):
    assert access.classify(method, twin(path, prefix)) == expected


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/runs/search"),
        ("POST", "/ajax-api/2.0/mlflow/experiments/search"),
        ("POST", "/api/2.0/mlflow/logged-models/search"),
        ("POST", "/api/3.0/mlflow/traces/search"),
        ("POST", "/ajax-api/3.0/mlflow/datasets/search"),
        ("POST", "/ajax-api/2.0/mlflow/experiments/search-datasets"),
        ("POST", "/ajax-api/2.0mlflow/experiments/search-datasets"),
        ("POST", "/api/2.0/mlflow/registered-models/get-latest-versions"),
        ("POST", "/api/3.0/mlflow/traces/batchGetInfos"),
        ("POST", "/api/3.0/mlflow/traces/metrics"),
        ("POST", "/ajax-api/3.0/jobs/search"),
        ("GET", "/ajax-api/2.0/mlflow/metrics/get-history-bulk"),
        ("GET", "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"),
    ],
)
def test_classify_search_and_bulk_reads_are_read(method, path):
    assert access.classify(method, path) == "read"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_classify_graphql_is_read(method):
    assert access.classify(method, "/graphql") == "read"


def test_classify_otlp_trace_ingestion_is_write():
    assert access.classify("POST", "/v1/traces") == "write"


@pytest.mark.parametrize("prefix", TWINS)
def test_classify_artifact_download_is_read_and_upload_is_write(prefix):
    path = twin("/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model/model.pkl", prefix)
    assert access.classify("GET", path) == "read"
    assert access.classify("PUT", path) == "write"
    assert access.classify("DELETE", path) == "write"
    mpu = twin("/api/2.0/mlflow-artifacts/mpu/create/1/abc/artifacts/big.bin", prefix)
    assert access.classify("POST", mpu) == "write"


@pytest.mark.parametrize(
    "path",
    ["/", "/static-files/static/js/main.abc.js", "/favicon.ico", "/health", "/version"],
)
def test_classify_static_ui_paths_are_read(path):
    assert access.classify("GET", path) == "read"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/2.0/mlflow/webhooks"),
        ("POST", "/ajax-api/2.0/mlflow/webhooks"),
        ("GET", "/api/2.0/mlflow/webhooks/wh-1"),
        ("PATCH", "/api/2.0/mlflow/webhooks/wh-1"),
        ("POST", "/ajax-api/2.0/mlflow/webhooks/wh-1/test"),
    ],
)
def test_classify_webhooks_are_admin(method, path):
    assert access.classify(method, path) == "admin"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ajax-api/3.0/mlflow/assistant/message"),
        ("PUT", "/ajax-api/3.0/mlflow/assistant/config"),
        ("GET", "/ajax-api/3.0/mlflow/assistant/sessions/s-1/stream"),
        ("GET", "/ajax-api/3.0/mlflow/assistant/providers/claude_code/models"),
        ("POST", "/ajax-api/3.0/jobs/"),
        ("POST", "/ajax-api/3.0/mlflow/demo/delete"),
    ],
)
def test_classify_server_side_execution_is_admin(method, path):
    assert access.classify(method, path) == "admin"


@pytest.mark.parametrize(
    "path",
    [
        "/ajax-api/2.0/mlflow/users/current",
        "/api/2.0/mlflow/users/current",
        "/ajax-api/3.0/mlflow/users/current/permissions",
        "/ajax-api/3.0/mlflow/users/roles/list",
        "/ajax-api/3.0/mlflow/assistant/config",
        "/ajax-api/3.0/mlflow/assistant/providers",
    ],
)
def test_classify_calls_of_every_ui_page_are_read(path):
    assert access.classify("GET", path) == "read"


def test_classify_head_is_treated_as_get():
    for path in ("/", "/api/2.0/mlflow/webhooks", "/api/3.0/mlflow/traces/tr-1"):
        assert access.classify("HEAD", path) == access.classify("GET", path)
    assert access.classify("HEAD", "/api/2.0/mlflow/runs/search") == "write"


def test_classify_options_preflight_is_read():
    assert access.classify("OPTIONS", "/api/2.0/mlflow/runs/delete") == "read"
    assert access.allowed("viewer", "OPTIONS", "/api/2.0/mlflow/webhooks")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/runs/searchX"),
        ("POST", "/api/2.0/mlflow/runs/search/"),
        ("POST", "/api/2.0/mlflow/runs/search/../.."),
        ("POST", "/api/2.0/mlflow/runs/search/../delete"),
        ("POST", "/api/2.0/mlflow/runs"),
        ("POST", "/api/2.0/mlflow/runs/search\n"),
        ("GET", "/api/2.0/mlflow/experiments/get/extra"),
        ("GET", "/api/3.0/mlflow/traces/tr-1/extra"),
        ("GET", "/static-filesX/a.js"),
        ("GET", "/x/api/2.0/mlflow/runs/get"),
        ("get", "/api/2.0/mlflow/runs/get"),
        ("TRACE", "/"),
    ],
)
def test_classify_near_miss_is_unclassified_not_read(method, path):
    assert not access.is_classified(method, path)
    assert access.classify(method, path) == "write"


def test_classify_segment_parameter_does_not_span_slashes():
    assert not access.is_classified("DELETE", "/api/2.0/mlflow/logged-models/m-1/tags/a/b")
    assert access.classify("DELETE", "/api/2.0/mlflow/logged-models/m-1/tags/a") == "write"


def test_classify_every_table_entry_matches_its_sample_path_on_both_twins():
    for methods, cls, template in access.ROUTES:
        for method in methods.split():
            path = sample_path(template)
            paths = [twin(path, p) for p in TWINS] if path.startswith("/api/") else [path]
            for concrete in paths:
                assert access.classify(method, concrete) == cls, (method, template, concrete)


def test_classify_overlapping_templates_strictest_class_wins(monkeypatch):
    monkeypatch.setattr(
        access,
        "ROUTES",
        (
            ("GET", "read", "/api/3.0/x/{name:path}"),
            ("GET", "admin", "/api/3.0/x/{name:path}/secrets"),
            ("GET", "read", "/api/3.0/x/literal/secrets"),
        ),
    )
    exact, regexes, _ = access._build()
    assert regexes["GET"].fullmatch("/api/3.0/x/a/b/secrets").lastgroup == "admin"
    assert regexes["GET"].fullmatch("/api/3.0/x/a/b").lastgroup == "read"
    assert exact[("GET", "/api/3.0/x/literal/secrets")] == "admin"


def test_classify_bad_table_entry_is_rejected(monkeypatch):
    monkeypatch.setattr(access, "ROUTES", (("GTE", "read", "/x"),))
    with pytest.raises(ValueError, match="bad access table entry"):
        access._build()


@pytest.mark.parametrize(
    ("role", "read", "write", "admin"),
    [
        ("viewer", True, False, False),
        ("editor", True, True, False),
        ("admin", True, True, True),
        ("Admin", False, False, False),
        ("", False, False, False),
    ],
)
def test_allowed_role_matrix_matches_classes(role, read, write, admin):
    assert access.allowed(role, "GET", "/ajax-api/2.0/mlflow/experiments/get") is read
    assert access.allowed(role, "POST", "/ajax-api/2.0/mlflow/runs/search") is read
    assert access.allowed(role, "POST", "/api/2.0/mlflow/runs/log-metric") is write
    assert access.allowed(role, "POST", "/api/2.0/mlflow/webhooks") is admin


def test_allowed_unknown_path_is_denied_for_viewer_but_allowed_for_editor():
    path = "/api/9.9/mlflow/something-new"
    assert not access.is_classified("GET", path)
    assert not access.allowed("viewer", "GET", path)
    assert access.allowed("editor", "GET", path)
    assert access.allowed("admin", "GET", path)


def test_unclassified_routes_accepts_both_syntaxes_and_twins_and_flags_new_ones():
    routes = {
        ("GET", "/ajax-api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>"),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}"),
        ("HEAD", "/api/3.0/mlflow/traces/<trace_id>"),
        ("GET", "/ajax-api/3.0/jobs/{job_id}"),
        ("POST", "/api/3.0/mlflow/brand-new"),
        ("DELETE", "/api/2.0/mlflow/runs/get"),
        ("GET", "/api/3.0/mlflow/traces/<path:trace_id>"),
        ("OPTIONS", "/api/2.0/mlflow/runs/get"),
        ("*", "/mounted/{path:path}"),
    }
    assert access.unclassified_routes(routes) == [
        ("*", "/mounted/{path:path}"),
        ("DELETE", "/api/2.0/mlflow/runs/get"),
        ("GET", "/api/3.0/mlflow/traces/<path:trace_id>"),
        ("OPTIONS", "/api/2.0/mlflow/runs/get"),
        ("POST", "/api/3.0/mlflow/brand-new"),
    ]


def test_classify_many_calls_stay_fast():
    paths = [
        ("POST", "/api/2.0/mlflow/runs/search"),
        ("GET", "/ajax-api/3.0/mlflow/traces/tr-0123456789abcdef"),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model/model.pkl"),
        ("DELETE", "/ajax-api/2.0/mlflow/logged-models/m-1/tags/k"),
    ] * 2500
    start = time.perf_counter()
    for method, path in paths:
        access.classify(method, path)
    # ~1-2 us each on a laptop; the bound only catches an accidental linear scan or recompile.
    assert (time.perf_counter() - start) / len(paths) < 20e-6


def test_access_module_does_not_import_mlflow():
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import mlflowstack.access; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlflow', 'flask', 'fastapi')]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True)


@pytest.fixture(scope="module")
def served_routes():
    pytest.importorskip("mlflow")
    return access.mlflow_routes()


def test_mlflow_routes_are_all_classified(served_routes):
    assert ("POST", "/api/2.0/mlflow/runs/search") in served_routes
    assert ("POST", "/ajax-api/2.0/mlflow/runs/search") in served_routes
    assert ("POST", "/v1/traces") in served_routes
    assert access.unclassified_routes(served_routes) == []


def test_mlflow_routes_sample_paths_get_their_table_class(served_routes):
    table = {
        (method, access._canonical(template)): cls
        for methods, cls, template in access.ROUTES
        for method in methods.split()
    }
    for method, template in served_routes:
        expected = table[(method, access._canonical(template))]
        assert access.classify(method, sample_path(template)) == expected, (method, template)


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/serving/iris/invocations"),
        ("GET", "/serving/iris/ping"),
        ("GET", "/serving/iris/health"),
        ("GET", "/serving/churn.v2/version"),
        ("POST", "/invocations"),
    ],
)
def test_classify_serving_calls_are_reads_so_viewers_may_predict(method, path):
    assert access.classify(method, path) == "read"
    assert access.allowed("viewer", method, path)


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/serving/a/b/invocations"),  # a name never spans a slash
        ("DELETE", "/serving/iris/invocations"),
        ("POST", "/serving/iris/reload"),
        ("GET", "/invocations"),
    ],
)
def test_classify_other_serving_paths_are_unclassified(method, path):
    assert not access.is_classified(method, path)
    assert not access.allowed("viewer", method, path)
