"""Per-key request rate and query budget, enforced with the ``limits`` library.

* **Rate** (``rate`` requests/s, ``burst`` at once): a moving window of ``burst`` requests per
  ``ceil(burst / rate)`` seconds. Like a token bucket it lets ``burst`` requests through at
  once and holds the long-run rate at or below ``rate``; unlike one it refills when the oldest
  request leaves the window rather than continuously (never more permissive).
* **Budget**: ``budget`` input rows per minute/hour/day, counted per row (a batch of 8 costs
  8), also a moving window, so a refused request spends nothing.

Both use ``limits``' moving-window strategy, whose check-and-add is atomic (a lock per key in
memory, a Lua script in Redis): many concurrent clients never get more than the limit, and
guards sharing one Redis (``redis_url``) share one limit exactly. The memory backend is per
process.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute
from limits import RateLimitItemPerSecond as PerSecond
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from advguard.errors import InputError
from advguard.guard.config import LimitsConfig

_PERIODS = {
    "minute": RateLimitItemPerMinute,
    "hour": RateLimitItemPerHour,
    "day": RateLimitItemPerDay,
}


@dataclass(frozen=True)
class LimitResult:
    allowed: bool
    #: "rate" or "budget" when refused.
    which: str | None
    limit: int
    remaining: int
    reset_s: int
    #: The ``RateLimit-Policy`` header value, e.g. ``20;w=2``.
    policy: str

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(max(0, self.reset_s)),
            "RateLimit-Policy": self.policy,
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, self.reset_s))
        return out


class SweptMemoryStorage(MemoryStorage):
    """``limits``' memory storage with one sweeper thread for its whole life.

    The library's storage expires old entries in a ``threading.Timer`` of 10 ms that it starts
    again from every hit once the previous one has ended: a new thread on most requests
    whenever requests are more than 10 ms apart (the largest part of the guard's rate check in
    a profile). Here one daemon thread runs the library's own sweep every ``sweep_s`` seconds
    and ends with the storage. The sweep only frees memory: the moving window reads entry
    times, so limits are exact whenever it runs."""

    def __init__(self, sweep_s: float = 1.0) -> None:
        super().__init__()
        self.sweep_s = sweep_s
        self._stop = threading.Event()
        ref = weakref.ref(self)
        self._sweeper = threading.Thread(
            target=_sweep, args=(ref, self._stop, sweep_s), name="limits-sweep", daemon=True
        )
        self._sweeper.start()
        weakref.finalize(self, self._stop.set)

    def _MemoryStorage__schedule_expiry(self) -> None:
        """Replaces the library's per-hit timer start: the sweeper thread is always there."""

    def sweep(self) -> None:
        """Expire old entries now (the library's own sweep)."""
        self._MemoryStorage__expire_events()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stop.set()


def _sweep(ref: weakref.ref[SweptMemoryStorage], stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        storage = ref()
        if storage is None:
            return
        storage.sweep()
        del storage


def memory_storage() -> MemoryStorage:
    """The guard's in-memory storage: :class:`SweptMemoryStorage`, or the library's own if a
    release renamed the private hooks it overrides."""
    hooks = ("_MemoryStorage__schedule_expiry", "_MemoryStorage__expire_events")
    if all(callable(getattr(MemoryStorage, h, None)) for h in hooks):
        return SweptMemoryStorage()
    return MemoryStorage()


class Limiter:
    """Rate and budget per client id (the public key id, never the key)."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        window = max(1, math.ceil(cfg.burst / cfg.rate))
        self.rate_item: RateLimitItem = PerSecond(cfg.burst, window)
        self.budget_item: RateLimitItem | None = (
            _PERIODS[cfg.budget_period](cfg.budget) if cfg.budget is not None else None
        )
        if cfg.redis_url:
            try:
                self.storage = storage_from_string(cfg.redis_url, key_prefix=cfg.key_prefix)
            except Exception as exc:  # bad scheme, redis package missing
                raise InputError(f"cannot use the rate-limit store: {type(exc).__name__}") from None
            if not self.storage.check() and not cfg.fail_open:
                raise InputError(
                    "the rate-limit Redis does not answer (limits.redis_url); start it, or set "
                    "limits.fail_open: true to serve without limits while it is down"
                )
        else:
            self.storage = memory_storage()
        self.limiter = MovingWindowRateLimiter(self.storage)

    @property
    def shared(self) -> bool:
        return self.cfg.redis_url is not None

    def _result(
        self, item: RateLimitItem, client: str, allowed: bool, which: str | None
    ) -> LimitResult:
        stats = self.limiter.get_window_stats(item, "guard", client)
        reset = math.ceil(stats.reset_time - time.time())
        policy = f"{item.amount};w={item.get_expiry()}"
        return LimitResult(allowed, which, item.amount, stats.remaining, reset, policy)

    def hit_rate(self, client: str, item: RateLimitItem | None = None) -> LimitResult:
        """Take one request of ``client``'s rate (``item``: a per-client override, see
        :meth:`client_item`), or refuse."""
        item = item or self.rate_item
        ok = self.limiter.hit(item, "guard", client)
        return self._result(item, client, ok, None if ok else "rate")

    @staticmethod
    def client_item(rate: float, burst: int) -> RateLimitItem:
        """The rate item of a throttled client (same moving-window shape as the default)."""
        return PerSecond(burst, max(1, math.ceil(burst / rate)))

    def hit_budget(self, client: str, rows: int) -> LimitResult | None:
        """Take ``rows`` input rows of ``client``'s budget, or refuse (nothing is spent then).
        None when there is no budget."""
        if self.budget_item is None:
            return None
        ok = rows <= self.budget_item.amount and self.limiter.hit(
            self.budget_item, "guard", client, cost=rows
        )
        return self._result(self.budget_item, client, ok, None if ok else "budget")

    def reset(self) -> None:
        self.storage.reset()
