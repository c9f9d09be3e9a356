"""Fresh logins during a wrong-password flood (issue 9: a flood must not lock anyone out).

Contract: ``fresh_logins`` runs, for each flood size, a wrong-password flood from this host
(wrk, ``flood_connections`` connections, as fast as it is answered) and meanwhile ``logins``
fresh logins of the valid bench user from another address: curl inside the nginx container,
so the gate sees 127.0.0.1, not the flood's bridge gateway. "Fresh": each login uses a header
neither nginx nor the gate has seen (the scheme's letter case varies), so each costs one
bcrypt check, as a first login, a restart or a new colleague does. A refused try (429) is
retried after its Retry-After second, at most 3 tries. A login's latency is the time from its
first try to its success, retries and waits included.
"""

import base64
import dataclasses
import statistics
import time

from stackbench.load import finish_wrk, start_wrk

MAX_TRIES = 3
URL = "http://127.0.0.1:8080/api/2.0/mlflow/experiments/search?max_results=1"


@dataclasses.dataclass
class FreshLogin:
    flood_connections: int
    seconds: float
    tries: int
    ok: bool


def variant_header(user: str, password: str, variant: int) -> str:
    """Basic credentials under the ``variant``-th spelling of the scheme (1-31)."""
    scheme = "".join(c.upper() if variant >> i & 1 else c for i, c in enumerate("basic"))
    return f"{scheme} {base64.b64encode(f'{user}:{password}'.encode()).decode()}"


def summarize(logins: list[FreshLogin]) -> tuple[float | None, int]:
    """(median latency of the logins that succeeded, number refused after MAX_TRIES)."""
    succeeded = [login.seconds for login in logins if login.ok]
    return (statistics.median(succeeded) if succeeded else None, sum(not x.ok for x in logins))


def _try_once(stack, header: str) -> tuple[int, float]:
    out = stack.compose(
        "exec", "-T", "nginx", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
        "-m", "30", "-H", "Host: localhost", "-H", f"Authorization: {header}", URL,
    )  # fmt: skip
    status, seconds = out.split()
    return int(status), float(seconds)


def fresh_logins(bench, stack, levels, logins: int, wrong: str) -> dict[int, list[FreshLogin]]:
    results: dict[int, list[FreshLogin]] = {}
    target = bench.targets["auth"]
    variant = 0
    for connections in levels:
        bench.settle()
        seconds = 4 + logins * 4
        attacker = start_wrk(target, "list", connections, seconds, wrong)
        time.sleep(1)  # the flood is at full speed first
        rows = []
        for _ in range(logins):
            variant = variant % 31 + 1
            header = variant_header(stack.user, stack.password, variant)
            total, tries, ok = 0.0, 0, False
            while not ok and tries < MAX_TRIES:
                if tries:
                    total += 1.0  # the refusal's Retry-After
                    time.sleep(1.0)
                status, spent = _try_once(stack, header)
                total, tries, ok = total + spent, tries + 1, status == 200
            rows.append(FreshLogin(connections, total, tries, ok))
        finish_wrk(attacker, seconds)
        results[connections] = rows
    return results
