"""PUBLIC_HOSTNAME: nginx refuses foreign Host headers first; MLflow follows the same list."""

import requests

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_foreign_host_refused_before_authentication(stack, admin):
    for auth in (None, admin):
        response = requests.get(stack.url + SEARCH, headers={"Host": "evil.example"}, auth=auth)
        assert response.status_code == 421
        assert "WWW-Authenticate" not in response.headers


def test_listed_host_without_port_accepted_on_any_port(stack, admin):
    response = requests.get(stack.url + SEARCH, headers={"Host": "localhost:1234"}, auth=admin)
    assert response.status_code == 200


def test_ui_write_from_public_origin_accepted(stack, admin):
    port = stack.url.rsplit(":", 1)[1]
    response = requests.post(
        stack.url + "/ajax-api/2.0/mlflow/experiments/create",
        json={"name": "from-the-ui"},
        headers={"Origin": f"http://127.0.0.1:{port}"},
        auth=admin,
    )
    assert response.status_code == 200, response.text


def test_ui_write_from_foreign_origin_refused_by_mlflow(stack, admin):
    response = requests.post(
        stack.url + "/ajax-api/2.0/mlflow/experiments/create",
        json={"name": "from-evil"},
        headers={"Origin": "http://evil.example"},
        auth=admin,
    )
    assert response.status_code == 403
