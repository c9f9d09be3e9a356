"""The MLflow inside our image: its full route set is served, and our access table covers it."""

import json
from pathlib import Path

import requests

ACCESS_MODULE = Path(__file__).resolve().parents[2] / "scripts" / "mlflowstack" / "access.py"


def _routes_in_server_image(stack) -> tuple[list, list]:
    program = ACCESS_MODULE.read_text() + (
        "\nimport json\nroutes = mlflow_routes()\n"
        "print(json.dumps([sorted(routes), unclassified_routes(routes)]))\n"
    )
    output = stack.compose(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "server", "-", input=program
    )
    routes, unclassified = json.loads(output.strip().splitlines()[-1])
    return [tuple(r) for r in routes], unclassified


def test_access_table_classifies_every_route_of_the_pinned_mlflow(stack):
    routes, unclassified = _routes_in_server_image(stack)
    assert len(routes) > 300
    assert unclassified == []


def test_fastapi_app_routes_are_served(stack):
    routes, _ = _routes_in_server_image(stack)
    # The FastAPI-only parts that the Flask app (mlflow server --gunicorn-opts) lacks.
    for expected in [
        ("POST", "/v1/traces"),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}"),
        ("GET", "/ajax-api/3.0/jobs/{job_id}"),
    ]:
        assert expected in routes, expected


def test_otlp_endpoint_answers_through_nginx(stack, admin):
    response = requests.post(
        stack.url + "/v1/traces",
        data=b"",
        headers={"Content-Type": "application/x-protobuf"},
        auth=admin,
    )
    # An empty export without an experiment header is rejected by MLflow itself, not 404.
    assert response.status_code not in (404, 405, 502), response.status_code
