"""Role-based access classes for every request that reaches MLflow through the gate.

Contract:

- ``classify(method, path)`` returns ``"read"``, ``"write"`` or ``"admin"``. ``path`` is nginx's
  normalized ``$uri`` (percent-decoded, dot segments resolved, slashes merged, no query string);
  ``method`` is the request method exactly as sent (HTTP methods are case-sensitive). HEAD is
  classified as GET; OPTIONS (CORS preflight, which runs no MLflow handler) is always "read".
- A request matching no entry of ``ROUTES`` is *unclassified*: ``classify`` returns ``"write"``
  for it, so viewers are refused while editors and admins reach MLflow, which answers 404/405.
  ``is_classified(method, path)`` tells an unclassified request from a classified "write".
- ``allowed(role, method, path)``: "viewer" may do "read", "editor" "read" and "write", "admin"
  everything. Any other role string (roles are case-sensitive) is allowed nothing.
- ``ROUTES`` is the one table, derived from MLflow 3.17.2's route list. A template under
  ``/api/`` also covers its ``/ajax-api/`` twin. Templates match whole paths, never prefixes;
  when several templates match one request, the strictest class wins, so the answer never
  depends on which of them MLflow itself would dispatch to.
- ``mlflow_routes()`` lists every (METHOD, template) MLflow serves and ``unclassified_routes()``
  those missing from ``ROUTES``; a stack test runs them in the server image so that a new MLflow
  route fails the build instead of silently defaulting. Only ``mlflow_routes`` imports mlflow
  (lazily); the rest of the module is standard library, because the gate image has no mlflow.
"""

import re

READ, WRITE, ADMIN = "read", "write", "admin"

_API, _AJAX = "/api/", "/ajax-api/"
_AJAX_LEN = len(_AJAX)

# (methods, class, template). Flask "<var>"/"<path:var>" and Starlette "{var}"/"{var:path}"
# are both accepted so each entry can be copied from MLflow's source as written there.
ROUTES: tuple[tuple[str, str, str], ...] = (
    # Web UI shell, static files, liveness and version probes.
    ("GET", READ, "/"),
    ("GET", READ, "/static-files/<path:path>"),
    ("GET", READ, "/build/<path:filename>"),  # Flask's implicit static route
    ("GET", READ, "/favicon.ico"),  # browsers ask on their own; MLflow answers 404
    ("GET", READ, "/health"),
    ("GET", READ, "/version"),
    ("GET", READ, "/api/3.0/mlflow/server-info"),
    # Who is logged in (the UI asks on every page): answered by the server's guard from the
    # verified identity (server/identity.py), not by MLflow, which serves it only in its
    # basic-auth app.
    ("GET", READ, "/api/2.0/mlflow/users/current"),
    ("GET", READ, "/api/3.0/mlflow/users/current/permissions"),  # the account page, likewise
    ("GET", READ, "/api/3.0/mlflow/users/roles/list"),
    ("GET POST", READ, "/api/3.0/mlflow/ui-telemetry"),  # every UI session posts this
    # GraphQL: in 3.17 its "mutations" are searches and a test echo, so POST only reads.
    ("GET POST", READ, "/graphql"),
    # Experiments. search-datasets also exists under MLflow's typo "2.0mlflow".
    ("GET", READ, "/api/2.0/mlflow/experiments/get"),
    ("GET", READ, "/api/2.0/mlflow/experiments/get-by-name"),
    ("GET POST", READ, "/api/2.0/mlflow/experiments/search"),
    ("POST", READ, "/api/2.0/mlflow/experiments/search-datasets"),
    ("POST", READ, "/api/2.0mlflow/experiments/search-datasets"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/create"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/delete"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/restore"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/update"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/set-experiment-tag"),
    ("POST", WRITE, "/api/2.0/mlflow/experiments/delete-experiment-tag"),
    # Runs and metrics.
    ("GET", READ, "/api/2.0/mlflow/runs/get"),
    ("POST", READ, "/api/2.0/mlflow/runs/search"),
    ("GET", READ, "/api/2.0/mlflow/metrics/get-history"),
    ("GET", READ, "/api/2.0/mlflow/metrics/get-history-bulk"),
    ("GET", READ, "/api/2.0/mlflow/metrics/get-history-bulk-interval"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/create"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/create-promptlab-run"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/delete"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/restore"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/update"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/set-tag"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/delete-tag"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/log-batch"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/log-inputs"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/log-metric"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/log-model"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/log-parameter"),
    ("POST", WRITE, "/api/2.0/mlflow/runs/outputs"),
    # Artifacts, proxied through the server (mlflow-artifacts) and the run-scoped helpers.
    ("GET", READ, "/get-artifact"),
    ("GET", READ, "/model-versions/get-artifact"),
    ("GET", READ, "/api/2.0/mlflow/artifacts/list"),
    ("POST", READ, "/api/2.0/mlflow/artifacts/presigned-download-url"),
    ("POST", WRITE, "/api/2.0/mlflow/artifacts/presigned-upload-url"),
    ("POST", WRITE, "/api/2.0/mlflow/upload-artifact"),
    ("GET", READ, "/api/2.0/mlflow-artifacts/artifacts"),
    ("GET", READ, "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}"),
    ("PUT DELETE", WRITE, "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}"),
    ("GET", READ, "/api/2.0/mlflow-artifacts/presigned/<path:artifact_path>"),
    ("POST", WRITE, "/api/2.0/mlflow-artifacts/mpu/create/<path:artifact_path>"),
    ("POST", WRITE, "/api/2.0/mlflow-artifacts/mpu/complete/<path:artifact_path>"),
    ("POST", WRITE, "/api/2.0/mlflow-artifacts/mpu/abort/<path:artifact_path>"),
    # Logged models.
    ("POST", READ, "/api/2.0/mlflow/logged-models/search"),
    ("GET", READ, "/api/2.0/mlflow/logged-models/<model_id>"),
    ("GET", READ, "/api/2.0/mlflow/logged-models/<model_id>/artifacts/directories"),
    ("GET", READ, "/api/2.0/mlflow/logged-models/<model_id>/artifacts/files"),
    ("POST", WRITE, "/api/2.0/mlflow/logged-models"),
    ("PATCH DELETE", WRITE, "/api/2.0/mlflow/logged-models/<model_id>"),
    ("POST", WRITE, "/api/2.0/mlflow/logged-models/<model_id>/params"),
    ("PATCH", WRITE, "/api/2.0/mlflow/logged-models/<model_id>/tags"),
    ("DELETE", WRITE, "/api/2.0/mlflow/logged-models/<model_id>/tags/<tag_key>"),
    # Model and prompt registry (prompts are registered models with a tag).
    ("GET", READ, "/api/2.0/mlflow/registered-models/get"),
    ("GET", READ, "/api/2.0/mlflow/registered-models/search"),
    ("GET POST", READ, "/api/2.0/mlflow/registered-models/get-latest-versions"),
    ("GET", READ, "/api/2.0/mlflow/registered-models/alias"),
    ("GET", READ, "/api/2.0/mlflow/model-versions/get"),
    ("GET", READ, "/api/2.0/mlflow/model-versions/get-download-uri"),
    ("GET", READ, "/api/2.0/mlflow/model-versions/search"),
    ("POST DELETE", WRITE, "/api/2.0/mlflow/registered-models/alias"),
    ("POST", WRITE, "/api/2.0/mlflow/registered-models/create"),
    ("POST", WRITE, "/api/2.0/mlflow/registered-models/rename"),
    ("PATCH", WRITE, "/api/2.0/mlflow/registered-models/update"),
    ("DELETE", WRITE, "/api/2.0/mlflow/registered-models/delete"),
    ("POST", WRITE, "/api/2.0/mlflow/registered-models/set-tag"),
    ("DELETE", WRITE, "/api/2.0/mlflow/registered-models/delete-tag"),
    ("POST", WRITE, "/api/2.0/mlflow/model-versions/create"),
    ("PATCH", WRITE, "/api/2.0/mlflow/model-versions/update"),
    ("DELETE", WRITE, "/api/2.0/mlflow/model-versions/delete"),
    ("POST", WRITE, "/api/2.0/mlflow/model-versions/set-tag"),
    ("DELETE", WRITE, "/api/2.0/mlflow/model-versions/delete-tag"),
    ("POST", WRITE, "/api/2.0/mlflow/model-versions/transition-stage"),
    # Traces: v2 (deprecated) and v3, OTLP ingestion, assessments.
    ("GET", READ, "/api/2.0/mlflow/traces"),
    ("GET", READ, "/api/2.0/mlflow/traces/<request_id>/info"),
    ("GET", READ, "/api/2.0/mlflow/unified-traces"),
    ("GET", READ, "/api/2.0/mlflow/get-online-trace-details"),
    ("GET", READ, "/api/2.0/mlflow/get-trace-artifact"),
    ("GET", READ, "/api/3.0/mlflow/get-trace-artifact"),
    ("GET", READ, "/api/3.0/mlflow/traces/get"),
    ("GET", READ, "/api/3.0/mlflow/traces/batchGet"),
    ("GET", READ, "/api/3.0/mlflow/traces/<trace_id>"),
    ("GET", READ, "/api/3.0/mlflow/traces/<trace_id>/assessments/<assessment_id>"),
    ("POST", READ, "/api/3.0/mlflow/traces/search"),
    ("POST", READ, "/api/3.0/mlflow/traces/batchGetInfos"),
    ("POST", READ, "/api/3.0/mlflow/traces/metrics"),
    ("POST", READ, "/api/3.0/mlflow/traces/calculate-filter-correlation"),
    ("POST", WRITE, "/v1/traces"),
    ("POST", WRITE, "/api/2.0/mlflow/traces"),
    ("PATCH", WRITE, "/api/2.0/mlflow/traces/<request_id>"),
    ("PATCH DELETE", WRITE, "/api/2.0/mlflow/traces/<request_id>/tags"),
    ("POST", WRITE, "/api/2.0/mlflow/traces/delete-traces"),
    ("POST", WRITE, "/api/2.0/mlflow/traces/link-prompts"),
    ("POST", WRITE, "/api/2.0/mlflow/traces/link-to-run"),
    ("POST", WRITE, "/api/3.0/mlflow/traces"),
    ("PATCH DELETE", WRITE, "/api/3.0/mlflow/traces/<trace_id>/tags"),
    ("POST", WRITE, "/api/3.0/mlflow/traces/delete-traces"),
    ("POST", WRITE, "/api/3.0/mlflow/traces/<trace_id>/assessments"),
    ("PATCH DELETE", WRITE, "/api/3.0/mlflow/traces/<trace_id>/assessments/<assessment_id>"),
    # Evaluation datasets.
    ("GET POST", READ, "/api/3.0/mlflow/datasets/search"),
    ("GET", READ, "/api/3.0/mlflow/datasets/<dataset_id>"),
    ("GET", READ, "/api/3.0/mlflow/datasets/<dataset_id>/experiment-ids"),
    ("GET", READ, "/api/3.0/mlflow/datasets/<dataset_id>/records"),
    ("POST", WRITE, "/api/3.0/mlflow/datasets/create"),
    ("DELETE", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>"),
    ("POST DELETE", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>/records"),
    ("POST", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>/add-experiments"),
    ("POST", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>/remove-experiments"),
    ("PATCH", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>/tags"),
    ("DELETE", WRITE, "/api/3.0/mlflow/datasets/<dataset_id>/tags/<key>"),
    # Scorers, online scoring, and UI-triggered evaluation (these spend the gateway's LLMs).
    ("GET", READ, "/api/3.0/mlflow/scorers/list"),
    ("GET", READ, "/api/3.0/mlflow/scorers/get"),
    ("GET", READ, "/api/3.0/mlflow/scorers/versions"),
    ("GET", READ, "/api/3.0/mlflow/scorers/online-configs"),
    ("POST", WRITE, "/api/3.0/mlflow/scorers/register"),
    ("DELETE", WRITE, "/api/3.0/mlflow/scorers/delete"),
    ("PUT", WRITE, "/api/3.0/mlflow/scorers/online-config"),
    ("POST", WRITE, "/api/3.0/mlflow/scorer/invoke"),
    ("POST", WRITE, "/api/3.0/mlflow/genai/evaluate/invoke"),
    # Issues (issue detection), review queues, label schemas.
    ("POST", READ, "/api/3.0/mlflow/issues/search"),
    ("GET", READ, "/api/3.0/mlflow/issues/<issue_id>"),
    ("POST", WRITE, "/api/3.0/mlflow/issues"),
    ("PATCH", WRITE, "/api/3.0/mlflow/issues/<issue_id>"),
    ("POST", WRITE, "/api/3.0/mlflow/issues/invoke"),
    ("GET", READ, "/api/3.0/mlflow/review-queues/get"),
    ("GET", READ, "/api/3.0/mlflow/review-queues/get-by-name"),
    ("GET", READ, "/api/3.0/mlflow/review-queues/list"),
    ("GET", READ, "/api/3.0/mlflow/review-queues/items/list"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/create"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/update"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/delete"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/get-or-create-user"),  # may create
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/items/add"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/items/remove"),
    ("POST", WRITE, "/api/3.0/mlflow/review-queues/items/set-status"),
    ("GET", READ, "/api/3.0/mlflow/label-schemas/get"),
    ("GET", READ, "/api/3.0/mlflow/label-schemas/get-by-name"),
    ("GET", READ, "/api/3.0/mlflow/label-schemas/list"),
    ("POST", WRITE, "/api/3.0/mlflow/label-schemas/create"),
    ("PATCH", WRITE, "/api/3.0/mlflow/label-schemas/update"),
    ("DELETE", WRITE, "/api/3.0/mlflow/label-schemas/delete"),
    # Prompt optimization jobs and the generic job API.
    ("GET POST", READ, "/api/3.0/mlflow/prompt-optimization/jobs/search"),
    ("GET", READ, "/api/3.0/mlflow/prompt-optimization/jobs/<job_id>"),
    ("POST", WRITE, "/api/3.0/mlflow/prompt-optimization/jobs"),
    ("POST", WRITE, "/api/3.0/mlflow/prompt-optimization/jobs/<job_id>/cancel"),
    ("DELETE", WRITE, "/api/3.0/mlflow/prompt-optimization/jobs/<job_id>"),
    ("GET", READ, "/api/3.0/jobs/{job_id}"),
    ("POST", READ, "/api/3.0/jobs/search"),
    ("GET", READ, "/api/3.0/mlflow/jobs/<job_id>"),
    ("PATCH", WRITE, "/api/3.0/jobs/cancel/{job_id}"),
    ("PATCH", WRITE, "/api/3.0/mlflow/jobs/cancel/<job_id>"),
    ("POST", ADMIN, "/api/3.0/jobs/"),  # runs any registered job function by name
    # MCP server registry: catalogue metadata only; the server never connects to these URLs.
    ("GET", READ, "/api/3.0/mlflow/mcp-servers"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/endpoints"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}/aliases/{alias:path}"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}/endpoints"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}/endpoints/{endpoint_id}"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}/versions"),
    ("GET", READ, "/api/3.0/mlflow/mcp-servers/{name:path}/versions/{version:path}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers"),
    ("PATCH DELETE", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/aliases"),
    ("DELETE", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/aliases/{alias:path}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/endpoints"),
    ("PATCH DELETE", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/endpoints/{endpoint_id}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/tags"),
    ("DELETE", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/tags/{key:path}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/versions"),
    ("PATCH DELETE", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/versions/{version:path}"),
    ("POST", WRITE, "/api/3.0/mlflow/mcp-servers/{name:path}/versions/{version:path}/tags"),
    (
        "DELETE",
        WRITE,
        "/api/3.0/mlflow/mcp-servers/{name:path}/versions/{version:path}/tags/{key:path}",
    ),
    # Model serving (the serve profile: nginx sends these to the scoring processes of
    # server/serving.py, never to MLflow). A prediction changes nothing, so viewers may.
    ("POST", READ, "/serving/{model}/invocations"),
    ("GET", READ, "/serving/{model}/ping"),
    ("GET", READ, "/serving/{model}/health"),
    ("GET", READ, "/serving/{model}/version"),
    ("POST", READ, "/invocations"),
    # AI gateway: invoking configured endpoints is "write" (it spends the provider keys);
    # configuring them is admin. Reads of non-secret configuration stay readable so that editors
    # can pick an endpoint for a judge; secrets and standalone guardrails (admin-only in MLflow's
    # own auth app as well) are admin even to read.
    ("GET", READ, "/gateway/mlflow/v1/models"),
    ("POST", WRITE, "/gateway/{endpoint_name}/mlflow/invocations"),
    ("POST", WRITE, "/gateway/mlflow/v1/chat/completions"),
    ("POST", WRITE, "/gateway/openai/v1/chat/completions"),
    ("POST", WRITE, "/gateway/openai/v1/embeddings"),
    ("POST", WRITE, "/gateway/openai/v1/responses"),
    ("POST", WRITE, "/gateway/openai/v1/responses/compact"),
    ("POST", WRITE, "/gateway/anthropic/v1/messages"),
    ("POST", WRITE, "/gateway/gemini/v1beta/models/{endpoint_name}:generateContent"),
    ("POST", WRITE, "/gateway/gemini/v1beta/models/{endpoint_name}:streamGenerateContent"),
    ("POST", WRITE, "/gateway/typesafe/v1/systemone"),
    ("POST", WRITE, "/gateway/proxy/{endpoint_name}/{path:path}"),
    ("GET", READ, "/api/2.0/mlflow/gateway-proxy"),  # legacy deployments server: list
    ("POST", WRITE, "/api/2.0/mlflow/gateway-proxy"),  # ... and query
    ("GET", READ, "/api/3.0/mlflow/gateway/supported-providers"),
    ("GET", READ, "/api/3.0/mlflow/gateway/supported-models"),
    ("GET", READ, "/api/3.0/mlflow/gateway/provider-config"),
    ("GET", READ, "/api/3.0/mlflow/gateway/endpoints/get"),
    ("GET", READ, "/api/3.0/mlflow/gateway/endpoints/list"),
    ("GET", READ, "/api/3.0/mlflow/gateway/endpoints/bindings/list"),
    ("GET", READ, "/api/3.0/mlflow/gateway/model-definitions/get"),
    ("GET", READ, "/api/3.0/mlflow/gateway/model-definitions/list"),
    ("GET", READ, "/api/3.0/mlflow/gateway/budgets/get"),
    ("GET", READ, "/api/3.0/mlflow/gateway/budgets/list"),
    ("GET", READ, "/api/3.0/mlflow/gateway/budgets/windows"),
    ("GET", READ, "/api/3.0/mlflow/gateway/guardrails/list-for-endpoint"),
    ("GET", ADMIN, "/api/3.0/mlflow/gateway/guardrails/get"),
    ("GET", ADMIN, "/api/3.0/mlflow/gateway/guardrails/list"),
    ("GET", ADMIN, "/api/3.0/mlflow/gateway/secrets/get"),
    ("GET", ADMIN, "/api/3.0/mlflow/gateway/secrets/list"),
    ("GET", ADMIN, "/api/3.0/mlflow/gateway/secrets/config"),  # tells if KEK is the default
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/secrets/create"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/secrets/update"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/secrets/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/create"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/update"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/endpoints/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/set-tag"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/endpoints/delete-tag"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/models/attach"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/models/detach"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/endpoints/bindings/create"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/endpoints/bindings/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/model-definitions/create"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/model-definitions/update"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/model-definitions/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/budgets/create"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/budgets/update"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/budgets/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/guardrails/create"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/guardrails/delete"),
    ("POST", ADMIN, "/api/3.0/mlflow/gateway/guardrails/add-to-endpoint"),
    ("DELETE", ADMIN, "/api/3.0/mlflow/gateway/guardrails/remove-from-endpoint"),
    ("PATCH", ADMIN, "/api/3.0/mlflow/gateway/guardrails/update-config"),
    # Webhooks make the server call out to any URL, and their config may hold secrets.
    ("GET POST", ADMIN, "/api/2.0/mlflow/webhooks"),
    ("GET PATCH DELETE", ADMIN, "/api/2.0/mlflow/webhooks/<webhook_id>"),
    ("POST", ADMIN, "/api/2.0/mlflow/webhooks/<webhook_id>/test"),
    # The assistant runs an agent with tools on the server host: everything it does is admin,
    # except the two reads the UI makes on every page to decide whether to show it. MLflow
    # serves them to remote callers with API keys and project locations removed.
    ("GET", READ, "/api/3.0/mlflow/assistant/config"),
    ("PUT", ADMIN, "/api/3.0/mlflow/assistant/config"),
    ("POST", ADMIN, "/api/3.0/mlflow/assistant/message"),
    ("GET", READ, "/api/3.0/mlflow/assistant/providers"),
    ("GET", ADMIN, "/api/3.0/mlflow/assistant/providers/{provider}/health"),
    ("GET", ADMIN, "/api/3.0/mlflow/assistant/providers/{provider}/models"),
    ("PATCH", ADMIN, "/api/3.0/mlflow/assistant/sessions/{session_id}"),
    ("GET", ADMIN, "/api/3.0/mlflow/assistant/sessions/{session_id}/stream"),
    ("POST", ADMIN, "/api/3.0/mlflow/assistant/sessions/{session_id}/permission"),
    ("POST", ADMIN, "/api/3.0/mlflow/assistant/sessions/{session_id}/tool-result"),
    ("POST", ADMIN, "/api/3.0/mlflow/assistant/skills/install"),
    # Workspaces: managing them is server configuration; listing names is what the UI needs.
    ("GET", READ, "/api/3.0/mlflow/workspaces"),
    ("GET", READ, "/api/3.0/mlflow/workspaces/<workspace_name>"),
    ("POST", ADMIN, "/api/3.0/mlflow/workspaces"),
    ("PATCH DELETE", ADMIN, "/api/3.0/mlflow/workspaces/<workspace_name>"),
    # Demo data: generating adds an experiment; deleting hard-deletes it, like `mlflow gc`.
    ("POST", WRITE, "/api/3.0/mlflow/demo/generate"),
    ("POST", ADMIN, "/api/3.0/mlflow/demo/delete"),
)

_RANK = {READ: 0, WRITE: 1, ADMIN: 2}
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_ROLE_CLASSES = {
    "viewer": frozenset({READ}),
    "editor": frozenset({READ, WRITE}),
    "admin": frozenset({READ, WRITE, ADMIN}),
}

# Flask "<conv(args):name>" or "<name>", Starlette "{name}" or "{name:conv}".
_PARAM = re.compile(r"<(?:(\w+)(?:\([^>]*\))?:)?\w+>|\{\w+(?::(\w+))?\}")


def _canonical(template: str) -> str:
    """The template with the /ajax-api/ twin folded onto /api/ and parameters anonymized."""
    if template.startswith(_AJAX):
        template = _API + template[_AJAX_LEN:]
    return _PARAM.sub(lambda m: "{*}" if "path" in (m[1], m[2]) else "{}", template)


def _pattern(template: str) -> str:
    # Looser than MLflow's own converters on purpose: a path MLflow routes somewhere must match
    # that route's template here, or a stricter class could be missed.
    out, pos = [], 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(".*" if "path" in (m[1], m[2]) else "[^/]+")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


def _build():
    exact: dict[tuple[str, str], str] = {}
    templated: dict[str, dict[str, list[str]]] = {}
    known: set[tuple[str, str]] = set()
    for methods, cls, template in ROUTES:
        if (
            cls not in _RANK
            or not template.startswith("/")
            or not _METHODS.issuperset(methods.split())
        ):
            raise ValueError(f"bad access table entry: {methods} {cls} {template}")
        if template.startswith(_AJAX):
            template = _API + template[_AJAX_LEN:]
        for method in methods.split():
            known.add((method, _canonical(template)))
            if _PARAM.search(template):
                by_class = templated.setdefault(method, {ADMIN: [], WRITE: [], READ: []})
                by_class[cls].append(_pattern(template))
            elif _RANK[cls] > _RANK.get(exact.get((method, template)), -1):
                exact[(method, template)] = cls
    # One regex per method, strictest class first: alternation is tried left to right, so the
    # first class whose group matches the whole path is the strictest one that matches at all.
    regexes = {}
    for method, by_class in templated.items():
        groups = [f"(?P<{c}>{'|'.join(p)})" for c, p in by_class.items() if p]
        regexes[method] = re.compile("|".join(groups), re.DOTALL)
    # A literal path may also fit a template of a stricter class; settle that once, here.
    for (method, path), cls in exact.items():
        m = regexes[method].fullmatch(path) if method in regexes else None
        if m and _RANK[m.lastgroup] > _RANK[cls]:
            exact[(method, path)] = m.lastgroup
    return exact, regexes, frozenset(known)


_EXACT, _REGEXES, _KNOWN = _build()


def _lookup(method: str, path: str) -> str | None:
    if method == "OPTIONS":
        return READ
    if method == "HEAD":
        method = "GET"
    if path.startswith(_AJAX):
        path = _API + path[_AJAX_LEN:]  # the twin shares its /api/ entry
    cls = _EXACT.get((method, path))
    if cls is None:
        regex = _REGEXES.get(method)
        if regex is not None and (m := regex.fullmatch(path)) is not None:
            cls = m.lastgroup
    return cls


def is_classified(method: str, path: str) -> bool:
    """Whether (method, path) matches an entry of ROUTES (OPTIONS always does)."""
    return _lookup(method, path) is not None


def classify(method: str, path: str) -> str:
    """The access class "read", "write" or "admin" of a request; unclassified gives "write"."""
    return _lookup(method, path) or WRITE


def allowed(role: str, method: str, path: str) -> bool:
    """Whether a user with ``role`` ("viewer", "editor" or "admin") may make this request."""
    classes = _ROLE_CLASSES.get(role)
    return classes is not None and (_lookup(method, path) or WRITE) in classes


def mlflow_routes() -> set[tuple[str, str]]:
    """Every (METHOD, route template) the installed MLflow server app serves.

    Covers the Flask url_map and the native FastAPI/Starlette routes. HEAD is reported as GET,
    as classify() treats it. OPTIONS is reported only where a handler of MLflow's own answers it
    (not Flask's automatic reply), so that such a handler gets flagged for review rather than
    waved through as preflight. A route without methods (a WebSocket or mounted
    sub-application) is reported with method "*", which no table entry classifies either.
    """
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import app as fastapi_app

    routes: set[tuple[str, str]] = set()

    def add(methods, template: str) -> None:
        for method in methods or ("*",):
            routes.add(("GET" if method == "HEAD" else method, template))

    for rule in flask_app.url_map.iter_rules():
        automatic = getattr(rule, "provide_automatic_options", True)
        add(set(rule.methods) - ({"OPTIONS"} if automatic else set()), rule.rule)

    def walk(items, prefix: str) -> None:
        try:  # newer FastAPI keeps included routers as lazy entries; this flattens them
            from fastapi.routing import iter_route_contexts

            items = list(iter_route_contexts(items))
        except ImportError:
            pass
        for route in items:
            path = prefix + (getattr(route, "path", None) or "")
            methods = getattr(route, "methods", None)
            if methods is not None:
                add(methods, path)
            elif getattr(getattr(route, "app", None), "app", None) is flask_app:
                continue  # the catch-all WSGI mount; its rules were listed above
            elif hasattr(route, "routes"):  # a Mount: its own routes, or everything below it
                if route.routes:
                    walk(route.routes, path)
                else:
                    add(None, path.rstrip("/") + "/{path:path}")
            else:
                add(None, path)

    walk(fastapi_app.routes, "")
    return routes


def unclassified_routes(routes) -> list[tuple[str, str]]:
    """The (METHOD, template) pairs of ``routes`` that no ROUTES entry classifies, sorted."""
    return sorted(
        (method, template)
        for method, template in routes
        if ("GET" if method == "HEAD" else method, _canonical(template)) not in _KNOWN
    )
