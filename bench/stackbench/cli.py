"""scripts/benchmark: build and start the stack under its own project, measure, tear down.

Contract: prints progress on stderr and the report (ending with the GOAL lines) on stdout,
writes the numbers to bench-results/benchmark-<time>.json, and always ends with ``down -v``
(also on Ctrl-C or SIGTERM). Exit status: 0 when the report was produced, whatever the goals
say; 2 when the benchmark itself could not run; 130 when interrupted.
"""

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from stackbench import api, https, logins, measure, replicas, serving
from stackbench.load import KINDS, SERVING_KINDS, Target, basic, wrk_binary
from stackbench.measure import Bench, progress
from stackbench.report import Report
from stackbench.stack import BASELINE, ROOT, SERVING, STACK, BenchError, BenchStack
from stackbench.transfer import artifacts

GATED_CONNECTIONS = [1, 4]
WIDE_CONNECTIONS = 16
# The parts of a run, in their order; --only and --skip choose among them. Start-up and idle
# memory are always measured (the stack has to start anyway).
SECTIONS = ("matrix", "flood", "logins", "writers", "artifacts", "serving", "replicas", "https")
SERVING_STARTS = 3  # starts of the serve profile timed to the first prediction (--quick: 1)
# Settings from the environment that change what is measured; the report names them.
SETTINGS = (
    "SERVER_WORKERS",
    "GATE_WORKERS",
    "GATE_THREADS",
    "GATE_BCRYPT_SLOTS",
    "GATE_FAILURE_PAUSE",
    "AUTH_CACHE_TTL",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/benchmark",
        description="Measure the authenticating proxy against the same nginx without auth, "
        "the bare server and MLflow's own basic-auth server, interleaved, on 127.0.0.1 only; "
        "then a wrong-password flood, SQLite writers, 1 GiB artifacts, predictions of a served "
        "model through the proxy vs its scoring process, the calls over HTTPS (auth vs the same "
        "nginx without auth, both over TLS), the calls with 1 and 3 server replicas on "
        "PostgreSQL, memory and start-up. "
        "Needs Docker with Compose v2 and wrk (apt-get install -y wrk). Prints a table and, "
        "last, one 'GOAL <name>: ... PASS|FAIL' line per goal. Settings such as GATE_WORKERS "
        "are taken from the environment, as compose does.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: 1 repetition of 1 s, 64 MiB artifacts")
    add(
        "--repetitions",
        type=int,
        default=30,
        metavar="N",
        help="interleaved repetitions of each gated measurement (default 30: single runs on a "
        "shared VM vary by ~10%%, and a cell's median needs many to settle within ~3%%)",
    )
    add(
        "--baseline-repetitions",
        type=int,
        default=15,
        metavar="N",
        help="repetitions of MLflow's basic-auth paths, the first N of the above (default 15)",
    )
    add(
        "--flood-repetitions",
        type=int,
        default=5,
        metavar="N",
        help="repetitions of the password flood, 2 s or more each (default 5)",
    )
    add(
        "--duration",
        type=int,
        default=1,
        metavar="SECONDS",
        help="seconds per measured run, whole seconds (default 1)",
    )
    add(
        "--wide-repetitions",
        type=int,
        default=3,
        metavar="N",
        help=f"repetitions at {WIDE_CONNECTIONS} connections, reported but not gated (default 3)",
    )
    add(
        "--flood-connections",
        type=int,
        default=8,
        metavar="N",
        help="connections of the wrong-password flood (default 8)",
    )
    add(
        "--artifact-mib",
        type=int,
        default=1024,
        metavar="MIB",
        help="artifact size for the transfer test (default 1024)",
    )
    add(
        "--compose-file",
        action="append",
        default=[],
        metavar="FILE",
        type=Path,
        help="an extra compose override, to measure other settings (repeatable)",
    )
    add(
        "--only",
        action="append",
        default=[],
        metavar="SECTION",
        help=f"run only these parts (repeatable or comma-separated): {', '.join(SECTIONS)}",
    )
    add(
        "--skip",
        action="append",
        default=[],
        metavar="SECTION",
        help="leave these parts out (repeatable or comma-separated)",
    )
    add("--no-build", action="store_true", help="use the images as they are (default: build)")
    args = parser.parse_args(argv)
    chosen = {}
    for option in ("only", "skip"):
        chosen[option] = {name.strip() for raw in getattr(args, option) for name in raw.split(",")}
        chosen[option].discard("")
        unknown = sorted(chosen[option] - set(SECTIONS))
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    args.sections = [
        name
        for name in SECTIONS
        if (not chosen["only"] or name in chosen["only"]) and name not in chosen["skip"]
    ]
    if not args.sections:
        parser.error("--only/--skip leave nothing to run")
    if args.quick:
        args.repetitions, args.duration, args.wide_repetitions = 1, 1, 1
        args.baseline_repetitions = args.flood_repetitions = 1
        args.artifact_mib = min(args.artifact_mib, 64)
    args.baseline_repetitions = min(args.baseline_repetitions, args.repetitions)
    counts = (args.repetitions, args.baseline_repetitions, args.flood_repetitions)
    if min(*counts, args.duration, args.artifact_mib, args.flood_connections) < 1:
        parser.error("counts and sizes must be at least 1")
    for path in args.compose_file:
        if not path.is_file():
            parser.error(f"--compose-file {path}: no such file")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    started, stamp = time.monotonic(), datetime.now(UTC)
    try:
        wrk_binary()
    except BenchError as error:
        print(f"benchmark: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    serve_model = serving.MODEL if "serving" in args.sections else None
    try:
        stack = BenchStack(tuple(path.resolve() for path in args.compose_file), serve_model)
    except BenchError as error:
        print(f"benchmark: {error}", file=sys.stderr)
        return 2
    report = Report(
        list(KINDS),
        GATED_CONNECTIONS,
        args.repetitions,
        args.quick,
        args.baseline_repetitions if "matrix" in args.sections else 0,
        args.flood_repetitions if "flood" in args.sections else 0,
    )
    report.settings = (
        ", ".join(
            [f"{name}={os.environ[name]}" for name in SETTINGS if name in os.environ]
            + [f"+{path}" for path in args.compose_file]
        )
        or "defaults (compose.yaml)"
    )
    if args.sections != list(SECTIONS):
        report.settings += f"; only {', '.join(args.sections)}"
    try:
        stack.down()  # leftovers of an interrupted earlier run
        run(stack, report, args, since=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
    except BenchError as error:
        print(f"benchmark: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmark: interrupted", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the tear-down short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        progress("tearing down (down -v)")
        stack.down()
    report.seconds = time.monotonic() - started
    text = report.render()
    results = ROOT / "bench-results"
    results.mkdir(exist_ok=True)
    path = results / f"benchmark-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report.as_json(), indent=1) + "\n")
    print(text)
    progress(f"numbers saved to {path.relative_to(ROOT)}")
    return 0


def run(stack: BenchStack, report: Report, args: argparse.Namespace, since: str) -> None:
    wants = set(args.sections)
    baseline = "matrix" in wants  # MLflow's basic-auth server is the matrix's baseline only
    if not args.no_build:
        progress("building images (docker compose build)")
        stack.build(baseline)
    progress("start-up with fresh volumes")
    report.startup["fresh volumes"] = stack.up("nginx")
    time.sleep(5)  # let start-up work (migrations, first health checks) settle before idling
    report.idle_memory = stack.docker_stats(STACK)
    stack.stop()
    progress("start-up with the volumes kept")
    report.startup["restart, volumes kept"] = stack.up("nginx")
    if baseline:
        progress("starting MLflow basic-auth (the baseline) and adding users")
        stack.compose("--profile", "bench", "up", "-d", BASELINE)  # boots while we set up ours
    else:
        progress("adding users")
    bench = prepare(stack, args.duration, baseline)
    progress("warm-up")
    ops = list(KINDS)
    measure.warm_up(bench, ops)
    bench.measure_idle()
    if "matrix" in wants:
        report.baseline_memory = stack.docker_stats((BASELINE,))[BASELINE]
        progress(f"matrix: {args.repetitions} repetitions of {args.duration} s runs")
        wide = WIDE_CONNECTIONS if args.wide_repetitions else None
        report.matrix = measure.matrix(
            bench,
            ops,
            GATED_CONNECTIONS,
            wide,
            args.repetitions,
            args.wide_repetitions,
            args.baseline_repetitions,
        )
    wrong = basic(stack.user, stack.password + "-wrong")
    if "flood" in wants:
        progress(f"wrong-password flood, {args.flood_connections} connections")
        flood_since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        report.flood = measure.flood(
            bench, GATED_CONNECTIONS, args.flood_repetitions, args.flood_connections, wrong
        )
        time.sleep(4)  # the last tarpitted answers end (and are logged)
        report.flood_log = measure.flood_statuses(stack.logs("nginx", flood_since))
    if "logins" in wants:
        progress("fresh logins during a wrong-password flood of 1 and 16 connections")
        count = 3 if args.quick else 7
        report.fresh_logins = logins.fresh_logins(bench, stack, (1, 16), count, wrong)
    if "writers" in wants:
        progress(f"SQLite, {WIDE_CONNECTIONS} writers")
        report.writer_connections = WIDE_CONNECTIONS
        report.writers = measure.writers(bench, WIDE_CONNECTIONS, max(3, 2 * args.duration))
        logs = stack.logs("server", since)
        report.locked_lines = sum("database is locked" in line for line in logs.splitlines())
    if "artifacts" in wants:
        progress(f"artifacts, {args.artifact_mib} MiB each way")
        rounds = 1 if args.quick else 2
        experiment = bench.targets["auth"].experiment_id
        report.artifacts = artifacts(stack, experiment, args.artifact_mib * 2**20, rounds)
    if "serving" in wants:
        serve(stack, bench, report, args)
    if "replicas" in wants:  # two stacks of their own beside this one, which stays idle
        progress(f"replicas: {args.repetitions} repetitions of {args.duration} s runs")
        report.replicas = replicas.measure(
            stack.project, ops, args.repetitions, args.duration, build=not args.no_build
        )
    if "https" in wants:  # last: with TLS on, plain HTTP only redirects
        progress(f"https: {args.repetitions} repetitions of {args.duration} s runs")
        report.https_restart, report.https = https.measure(
            stack, bench, ops, GATED_CONNECTIONS, args.repetitions
        )


def serve(stack: BenchStack, bench: Bench, report: Report, args: argparse.Namespace) -> None:
    """The serving cell, after every other but https (they measure the stack without the serve
    profile): a registered model, the profile's start timed to the first prediction through nginx
    (more than once unless --quick), memory, then predictions on every serving path."""
    auth = basic(stack.user, stack.password)
    progress(f"serving: registering {serving.MODEL} (a decision tree on iris) as the bench user")
    version = serving.register(stack)
    starts = 1 if args.quick else SERVING_STARTS
    for index in range(starts):
        if index:
            serving.remove(stack)
        progress(f"serving: start {index + 1} of {starts}, `up -d` to the first prediction")
        start = serving.start(stack, auth)
        report.serving_starts.append(start)
        progress(f"serving: version {version} answered {start.first_prediction_seconds:.1f} s in")
    time.sleep(5)  # the first predictions' work (and health checks) settle before reading
    when = "loaded, idle"
    report.serving_processes[when] = serving.processes(stack)
    report.serving_container[when] = stack.memory_bytes(SERVING)

    ports = stack.ports

    def target(port, path, authorization="", close=False, headers=()):
        return Target(port, authorization, "", "", close, path, headers)

    secret = (serving.secret_header(stack),)
    targets = {
        "serve-auth": target(ports.edge, serving.EDGE_PATH, auth),
        "serve-noauth": target(ports.noauth, serving.EDGE_PATH),
        "serve-direct-ka": target(ports.serving, serving.DIRECT_PATH, headers=secret),
        "serve-direct-close": target(
            ports.serving, serving.DIRECT_PATH, close=True, headers=secret
        ),
    }
    for name, found in targets.items():  # every path answers before any is measured
        status, answer = serving.predict(found.port, found.path, found.authorization, found.headers)
        if status != 200:
            raise BenchError(f"serving: {name} (port {found.port}) answers {status}: {answer}")
    cell = Bench(
        targets,
        stack_cpu=lambda: stack.cpu_ns((*STACK, SERVING)),
        baseline_cpu=bench.baseline_cpu,
        seconds=args.duration,
    )
    cell.measure_idle()
    progress(f"serving: {args.repetitions} repetitions of {args.duration} s runs")
    (op,) = SERVING_KINDS
    report.serving = measure.serving(cell, op, GATED_CONNECTIONS, args.repetitions)
    report.serving_reps = args.repetitions
    when = "after the cell"
    report.serving_processes[when] = serving.processes(stack)
    report.serving_container[when] = stack.memory_bytes(SERVING)


def prepare(stack: BenchStack, seconds: int, baseline: bool = True) -> Bench:
    """The bench user on both servers (basic-auth's only with ``baseline``), an experiment of
    runs on each, one target per path."""
    ports = stack.ports
    auth = basic(stack.user, stack.password)
    stack.add_user(stack.user, stack.password)
    api.wait_ok(ports.edge, "/api/2.0/mlflow/experiments/search?max_results=1", auth)
    ids = api.seed(ports.edge, auth, "bench")

    def target(port, close=False, on=ids, authorization=auth):
        return Target(port, authorization, on[0], on[1], close)

    internal = "Bearer " + stack.proxy_secret()
    targets = {
        "auth": target(ports.edge),
        "noauth": target(ports.noauth),
        "direct-ka": target(ports.direct, authorization=internal),
        "direct-close": target(ports.direct, close=True, authorization=internal),
    }
    if baseline:
        stack.up(BASELINE, profile="bench")
        admin = basic("admin", stack.basicauth_admin_password)
        body = {"username": stack.user, "password": stack.password}
        api.call(ports.basicauth, "POST", "/api/2.0/mlflow/users/create", admin, body)
        # The bench user creates its own experiment there, so it holds MANAGE on it as an
        # ordinary (non-admin) MLflow user would.
        baseline_ids = api.seed(ports.basicauth, auth, "bench")
        targets["basic-ka"] = target(ports.basicauth, on=baseline_ids)
        targets["basic-close"] = target(ports.basicauth, close=True, on=baseline_ids)
    return Bench(
        targets,
        stack_cpu=lambda: stack.cpu_ns(STACK),
        # 0 without it: settle() waits on the sum of both.
        baseline_cpu=(lambda: stack.cpu_ns((BASELINE,))) if baseline else (lambda: 0),
        seconds=seconds,
    )
