"""The walk-through ends in predictions behind the same login: the example project trained
twice, the better version aliased @production, the serve profile started while the rest of the
stack runs, predictions equal to the model loaded locally, the same users, roles and tokens,
clear refusals that never hang, and a rollout that fails no request.

Invariants checked from the client's side: nobody predicts without a verified credential; a
name that is not served and a model that cannot load are answered at once (404, 503), never
by waiting; MLflow's own 400 for a malformed body reaches the client unchanged.
"""

import json
import os
import subprocess
import threading
import time

import mlflow
import pandas as pd
import pytest
import requests
from conftest import MISSING_MODEL, ROOT, SERVED_MODEL
from sklearn.datasets import load_iris
from walkthrough import client_as, tracking_env, train_two_and_promote

FIVE_ROWS = load_iris(as_frame=True).data.iloc[[0, 51, 102, 25, 130]]
PREDICT = f"/serving/{SERVED_MODEL}/invocations"


def dataframe_split(rows: pd.DataFrame) -> dict:
    return {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}


@pytest.fixture(scope="module")
def editor(stack):
    stack.add_user("serve-erin", "erin-password-5", "editor")
    return ("serve-erin", "erin-password-5")


@pytest.fixture(scope="module")
def viewer_token(stack):
    return stack.stackctl("token", "add", "serve-reader", "--role", "viewer").strip().split()[-1]


@pytest.fixture(scope="module")
def served(stack, editor):
    """Two versions trained and registered; the serve profile started; the first answer."""
    env = tracking_env(stack.url, *editor)
    name, better, other = train_two_and_promote(env, model_name=SERVED_MODEL)
    started = time.monotonic()
    stack.compose("--profile", "serve", "up", "-d", "--no-build", "serving")
    deadline = time.monotonic() + 240
    while True:
        answer = requests.post(stack.url + PREDICT, auth=editor, json=dataframe_split(FIVE_ROWS))
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert answer.status_code == 200, answer.text
    print(f"serve profile up to first prediction: {time.monotonic() - started:.1f} s")
    return {"env": env, "name": name, "better": better, "other": other}


def local_predictions(env: dict, uri: str) -> list:
    with client_as(env):
        return mlflow.pyfunc.load_model(uri).predict(FIVE_ROWS).tolist()


def test_predictions_equal_model_loaded_locally_by_alias(stack, editor, served):
    answer = requests.post(stack.url + PREDICT, auth=editor, json=dataframe_split(FIVE_ROWS))
    assert answer.status_code == 200
    expected = local_predictions(served["env"], f"models:/{SERVED_MODEL}@production")
    assert answer.json() == {"predictions": expected}
    assert len(expected) == 5


def test_predictions_without_credentials_get_401_json(stack, served):
    answer = requests.post(stack.url + PREDICT, json=dataframe_split(FIVE_ROWS))
    assert answer.status_code == 401
    assert answer.json()["error_code"] == "UNAUTHENTICATED"
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


def test_predictions_wrong_password_get_401(stack, editor, served):
    answer = requests.post(
        stack.url + PREDICT, auth=(editor[0], "not-it"), json=dataframe_split(FIVE_ROWS)
    )
    assert answer.status_code == 401


def test_predictions_viewer_token_allowed(stack, viewer_token, served):
    answer = requests.post(
        stack.url + PREDICT,
        headers={"Authorization": f"Bearer {viewer_token}"},
        json=dataframe_split(FIVE_ROWS),
    )
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5


def test_invocations_at_root_answers_first_served_model(stack, editor, served):
    at_root = requests.post(
        stack.url + "/invocations", auth=editor, json=dataframe_split(FIVE_ROWS)
    )
    named = requests.post(stack.url + PREDICT, auth=editor, json=dataframe_split(FIVE_ROWS))
    assert at_root.status_code == 200 and at_root.json() == named.json()


def test_ping_and_version_behind_login(stack, editor, served):
    assert requests.get(stack.url + f"/serving/{SERVED_MODEL}/ping").status_code == 401
    assert requests.get(stack.url + f"/serving/{SERVED_MODEL}/ping", auth=editor).ok
    version = requests.get(stack.url + f"/serving/{SERVED_MODEL}/version", auth=editor)
    assert version.status_code == 200 and version.text.strip() == mlflow.__version__


@pytest.mark.parametrize(
    "body, content_type",
    [
        (lambda rows: {"dataframe_records": rows.to_dict(orient="records")}, "application/json"),
        (lambda rows: {"inputs": rows.to_dict(orient="list")}, "application/json"),
        (lambda rows: {"instances": rows.to_dict(orient="records")}, "application/json"),
        (lambda rows: rows.to_csv(index=False), "text/csv"),
    ],
    ids=["dataframe_records", "inputs", "instances", "csv"],
)
def test_predictions_every_input_format_gives_same_answer(
    stack, editor, served, body, content_type
):
    payload = body(FIVE_ROWS)
    data = payload if isinstance(payload, str) else json.dumps(payload)
    answer = requests.post(
        stack.url + PREDICT, auth=editor, data=data, headers={"Content-Type": content_type}
    )
    reference = requests.post(stack.url + PREDICT, auth=editor, json=dataframe_split(FIVE_ROWS))
    assert answer.status_code == 200, answer.text
    assert answer.json() == reference.json()


def test_malformed_body_gets_mlflow_400_passed_through(stack, editor, served):
    answer = requests.post(stack.url + PREDICT, auth=editor, json={"rows": [[1, 2, 3, 4]]})
    assert answer.status_code == 400
    assert answer.json()["error_code"] == "BAD_REQUEST"
    assert "dataframe_split" in answer.json()["message"]


def test_body_over_serving_limit_refused_413_naming_the_limit(stack, editor, served):
    """SERVING_BODY_LIMIT (4m): the scoring process holds a body several times over, so a
    viewer's 32 MB body could make it run out of memory."""
    big = b'{"inputs": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    answer = requests.post(
        stack.url + PREDICT, auth=editor, data=big, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413 and "SERVING_BODY_LIMIT" in answer.json()["message"]
    assert "4m" in answer.json()["message"]


def test_prediction_answers_are_what_nginx_says_never_what_a_model_says(stack, editor, served):
    """A model is code: whatever headers it sends, a browser gets JSON it will not render as a
    page, run or frame, and no cookie (serving-proxy.conf)."""
    answer = requests.post(stack.url + PREDICT, auth=editor, json=dataframe_split(FIVE_ROWS))
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in answer.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    assert "Set-Cookie" not in answer.headers and "uvicorn" not in str(answer.headers)


def test_name_not_served_gets_404_at_once_after_login(stack, editor, served):
    assert requests.post(stack.url + "/serving/no-such-model/invocations").status_code == 401
    started = time.monotonic()
    answer = requests.post(
        stack.url + "/serving/no-such-model/invocations", auth=editor, json={}, timeout=10
    )
    assert answer.status_code == 404 and time.monotonic() - started < 2
    assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert SERVED_MODEL in answer.json()["message"]


def test_listed_model_that_cannot_load_gets_503_at_once_and_log_says_why(stack, editor, served):
    started = time.monotonic()
    answer = requests.post(
        stack.url + f"/serving/{MISSING_MODEL}/invocations", auth=editor, json={}, timeout=10
    )
    assert answer.status_code == 503 and time.monotonic() - started < 2
    assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert f"{MISSING_MODEL}@production: not served" in stack.logs("serving")
    assert "not found" in stack.logs("serving")
    # The container's health says so too (every listed model must answer).
    container = stack.compose("ps", "-q", "serving").split()[0]
    health = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert health != "healthy"


def test_serving_token_is_a_viewer_token_held_only_by_serving(stack, served):
    listing = stack.stackctl("token", "list", "--json")
    tokens = {item["name"]: item for item in json.loads(listing)}
    assert tokens["serving"]["role"] == "viewer"
    serving_environment = stack.compose("exec", "-T", "serving", "env")
    assert "MLFLOW_TRACKING_TOKEN" not in serving_environment
    files = stack.compose("exec", "-T", "serving", "ls", "-R", "/var/lib")
    assert "proxy-secret" not in files and "serving-secret" in files


def test_nginx_keeps_connections_to_the_scorer_alive(stack, editor, served):
    """A new connection per prediction cost a tenth of its time (README, benchmark): after 20
    predictions one after another, nginx still holds connections to the scorer's unix socket,
    fewer than the predictions."""
    session = requests.Session()
    session.auth = editor
    for _ in range(20):
        answer = session.post(stack.url + PREDICT, json=dataframe_split(FIVE_ROWS))
        assert answer.status_code == 200
    # The scorer's end of each connection is counted in the connecting side's namespace:
    # nginx's. Num RefCount Protocol Flags Type St Inode Path; St 03: connected.
    table = stack.compose("exec", "-T", "nginx", "cat", "/proc/net/unix")
    kept = [
        fields for fields in (line.split() for line in table.splitlines()[1:])
        if len(fields) == 8 and fields[7].endswith("/model-0.sock") and fields[5] == "03"
    ]  # fmt: skip
    assert 1 <= len(kept) < 20, table


def test_rollout_moves_to_new_alias_target_without_a_failed_request(stack, editor, served):
    env, name = served["env"], served["name"]
    before = local_predictions(env, f"models:/{name}/{served['better']}")
    after = local_predictions(env, f"models:/{name}/{served['other']}")
    assert before != after, "the two versions must predict differently to tell them apart"
    with client_as(env) as client:
        client.set_registered_model_alias(name, "production", served["other"])

    failures, answers, stop = [], [], threading.Event()

    def predict_continuously():
        session = requests.Session()
        session.auth = editor
        while not stop.is_set():
            try:
                answer = session.post(stack.url + PREDICT, json=dataframe_split(FIVE_ROWS))
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                else:
                    answers.append(answer.json()["predictions"])
            except Exception as error:  # any failure at all is what this test looks for
                failures.append(repr(error))

    clients = [threading.Thread(target=predict_continuously) for _ in range(4)]
    for thread in clients:
        thread.start()
    started = time.monotonic()
    try:
        rollout = subprocess.run(
            [str(ROOT / "scripts" / "stackctl"), "serve", "rollout", name],
            capture_output=True, text=True, timeout=300, env=os.environ,
        )  # fmt: skip
        took = time.monotonic() - started
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert rollout.returncode == 0, rollout.stdout + rollout.stderr
    assert f"version {served['other']} loaded" in rollout.stdout
    print(f"rollout: {took:.1f} s, {len(answers)} predictions during it, none failed")
    assert failures == []
    assert before in answers and answers[-1] == after
    status = stack.compose(
        "exec", "-T", "serving", "python", "/opt/mlflow-stack/serving.py", "status"
    )
    served_versions = {s["model"]: s["version"] for s in json.loads(status.splitlines()[0])}
    assert served_versions[name] == served["other"]


def test_scoring_process_reached_directly_predicts_nothing(stack, served):
    """Another container on the backend network reaches the serving container's address (the
    Docker host has none there), but not the login: the scoring process wants nginx's serving
    secret."""
    body = json.dumps(dataframe_split(FIVE_ROWS)).encode()
    json_type = {"Content-Type": "application/json"}
    answer = stack.backend_request("serving", 5100, "/invocations", "POST", json_type, body)
    assert answer.status_code == 403 and "predictions" not in answer.text
    forged = {**json_type, "X-Serving-Secret": "0" * 64}
    forged = stack.backend_request("serving", 5100, "/invocations", "POST", forged, body)
    assert forged.status_code == 403
    assert stack.backend_request("serving", 5100, "/ping").status_code == 200
