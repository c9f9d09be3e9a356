"""The https section: the MLflow calls of the matrix over TLS, through nginx + gate vs the same
nginx without auth over TLS (bench/nginx/bench-noauth-tls.conf: the site's TLS settings and
certificate, the same snippets), so the ratio is the cost of auth when both pay for TLS.

Contract: ``measure`` switches the stack to TLS_MODE=self-signed (the last section: plain HTTP
then redirects), then runs ``reps`` repetitions of both paths in shuffled order per call and
connection count, keep-alive as the MLflow client does; ``render`` gives the table and the
GOAL line (the worst cell's median of per-repetition ratios, target as the plain matrix's).
"""

import tempfile
from pathlib import Path

from stackbench.load import Target
from stackbench.measure import Bench, Results, interleaved, progress
from stackbench.stack import STACK, BenchError, BenchStack

PATHS = ("tls-auth", "tls-noauth")
MIN_RATIO = 0.95  # as the plain matrix's auth vs nginx without auth


def measure(stack: BenchStack, bench: Bench, ops: list[str], levels: list[int], reps: int):
    """(seconds nginx took to come back with TLS, Results)."""
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        progress("https: certificate (stackctl tls self-signed, tls reload), nginx with TLS")
        restart = stack.enable_tls(Path(directory) / "tls")
    plain = bench.targets["auth"]

    def target(port, authorization):
        return Target(
            port, authorization, plain.experiment_id, plain.run_id, scheme="https"
        )  # fmt: skip

    cell = Bench(
        {
            "tls-auth": target(stack.ports.https, plain.authorization),
            "tls-noauth": target(stack.ports.noauth_tls, ""),
        },
        stack_cpu=lambda: stack.cpu_ns(STACK),
        baseline_cpu=lambda: 0,
        seconds=bench.seconds,
    )
    for path in PATHS:  # every path answers (and the gate's cache is warm) before any counts
        for op in ops:
            result = cell.run(path, op, max(levels), seconds=1)
            if not result.ok:
                raise BenchError(f"https: {path} {op}: no 2xx answer ({result.statuses})")
    cell.measure_idle()
    return restart, interleaved(cell, PATHS, ops, levels, reps, seed=20262, label="https")


def ratios(results: Results) -> dict[tuple[str, int], float | None]:
    """Per cell, the median of per-repetition auth/no-auth rate ratios."""
    from stackbench.report import median

    out = {}
    for op, conns in sorted({(op, conns) for op, conns, _ in results}, key=lambda k: k[1]):
        pairs = zip(
            results[(op, conns, "tls-auth")], results[(op, conns, "tls-noauth")], strict=False
        )
        out[(op, conns)] = median([a.rate / b.rate if b.rate else None for a, b in pairs])
    return out


def render(results: Results, reps: int, restart: float | None):
    """(lines, goal name, measured text, target text, ok) for report.Report."""
    from stackbench.report import _num, _table, median

    rows, worst, failures = [], None, 0
    cell_ratios = ratios(results)
    for (op, conns), ratio in cell_ratios.items():
        auth, noauth = results[(op, conns, "tls-auth")], results[(op, conns, "tls-noauth")]
        failures += sum(r.failures for r in auth + noauth)
        rows.append(
            [
                op,
                str(conns),
                _num(median([r.rate for r in auth])),
                _num(median([r.rate for r in noauth])),
                _num(ratio, ".3f"),
                _num(median([r.p50_ms for r in auth]), ".2f"),
                _num(median([r.p50_ms for r in noauth]), ".2f"),
            ]
        )
        if ratio is not None and (worst is None or ratio < worst[0]):
            worst = (ratio, f"{op}@{conns}")
    pooled = median([r for r in cell_ratios.values() if r is not None])
    lines = [
        f"HTTPS (TLS_MODE=self-signed, keep-alive): {reps} interleaved repetitions, medians; "
        f"nginx back with TLS {_num(restart)} s after up",
        "req/s of 2xx answers, and p50 latency in ms",
        *_table(
            "call:18 conn:5 auth:9 no-auth:9 auth/noauth:13 p50_auth:10 p50_no-auth:12", rows
        ),  # fmt: skip
    ]
    measured = (
        f"worst cell {_num(worst and worst[0], '.3f')} ({worst and worst[1]}), "
        f"pooled {_num(pooled, '.3f')}, {failures} non-2xx or socket errors"
    )
    ok = worst is not None and worst[0] >= MIN_RATIO and failures == 0
    return lines, "https-auth-vs-nginx-without-auth", measured, f">= {MIN_RATIO}, no errors", ok
