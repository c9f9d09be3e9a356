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
    log = "\n".join(
        [
            '172.18.0.1 - - [27/Nov/2026:09:00:00 +0000] "GET /api/2.0/mlflow/experiments/'
            'search?max_results=1 HTTP/1.1" 401 13 0.2 "wrk"',
            '172.18.0.1 - - [27/Nov/2026:09:00:00 +0000] "GET /api/2.0/mlflow/experiments/'
            'search?max_results=1 HTTP/1.1" 429 40 3.0 "wrk"',
            '172.18.0.1 - bench [27/Nov/2026:09:00:00 +0000] "GET /api/2.0/mlflow/experiments/'
            'search?max_results=1 HTTP/1.1" 200 90 0.01 "wrk"',
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
