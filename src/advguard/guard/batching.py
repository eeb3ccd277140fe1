"""Coalescing concurrent work: micro-batching of prediction requests and group commit of
decision records.

**Micro-batching** (opt-in, ``batching: {max_batch: 32, max_wait_ms: 2}``): each request is
authenticated, rate-limited, parsed, validated and charged to its budget on its own, then its
validated batch waits in the :class:`MicroBatcher`. A batch of waiting requests starts when it
holds ``max_batch`` rows (or the next request would not fit) or when the oldest has waited
``max_wait_ms``; one batch runs at a time, so under load the next batch fills while the current
one runs. :func:`process_batch` scores the concatenated inputs with the detectors in one call
and answers every allowed row of every request in one model call (fallback rows in one
fallback call); the decisions, stateful observations, records, metrics and answers stay per
request, and an error in one request's steps is that request's error alone.

**Group commit** (:class:`GroupCommit`, always on): a thread that has a decision record to
write joins the records waiting for the database; one thread writes all waiting records in
one transaction while the others wait for it, and each answer still leaves only after its own
record is committed. Concurrent requests thus share a commit (one fsync with SQLite) instead
of queuing for one each. The records that need not be committed before the answer (those of
allowed, unflagged, unsampled requests kept only because of ``record_all_decisions``, with
``forensics.plain_records: background``) go to a :class:`BackgroundWriter` instead, which
writes them in group commits off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    from advguard.guard.pipeline import DetectorSlot, Guard, Outcome, Pending
    from advguard.guard.rollout import Variant
    from advguard.guard.serving import ServedModel
    from advguard.guard.storage import DecisionRecord, KeyRecord

T = TypeVar("T")


# -- group commit -----------------------------------------------------------------------
@dataclass
class _Slot(Generic[T]):
    item: T
    done: bool = False
    error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Write items with ``write(items)`` (one transaction), several threads' items at once.

    :meth:`add_many` returns when the caller's items are written; a failed group is retried
    item by item, so one bad item fails only its own caller."""

    def __init__(self, write: Callable[[Sequence[T]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._queue: list[_Slot[T]] = []
        self._busy = False
        #: Transactions run so far (groups written, including retries).
        self.commits = 0

    def add(self, item: T) -> None:
        """Write ``item``; raises what writing it raised."""
        (err,) = self.add_many([item])
        if err is not None:
            raise err

    def add_many(self, items: Sequence[T]) -> list[BaseException | None]:
        """Write ``items``; the error of each (None: committed)."""
        if not items:
            return []
        slots = [_Slot(it) for it in items]
        with self._cond:
            self._queue.extend(slots)
            while self._busy and not all(s.done for s in slots):
                self._cond.wait()
            if all(s.done for s in slots):
                return [s.error for s in slots]
            # leader: write everything waiting, our own items included
            self._busy = True
            group, self._queue = self._queue, []
        try:
            self._commit(group)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return [s.error for s in slots]

    def _commit(self, group: list[_Slot[T]]) -> None:
        try:
            self.commits += 1
            self._write([s.item for s in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
            else:  # find the bad item(s): each alone
                for s in group:
                    try:
                        self.commits += 1
                        self._write([s.item])
                    except Exception as one:
                        s.error = one
        for s in group:
            s.done = True


class BackgroundWriter(Generic[T]):
    """Write items with ``write(items)`` from one daemon thread, all the items queued at the
    time in one transaction (group commit off the request path).

    :meth:`put` returns at once unless ``capacity`` items wait (then it blocks until there is
    room: back-pressure, never an unbounded queue). The thread waits ``linger_s`` after the
    first item of a group so that the items of the next few milliseconds share its commit
    (at most one commit per ``linger_s``; a wake-up per request cost more than the write).
    A failed group is retried item by item; an item that still fails goes to
    ``on_error(item, exc)`` (counted and logged by the guard).
    :meth:`flush` waits until everything queued before it is written; :meth:`close` flushes
    and ends the thread."""

    def __init__(
        self,
        write: Callable[[Sequence[T]], None],
        on_error: Callable[[T, BaseException], None],
        *,
        capacity: int = 10_000,
        max_group: int = 1_000,
        idle_s: float = 1.0,
        linger_s: float = 0.005,
    ) -> None:
        self._write = write
        self._on_error = on_error
        self._capacity = capacity
        self._max_group = max_group
        self._cond = threading.Condition()
        self._queue: list[T] = []
        self._queued = 0  # items ever queued
        self._written = 0  # items ever taken off the queue and finished
        self._closed = False
        self._hurry = 0  # callers in flush(): the writer stops lingering
        self._idle_s = idle_s
        self._linger_s = linger_s
        self._running = False  # the thread runs while there is work, ends when idle_s idle
        #: Transactions run so far (groups written, including retries).
        self.commits = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the background writer is closed")
            while len(self._queue) >= self._capacity:
                self._cond.wait()
            self._queue.append(item)
            self._queued += 1
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="decision-writer", daemon=True).start()
            # no wake-up: a running writer looks at the queue every linger_s (a notify per
            # request cost more than the writer's polls, at most 1/linger_s a second)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every item queued so far is written (or failed); False on timeout."""
        with self._cond:
            target = self._queued
            self._hurry += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._written >= target, timeout_s)
            finally:
                self._hurry -= 1

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Refuse new items and wait until the queued ones are written."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._wait_for_work()
                if not self._queue:  # idle or closed: the next put starts a new thread
                    self._running = False
                    return
                # let the records of the next few ms join this commit (not when flushing)
                self._cond.wait_for(
                    lambda: self._closed or self._hurry or len(self._queue) >= self._max_group,
                    self._linger_s,
                )
                group = self._queue[: self._max_group]
                del self._queue[: self._max_group]
                self._cond.notify_all()  # room for waiting producers
            self._commit(group)
            with self._cond:
                self._written += len(group)
                self._cond.notify_all()

    def _wait_for_work(self) -> None:
        """Wait (holding the condition) until an item is queued, the writer is closed or
        flushed, or ``idle_s`` passed: a check every ``linger_s``, since :meth:`put` does not
        notify."""
        deadline = time.monotonic() + self._idle_s
        while not (self._queue or self._closed):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(self._linger_s, left))

    def _commit(self, group: list[T]) -> None:
        try:
            self.commits += 1
            self._write(group)
            return
        except Exception as exc:
            if len(group) == 1:
                self._report(group[0], exc)
                return
        for item in group:  # find the bad item(s): each alone
            try:
                self.commits += 1
                self._write([item])
            except Exception as one:
                self._report(item, one)

    def _report(self, item: T, exc: BaseException) -> None:
        with contextlib.suppress(Exception):  # the writer thread must survive a bad callback
            self._on_error(item, exc)


# -- micro-batching ---------------------------------------------------------------------
def plan(
    arrivals: Sequence[float],
    rows: Sequence[int],
    now: float,
    *,
    max_rows: int,
    max_wait_s: float,
) -> tuple[int, float]:
    """What the batcher does with the waiting requests (their ``arrivals`` times and ``rows``,
    oldest first) at time ``now``: ``(k, 0)`` runs the first ``k`` now, ``(0, s)`` waits up to
    ``s`` seconds for more. A batch runs when it is full (``max_rows`` rows, or the next
    request would not fit) or the oldest request has waited ``max_wait_s``. A request larger
    than ``max_rows`` runs alone."""
    if not arrivals:
        return 0, math.inf
    total = k = 0
    for r in rows:
        if k and total + r > max_rows:
            break
        total += r
        k += 1
    if total >= max_rows or k < len(rows):
        return k, 0.0
    left = arrivals[0] + max_wait_s - now
    return (k, 0.0) if left <= 0 else (0, left)


@dataclass
class _Waiting:
    item: Any
    rows: int
    arrived: float
    future: asyncio.Future[Any]


@dataclass
class BatchResult:
    """One request's result from a batch: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


class MicroBatcher:
    """Collects concurrent requests (on the event loop) and runs them as batches with
    ``run(items) -> [BatchResult]`` in the thread pool, one batch at a time.

    ``clock`` (seconds, monotonic) only decides when a batch is due (see :func:`plan`);
    tests inject their own."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[BatchResult]],
        *,
        max_rows: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._waiting: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        #: Batches run and requests answered so far.
        self.batches = 0
        self.requests = 0

    async def submit(self, item: Any, rows: int) -> Any:
        """Queue ``item`` (``rows`` input rows) and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Waiting(item, rows, self.clock(), fut))
        if self._task is None or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._worker())
        else:
            assert self._wake is not None
            self._wake.set()
        return await fut

    async def _worker(self) -> None:
        """Runs while requests wait; exits when none is left (a new one starts it again)."""
        try:
            while self._waiting:
                k, wait = plan(
                    [w.arrived for w in self._waiting],
                    [w.rows for w in self._waiting],
                    self.clock(),
                    max_rows=self.max_rows,
                    max_wait_s=self.max_wait_s,
                )
                if k == 0:
                    assert self._wake is not None
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                batch, self._waiting = self._waiting[:k], self._waiting[k:]
                await self._dispatch(batch)
        finally:
            self._task = None

    async def _dispatch(self, batch: list[_Waiting]) -> None:
        from starlette.concurrency import run_in_threadpool

        self.batches += 1
        self.requests += len(batch)
        try:
            results = await run_in_threadpool(self.run, [w.item for w in batch])
        except Exception as exc:  # run() keeps errors per request; this is a bug in it
            results = [BatchResult(error=exc)] * len(batch)
        for w, res in zip(batch, results, strict=True):
            if w.future.done():  # the client went away
                continue
            if res.error is not None:
                w.future.set_exception(res.error)
            else:
                w.future.set_result(res.value)


# -- the guard's batch ----------------------------------------------------------------------
@dataclass
class BatchItem:
    """One validated request waiting for the batch (rate and budget already taken)."""

    key: KeyRecord
    model: ServedModel
    x: np.ndarray
    started: float
    extra: dict[str, Any] = field(default_factory=dict)


def process_batch(guard: Guard, items: Sequence[BatchItem]) -> list[BatchResult]:
    """:meth:`Guard.process` for several requests at once (see the module docstring); the
    result of each is its :class:`Outcome` or the exception it raised. Each request is routed
    first (production or canary, a shadow copy: :mod:`advguard.guard.rollout`); the requests
    routed to one model version run as one group, with that version's detectors."""
    rollout = guard.rollout
    routes = [rollout.begin(it.key, it.model) for it in items]
    results = [BatchResult() for _ in items]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(routes):  # one group per served model version
        groups.setdefault(id(r.variant.model), []).append(i)
    for idx in groups.values():
        variant = routes[idx[0]].variant
        group = [items[i] for i in idx]
        for i, res in zip(idx, _process_group(guard, group, variant), strict=True):
            results[i] = res
    for it, route, res in zip(items, routes, results, strict=True):
        rollout.settle(route, it.x, res.error if res.error is not None else res.value)
    return results


def _scores(
    guard: Guard, xs: list[np.ndarray], detectors: Sequence[DetectorSlot]
) -> list[list[np.ndarray] | None]:
    """Each request's detector scores from one call on the concatenated batch (None for
    every request when that call fails: each is then scored alone, inside its own steps)."""
    if not detectors or len(xs) == 1:
        return [None] * len(xs)
    try:
        allscores = guard.score_inputs(np.concatenate(xs), detectors)
    except Exception:
        return [None] * len(xs)
    ends = np.cumsum([len(x) for x in xs])
    starts = ends - np.array([len(x) for x in xs])
    return [[s[a:b] for s in allscores] for a, b in zip(starts, ends, strict=True)]


def _answer(guard: Guard, model: ServedModel, live: list[Pending]) -> list[Any]:
    """Scores of every live request from one model call (and one fallback call); when that
    fails, each request is answered alone so that an error stays with its request."""
    if len(live) > 1:
        try:
            probs = guard.answer(
                model,
                np.concatenate([p.xs for p in live]),
                [a for p in live for a in p.row_actions],
            )
            ends = np.cumsum([len(p.xs) for p in live])
            return np.split(probs, ends[:-1])
        except Exception:
            pass
    out: list[Any] = []
    for p in live:
        try:
            out.append(guard.answer(model, p.xs, p.row_actions))
        except Exception as exc:
            out.append(exc)
    return out


def _process_group(guard: Guard, items: list[BatchItem], variant: Variant) -> list[BatchResult]:
    model, detectors = variant.model, variant.detectors
    decided: list[Pending | BaseException] = []
    xs = [guard.sanitize(it.x, model) for it in items]
    for it, sc in zip(items, _scores(guard, xs, detectors), strict=True):
        try:
            decided.append(
                guard.decide(it.key, model, it.x, it.started, None, detectors, scores=sc)
            )
        except Exception as exc:
            decided.append(exc)
    live = [p for p in decided if not isinstance(p, BaseException) and not p.refused]
    answers = dict(zip(map(id, live), _answer(guard, model, live), strict=True))
    records: list[DecisionRecord] = []
    owners: list[int] = []
    results: list[BatchResult] = []
    for p in decided:
        if isinstance(p, BaseException):
            results.append(BatchResult(error=p))
            continue
        probs = answers.get(id(p))
        if isinstance(probs, BaseException):
            results.append(BatchResult(error=probs))
            continue
        n = len(records)
        try:
            outcome: Outcome = guard.conclude(p, probs, records)
            results.append(BatchResult(value=outcome))
        except Exception as exc:
            results.append(BatchResult(error=exc))
        owners.extend([len(results) - 1] * (len(records) - n))
    # every answer of the batch waits for its own record: one transaction for all of them
    for owner, rec, err in zip(owners, records, guard.recorder.add_many(records), strict=True):
        failed = None
        if err is not None:
            failed = guard.record_failure(err, model, rec.id)  # None: forensics.fail_open
            if failed is not None:
                results[owner] = BatchResult(error=failed)
        guard.count_committed(rec, failed)
    return results
