"""The few MLflow REST calls the benchmark's set-up needs (standard library only).

Contract: ``call`` sends one JSON request to 127.0.0.1 and returns the decoded answer, or
raises BenchError on any non-2xx; ``seed`` creates an experiment with runs to search and
returns (experiment_id, run_id of the run the loads log to).
"""

import http.client
import json
import time

from stackbench.stack import BenchError

SEEDED_RUNS = 20


def call(port: int, method: str, path: str, authorization: str | None, body=None) -> dict:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except OSError as error:
        raise BenchError(f"{method} {path} on port {port}: {error}") from error
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise BenchError(f"{method} {path} on port {port}: {response.status} {data[:300]!r}")
    return json.loads(data) if data else {}


def wait_ok(port: int, path: str, authorization: str | None, seconds: float = 60) -> None:
    """Poll until ``path`` answers 2xx (a freshly added user needs the gate to see the file)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call(port, "GET", path, authorization)
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def seed(port: int, authorization: str, name: str) -> tuple[str, str]:
    """An experiment of ``SEEDED_RUNS`` runs (params, tags, metrics), as a search would meet."""
    api = "/api/2.0/mlflow"
    experiment = call(port, "POST", f"{api}/experiments/create", authorization, {"name": name})
    experiment_id = experiment["experiment_id"]
    run_id = ""
    now = int(time.time() * 1000)
    for index in range(SEEDED_RUNS):
        body = {"experiment_id": experiment_id, "start_time": now, "run_name": f"run-{index}"}
        run_id = call(port, "POST", f"{api}/runs/create", authorization, body)["run"]["info"][
            "run_id"
        ]
        batch = {
            "run_id": run_id,
            "params": [{"key": f"p{i}", "value": str(i * index)} for i in range(10)],
            "tags": [{"key": "team", "value": "bench"}],
            "metrics": [
                {"key": f"m{i}", "value": i / (index + 1), "timestamp": now, "step": 0}
                for i in range(10)
            ],
        }
        call(port, "POST", f"{api}/runs/log-batch", authorization, batch)
    return experiment_id, run_id
