"""The replicas section: the stack with the bundled PostgreSQL and SERVER_REPLICAS=1 beside the
same stack with SERVER_REPLICAS=3 (README, "Replicas"), the matrix's calls through nginx + gate
at 4 and 16 connections, interleaved.

Contract: ``measure`` starts two projects of their own (``<project>-r1`` and ``<project>-r3``,
fresh volumes, free ports on 127.0.0.1), both with ``COMPOSE_PROFILES=postgres`` and nothing
else changed, and removes both (``down -v``) on every exit path. Each repetition runs both
stacks back to back in a shuffled order per (call, connections) cell, so a noisy phase of the
machine hits both alike; ``render`` reports req/s per cell and the median of the
per-repetition 3-vs-1 ratios. No goal on the ratio: replicas add processes, not cores, so on a
2-core machine they cannot add throughput; what the section shows is that requests spread over
replicas without errors, and what a bigger machine gains. The one goal: no non-2xx answer.
"""

from stackbench import api
from stackbench.load import Target, basic
from stackbench.measure import Bench, Results, interleaved, progress
from stackbench.stack import ROOT, BenchStack

REPLICAS = (1, 3)
LEVELS = (4, 16)
SERVICES = ("nginx", "auth", "server", "postgres")


def _path(replicas: int) -> str:
    return f"replicas-{replicas}"


def _stacks(project: str) -> dict[int, BenchStack]:
    stacks = {}
    for count in REPLICAS:
        stack = BenchStack(
            project=f"{project}-r{count}",
            settings={"COMPOSE_PROFILES": "postgres", "SERVER_REPLICAS": str(count)},
        )
        # compose.yaml alone: the bench file publishes the server's port, which replicas
        # cannot share, and the edge is all this section measures.
        stack.files = (ROOT / "compose.yaml",)
        stacks[count] = stack
    return stacks


def _down(stack: BenchStack) -> None:
    stack.compose(
        "--profile", "postgres", "--profile", "tools", "down", "-v", "--remove-orphans",
        check=False, timeout=300,
    )  # fmt: skip


def measure(project: str, ops: list[str], reps: int, seconds: int, build: bool) -> Results:
    """Results keyed (call, connections, "replicas-N")."""
    stacks = _stacks(project)
    try:
        targets = {}
        for count, stack in stacks.items():
            _down(stack)  # leftovers of an interrupted run
            if build:  # the images of the main project's build, under this project's names
                progress(f"replicas: building {stack.project} (from the build cache)")
                stack.compose("build")
            progress(f"replicas: starting {stack.project} (postgres, {count} server replicas)")
            stack.up("nginx")
            auth = basic(stack.user, stack.password)
            stack.add_user(stack.user, stack.password)
            api.wait_ok(stack.ports.edge, "/api/2.0/mlflow/experiments/search?max_results=1", auth)
            experiment, run = api.seed(stack.ports.edge, auth, "bench")
            targets[_path(count)] = Target(stack.ports.edge, auth, experiment, run)

        def cpu():
            counts = [stack.cpu_ns(SERVICES) for stack in stacks.values()]
            return None if None in counts else sum(counts)

        cell = Bench(targets, stack_cpu=cpu, baseline_cpu=lambda: 0, seconds=seconds)
        for path in targets:  # every path answers (and each gate's cache is warm) first
            for op in ops:
                cell.run(path, op, max(LEVELS), seconds=1)
        cell.measure_idle()
        return interleaved(cell, list(targets), ops, LEVELS, reps, seed=20263, label="replicas")
    finally:
        for stack in stacks.values():
            _down(stack)


def render(results: Results, reps: int):
    """(lines, goal name, measured text, target text, ok) for report.Report."""
    from stackbench.report import _num, _table, median

    one, three = _path(1), _path(3)
    rows, failures, ratios = [], 0, []
    for op, conns in sorted({(op, conns) for op, conns, _ in results}, key=lambda k: k[::-1]):
        single, spread = results[(op, conns, one)], results[(op, conns, three)]
        failures += sum(r.failures for r in single + spread)
        pairs = zip(spread, single, strict=False)
        ratio = median([a.rate / b.rate if b.rate else None for a, b in pairs])
        ratios.append(ratio)
        rows.append(
            [
                op,
                str(conns),
                _num(median([r.rate for r in single])),
                _num(median([r.rate for r in spread])),
                _num(ratio, ".3f"),
                _num(median([r.p50_ms for r in single]), ".2f"),
                _num(median([r.p50_ms for r in spread]), ".2f"),
            ]
        )
    lines = [
        f"Replicas (COMPOSE_PROFILES=postgres, through nginx + gate): {reps} interleaved "
        "repetitions, medians; req/s of 2xx answers, and p50 latency in ms",
        *_table(
            "call:18 conn:5 1_replica:11 3_replicas:11 3/1:7 p50_1:8 p50_3:8", rows
        ),  # fmt: skip
    ]
    pooled = median([r for r in ratios if r is not None])
    measured = f"{failures} non-2xx or socket errors (3-vs-1 pooled {_num(pooled, '.3f')})"
    return lines, "replicas-no-errors", measured, "0 errors (the ratio is reported)", failures == 0
