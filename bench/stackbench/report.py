"""Statistics, the printed table and the GOAL lines.

Contract: ``Report`` collects the raw results of every section; ``render()`` returns the text
to print, ending with one ``GOAL <name>: measured <value> (target <target>) PASS|FAIL`` line
per goal; ``as_json()`` returns the numbers for bench-results/. A ratio is the median of the
per-repetition ratios (both sides of a repetition ran back to back), not a ratio of medians.
"direct" and "basic-auth" take the better of keep-alive and one connection per request, chosen
per cell by median rate; basic-auth runs in fewer repetitions, each paired with the
authenticated run of its own repetition. A ratio goal is judged on its worst gated cell (every
call at 1 and 4 connections), so one slow call cannot hide behind fast ones; the GOAL line also
shows the median of all gated cells' per-repetition ratios pooled, less sensitive to noise.
"""

import dataclasses
import statistics

from stackbench.load import PREDICTION_ROWS, WrkResult
from stackbench.logins import MAX_TRIES, FreshLogin, summarize
from stackbench.measure import PATHS, SERVING_PATHS, STACK_PATHS, FloodRound, Results
from stackbench.serving import Process, Start
from stackbench.transfer import ArtifactResult

MiB = 2**20
RATIO_GOALS = (  # (cell key, goal name, lowest passing value)
    ("vs_noauth", "auth-vs-nginx-without-auth", 0.95),
    ("vs_direct", "auth-vs-direct-server", 0.90),
    ("vs_basic", "auth-vs-mlflow-basic-auth", 1.30),
)
RATIO_BASES = {"vs_noauth": "noauth", "vs_direct": "direct", "vs_basic": "basic"}
MAX_ADDED_MS = 1.0
MIN_KEPT_UNDER_FLOOD = 0.80
MAX_FRESH_LOGIN_SECONDS = 2.0
MIN_TRANSFER_RATIO = 0.90
MAX_NGINX_GROWTH = 16 * MiB
MIN_SERVING_RATIO = 0.90  # predictions through nginx + gate vs the scoring process's own port
MAX_SERVING_ADDED_MS = 1.0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: WrkResult, b: WrkResult):
    return a.rate / b.rate if b.rate else None


def _num(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(value) -> str:
    return "?" if value is None else f"{value / MiB:.1f} MiB"


def _runs_json(results: Results) -> dict:
    return {
        f"{op}@{conns}/{path}": [
            {"rate": r.rate, "p50_ms": r.p50_ms, "cpu_ms": r.cpu_ms, "failures": r.failures}
            for r in runs
        ]
        for (op, conns, path), runs in results.items()
    }


def _table(spec: str, rows: list[list[str]]) -> list[str]:
    """Rows under a header. ``spec`` is "name:width ..." ("_" in a name prints as a space);
    the first column is left-aligned, the others right-aligned."""
    pairs = (item.rsplit(":", 1) for item in spec.split())
    columns = [(name.replace("_", " "), int(width)) for name, width in pairs]

    def line(cells):
        first, *rest = cells
        widths = [width for _, width in columns[1:]]
        return f"{first:<{columns[0][1]}}" + "".join(
            f"{cell:>{width}}" for cell, width in zip(rest, widths, strict=True)
        )

    return [line([name for name, _ in columns]), *(line(row) for row in rows)]


@dataclasses.dataclass
class Goal:
    name: str
    measured: str
    target: str
    ok: bool

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return f"GOAL {self.name}: measured {self.measured} (target {self.target}) {verdict}"


@dataclasses.dataclass
class Report:
    ops: list[str]
    levels: list[int]  # gated connection counts
    reps: int
    quick: bool
    baseline_reps: int = 0
    flood_reps: int = 0
    settings: str = ""
    matrix: Results = dataclasses.field(default_factory=dict)
    flood: dict[int, list[FloodRound]] = dataclasses.field(default_factory=dict)
    flood_log: dict[int, int] = dataclasses.field(default_factory=dict)  # status -> count
    fresh_logins: dict[int, list[FreshLogin]] = dataclasses.field(default_factory=dict)
    writers: dict[str, WrkResult] = dataclasses.field(default_factory=dict)
    writer_connections: int = 16
    locked_lines: int | None = None
    artifacts: ArtifactResult | None = None
    idle_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    baseline_memory: int | None = None
    startup: dict[str, float] = dataclasses.field(default_factory=dict)
    serving: Results = dataclasses.field(default_factory=dict)
    serving_reps: int = 0
    serving_starts: list[Start] = dataclasses.field(default_factory=list)
    # When it was read ("loaded, idle", "after the cell") -> the container's processes.
    serving_processes: dict[str, list[Process]] = dataclasses.field(default_factory=dict)
    serving_container: dict[str, int | None] = dataclasses.field(default_factory=dict)
    # The https section (stackbench/https.py): its runs, and how long nginx took to restart.
    https: Results = dataclasses.field(default_factory=dict)
    https_restart: float | None = None
    # The replicas section (stackbench/replicas.py): 1 vs 3 server replicas on PostgreSQL.
    replicas: Results = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    goals: list[Goal] = dataclasses.field(default_factory=list)

    def better_mode(
        self, op: str, conns: int, prefix: str, results: Results | None = None
    ) -> tuple[str, list[WrkResult]]:
        """``prefix``'s better connection mode in this cell ("ka" or "close"), by median
        rate, and its runs (of the matrix unless ``results`` says otherwise). Chosen once per
        cell, not per repetition: the better of two noisy numbers is biased upwards, and a run
        does not change how the server handles connections."""
        found = self.matrix if results is None else results
        runs = {kind: found[(op, conns, f"{prefix}-{kind}")] for kind in ("ka", "close")}
        rates = {kind: median(r.rate for r in found) or 0.0 for kind, found in runs.items()}
        mode = "close" if rates["close"] > rates["ka"] else "ka"
        return mode, runs[mode]

    def _paths(self, op: str, conns: int) -> dict[str, list[WrkResult]]:
        """The runs each comparison uses in one cell: auth, noauth, and the better modes."""
        return {
            "auth": self.matrix[(op, conns, "auth")],
            "noauth": self.matrix[(op, conns, "noauth")],
            "direct": self.better_mode(op, conns, "direct")[1],
            "basic": self.better_mode(op, conns, "basic")[1],
        }

    @staticmethod
    def _ratios(paths: dict[str, list[WrkResult]], other: str) -> list[float | None]:
        """Per-repetition auth/``other`` ratios; zip pairs each run of a path measured in
        fewer repetitions with the authenticated run of its own repetition."""
        return [_ratio(a, b) for a, b in zip(paths["auth"], paths[other], strict=False)]

    def cell(self, op: str, conns: int) -> dict:
        """Medians of one (call, connections) cell: per path, and per-repetition ratios."""
        paths = self._paths(op, conns)
        auth, noauth = paths["auth"], paths["noauth"]
        return {
            "rate": {name: median(r.rate for r in runs) for name, runs in paths.items()},
            "cpu": {name: median(r.cpu_per_request for r in runs) for name, runs in paths.items()},
            "p50": {name: median(r.p50_ms for r in runs) for name, runs in paths.items()},
            "mode": {p: self.better_mode(op, conns, p)[0] for p in ("direct", "basic")},
            **{key: median(self._ratios(paths, other)) for key, other in RATIO_BASES.items()},
            "added_ms": median(a.p50_ms - b.p50_ms for a, b in zip(auth, noauth, strict=False)),
            "reps": {name: len(runs) for name, runs in paths.items()},
        }

    def _pooled(self, key: str) -> list[float | None]:
        """Every per-repetition ratio ``key`` of the gated cells."""
        ratios = []
        for op, conns in self.cells():
            if conns in self.levels:
                ratios += self._ratios(self._paths(op, conns), RATIO_BASES[key])
        return ratios

    def cells(self) -> list[tuple[str, int]]:
        keys = {(op, conns) for op, conns, _ in self.matrix}
        return sorted(keys, key=lambda key: (self.ops.index(key[0]), key[1]))

    def failures(self, paths=STACK_PATHS) -> int:
        runs = (
            r for (_, _, path), results in self.matrix.items() if path in paths for r in results
        )
        return sum(r.failures for r in runs)

    # -- rendering -----------------------------------------------------------------------

    def render(self) -> str:
        self.goals = []
        fewer = [f"{self.baseline_reps} for MLflow basic-auth"] if self.baseline_reps else []
        fewer += [f"{self.flood_reps} of the flood"] if self.flood_reps else []
        title = f"MLflow stack benchmark: {self.reps} interleaved repetitions" + (
            f" ({', '.join(fewer)}), medians" if fewer else ", medians"
        )
        lines = [title + ("  (QUICK smoke run: not a measurement)" if self.quick else "")]
        if self.settings:
            lines.append(f"settings: {self.settings}")
        for present, section in (
            (self.matrix, self._render_matrix),
            (self.flood, self._render_flood),
            (self.fresh_logins, self._render_fresh_logins),
            (self.writers, self._render_writers),
            (self.artifacts, self._render_artifacts),
            (self.serving or self.serving_starts, self._render_serving),
            (self.https, self._render_https),
            (self.replicas, self._render_replicas),
        ):
            if present:
                lines += ["", *section()]
        lines += ["", *self._render_footprint(), ""]
        return "\n".join([*lines, *(goal.line() for goal in self.goals)])

    def _render_matrix(self) -> list[str]:
        rates, costs = [], []
        worst: dict[str, tuple[float, str]] = {}
        for op, conns in self.cells():
            c = self.cell(op, conns)
            rate, cpu, p50, mode = c["rate"], c["cpu"], c["p50"], c["mode"]
            rates.append(
                [
                    op,
                    str(conns),
                    _num(rate["auth"]),
                    _num(rate["noauth"]),
                    f"{_num(rate['direct'])} {mode['direct']:>5}",
                    f"{_num(rate['basic'])} {mode['basic']:>5}",
                    _num(c["vs_noauth"], ".3f"),
                    _num(c["vs_direct"], ".3f"),
                    _num(c["vs_basic"], ".2f"),
                ]
            )
            costs.append(
                [
                    op,
                    str(conns),
                    *(_num(cpu[p], ".2f") for p in ("auth", "noauth", "direct", "basic")),
                    *(_num(p50[p], ".2f") for p in ("auth", "noauth", "direct", "basic")),
                    _num(c["added_ms"], "+.2f"),
                ]
            )
            if conns not in self.levels:
                continue  # reported, not gated
            for key, _, _ in RATIO_GOALS:
                if c[key] is not None and (key not in worst or c[key] < worst[key][0]):
                    worst[key] = (c[key], f"{op}@{conns}")
            added = c["added_ms"]
            if conns == 1 and added is not None and added > worst.get("added", (-1e9,))[0]:
                worst["added"] = (added, op)
        for key, name, limit in RATIO_GOALS:
            value, where = worst.get(key, (None, "-"))
            pooled = _num(median(self._pooled(key)), ".3f")
            measured = f"{_num(value, '.3f')} (worst cell {where}; all cells pooled {pooled})"
            self.goals.append(Goal(name, measured, f">= {limit:.2f}", (value or 0) >= limit))
        value, where = worst.get("added", (None, "-"))
        self.goals.append(
            Goal(
                "added-latency-1-connection",
                f"{_num(value, '+.2f')} ms p50 (worst: {where})",
                f"<= {MAX_ADDED_MS:.2f} ms",
                value is not None and value <= MAX_ADDED_MS,
            )
        )
        failures = self.failures()
        self.goals.append(
            Goal(
                "no-non-2xx-in-matrix",
                f"{failures} non-2xx or socket errors (auth, no-auth, direct)",
                "0",
                failures == 0,
            )
        )
        throughput = _table(
            "call:17 conn:5 auth:9 no-auth:9 direct:13 basic:13 auth/noauth:13 auth/direct:13 "
            "auth/basic:12",
            rates,
        )
        cpu_latency = _table(
            "call:17 conn:5 cpu:auth:9 no-auth:8 direct:8 basic:8 p50:auth:9 no-auth:8 direct:8 "
            "basic:8 +auth:8",
            costs,
        )
        errors = [f"  {path:<14}{self.failures((path,)):>8}" for path in PATHS]
        return [
            "Throughput, req/s of 2xx answers. direct/basic: the better (by median) of",
            "keep-alive ('ka') and a connection per request ('close'), chosen per cell",
            *throughput,
            "",
            "CPU ms per request (cgroup counters less idle: nginx+auth+server, or the",
            "basic-auth container) and median latency p50 in ms; +auth = p50 auth - no-auth",
            *cpu_latency,
            "",
            "Non-2xx answers and socket errors in the measured runs, per path",
            *errors,
        ]

    def _render_flood(self) -> list[str]:
        rows, worst = [], None
        for conns, rounds in sorted(self.flood.items()):
            kept = median(_ratio(r.flooded, r.alone) for r in rounds)
            bad = sum(r.alone.failures + r.flooded.failures for r in rounds)
            answered = sum(sum(r.flood.statuses.values()) for r in rounds)
            alone, flooded = (
                median(getattr(r, k).rate for r in rounds) for k in ("alone", "flooded")
            )
            row = [_num(alone), _num(flooded), _num(kept, ".1%"), str(answered), str(bad)]
            rows.append([str(conns), *row])
            if kept is not None and (worst is None or kept < worst[0]):
                worst = (kept, conns, bad)
        # 499: wrk closed the connection at its end, mid-tarpit.
        logged = {401: 0, 429: 0, **self.flood_log}
        counts = ", ".join(f"{n}x{status}" for status, n in sorted(logged.items()))
        if worst:
            kept, conns, bad = worst
            measured = f"{kept:.1%} kept (worst at {conns} conn); flood got {counts}"
            ok = kept >= MIN_KEPT_UNDER_FLOOD and bad == 0
            self.goals.append(Goal("valid-user-under-password-flood", measured, ">= 80%", ok))
        return [
            "Wrong-password flood from one client vs a valid user's log-metric, req/s",
            *_table("conn:5 alone:9 flooded:9 kept:8 flood_answered:16 valid_non-2xx:15", rows),
            f"the flood's requests as nginx logged them: {counts}",
            "('answered': within wrk's window; a tarpitted 429 may finish after it)",
        ]

    def _render_fresh_logins(self) -> list[str]:
        rows = []
        for conns, logins in sorted(self.fresh_logins.items()):
            p50, refused = summarize(logins)
            tries = max(login.tries for login in logins)
            seconds = " ".join(f"{login.seconds:.2f}" for login in logins)
            rows.append([str(conns), _num(p50, ".2f"), str(refused), str(tries), seconds])
            ok = p50 is not None and p50 < MAX_FRESH_LOGIN_SECONDS and refused == 0
            measured = f"p50 {_num(p50, '.2f')} s, {refused} refused after {MAX_TRIES} tries"
            target = f"p50 < {MAX_FRESH_LOGIN_SECONDS:g} s, 0 refused"
            self.goals.append(Goal(f"fresh-login-under-{conns}-conn-flood", measured, target, ok))
        return [
            "Fresh logins (one bcrypt check each) from another address during a wrong-password",
            "flood; seconds from first try to success, retries included",
            *_table("flood_conn:10 p50_s:7 refused:8 max_tries:10 each_s:40", rows),
        ]

    def _render_writers(self) -> list[str]:
        rows = [[op, _num(r.rate), str(r.failures)] for op, r in self.writers.items()]
        failures = sum(r.failures for r in self.writers.values())
        locked = "?" if self.locked_lines is None else str(self.locked_lines)
        self.goals.append(
            Goal(
                f"sqlite-{self.writer_connections}-writers",
                f"{failures} non-2xx, {locked} 'database is locked' in the server log",
                "0 and 0",
                failures == 0 and self.locked_lines == 0,
            )
        )
        return [
            f"SQLite under {self.writer_connections} concurrent writer connections (nginx+gate)",
            *_table("call:17 req/s:9 non-2xx:9", rows),
            f"'database is locked' lines in the server log, whole run: {locked}",
        ]

    def _render_artifacts(self) -> list[str]:
        a = self.artifacts
        rows = []
        for direction in ("upload", "download"):
            speeds = {
                path: [
                    t.mib_per_s for t in a.transfers if (t.direction, t.path) == (direction, path)
                ]
                for path in ("proxy", "direct")
            }
            pairs = zip(speeds["proxy"], speeds["direct"], strict=True)
            ratio = median(p / d for p, d in pairs)
            rows.append(
                [
                    direction,
                    *(" ".join(f"{v:.0f}" for v in speeds[p]) for p in speeds),
                    _num(ratio, ".3f"),
                ]
            )
            ok = ratio is not None and ratio >= MIN_TRANSFER_RATIO
            target = f">= {MIN_TRANSFER_RATIO:.2f}"
            self.goals.append(
                Goal(f"artifact-{direction}-proxy-vs-direct", _num(ratio, ".3f"), target, ok)
            )
        growth = None if None in (a.nginx_max, a.nginx_idle) else a.nginx_max - a.nginx_idle
        self.goals.append(
            Goal(
                "nginx-memory-flat-during-transfer",
                f"+{_mib(growth)} (max {_mib(a.nginx_max)})",
                f"<= +{_mib(MAX_NGINX_GROWTH)}",
                growth is not None and growth <= MAX_NGINX_GROWTH,
            )
        )
        size = a.transfers[0].size / MiB
        return [
            f"Artifacts: {size:.0f} MiB with the MLflow client, MiB/s per round (ABBA order)",
            *_table("transfer:10 proxy:20 direct:20 ratio:8", rows),
            f"nginx memory: {_mib(a.nginx_idle)} before, max {_mib(a.nginx_max)} during the "
            "proxied transfers (sampled every 100 ms)",
        ]

    # -- serving -------------------------------------------------------------------------

    def serving_cell(self, op: str, conns: int) -> dict:
        """Medians of one serving cell: per path, auth's per-repetition ratios to no-auth and
        to the better direct mode, and auth's added p50 over each."""
        mode, direct = self.better_mode(op, conns, "serve-direct", self.serving)
        paths = {
            "auth": self.serving[(op, conns, "serve-auth")],
            "noauth": self.serving[(op, conns, "serve-noauth")],
            "direct": direct,
        }

        def per_rep(other, value):
            return median(value(a, b) for a, b in zip(paths["auth"], paths[other], strict=False))

        return {
            "rate": {name: median(r.rate for r in runs) for name, runs in paths.items()},
            "cpu": {name: median(r.cpu_per_request for r in runs) for name, runs in paths.items()},
            "p50": {name: median(r.p50_ms for r in runs) for name, runs in paths.items()},
            "p99": {name: median(r.p99_ms for r in runs) for name, runs in paths.items()},
            "mode": mode,
            "vs_noauth": per_rep("noauth", _ratio),
            "vs_direct": per_rep("direct", _ratio),
            "added_vs_noauth_ms": per_rep("noauth", lambda a, b: a.p50_ms - b.p50_ms),
            "added_ms": per_rep("direct", lambda a, b: a.p50_ms - b.p50_ms),
            "reps": {name: len(runs) for name, runs in paths.items()},
        }

    def serving_cells(self) -> list[tuple[str, int]]:
        return sorted({(op, conns) for op, conns, _ in self.serving}, key=lambda k: k[1])

    def _render_serving(self) -> list[str]:
        out = [
            f"Model serving (serve profile): predictions of {len(PREDICTION_ROWS)} rows "
            f"(dataframe_split JSON), {self.serving_reps} interleaved repetitions, medians",
        ]
        rates, costs, ratios, lowest, added = [], [], [], None, None
        for op, conns in self.serving_cells():
            c = self.serving_cell(op, conns)
            rate, p50, cpu = c["rate"], c["p50"], c["cpu"]
            rates.append(
                [
                    op,
                    str(conns),
                    _num(rate["auth"]),
                    _num(rate["noauth"]),
                    f"{_num(rate['direct'])} {c['mode']:>5}",
                    _num(c["vs_noauth"], ".3f"),
                    _num(c["vs_direct"], ".3f"),
                ]
            )
            costs.append(
                [
                    op,
                    str(conns),
                    *(_num(p50[p], ".2f") for p in ("auth", "noauth", "direct")),
                    _num(c["added_ms"], "+.2f"),
                    _num(c["added_vs_noauth_ms"], "+.2f"),
                    *(_num(cpu[p], ".2f") for p in ("auth", "noauth", "direct")),
                ]
            )
            mode, direct = self.better_mode(op, conns, "serve-direct", self.serving)
            auth = self.serving[(op, conns, "serve-auth")]
            ratios += [_ratio(a, b) for a, b in zip(auth, direct, strict=False)]
            if c["vs_direct"] is not None and (lowest is None or c["vs_direct"] < lowest[0]):
                lowest = (c["vs_direct"], f"{op}@{conns}")
            if conns == 1:
                added = c["added_ms"]
        if rates:
            out += [
                "Throughput, req/s of 2xx answers; direct: the scoring process's own port, the",
                "better (by median) of keep-alive ('ka') and a connection per request ('close')",
                *_table(
                    "call:12 conn:5 auth:9 no-auth:9 direct:13 auth/noauth:13 auth/direct:13", rates
                ),  # fmt: skip
                "",
                "Median latency p50 in ms, added p50 (per-repetition differences), and CPU ms",
                "per request (cgroup counters less idle: nginx+auth+server+serving)",
                *_table(
                    "call:12 conn:5 p50:auth:9 no-auth:8 direct:8 +vs_direct:11 +vs_noauth:11 "
                    "cpu:auth:9 no-auth:8 direct:8",
                    costs,
                ),
                "",
                "Non-2xx answers and socket errors in the measured runs, per path",
                *(f"  {path:<20}{self._serving_failures((path,)):>8}" for path in SERVING_PATHS),
            ]
            value, where = lowest or (None, "-")
            pooled = _num(median(ratios), ".3f")
            self.goals.append(
                Goal(
                    "serving-vs-direct",
                    f"{_num(value, '.3f')} (worst cell {where}; all cells pooled {pooled})",
                    f">= {MIN_SERVING_RATIO:.2f}",
                    (value or 0) >= MIN_SERVING_RATIO,
                )
            )
            self.goals.append(
                Goal(
                    "serving-added-latency-1-connection",
                    f"{_num(added, '+.2f')} ms p50 vs direct",
                    f"<= {MAX_SERVING_ADDED_MS:.2f} ms",
                    added is not None and added <= MAX_SERVING_ADDED_MS,
                )
            )
            failures = self._serving_failures()
            self.goals.append(
                Goal(
                    "serving-no-non-2xx",
                    f"{failures} non-2xx or socket errors (every serving path)",
                    "0",
                    failures == 0,
                )
            )
        if self.serving_processes:
            rows = []
            for when, found in self.serving_processes.items():
                cells = []
                for role in ("scorer", "supervisor", "init"):
                    mine = [p for p in found if p.role == role]
                    rss, peak = sum(p.rss for p in mine), sum(p.peak for p in mine)
                    cells.append(f"{rss / MiB:.1f} ({peak / MiB:.1f})" if mine else "-")
                total = self.serving_container.get(when)
                rows.append([when, *cells, "-" if total is None else f"{total / MiB:.1f}"])
            out += [
                "",
                "Serving container memory, MiB: RSS per process (peak RSS so far); container:",
                "its cgroup's usage less inactive file cache (as docker stats counts it)",
                *_table("when:16 scorer:16 supervisor:14 init:12 container:11", rows),
            ]
        if self.serving_starts:
            each = " ".join(f"{s.first_prediction_seconds:.1f}" for s in self.serving_starts)
            first = median(s.first_prediction_seconds for s in self.serving_starts)
            up = median(s.up_seconds for s in self.serving_starts)
            out += [
                "",
                f"Start of the serve profile (model registered before): `up -d` returned after "
                f"{_num(up)} s;",
                f"first prediction answered through nginx after {_num(first)} s (median; each: "
                f"{each} s)",
            ]
        return out

    def _serving_failures(self, paths=SERVING_PATHS) -> int:
        return sum(
            r.failures for (_, _, path), runs in self.serving.items() if path in paths for r in runs
        )

    def _render_https(self) -> list[str]:
        from stackbench import https

        lines, name, measured, target, ok = https.render(
            self.https, self.reps, self.https_restart
        )  # fmt: skip
        self.goals.append(Goal(name, measured, target, ok))
        return lines

    def _render_replicas(self) -> list[str]:
        from stackbench import replicas

        lines, name, measured, target, ok = replicas.render(self.replicas, self.reps)
        self.goals.append(Goal(name, measured, target, ok))
        return lines

    def _render_footprint(self) -> list[str]:
        out = ["Idle memory (docker stats --no-stream) and start-up"]
        out += [f"  {service:<12}{_mib(size):>12}" for service, size in self.idle_memory.items()]
        if self.idle_memory:
            out.append(f"  {'total':<12}{_mib(sum(self.idle_memory.values())):>12}")
        if self.baseline_memory is not None:
            out.append(f"  MLflow basic-auth server, for comparison: {_mib(self.baseline_memory)}")
        for name, seconds in self.startup.items():
            out.append(f"  start-up, {name}: {seconds:.1f} s from `up -d` to healthy (--wait)")
        if self.seconds:
            out.append(f"  benchmark run time: {self.seconds / 60:.1f} min")
        return out

    def as_json(self) -> dict:
        return {
            "reps": self.reps,
            "baseline_reps": self.baseline_reps,
            "flood_reps": self.flood_reps,
            "quick": self.quick,
            "settings": self.settings,
            "cells": {f"{op}@{conns}": self.cell(op, conns) for op, conns in self.cells()},
            "runs": _runs_json(self.matrix),
            "goals": [dataclasses.asdict(goal) for goal in self.goals],
            "idle_memory": self.idle_memory,
            "baseline_memory": self.baseline_memory,
            "flood_log": self.flood_log,
            "fresh_logins": {
                conns: [dataclasses.asdict(login) for login in rows]
                for conns, rows in self.fresh_logins.items()
            },
            "startup": self.startup,
            "serving": {
                "reps": self.serving_reps,
                "cells": {f"{op}@{c}": self.serving_cell(op, c) for op, c in self.serving_cells()},
                "runs": _runs_json(self.serving),
                "starts": [dataclasses.asdict(start) for start in self.serving_starts],
                "processes": {
                    when: [dataclasses.asdict(p) for p in found]
                    for when, found in self.serving_processes.items()
                },
                "container_memory": self.serving_container,
            },
            "https": {
                "restart_seconds": self.https_restart,
                "runs": _runs_json(self.https),
            },
            "replicas": {"runs": _runs_json(self.replicas)},
            "seconds": self.seconds,
        }
