"""The interleaved load scenarios: the path matrix, the wrong-password flood, 16 writers, the
served model.

Contract: every function returns raw ``WrkResult`` lists (one per repetition, in repetition
order; a path measured in fewer repetitions has them first) and leaves the statistics to
``report``. Within a repetition every path of one (call, connections) cell runs back to back in
a shuffled order, so slow phases of a noisy machine hit all paths alike and the per-repetition
ratios stay fair.
"""

import dataclasses
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable

from stackbench.load import KINDS, SERVING_KINDS, Target, WrkResult, finish_wrk, run_wrk, start_wrk

# a: through nginx and the gate; b: the same nginx without auth_request; c: the server's own
# port, keep-alive and one connection per request; d: MLflow's basic-auth server, both ways
# too (its launcher's keep-alive handling is not ours to fix, so it gets the better of both).
STACK_PATHS = ("auth", "noauth", "direct-ka", "direct-close")
BASELINE_PATHS = ("basic-ka", "basic-close")
PATHS = STACK_PATHS + BASELINE_PATHS
# The served model (serve profile): through nginx and the gate; the same nginx without the
# login; the scoring process's own port (with the serving secret nginx would add), keep-alive
# and a connection per request.
SERVING_PATHS = ("serve-auth", "serve-noauth", "serve-direct-ka", "serve-direct-close")

Results = dict[tuple[str, int, str], list[WrkResult]]
SETTLE_STEP = 0.05  # seconds
SETTLE_BUSY_NS = 0.25 * SETTLE_STEP * 1e9  # a quarter of a core over one step


@dataclasses.dataclass
class Bench:
    """What the scenarios need: a target per path and the CPU counter behind each.

    ``*_idle`` are the containers' CPU ns per second at rest (health checks every few
    seconds): ``run`` subtracts them, so CPU per request is what the requests cost.
    """

    targets: dict[str, Target]
    stack_cpu: Callable[[], int | None]
    baseline_cpu: Callable[[], int | None]
    seconds: int
    stack_idle: float = 0.0
    baseline_idle: float = 0.0

    def run(self, path: str, op: str, connections: int, seconds=None, quiet=True) -> WrkResult:
        """One measured run. ``quiet``: start and end at rest, so that requests the previous
        run left in flight (wrk stops without waiting for them) neither slow this run nor
        escape its CPU count. Off when another load runs on purpose (the flood)."""
        baseline = path in BASELINE_PATHS
        counter = self.baseline_cpu if baseline else self.stack_cpu
        if quiet:
            self.settle()
        started, before = time.monotonic(), counter()
        kind = KINDS.get(op) or SERVING_KINDS[op]
        result = run_wrk(self.targets[path], kind, connections, seconds or self.seconds)
        if quiet:
            self.settle()
        after = counter()
        if before is not None and after is not None:
            idle = self.baseline_idle if baseline else self.stack_idle
            elapsed = time.monotonic() - started
            result.cpu_ms = max(0.0, (after - before - idle * elapsed) / 1e6)
        return result

    def _total_cpu(self) -> int | None:
        stack, baseline = self.stack_cpu(), self.baseline_cpu()
        return None if stack is None or baseline is None else stack + baseline

    def settle(self, limit: float = 10.0) -> None:
        """Wait (at most ``limit`` s) until both sides use under a quarter of a core."""
        deadline, last = time.monotonic() + limit, self._total_cpu()
        while last is not None and time.monotonic() < deadline:
            time.sleep(SETTLE_STEP)
            now = self._total_cpu()
            if now is None or now - last < SETTLE_BUSY_NS:
                return
            last = now

    def measure_idle(self, seconds: float = 9.0) -> None:
        """CPU ns per second of both sides at rest, over a few health-check periods."""
        before = (self.stack_cpu(), self.baseline_cpu())
        time.sleep(seconds)
        after = (self.stack_cpu(), self.baseline_cpu())
        if None not in before and None not in after:
            self.stack_idle = (after[0] - before[0]) / seconds
            self.baseline_idle = (after[1] - before[1]) / seconds


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warm_up(bench: Bench, ops: list[str]) -> None:
    """Fill every cache a measurement would otherwise pay for on its first requests.

    The gate and basic-auth each cache a verified password per process, after one slow hash
    per process; concurrent first requests may meanwhile be refused (the gate answers 429
    while its bcrypt slot is taken). Both authenticating paths run every call once, then
    until a 16-connection run is all 2xx (at most 5 tries).
    """
    # The other paths reach the same, now warm, server; basic-auth only when it runs.
    authenticating = [path for path in ("auth", "basic-ka") if path in bench.targets]
    for op in ops:
        for path in authenticating:
            bench.run(path, op, 4, seconds=1)
    for path in authenticating:
        for _ in range(5):
            result = bench.run(path, "experiments-list", 16, seconds=1)
            if result.failures == 0:
                break
            progress(f"warm-up: {path} still refuses ({result.statuses}); again")
            time.sleep(1)


def matrix(
    bench: Bench,
    ops: list[str],
    levels: list[int],
    wide: int | None,
    reps: int,
    wide_reps: int,
    baseline_reps: int,
) -> Results:
    """``reps`` repetitions of every (call, connections) cell, one cell after the other.

    A repetition runs each path once, back to back in a shuffled order; MLflow's basic-auth
    paths only in the first ``baseline_reps`` (they are a third of a repetition's time, and
    their goal is a ratio of 1.3, not of 0.95). ``wide`` connections get ``wide_reps``
    repetitions (reported, not gated). Many short runs rather than a few long ones: on this
    kind of VM a whole run is faster or slower by ~10% at random, whatever its length, so
    precision comes from the number of runs.
    """
    results: Results = defaultdict(list)
    shuffle = random.Random(20260).shuffle
    cells = [(op, conns) for op in ops for conns in levels]
    cells += [(op, wide) for op in ops] if wide and wide_reps else []
    for op, connections in cells:
        started = time.monotonic()
        # Unmeasured: the call just switched, and whichever path came first would otherwise
        # pay for it (e.g. reads after a burst of writes meet a long WAL).
        bench.run("direct-ka", op, connections, seconds=1)
        for rep in range(reps if connections in levels else wide_reps):
            order = list(PATHS if rep < baseline_reps else STACK_PATHS)
            shuffle(order)
            for path in order:
                results[(op, connections, path)].append(bench.run(path, op, connections))
        progress(f"matrix {op}@{connections} done in {time.monotonic() - started:.0f}s")
    return results


def interleaved(
    bench: Bench,
    paths: list[str],
    ops: list[str],
    levels: list[int],
    reps: int,
    seed: int,
    label: str,
) -> Results:
    """``reps`` repetitions per connection level, each running every call on every path, the
    paths in a shuffled order (``seed``): the side-by-side cells of the https and replicas
    sections, where two stacks share the machine's slow and fast phases alike."""
    results: Results = defaultdict(list)
    shuffle = random.Random(seed).shuffle
    for connections in levels:
        started = time.monotonic()
        for _ in range(reps):
            for op in ops:
                order = list(paths)
                shuffle(order)
                for path in order:
                    results[(op, connections, path)].append(bench.run(path, op, connections))
        progress(f"{label} @{connections} done in {time.monotonic() - started:.0f}s")
    return dict(results)


@dataclasses.dataclass
class FloodRound:
    """One repetition at one connection count: the valid user alone and under the flood."""

    alone: WrkResult
    flooded: WrkResult
    flood: WrkResult


def flood(
    bench: Bench, levels: list[int], reps: int, flood_connections: int, wrong: str
) -> dict[int, list[FloodRound]]:
    """The valid user's log-metric throughput with and without a wrong-password flood.

    The flood (``wrong``: an Authorization header with a wrong password for an existing
    user) comes from one client over ``flood_connections`` connections, sends as fast as it
    is answered, and starts before and ends after the valid user's measured window.
    """
    rounds: dict[int, list[FloodRound]] = defaultdict(list)
    target = bench.targets["auth"]
    seconds = max(2, bench.seconds)  # few repetitions here, so each measures a while
    for rep in range(reps):
        for connections in levels:
            flood_first = rep % 2 == 1  # alternate, so drift does not favour either side
            if not flood_first:
                alone = bench.run("auth", "log-metric", connections, seconds)
            bench.settle()
            attacker = start_wrk(target, "list", flood_connections, seconds + 2, wrong)
            time.sleep(1)  # the flood is at full speed before the measured window opens
            flooded = bench.run("auth", "log-metric", connections, seconds, quiet=False)
            attack = finish_wrk(attacker, seconds + 2)
            if flood_first:
                alone = bench.run("auth", "log-metric", connections, seconds)
            rounds[connections].append(FloodRound(alone, flooded, attack))
    return rounds


def flood_statuses(nginx_log: str) -> dict[int, int]:
    """Statuses of the flood's requests as nginx logged them (no user, experiments GET), from
    nginx's JSON access log (nginx/nginx.conf, access_json).

    wrk only counts answers that finish inside its window, and a tarpitted 429 can take
    longer than that; nginx logs every request once it ends, however it ended.
    """
    counts: dict[int, int] = defaultdict(int)
    for line in nginx_log.splitlines():
        # After compose's "nginx-1  | " prefix; nginx's error log lines are not JSON.
        start = line.find("{")
        try:
            record = json.loads(line[start:]) if start >= 0 else None
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if (
            record.get("user") == ""
            and record.get("method") == "GET"
            and record.get("path") == "/api/2.0/mlflow/experiments/search"
        ):
            counts[int(record["status"])] += 1
    return dict(counts)


def writers(bench: Bench, connections: int, seconds: int) -> dict[str, WrkResult]:
    """Concurrent writers into SQLite through the whole stack: single metrics, then batches."""
    return {
        op: bench.run("auth", op, connections, seconds) for op in ("log-metric", "log-batch-100")
    }


def serving(bench: Bench, op: str, levels: list[int], reps: int) -> Results:
    """The served model's cell, as ``matrix`` runs a call: for each connection count, ``reps``
    repetitions of every serving path back to back in a shuffled order, after one unmeasured
    run of each path (the scoring process's first requests, the gate's verdict cache)."""
    results: Results = defaultdict(list)
    shuffle = random.Random(20261).shuffle
    for path in SERVING_PATHS:
        bench.run(path, op, max(levels), seconds=1)
    for connections in levels:
        started = time.monotonic()
        for _ in range(reps):
            order = list(SERVING_PATHS)
            shuffle(order)
            for path in order:
                results[(op, connections, path)].append(bench.run(path, op, connections))
        progress(f"serving {op}@{connections} done in {time.monotonic() - started:.0f}s")
    return results
