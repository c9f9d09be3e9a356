import threading
import time

import pytest
from mlflowstack.fairness import FairSlots, RecentFailures, client_key

LONG = 5.0  # a wait that must never run out in these tests (something else ends it first)


def wait_until(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


class Contender:
    """A thread that asks ``slots`` for a slot as ``address`` and records what it got."""

    def __init__(self, slots: FairSlots, address: str, order: list, wait: float = LONG):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(slots, address, order, wait))
        self.thread.start()

    def _run(self, slots, address, order, wait):
        self.result = slots.acquire(address, wait)
        if self.result:
            order.append(address)
            slots.release(address)

    def join(self):
        self.thread.join(LONG)
        assert not self.thread.is_alive()
        return self.result


def test_acquire_free_slot_nobody_waiting_granted_at_once():
    slots = FairSlots(1)
    started = time.monotonic()
    assert slots.acquire("192.0.2.1", LONG)
    assert time.monotonic() - started < 1 and slots.waiting == 0
    slots.release("192.0.2.1")


def test_acquire_clean_address_queued_behind_failing_one_gets_slot_first():
    slots = FairSlots(1)
    slots.failed("203.0.113.66")
    assert slots.acquire("198.51.100.1", 0)
    order = []
    failing = Contender(slots, "203.0.113.66", order)
    wait_until(lambda: slots.waiting == 1)
    clean = Contender(slots, "192.0.2.1", order)
    wait_until(lambda: slots.waiting == 2)
    slots.release("198.51.100.1")
    assert clean.join() and failing.join()
    assert order == ["192.0.2.1", "203.0.113.66"]


def test_acquire_waiters_without_failures_served_in_arrival_order():
    slots = FairSlots(1)
    assert slots.acquire("198.51.100.1", 0)
    order, contenders = [], []
    for n, address in enumerate(["192.0.2.3", "192.0.2.1", "192.0.2.2"], start=1):
        contenders.append(Contender(slots, address, order))
        wait_until(lambda n=n: slots.waiting == n)
    slots.release("198.51.100.1")
    assert all(contender.join() for contender in contenders)
    assert order == ["192.0.2.3", "192.0.2.1", "192.0.2.2"]


def test_acquire_failing_address_with_check_in_flight_busy_at_once():
    slots = FairSlots(2)
    slots.failed("203.0.113.66")
    assert slots.acquire("203.0.113.66", 0)
    started = time.monotonic()
    assert not slots.acquire("203.0.113.66", LONG)  # even with a slot free
    assert time.monotonic() - started < 1
    slots.release("203.0.113.66")
    assert slots.acquire("203.0.113.66", 0)
    slots.release("203.0.113.66")


def test_acquire_failing_address_with_check_waiting_busy_at_once():
    slots = FairSlots(1)
    slots.failed("203.0.113.66")
    assert slots.acquire("198.51.100.1", 0)
    waiter = Contender(slots, "203.0.113.66", [])
    wait_until(lambda: slots.waiting == 1)
    assert not slots.acquire("203.0.113.66", LONG)
    slots.release("198.51.100.1")
    assert waiter.join()


def test_acquire_wait_runs_out_busy_and_slot_still_usable():
    slots = FairSlots(1)
    assert slots.acquire("198.51.100.1", 0)
    assert not slots.acquire("192.0.2.1", 0.05)
    assert slots.waiting == 0
    slots.release("198.51.100.1")
    assert slots.acquire("192.0.2.1", 0)
    slots.release("192.0.2.1")


def test_acquire_queue_full_busy_at_once():
    slots = FairSlots(1, max_waiters=1)
    assert slots.acquire("198.51.100.1", 0)
    waiter = Contender(slots, "192.0.2.1", [])
    wait_until(lambda: slots.waiting == 1)
    assert not slots.acquire("192.0.2.2", LONG)
    slots.release("198.51.100.1")
    assert waiter.join()


def test_acquire_no_waiters_allowed_busy_at_once():
    slots = FairSlots(1, max_waiters=0)
    assert slots.acquire("198.51.100.1", 0)
    assert not slots.acquire("192.0.2.1", LONG)
    slots.release("198.51.100.1")


def test_acquire_queue_full_clean_newcomer_displaces_failing_waiter():
    slots = FairSlots(1, max_waiters=1)
    slots.failed("203.0.113.66")
    assert slots.acquire("198.51.100.1", 0)
    order = []
    failing = Contender(slots, "203.0.113.66", order)
    wait_until(lambda: slots.waiting == 1)
    clean = Contender(slots, "192.0.2.1", order)
    assert failing.join() is False
    wait_until(lambda: slots.waiting == 1)
    slots.release("198.51.100.1")
    assert clean.join() and order == ["192.0.2.1"]


def test_acquire_queue_full_of_one_address_newcomer_displaces_its_newest():
    slots = FairSlots(1, max_waiters=2)
    assert slots.acquire("198.51.100.1", 0)
    order = []
    first = Contender(slots, "203.0.113.66", order)
    wait_until(lambda: slots.waiting == 1)
    second = Contender(slots, "203.0.113.66", order)
    wait_until(lambda: slots.waiting == 2)
    newcomer = Contender(slots, "192.0.2.1", order)
    assert second.join() is False
    wait_until(lambda: slots.waiting == 2)
    slots.release("198.51.100.1")
    assert first.join() and newcomer.join()
    assert order == ["203.0.113.66", "192.0.2.1"]


def test_acquire_failing_newcomer_never_displaces():
    slots = FairSlots(1, max_waiters=1)
    slots.failed("203.0.113.66")
    slots.failed("203.0.113.67")
    assert slots.acquire("198.51.100.1", 0)
    waiter = Contender(slots, "203.0.113.66", [])
    wait_until(lambda: slots.waiting == 1)
    assert not slots.acquire("203.0.113.67", LONG)
    slots.release("198.51.100.1")
    assert waiter.join()


def test_succeeded_clears_failures_of_address():
    slots = FairSlots(2)
    slots.failed("203.0.113.66")
    slots.succeeded("203.0.113.66")
    assert slots.acquire("203.0.113.66", 0) and slots.acquire("203.0.113.66", 0)
    slots.release("203.0.113.66")
    slots.release("203.0.113.66")


def test_release_more_than_acquired_raises():
    slots = FairSlots(1)
    with pytest.raises(ValueError):
        slots.release("192.0.2.1")


def test_acquire_many_threads_never_more_than_slots_at_once():
    slots = FairSlots(2, max_waiters=32)
    lock, running, peak, granted = threading.Lock(), [0], [0], []

    def contend(address):
        if slots.acquire(address, LONG):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.005)
            with lock:
                running[0] -= 1
                granted.append(address)
            slots.release(address)

    threads = [threading.Thread(target=contend, args=(f"192.0.2.{n}",)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert peak[0] <= 2 and len(granted) == 12


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_recent_failures_expire_after_window():
    clock = Clock()
    failures = RecentFailures(window=300, monotonic=clock)
    failures.record("203.0.113.66")
    clock.now += 299
    assert "203.0.113.66" in failures
    clock.now += 1
    assert "203.0.113.66" not in failures and len(failures) == 0


def test_recent_failures_past_limit_oldest_dropped():
    clock = Clock()
    failures = RecentFailures(limit=3, monotonic=clock)
    for n in range(4):
        failures.record(f"203.0.113.{n}")
        clock.now += 1
    failures.record("203.0.113.1")  # failed again: now the newest
    failures.record("203.0.113.9")
    assert len(failures) == 3
    assert [a in failures for a in ("203.0.113.0", "203.0.113.2", "203.0.113.1")] == [
        False,
        False,
        True,
    ]


@pytest.mark.parametrize(
    "address,key",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),
    ],
)
def test_client_key_ipv6_grouped_by_64(address, key):
    assert client_key(address) == key
