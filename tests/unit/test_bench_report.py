"""bench/stackbench: how the benchmark turns runs into cells, ratios and GOAL lines."""

from stackbench.load import WrkResult
from stackbench.measure import flood_statuses
from stackbench.report import Report


def _run(rate: float, p50: float = 10.0) -> WrkResult:
    return WrkResult(
        seconds=1.0, statuses={200: int(rate)}, socket_errors=0, p50_ms=p50, p99_ms=p50
    )


def _report(auth, noauth, direct_ka, direct_close, basic_ka, basic_close) -> Report:
    report = Report(["log-metric"], [1], len(auth), quick=False, baseline_reps=len(basic_ka))
    paths = {
        "auth": auth,
        "noauth": noauth,
        "direct-ka": direct_ka,
        "direct-close": direct_close,
        "basic-ka": basic_ka,
        "basic-close": basic_close,
    }
    for path, rates in paths.items():
        report.matrix[("log-metric", 1, path)] = [_run(rate) for rate in rates]
    return report


def _goal(report: Report, name: str):
    report.render()
    return next(goal for goal in report.goals if goal.name == name)


def test_better_mode_close_has_higher_median_picks_close_for_every_repetition():
    report = _report([100] * 3, [100] * 3, [90, 200, 90], [95, 95, 95], [10] * 3, [10] * 3)
    mode, runs = report.better_mode("log-metric", 1, "direct")
    assert mode == "close"
    assert [r.rate for r in runs] == [95, 95, 95]


def test_cell_one_lucky_keepalive_run_does_not_lower_the_ratio():
    # Per repetition, the better of the two would take the 200 and pull the median down.
    report = _report([100] * 3, [100] * 3, [90, 200, 90], [80, 80, 80], [10] * 3, [10] * 3)
    assert report.cell("log-metric", 1)["vs_direct"] == 100 / 90


def test_cell_fewer_baseline_repetitions_pairs_each_with_its_own_repetition():
    report = _report([100, 100, 50, 50], [100] * 4, [100] * 4, [1] * 4, [50, 25], [1, 1])
    cell = report.cell("log-metric", 1)
    assert cell["vs_basic"] == 3.0  # median of 100/50 and 100/25, not of the later runs
    assert cell["reps"]["basic"] == 2


def test_render_one_cell_under_the_limit_fails_the_goal():
    report = _report([90] * 3, [100] * 3, [90] * 3, [1] * 3, [10] * 3, [10] * 3)
    goal = _goal(report, "auth-vs-nginx-without-auth")
    assert not goal.ok
    assert goal.measured.startswith("0.900")


def test_render_every_cell_at_the_limit_passes_the_goal():
    report = _report([95] * 3, [100] * 3, [100] * 3, [1] * 3, [10] * 3, [10] * 3)
    assert _goal(report, "auth-vs-nginx-without-auth").ok
    assert _goal(report, "auth-vs-mlflow-basic-auth").ok


def test_render_a_failed_request_fails_the_no_non_2xx_goal():
    report = _report([100] * 3, [100] * 3, [100] * 3, [1] * 3, [10] * 3, [10] * 3)
    report.matrix[("log-metric", 1, "auth")][1].statuses[502] = 1
    assert not _goal(report, "no-non-2xx-in-matrix").ok


def test_flood_statuses_counts_only_requests_without_a_user():
    def line(user, status):
        return (
            'nginx-1  | {"time":"2026-11-27T09:00:00+00:00","client":"172.18.0.1",'
            f'"user":"{user}","kind":"","method":"GET","path":"/api/2.0/mlflow/experiments/search",'
            f'"status":{status},"bytes_in":90,"bytes_out":40,"duration":0.2,"verdict":"refused"}}'
        )

    log = "\n".join(
        [
            line("", 401),
            line("", 429),
            line("bench", 200),
            "nginx-1  | 2026/11/27 09:00:00 [notice] 1#1: js vm init njs: {not json",
        ]
    )
    assert flood_statuses(log) == {401: 1, 429: 1}


def test_render_fresh_logins_slow_or_refused_fail_fast_pass():
    from stackbench.logins import FreshLogin, variant_header

    report = Report(ops=[], levels=[1], reps=1, quick=True)
    report.fresh_logins = {
        1: [FreshLogin(1, s, 1, True) for s in (0.4, 0.6, 0.5)],
        16: [FreshLogin(16, 0.5, 1, True), FreshLogin(16, 5.0, 3, False)],
    }
    text = report.render()
    assert "GOAL fresh-login-under-1-conn-flood: measured p50 0.50 s" in text
    goals = {g.name: g.ok for g in report.goals}
    assert goals["fresh-login-under-1-conn-flood"] is True
    assert goals["fresh-login-under-16-conn-flood"] is False
    headers = {variant_header("u", "p", v) for v in range(1, 32)}
    assert len(headers) == 31 and all(h.lower().startswith("basic ") for h in headers)


def _serving_report(auth, noauth, direct_ka, direct_close, p50s=None) -> Report:
    """One serving cell at 1 connection; ``p50s`` per path (default 10 ms everywhere)."""
    report = Report(ops=[], levels=[1], reps=len(auth), quick=False)
    p50s = p50s or {}
    paths = {
        "serve-auth": auth,
        "serve-noauth": noauth,
        "serve-direct-ka": direct_ka,
        "serve-direct-close": direct_close,
    }
    for path, rates in paths.items():
        report.serving[("predict-5", 1, path)] = [_run(r, p50s.get(path, 10.0)) for r in rates]
    report.serving_reps = len(auth)
    return report


def test_serving_cell_compares_with_the_better_direct_mode_per_repetition():
    report = _serving_report([90] * 3, [95] * 3, [100, 100, 80], [50] * 3)
    cell = report.serving_cell("predict-5", 1)
    assert cell["mode"] == "ka"
    assert cell["vs_direct"] == 0.9  # median of 90/100, 90/100, 90/80
    assert cell["vs_noauth"] == 90 / 95


def test_render_serving_goals_throughput_and_added_latency():
    slow = _serving_report(
        [85] * 3,
        [100] * 3,
        [100] * 3,
        [1] * 3,
        {"serve-auth": 11.5, "serve-direct-ka": 10.0},
    )
    assert not _goal(slow, "serving-vs-direct").ok
    added = _goal(slow, "serving-added-latency-1-connection")
    assert not added.ok and added.measured.startswith("+1.50 ms")

    fine = _serving_report(
        [92] * 3, [100] * 3, [1] * 3, [100] * 3, {"serve-auth": 10.8, "serve-direct-close": 10.0}
    )
    assert _goal(fine, "serving-vs-direct").ok
    assert _goal(fine, "serving-added-latency-1-connection").ok
    assert _goal(fine, "serving-no-non-2xx").ok
    assert "predict-5" in fine.render() and "serving" in fine.as_json()


def test_render_serving_a_failed_prediction_fails_the_goal():
    report = _serving_report([100] * 3, [100] * 3, [100] * 3, [1] * 3)
    report.serving[("predict-5", 1, "serve-direct-close")][0].statuses[503] = 1
    assert not _goal(report, "serving-no-non-2xx").ok


def test_serving_processes_are_named_by_role_and_summed_in_the_report():
    from stackbench.serving import Start, parse_processes

    out = "\n".join(
        [
            "1\t700\t700\t/sbin/docker-init -- python /opt/mlflow-stack/serving.py run",
            "7\t16000\t16500\tpython /opt/mlflow-stack/serving.py run",
            "41\t260000\t262000\t/usr/local/bin/python /opt/mlflow-stack/serving.py score "
            "/tmp/serving/models/iris-x 3 5",
            "99\t3000\t3000\t/bin/bash /opt/mlflow-stack/serving-health.sh",
        ]
    )
    found = parse_processes(out)
    assert [p.role for p in found] == ["init", "supervisor", "scorer", "health check"]
    assert found[2].rss == 260000 * 1024 and found[2].peak == 262000 * 1024

    report = Report(ops=[], levels=[1], reps=1, quick=True)
    report.serving_processes["loaded, idle"] = found
    report.serving_container["loaded, idle"] = 200 * 2**20
    report.serving_starts = [Start(1.5, 9.0, 20), Start(1.2, 7.0, 15), Start(1.4, 8.0, 18)]
    text = report.render()
    assert "253.9 (255.9)" in text and "15.6 (16.1)" in text and "200.0" in text
    assert "after 8.0 s (median; each: 9.0 7.0 8.0 s)" in text


def test_parse_args_only_and_skip_choose_sections_in_their_order():
    import pytest
    from stackbench.cli import SECTIONS, parse_args

    assert parse_args([]).sections == list(SECTIONS)
    assert parse_args(["--only", "serving"]).sections == ["serving"]
    assert parse_args(["--only", "serving,matrix"]).sections == ["matrix", "serving"]
    assert "serving" not in parse_args(["--skip", "serving"]).sections
    with pytest.raises(SystemExit):
        parse_args(["--only", "servng"])
    with pytest.raises(SystemExit):
        parse_args(["--only", "serving", "--skip", "serving"])


def test_prediction_command_posts_the_body_to_the_path_without_empty_credentials(monkeypatch):
    import json

    from stackbench import load

    monkeypatch.setattr(load, "wrk_binary", lambda: "wrk")
    target = load.Target(18524, "", "", "", True, "/invocations", ("X-Serving-Secret: s",))
    command = load._command(target, "predict", 4, 1)
    assert command[-4:-1] == ["--", "predict", "/invocations"]
    body = json.loads(command[-1])["dataframe_split"]
    assert len(body["data"]) == 5 and body["columns"] == list(load.IRIS_COLUMNS)
    assert not any(arg.startswith("Authorization") for arg in command)
    assert "Connection: close" in command and "X-Serving-Secret: s" in command


def _https_report(auth, noauth) -> Report:
    report = Report(["log-metric"], [1], len(auth), quick=False)
    report.https[("log-metric", 1, "tls-auth")] = [_run(rate) for rate in auth]
    report.https[("log-metric", 1, "tls-noauth")] = [_run(rate) for rate in noauth]
    return report


def test_render_https_cell_per_repetition_ratio_median_decides_goal():
    passing = _https_report([96, 50, 100], [100, 100, 100])  # ratios 0.96, 0.5, 1.0
    assert _goal(passing, "https-auth-vs-nginx-without-auth").ok
    failing = _https_report([90, 94, 100], [100, 100, 100])  # median 0.94
    goal = _goal(failing, "https-auth-vs-nginx-without-auth")
    assert not goal.ok and "0.940" in goal.measured


def test_https_command_speaks_tls_to_the_port(monkeypatch):
    from stackbench import load

    monkeypatch.setattr(load, "wrk_binary", lambda: "wrk")
    target = load.Target(18525, "Basic x", "1", "r", scheme="https")
    assert "https://127.0.0.1:18525" in load._command(target, "list", 1, 1)


def _replicas_report(one, three, failed=0) -> Report:
    report = Report(["log-metric"], [1], len(one), quick=False)
    report.replicas[("log-metric", 4, "replicas-1")] = [_run(rate) for rate in one]
    runs = [_run(rate) for rate in three]
    runs[0].statuses[502] = failed
    report.replicas[("log-metric", 4, "replicas-3")] = runs
    return report


def test_render_replicas_reports_the_ratio_and_fails_only_on_errors():
    slower = _replicas_report([100, 100, 100], [80, 90, 95])  # reported, not a goal
    goal = _goal(slower, "replicas-no-errors")
    assert goal.ok and "0.900" in goal.measured
    assert any("3 replicas" in line for line in slower.render().splitlines())
    failing = _replicas_report([100, 100, 100], [100, 100, 100], failed=1)
    assert not _goal(failing, "replicas-no-errors").ok


def test_replica_stacks_are_projects_of_their_own_on_postgres_with_free_ports(monkeypatch):
    from stackbench import replicas

    monkeypatch.setenv("BENCH_PORT_BASE", "20000")  # the main stack's: never reused here
    stacks = replicas._stacks("mlflowstack-bench")
    assert {s.project for s in stacks.values()} == {"mlflowstack-bench-r1", "mlflowstack-bench-r3"}
    for count, stack in stacks.items():
        assert stack.env["COMPOSE_PROFILES"] == "postgres"
        assert stack.env["SERVER_REPLICAS"] == str(count)
        assert stack.env["COMPOSE_PROJECT_NAME"] == stack.project
        assert stack.ports.edge != 20000
        # Replicas cannot share a published port: the bench file's direct port stays out.
        assert [path.name for path in stack.files] == ["compose.yaml"]
