"""Issue 9: a password flood cannot lock out a fresh login, failures all take the same time,
and slow-header clients cannot exhaust nginx."""

import base64
import concurrent.futures
import resource
import socket
import statistics
import threading
import time

import requests


def _basic_variant(user: str, password: str, variant: int) -> str:
    """The same credentials under a header nobody has sent yet (the scheme's letter case
    varies), so neither nginx nor the gate has it cached: a fresh login, one bcrypt check."""
    scheme = "".join(c.upper() if variant >> i & 1 else c for i, c in enumerate("basic"))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"{scheme} {token}"


def _flood(stack, stop: threading.Event) -> int:
    """Wrong passwords, sequentially, hanging up after the status line (as the pentest did)."""
    sent = 0
    header = "Basic " + base64.b64encode(b"admin:wrong-password").decode()
    request = (
        "GET /api/2.0/mlflow/experiments/search HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: {header}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        stack.raw(request, timeout=5)
        sent += 1
    return sent


def _login_from_inside_nginx(stack, header: str) -> tuple[str, float]:
    """From another address (127.0.0.1 inside nginx's container, not the flood's bridge
    gateway): the status and seconds of one request."""
    out = stack.compose(
        "exec", "-T", "nginx", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
        "-H", "Host: localhost", "-H", f"Authorization: {header}",
        "http://127.0.0.1:8080/api/2.0/mlflow/experiments/search?max_results=1",
    )  # fmt: skip
    status, seconds = out.split()
    return status, float(seconds)


def test_fresh_login_during_password_flood_is_let_in(stack):
    """Not locked out (no 429, no timeout). How fast is the benchmark's question (its "fresh
    logins" cell, measured side by side): a timed assertion here failed on a loaded machine."""
    stack.add_user("fresh-login", "fresh-login-pw")
    stack.wait_for_status(200, ("fresh-login", "fresh-login-pw"))
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(_flood, stack, stop) for _ in range(4)]
        time.sleep(2)
        results = []
        for variant in range(1, 7):
            for _attempt in range(3):
                header = _basic_variant("fresh-login", "fresh-login-pw", variant)
                status, seconds = _login_from_inside_nginx(stack, header)
                if status == "200":
                    break
            results.append((status, seconds))
        stop.set()
        sent = sum(f.result() for f in floods)
    assert sent > 4
    assert all(status == "200" for status, _ in results), results


def _failure_seconds(stack, user: str) -> float:
    start = time.monotonic()
    status = requests.get(
        stack.url + "/api/2.0/mlflow/experiments/search", auth=(user, "not-the-password")
    ).status_code
    assert status == 401
    return time.monotonic() - start


def test_failed_checks_take_the_same_time_for_every_user(stack):
    stack.stackctl(
        "user", "add", "slow-hash", "--cost", "14", "--password-stdin", input="slow-hash-pw\n"
    )
    stack.add_user("fast-hash", "fast-hash-pw")
    try:
        stack.wait_for_status(200, ("fast-hash", "fast-hash-pw"))
        samples = {user: [] for user in ("slow-hash", "fast-hash", "no-such-user")}
        for _ in range(3):
            for user, seconds in samples.items():
                seconds.append(_failure_seconds(stack, user))
        medians = {user: statistics.median(s) for user, s in samples.items()}
        assert max(medians.values()) / min(medians.values()) < 1.25, medians
    finally:
        stack.stackctl("user", "remove", "slow-hash")


def test_slow_header_clients_cannot_lock_out_honest_ones(stack, admin):
    # Straight to nginx's bridge address: thousands of connections through the published
    # port would measure Docker's userland proxy (docker-proxy), not nginx.
    edge = stack.container_ip("nginx")
    # Verified once before: 16 first logins at once would queue for bcrypt (and get 429, which
    # the MLflow client retries), a different question from this one.
    stack.wait_for_status(200, admin)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 20000), hard), hard))
    slow = []
    try:
        for _ in range(5000):
            sock = socket.create_connection((edge, 8080), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            slow.append(sock)
        url = f"http://{edge}:8080/api/2.0/mlflow/experiments/search?max_results=1"

        def honest(_):
            with requests.Session() as session:
                session.headers["Host"] = "localhost"
                return [session.get(url, auth=admin, timeout=10).status_code for _ in range(5)]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = [s for batch in pool.map(honest, range(16)) for s in batch]
        assert statuses == [200] * 80
        # nginx drops each slow header within client_header_timeout (10 s).
        time.sleep(12)
        still_open = 0
        for sock in slow:
            sock.settimeout(0.01)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.recv(1)  # b"" (or a 408) once nginx has closed it
            except TimeoutError:
                still_open += 1
            except OSError:
                pass
        assert still_open < len(slow) // 100, still_open
    finally:
        for sock in slow:
            sock.close()
