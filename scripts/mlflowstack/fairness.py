"""Fair turns at the gate's bcrypt slots, so a password flood cannot lock other people out.

The gate runs at most ``slots`` bcrypt checks at once (a flood must never take every core).
Refusing everyone else while the slots are busy let one attacker connection, retaking the
slot a few milliseconds after each 401, keep every new login out. So the slots are shared
out by address instead (:class:`FairSlots`):

- A free slot with nobody waiting is taken at once: no added latency in the normal case.
- An address that failed a check within the last few minutes (:class:`RecentFailures`) gets
  at most one check running or waiting at a time; any further request is refused at once.
- When the slots are busy, a request waits in a queue for up to ``wait`` seconds. A slot
  that frees goes to the longest-waiting address *without* recent failures, and only then to
  the others in arrival order; a waiter whose time runs out is refused.
- The queue holds at most ``max_waiters`` (each parks a server thread; the gate keeps some
  threads for cached logins). When it is full, a newcomer without recent failures takes the
  place of the newest waiter from an address with recent failures, or from an address that
  holds more places in the queue than the newcomer's would; otherwise the newcomer is refused.

So an attacker address hammering wrong passwords, sequentially or over many connections,
delays a valid login from elsewhere by at most the check (and failure pause) it is running.
Addresses are compared by :func:`client_key`: an IPv6 host usually owns a whole /64, so that
is what counts as one address.
"""

import collections
import ipaddress
import threading
import time

MAX_WAITERS = 32
FAILURE_WINDOW = 300.0  # seconds a failed check counts against its address
FAILURE_MEMORY = 10_000  # addresses remembered; the oldest is forgotten first


def client_key(address: str) -> str:
    """The unit fairness is judged by: an IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RecentFailures:
    """Addresses whose last failed check is younger than ``window`` seconds.

    At most ``limit`` addresses are kept, the one that failed longest ago is dropped first.
    Not locked: :class:`FairSlots` uses it under its own lock.
    """

    def __init__(
        self,
        window: float = FAILURE_WINDOW,
        limit: int = FAILURE_MEMORY,
        monotonic=time.monotonic,
    ):
        self._window = window
        self._limit = limit
        self._monotonic = monotonic
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()

    def record(self, address: str) -> None:
        self._last[address] = self._monotonic()
        self._last.move_to_end(address)
        while len(self._last) > self._limit:
            self._last.popitem(last=False)

    def forget(self, address: str) -> None:
        self._last.pop(address, None)

    def __contains__(self, address: str) -> bool:
        last = self._last.get(address)
        if last is None:
            return False
        if self._monotonic() - last >= self._window:
            del self._last[address]
            return False
        return True

    def __len__(self) -> int:
        return len(self._last)


_WAITING, _GRANTED, _REFUSED = "waiting", "granted", "refused"


class _Waiter:
    __slots__ = ("address", "state", "event")

    def __init__(self, address: str):
        self.address = address
        self.state = _WAITING
        self.event = threading.Event()


class FairSlots:
    """``slots`` places for bcrypt checks, handed out by the rules in this module's docstring.

    ``acquire(address, wait)`` returns True with a slot held (give it back with
    ``release(address)``), or False: the caller answers "busy". ``failed(address)`` and
    ``succeeded(address)`` report the outcome of the check made with the slot.
    """

    def __init__(
        self, slots: int = 1, max_waiters: int = 6, failures: RecentFailures | None = None
    ):
        if slots < 1:
            raise ValueError("at least one slot is needed")
        self._slots = slots
        self._free = slots  # invariant: a free slot means nobody waits (release hands over)
        self._max_waiters = max(0, min(max_waiters, MAX_WAITERS))
        self._failures = failures if failures is not None else RecentFailures()
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []  # in arrival order
        self._active: collections.Counter[str] = collections.Counter()  # running or queued

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def acquire(self, address: str, wait: float) -> bool:
        with self._lock:
            suspect = address in self._failures
            if suspect and self._active[address]:
                return False
            if self._free > 0:
                self._free -= 1
                self._active[address] += 1
                return True
            if len(self._queue) >= self._max_waiters:
                victim = None if suspect else self._displaceable(address)
                if victim is None:
                    return False
                self._queue.remove(victim)
                self._drop(victim.address)
                victim.state = _REFUSED
                victim.event.set()
            waiter = _Waiter(address)
            self._queue.append(waiter)
            self._active[address] += 1
        waiter.event.wait(wait)
        with self._lock:
            if waiter.state == _GRANTED:
                return True
            if waiter.state == _WAITING:  # timed out
                self._queue.remove(waiter)
                self._drop(address)
            return False

    def release(self, address: str) -> None:
        with self._lock:
            self._drop(address)
            waiter = self._next()
            if waiter is None:
                if self._free >= self._slots:
                    raise ValueError("slot released more often than acquired")
                self._free += 1
                return
            # Handed over directly, so no newcomer can take the slot in between.
            self._queue.remove(waiter)
            waiter.state = _GRANTED
            waiter.event.set()

    def failed(self, address: str) -> None:
        with self._lock:
            self._failures.record(address)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.forget(address)

    def _drop(self, address: str) -> None:
        self._active[address] -= 1
        if self._active[address] <= 0:
            del self._active[address]

    def _next(self) -> _Waiter | None:
        """The longest-waiting waiter without recent failures, else the longest-waiting one."""
        for waiter in self._queue:
            if waiter.address not in self._failures:
                return waiter
        return self._queue[0] if self._queue else None

    def _displaceable(self, address: str) -> _Waiter | None:
        """The newest waiter a newcomer from ``address`` (no recent failures) may replace."""
        places = collections.Counter(waiter.address for waiter in self._queue)
        for waiter in reversed(self._queue):
            if waiter.address in self._failures or places[waiter.address] > places[address] + 1:
                return waiter
        return None
