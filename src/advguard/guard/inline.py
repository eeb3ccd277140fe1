"""Which small requests run on the event loop: the adaptive inline rule.

A prediction whose body has at most ``edge.inline_max_body_bytes`` bytes can be parsed,
validated, decided and answered on the event loop, without the thread-pool hop (for a small
model the hop costs more than the work: a third of the guard's CPU per request at 32
connections). But the loop serves every connection: while one request's pipeline runs there,
no other request is read or answered. So :class:`InlineGate` keeps, per model, a moving
average of how long its inline runs took (an EWMA on injected clocks), and when it exceeds
``edge.inline_max_ms`` the model's requests take the thread pool. Every ``probe_every``-th
request of a model in the pool runs inline once more (a probe, measured like any inline run);
a probe within the bound brings the model back inline, a slow one doubles the probe interval
(up to ``max_backoff`` x ``probe_every``) so that a model that stays slow blocks the loop
ever more rarely.

A run counts for the CPU time the loop's thread spent on it (``time.thread_time``), or a
quarter (``wall_slack``) of its wall time when that is larger: other processes taking the
CPU (the run waits, descheduled, and so would any other work) do not send a fast model to the
pool, while a long wait on the loop (for a lock, the GIL, a full record queue) still does.

One sample moves the average by at most ``alpha`` x (``clamp`` x the bound): a single pause
(a garbage collection, another thread holding the GIL) does not send a model that averages
half the bound to the pool, while a model that got slow is there within a few requests (from
half the bound: 4 requests at twice the bound or more; a first request over the bound at
once).

The first request of a model runs inline (nothing is known yet); with a slow model that one
request blocks the loop once.

The gate is used from the event loop only; a lock keeps it consistent should another thread
call it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["InlineGate", "InlineState"]


@dataclass
class InlineState:
    """What the gate knows about one model."""

    #: Moving average of the inline pipeline's duration, seconds (None: never measured).
    ewma_s: float | None = None
    #: True: the model's requests take the thread pool (but for probes).
    pooled: bool = False
    #: Requests sent to the pool since the last probe.
    since_probe: int = 0
    #: Probes in a row that were over the bound (the probe interval doubles with each).
    failed_probes: int = 0
    #: Requests run inline and sent to the pool (counters, for tests and the metrics).
    inline: int = 0
    pool: int = 0


class InlineGate:
    """Per-model choice between the event loop and the thread pool (see the module
    docstring). ``max_s`` 0 disables inline runs altogether."""

    def __init__(
        self,
        max_s: float,
        *,
        clock: Callable[[], float],
        cpu_clock: Callable[[], float] | None = None,
        wall_slack: float = 4.0,
        alpha: float = 0.1,
        clamp: float = 2.0,
        probe_every: int = 64,
        max_backoff: int = 16,
        on_switch: Callable[[str, bool], None] | None = None,
        on_new: Callable[[str, InlineState], None] | None = None,
    ) -> None:
        if max_s < 0 or not 0 < alpha <= 1 or clamp < 1 or probe_every < 1 or max_backoff < 1:
            raise ValueError("InlineGate: bad parameters")
        if wall_slack < 1:
            raise ValueError("InlineGate: wall_slack must be at least 1")
        self.max_s = float(max_s)
        self.clock = clock
        self.cpu_clock = clock if cpu_clock is None else cpu_clock
        self.wall_slack = wall_slack
        self.alpha = alpha
        self.clamp = clamp
        self.probe_every = probe_every
        self.max_backoff = max_backoff
        #: Called with (model, inline) when a model moves to the pool (False) or back (True).
        self.on_switch = on_switch
        #: Called with (model, state) when a model is first seen (the metrics' gauge).
        self.on_new = on_new
        self._states: dict[str, InlineState] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_s > 0

    def state(self, model: str) -> InlineState:
        """The state of ``model`` (created on first use)."""
        st = self._states.get(model)
        if st is None:
            with self._lock:
                st = self._states.get(model)
                new = st is None
                if st is None:
                    st = self._states[model] = InlineState()
            if new and self.on_new is not None:
                self.on_new(model, st)
        return st

    def admit(self, model: str) -> bool:
        """Whether the next request of ``model`` runs inline (its duration then goes to
        :meth:`record`): yes unless the model is in the pool, and then one request in
        ``probe_every`` (x the backoff) as a probe."""
        if not self.enabled:
            return False
        st = self.state(model)
        with self._lock:
            if not st.pooled:
                st.inline += 1
                return True
            st.since_probe += 1
            every = self.probe_every * min(1 << st.failed_probes, self.max_backoff)
            if st.since_probe >= every:
                st.since_probe = 0
                st.inline += 1
                return True
            st.pool += 1
            return False

    def start(self) -> tuple[float, float]:
        """The clocks' readings before an inline run (pass them to :meth:`record`)."""
        return self.clock(), self.cpu_clock()

    def sample(self, started: tuple[float, float]) -> float:
        """Seconds an inline run that began at ``started`` counts for: the CPU time of the
        thread that ran it, or its wall time / ``wall_slack`` when that is larger."""
        wall = self.clock() - started[0]
        cpu = self.cpu_clock() - started[1]
        return max(0.0, cpu, wall / self.wall_slack)

    def record(self, model: str, started: tuple[float, float]) -> None:
        """An inline run of ``model`` that began at ``started`` (:meth:`start`) just ended."""
        took = self.sample(started)
        st = self.state(model)
        switched: bool | None = None
        with self._lock:
            if st.pooled:  # a probe: it alone decides
                st.ewma_s = took
                if took <= self.max_s:
                    st.pooled, st.failed_probes, switched = False, 0, True
                else:
                    st.failed_probes = min(st.failed_probes + 1, 30)
            else:
                sample = min(took, self.clamp * self.max_s)
                prev = st.ewma_s
                st.ewma_s = sample if prev is None else prev + self.alpha * (sample - prev)
                if st.ewma_s > self.max_s:
                    st.pooled, st.since_probe, switched = True, 0, False
        if switched is not None and self.on_switch is not None:
            self.on_switch(model, switched)
