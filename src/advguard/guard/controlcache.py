"""A short-lived cache of what every request reads from the guard database: the client's key,
block and incident throttle (one query) and the model's isolation.

Without it each prediction read the database three times (key and block, throttle,
isolation), a third of the guard's CPU per request. An entry is used for at most ``ttl_s``
seconds (``auth.cache_ttl_s``, default 1 s; 0 reads the database on every request) and is
dropped as soon as this process commits any change through its store (a key revoked, a
client blocked, throttled or isolated by the admin API, a stateful detector or the CLI in
this process; :attr:`GuardStore.generation`). A change made by another process (the CLI, a
replica) takes effect within ``ttl_s``. Only the rows are cached, never a verdict: the key's
digest is compared, and a block's or throttle's expiry checked, on every request; a key id
that is not in the database is never cached (a new key works at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from advguard.guard.storage import ClientState, GuardStore, Isolation

__all__ = ["ControlCache"]

T = TypeVar("T")


class _Entries(Generic[T]):
    """``name -> (expires, generation, value)``; at most ``capacity`` (cleared when full)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: dict[str, tuple[float, int, T]] = {}

    def fresh(self, name: str, at: float, generation: int) -> tuple[bool, T | None]:
        hit = self.items.get(name)
        if hit is None or hit[0] <= at or hit[1] != generation:
            return False, None
        return True, hit[2]

    def put(self, name: str, expires: float, generation: int, value: T) -> None:
        if len(self.items) >= self.capacity and name not in self.items:
            self.items.clear()  # bounded: a flood of distinct names only costs re-reads
        self.items[name] = (expires, generation, value)


class ControlCache:
    """Client states and isolations of ``store``, each kept ``ttl_s`` seconds by ``clock``
    (monotonic seconds; injected in tests). Thread-safe: a race at worst reads twice."""

    def __init__(
        self,
        store: GuardStore,
        ttl_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 100_000,
    ) -> None:
        self.store = store
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._clients: _Entries[ClientState] = _Entries(capacity)
        self._isolation: _Entries[Isolation | None] = _Entries(capacity)
        #: Database reads made (misses), for tests and the benchmark's notes.
        self.reads = 0

    def client_is_fresh(self, key_id: str) -> bool:
        """Whether :meth:`client` answers ``key_id`` without reading the database."""
        return self._clients.fresh(key_id, self.clock(), self.store.generation)[0]

    def isolation_is_fresh(self, model: str) -> bool:
        """Whether :meth:`isolation` answers ``model`` without reading the database."""
        return self._isolation.fresh(model, self.clock(), self.store.generation)[0]

    def client(self, key_id: str) -> ClientState | None:
        """The client's key, block and throttle (None: no such key; never cached)."""
        gen = self.store.generation
        at = self.clock()
        ok, state = self._clients.fresh(key_id, at, gen)
        if ok:
            return state
        self.reads += 1
        state = self.store.client_state(key_id)
        if state is not None and self.ttl_s > 0:
            self._clients.put(key_id, at + self.ttl_s, gen, state)
        return state

    def isolation(self, model: str) -> Isolation | None:
        """How ``model`` is isolated by an incident, if it is."""
        gen = self.store.generation
        at = self.clock()
        ok, iso = self._isolation.fresh(model, at, gen)
        if ok:
            return iso
        self.reads += 1
        iso = self.store.isolation(model)
        if self.ttl_s > 0:
            self._isolation.put(model, at + self.ttl_s, gen, iso)
        return iso

    def clear(self) -> None:
        self._clients.items.clear()
        self._isolation.items.clear()
