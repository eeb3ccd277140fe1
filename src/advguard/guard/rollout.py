"""Rollout of model versions behind one guard: a canary next to production, shadow traffic,
per-version metrics, automatic rollback on an SLO breach, and hot swaps.

The guard serves a :class:`ModelSet` (production and an optional canary, each a
:class:`Variant`: a served model with the per-input detectors scoring for it). A request takes
the set current when it enters :meth:`Rollout.process` and keeps it to the end, so a swap
(:meth:`Rollout.swap_model`, :meth:`Rollout.reload_model`, ``POST
/v1/admin/models/{name}/reload``) never touches a request in flight: the set is replaced whole
under a lock and old requests finish on the old models.

Routing: ``weight`` of the requests goes to the canary, drawn per request from a seeded
``random.Random`` (``rollout.seed``; :attr:`Rollout.rng` can be replaced in tests) or, with
``sticky``, from a hash of the API key id, so one client always sees one version. In ``mode:
canary`` the canary answers them; in ``mode: shadow`` production answers every request and the
canary gets a copy off the answer path (a worker thread): its action and labels are compared
with production's (the agreement rate) and nothing it does reaches the client.

Rollback: every canary (and shadow) request lands in a sliding window (the last
``window_requests`` requests, only those of the last ``window_s`` seconds when set; the clock
is :attr:`Rollout.clock`). Once ``min_requests`` are in it, an error rate above
``max_error_rate``, a flag rate above ``max_flag_rate``, or above ``max_flag_ratio`` times
production's own flag rate sets the canary weight to 0, counts
``advguard_guard_rollbacks_total{model,reason}``, logs one line and stores an event in the
``<prefix>rollout_events`` table of the guard database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Table, select

from advguard.errors import AdvguardError, InputError
from advguard.guard.config import RolloutConfig
from advguard.guard.problems import Problem
from advguard.guard.serving import ServedModel, load_served_model
from advguard.guard.storage import (
    DecisionRecord,
    GuardStore,
    KeyRecord,
    StoreCorrupt,
    now,
    rollout_events_table,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from advguard.guard.pipeline import DetectorSlot, Guard, Outcome
    from advguard.guard.telemetry import RequestObs

log = logging.getLogger("advguard.guard")

ROLES = ("production", "canary", "shadow")
#: Problems that mean "the detectors flagged this request" (not an error).
FLAG_SLUGS = ("rejected", "client-blocked")
EVENT_KINDS = ("rollback", "set", "swap", "reset")


@dataclass(frozen=True)
class Variant:
    """One served model version and the per-input detectors that score for it."""

    model: ServedModel
    detectors: tuple[DetectorSlot, ...]


@dataclass(frozen=True)
class ModelSet:
    """What the guard serves at one moment; replaced whole, never changed in place."""

    production: Variant
    canary: Variant | None
    generation: int


@dataclass(frozen=True)
class Route:
    """Where one request goes: the variant that answers it, and whether the canary gets a copy."""

    role: Literal["production", "canary"]
    variant: Variant
    models: ModelSet
    shadow: bool


class Window:
    """The last ``size`` observations ``(t, flagged, error)``, only those younger than
    ``seconds`` (when set) counted."""

    def __init__(self, size: int, seconds: float | None) -> None:
        self.items: deque[tuple[float, bool, bool]] = deque(maxlen=size)
        self.seconds = seconds

    def add(self, t: float, flagged: bool, error: bool) -> None:
        self.items.append((t, flagged, error))

    def rates(self, t: float) -> tuple[int, float, float]:
        """(requests, flag rate, error rate) in the window at time ``t``."""
        if self.seconds is not None:
            while self.items and self.items[0][0] < t - self.seconds:
                self.items.popleft()
        n = len(self.items)
        if n == 0:
            return 0, 0.0, 0.0
        flags = sum(1 for _, f, _ in self.items if f)
        errors = sum(1 for _, _, e in self.items if e)
        return n, flags / n, errors / n

    def clear(self) -> None:
        self.items.clear()


class RolloutEvent(BaseModel):
    """A rollout event as stored (rows read back are validated: the database is untrusted)."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1)
    ts: datetime
    model: str = Field(max_length=100)
    kind: Literal["rollback", "set", "swap", "reset"]
    reason: str = Field(max_length=200)
    production_version: str = Field(max_length=200)
    canary_version: str | None = Field(default=None, max_length=200)
    detail: dict[str, Any]

    def public(self) -> dict[str, Any]:
        out = self.model_dump()
        out["ts"] = self.ts.isoformat()
        return out


class RolloutEvents:
    """The ``<prefix>rollout_events`` table: one of the guard store's tables (created by its
    migrations) when ``prefix`` is the store's; for another prefix it is added to the store's
    metadata (so :meth:`GuardStore.drop_all` drops it too) and created here."""

    def __init__(self, store: GuardStore, prefix: str) -> None:
        self.store = store
        name = f"{prefix}rollout_events"
        md = store.metadata
        table = md.tables.get(name)
        if table is None:
            table = rollout_events_table(prefix, md)
            table.create(store.engine, checkfirst=True)
        self.table: Table = table

    def add(self, **values: Any) -> None:
        values["reason"] = str(values["reason"])[:200]
        with self.store.engine.begin() as conn:
            conn.execute(self.table.insert().values(ts=now(), **values))

    def list(self, model: str | None = None, limit: int = 50) -> list[RolloutEvent]:
        t = self.table
        q = select(t).order_by(t.c.id.desc()).limit(limit)
        if model is not None:
            q = q.where(t.c.model == model)
        with self.store.engine.begin() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            data = dict(r._mapping)
            if isinstance(data["ts"], datetime) and data["ts"].tzinfo is None:
                data["ts"] = data["ts"].replace(tzinfo=now().tzinfo)
            try:
                out.append(RolloutEvent.model_validate(data))
            except ValidationError as e:
                field = ".".join(str(p) for p in e.errors()[0]["loc"])
                raise StoreCorrupt(
                    f"the guard database holds a bad rollout event row (field {field})"
                ) from None
        return out


def _unit_hash(seed: int | None, key_id: str) -> float:
    """A number in [0, 1) fixed by ``seed`` and the key id (sticky routing)."""
    h = hashlib.sha256(f"{seed}:{key_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


class Rollout:
    """Routing, shadowing, rollback and swaps for one :class:`~advguard.guard.pipeline.Guard`.

    Public attributes tests and embedders may replace: ``rng`` (a ``random.Random``) and
    ``clock`` (seconds, monotonic; the rollback window's time).
    """

    def __init__(
        self,
        guard: Guard,
        *,
        canary: ServedModel | None = None,
        canary_detectors: Sequence[DetectorSlot] | None = None,
        build_detectors: Callable[[Any, ServedModel], list[DetectorSlot]] | None = None,
    ) -> None:
        cfg: RolloutConfig = guard.cfg.rollout
        #: Loads ``cfg.detectors`` for a model (the pipeline's ``build_detectors``).
        self.build_detectors = build_detectors or (lambda _cfg, _model: [])
        self.guard = guard
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.clock: Callable[[], float] = time.monotonic
        self.weight = cfg.weight
        self.mode: Literal["canary", "shadow"] = cfg.mode
        self.sticky = cfg.sticky
        self.rolled_back: str | None = None
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        prod = Variant(guard.model, tuple(guard.detectors))
        self._set = ModelSet(prod, None, 1)
        self._history: deque[ModelSet] = deque([self._set], maxlen=16)
        self.windows = {
            "production": Window(cfg.rollback.window_requests, cfg.rollback.window_s),
            "canary": Window(cfg.rollback.window_requests, cfg.rollback.window_s),
        }
        self.shadow_stats = {"requests": 0, "errors": 0, "dropped": 0}
        self.shadow_stats.update({"rows": 0, "rows_agree": 0, "actions_agree": 0})
        self._pending: set[Future[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._register_metrics()
        self.events = RolloutEvents(guard.store, guard.cfg.storage.table_prefix)
        if canary is not None:
            self._install_canary(canary, canary_detectors)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if cfg.poll_interval_s is not None:
            self._poller = threading.Thread(
                target=self._poll_loop, name="advguard-registry-poll", daemon=True
            )
            self._poller.start()

    def _register_metrics(self) -> None:
        reg = self.guard.metrics.registry
        self.routed = Counter(
            "advguard_guard_routed_requests",
            "Requests routed to a model version, by role (production, canary, shadow).",
            ["model", "version", "role"],
            registry=reg,
        )
        self.rollbacks = Counter(
            "advguard_guard_rollbacks",
            "Canary rollbacks (weight set to 0), by reason.",
            ["model", "reason"],
            registry=reg,
        )
        self.shadow_rows = Counter(
            "advguard_guard_shadow_rows",
            "Rows the shadow canary labelled, by whether it agreed with production.",
            ["model", "version", "outcome"],
            registry=reg,
        )

    # -- the current set ---------------------------------------------------------------
    @property
    def models(self) -> ModelSet:
        return self._set

    def _publish(self, new: ModelSet) -> None:
        """Make ``new`` current (caller holds ``_swap_lock``); the guard's ``model`` and
        ``detectors`` attributes follow its production variant."""
        with self._lock:
            self._set = new
            self._history.append(new)
            self.guard.model = new.production.model
            self.guard.detectors = list(new.production.detectors)

    def _check_spec(self, new: ServedModel) -> None:
        have = self._set.production.model
        if new.spec != have.spec:
            raise InputError(
                f"the new model takes {new.spec} but the guard serves {have.spec}: a hot swap "
                "keeps the input specification; restart the guard to change it"
            )
        if new.name != have.name:
            raise InputError(f"the new model is named {new.name!r}, not {have.name!r}")

    def _install_canary(
        self, canary: ServedModel, detectors: Sequence[DetectorSlot] | None
    ) -> None:
        canary = dataclasses.replace(canary, name=self._set.production.model.name)
        self._check_spec(canary)
        dets = tuple(self._set.production.detectors if detectors is None else detectors)
        with self._swap_lock:
            cur = self._set
            self._publish(ModelSet(cur.production, Variant(canary, dets), cur.generation + 1))
            with self._lock:
                self.windows["canary"].clear()
                self.rolled_back = None

    # -- routing and one request -----------------------------------------------------------
    def route(self, key: KeyRecord, model: ServedModel) -> Route:
        """The route of one request validated against ``model`` (the production model the
        request started with: if a swap happened since, the set that served it is used)."""
        ms = self._set
        if ms.production.model is not model:
            ms = next((s for s in self._history if s.production.model is model), ms)
        if ms.canary is None or self.weight <= 0.0:
            return Route("production", ms.production, ms, False)
        with self._lock:
            u = _unit_hash(self.cfg.seed, key.key_id) if self.sticky else self.rng.random()
        hit = u < self.weight
        if hit and self.mode == "canary":
            return Route("canary", ms.canary, ms, False)
        return Route("production", ms.production, ms, hit)

    def process(
        self,
        key: KeyRecord,
        model: ServedModel,
        x: np.ndarray,
        started: float,
        obs: RequestObs | None = None,
        records: list[DecisionRecord] | None = None,
    ) -> Outcome:
        """Route the request, run the guard's stages on the chosen variant, feed the rollback
        window and (shadow mode) hand a copy to the canary (``records``: see
        :meth:`~advguard.guard.pipeline.Guard.conclude`)."""
        route = self.begin(key, model)
        v = route.variant
        try:
            out = self.guard.run_stages(
                key, v.model, x, started, obs, detectors=v.detectors, records=records
            )
        except Exception as exc:
            self.settle(route, x, exc)
            raise
        self.settle(route, x, out)
        return out

    def begin(self, key: KeyRecord, model: ServedModel) -> Route:
        """:meth:`route` one request and count it for its variant (then :meth:`settle` it)."""
        route = self.route(key, model)
        v = route.variant
        self.guard.metrics.child(self.routed, v.model.name, v.model.version, route.role).inc()
        return route

    def settle(self, route: Route, x: np.ndarray, result: Outcome | BaseException) -> None:
        """A routed request's result (its outcome, or what it raised) into its variant's
        rollback window, and (shadow mode) a copy of the request to the canary. A refusal
        names the version that refused it."""
        if isinstance(result, Problem):
            result.model_version = result.model_version or route.variant.model.version
            self.observe(route.role, result.slug in FLAG_SLUGS, result.status >= 500)
            if route.shadow and result.slug in FLAG_SLUGS:
                action = "block" if result.slug == "client-blocked" else "reject"
                self._submit_shadow(route, x, action, None)
        elif isinstance(result, BaseException):
            self.observe(route.role, False, True)
        else:
            self.observe(route.role, result.action != "allow", False)
            if route.shadow:
                self._submit_shadow(route, x, result.action, result.probabilities.argmax(1))

    def observe(self, role: str, flagged: bool, error: bool) -> None:
        """One request's result for ``role`` (production, canary or shadow); a canary or
        shadow result may roll the canary back."""
        win = "production" if role == "production" else "canary"
        with self._lock:
            self.windows[win].add(self.clock(), flagged, error)
        if win == "canary":
            self.check_slo()

    # -- shadow ------------------------------------------------------------------------------
    def _submit_shadow(
        self, route: Route, x: np.ndarray, action: str, labels: np.ndarray | None
    ) -> None:
        canary = route.models.canary
        assert canary is not None
        with self._lock:
            if len(self._pending) >= self.cfg.shadow_queue:
                self.shadow_stats["dropped"] += 1
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="advguard-shadow")
            self.routed.labels(canary.model.name, canary.model.version, "shadow").inc()
            fut = self._executor.submit(self._run_shadow, canary, x.copy(), action, labels)
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _run_shadow(
        self, canary: Variant, x: np.ndarray, action: str, labels: np.ndarray | None
    ) -> None:
        """The canary's answer to a copy of the request: never reaches the client."""
        g, m = self.guard, canary.model
        try:
            xs = g.sanitize(x, m)
            det = g.detect(xs, canary.detectors)
            mine = det.action()
            agree = None
            if labels is not None:
                agree = int((m.predict_proba(xs).argmax(1) == labels).sum())
        except Exception as exc:  # a shadow failure is only counted
            log.warning("shadow canary %s failed (%s)", m.version, type(exc).__name__)
            with self._lock:
                self.shadow_stats["requests"] += 1
                self.shadow_stats["errors"] += 1
            self.observe("shadow", False, True)
            return
        with self._lock:
            st = self.shadow_stats
            st["requests"] += 1
            st["actions_agree"] += int(mine == action)
            if agree is not None and labels is not None:
                st["rows"] += len(labels)
                st["rows_agree"] += agree
        if agree is not None and labels is not None:
            self.shadow_rows.labels(m.name, m.version, "agree").inc(agree)
            self.shadow_rows.labels(m.name, m.version, "disagree").inc(len(labels) - agree)
        self.observe("shadow", mine != "allow", False)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the shadow requests submitted so far have run (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        wait_futures(pending, timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- rollback ------------------------------------------------------------------------------
    def breach(self) -> tuple[str, str] | None:
        """``(reason, detail)`` when the canary's window breaches its SLO, else None."""
        rb = self.cfg.rollback
        t = self.clock()
        with self._lock:
            n, flag_rate, error_rate = self.windows["canary"].rates(t)
            pn, pflag, _ = self.windows["production"].rates(t)
        if n < rb.min_requests:
            return None
        where = f"over the last {n} canary requests"
        if rb.max_error_rate is not None and error_rate > rb.max_error_rate:
            return "error_rate", f"error rate {error_rate:.3f} > {rb.max_error_rate} {where}"
        if rb.max_flag_rate is not None and flag_rate > rb.max_flag_rate:
            return "flag_rate", f"flag rate {flag_rate:.3f} > {rb.max_flag_rate} {where}"
        if rb.max_flag_ratio is not None and pn >= rb.min_requests:
            base = max(pflag, 1.0 / pn)  # one flag: a clean production still has a baseline
            if flag_rate > rb.max_flag_ratio * base:
                return "flag_ratio", (
                    f"flag rate {flag_rate:.3f} > {rb.max_flag_ratio} x production's "
                    f"{pflag:.3f} {where}"
                )
        return None

    def check_slo(self) -> bool:
        """Roll the canary back if its window breaches the SLO; True when it did."""
        if not self.cfg.rollback.enabled or self.weight <= 0.0 or self._set.canary is None:
            return False
        found = self.breach()
        if found is None:
            return False
        return self.rollback(*found)

    def rollback(self, reason: str, detail: str = "") -> bool:
        """Send all traffic to production (canary weight 0); False when it already was."""
        with self._lock:
            if self.weight <= 0.0:
                return False
            before, self.weight, self.rolled_back = self.weight, 0.0, reason
        ms = self._set
        name = ms.production.model.name
        cv = ms.canary.model.version if ms.canary else None
        self.rollbacks.labels(name, reason).inc()
        log.warning("canary %s of %s rolled back (%s): %s", cv, name, reason, detail)
        self._event("rollback", reason, {"weight_before": before, "detail": detail[:500]})
        return True

    def _event(self, kind: str, reason: str, detail: dict[str, Any]) -> None:
        ms = self._set
        try:
            self.events.add(
                model=ms.production.model.name,
                kind=kind,
                reason=reason,
                production_version=ms.production.model.version,
                canary_version=ms.canary.model.version if ms.canary else None,
                detail=detail,
            )
        except Exception as exc:  # the rollout itself already happened
            log.error("rollout event not recorded (%s)", type(exc).__name__)

    # -- operator actions ---------------------------------------------------------------------
    def set_canary(
        self,
        *,
        weight: float | None = None,
        mode: Literal["canary", "shadow"] | None = None,
        sticky: bool | None = None,
        model: ServedModel | None = None,
        detectors: Sequence[DetectorSlot] | None = None,
        reset: bool = False,
    ) -> dict[str, Any]:
        """Change the canary: a new model (and its detectors), its weight, mode, stickiness;
        ``reset`` clears the rollback window and state. Returns :meth:`status`."""
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise InputError(f"weight must be in [0, 1], got {weight}")
        if model is not None:
            self._install_canary(model, detectors)
        if weight is not None and weight > 0 and self._set.canary is None:
            raise InputError("no canary model: configure rollout.canary or swap one in first")
        with self._lock:
            if reset:
                self.windows["canary"].clear()
                self.rolled_back = None
            if weight is not None:
                self.weight = float(weight)
            if mode is not None:
                self.mode = mode
            if sticky is not None:
                self.sticky = sticky
        detail = {"weight": self.weight, "mode": self.mode, "sticky": self.sticky, "reset": reset}
        self._event("set", "operator", detail)
        return self.status()

    def swap_model(
        self,
        new: ServedModel,
        *,
        target: Literal["production", "canary"] = "production",
        detectors: Sequence[DetectorSlot] | None = None,
    ) -> ModelSet:
        """Atomically serve ``new`` as ``target``; requests in flight finish on the old set.
        ``detectors`` default to the current production detectors."""
        new = dataclasses.replace(new, name=self._set.production.model.name)
        self._check_spec(new)
        if target == "canary":
            self._install_canary(new, detectors)
        else:
            dets = tuple(self._set.production.detectors if detectors is None else detectors)
            with self._swap_lock:
                cur = self._set
                self._publish(ModelSet(Variant(new, dets), cur.canary, cur.generation + 1))
                with self._lock:
                    self.windows["production"].clear()
        log.info("%s %s now serves %s", target, new.name, new.version)
        self._event("swap", target, {"version": new.version, "digest": new.digest})
        return self._set

    def reload_model(self, target: Literal["production", "canary"] = "production") -> ModelSet:
        """Re-read ``target`` from its configured source (a registry stage is pulled and
        re-hashed again, a file re-hashed) and swap it in; detectors are reloaded for it."""
        gcfg = self.guard.cfg
        spec = gcfg.model if target == "production" else self.cfg.canary
        if spec is None:
            raise InputError(f"no {target} model source in the config to reload from")
        new = load_served_model(spec, gcfg)
        dcfg = gcfg
        if target == "canary" and self.cfg.detectors is not None:
            dcfg = gcfg.model_copy(update={"detectors": self.cfg.detectors})
        dets = self.build_detectors(dcfg, new) if dcfg.detectors else None
        return self.swap_model(new, target=target, detectors=dets)

    def _registry_ref(self, spec: Any) -> str | None:
        """The version now in the registry stage ``spec`` serves from (None: not a registry
        source)."""
        if spec is None or spec.registry is None:
            return None
        from advguard.registry.store import Registry

        src = spec.registry
        with Registry(self.guard.cfg.resolve(src.root), db_url=src.db_url) as reg:
            return str(reg.get(f"{src.model_name}@{src.stage}").ref)

    def poll_once(self) -> list[str]:
        """Reload each registry-sourced model whose stage now holds another version; returns
        the targets reloaded."""
        done: list[str] = []
        ms = self._set
        targets: list[tuple[Literal["production", "canary"], Any, Variant | None]] = [
            ("production", self.guard.cfg.model, ms.production),
            ("canary", self.cfg.canary, ms.canary),
        ]
        for target, spec, served in targets:
            ref = self._registry_ref(spec)
            if ref is not None and (served is None or served.model.version != ref):
                self.reload_model(target)
                done.append(target)
        return done

    def _poll_loop(self) -> None:
        interval = self.cfg.poll_interval_s
        assert interval is not None
        while not self._stop.wait(interval):
            try:
                for target in self.poll_once():
                    log.info("registry poll: %s reloaded", target)
            except Exception as exc:  # keep serving what is loaded; try again next time
                log.warning("registry poll failed (%s)", type(exc).__name__)

    def status(self) -> dict[str, Any]:
        ms = self._set
        t = self.clock()
        with self._lock:
            n, fr, er = self.windows["canary"].rates(t)
            pn, pfr, per = self.windows["production"].rates(t)
            st: dict[str, Any] = dict(self.shadow_stats)
            out: dict[str, Any] = {
                "model": ms.production.model.name,
                "generation": ms.generation,
                "production": {"version": ms.production.model.version, "digest": None},
                "canary": None,
                "weight": self.weight,
                "mode": self.mode,
                "sticky": self.sticky,
                "rolled_back": self.rolled_back,
            }
        out["production"]["digest"] = ms.production.model.digest
        out["production"]["window"] = {"requests": pn, "flag_rate": pfr, "error_rate": per}
        if ms.canary is not None:
            out["canary"] = {
                "version": ms.canary.model.version,
                "digest": ms.canary.model.digest,
                "window": {"requests": n, "flag_rate": fr, "error_rate": er},
            }
        st["agreement_rate"] = st["rows_agree"] / st["rows"] if st["rows"] else None
        out["shadow"] = st
        return out


def load_canary(
    cfg: Any, production: ServedModel, build: Callable[[Any, ServedModel], list[Any]]
) -> tuple[ServedModel, list[Any] | None]:
    """The configured canary (``rollout.canary``, named like ``production``) and its detectors
    loaded with ``build`` (``rollout.detectors``, else ``detectors:``; None when neither)."""
    rcfg: RolloutConfig = cfg.rollout
    assert rcfg.canary is not None
    canary = load_served_model(rcfg.canary, cfg)
    canary = dataclasses.replace(canary, name=production.name)
    dcfg = cfg if rcfg.detectors is None else cfg.model_copy(update={"detectors": rcfg.detectors})
    return canary, (build(dcfg, canary) if dcfg.detectors else None)


# -- the admin API ----------------------------------------------------------------------
class RolloutUpdate(BaseModel):
    """Body of ``POST /v1/admin/models/{name}/rollout``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    weight: float | None = Field(default=None, ge=0.0, le=1.0)
    mode: Literal["canary", "shadow"] | None = None
    sticky: bool | None = None
    #: True: roll back now (weight 0, reason "manual").
    rollback: bool = False
    #: True: clear the rollback window and state.
    reset: bool = False


class ReloadRequest(BaseModel):
    """Body of ``POST /v1/admin/models/{name}/reload`` (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    target: Literal["production", "canary"] = "production"


def add_rollout_routes(
    app: FastAPI, guard: Guard, admin_key: Callable[..., Awaitable[KeyRecord]]
) -> None:
    """Admin endpoints (``admin_key``: the app's dependency authenticating the admin scope):
    rollout status and settings, and the hot reload of a model."""
    from fastapi import Body, Depends

    from advguard.guard.problems import openapi_responses

    auth = ("unauthorized", "forbidden", "client-blocked", "internal")
    errors = openapi_responses(*auth, "model-not-found", "invalid-input")

    @app.get(
        "/v1/admin/models/{name}/rollout",
        tags=["admin"],
        summary="Rollout status: versions, canary weight and mode, windows, shadow agreement",
        responses=errors,
    )
    def rollout_status(name: str, key: KeyRecord = Depends(admin_key)) -> dict[str, Any]:
        guard.get_model(name)
        out = guard.rollout.status()
        out["events"] = [e.public() for e in guard.rollout.events.list(name, limit=20)]
        return out

    @app.post(
        "/v1/admin/models/{name}/rollout",
        tags=["admin"],
        summary="Set the canary's weight, mode and stickiness, roll it back or reset it",
        responses={**errors, **openapi_responses("rollout-conflict")},
    )
    def rollout_set(
        name: str, body: RolloutUpdate, key: KeyRecord = Depends(admin_key)
    ) -> dict[str, Any]:
        guard.get_model(name)
        r = guard.rollout
        try:
            if body.rollback:
                r.rollback("manual", f"by key {key.key_id}")
            if body.weight is not None or body.mode or body.sticky is not None or body.reset:
                weight = None if body.rollback else body.weight
                r.set_canary(weight=weight, mode=body.mode, sticky=body.sticky, reset=body.reset)
        except InputError as e:
            raise Problem("rollout-conflict", str(e)) from None
        return r.status()

    @app.post(
        "/v1/admin/models/{name}/reload",
        tags=["admin"],
        summary="Re-read a model from its configured source and swap it in (no request lost)",
        responses={**errors, **openapi_responses("reload-failed")},
    )
    def reload(
        name: str,
        body: ReloadRequest | None = Body(default=None),
        key: KeyRecord = Depends(admin_key),
    ) -> dict[str, Any]:
        guard.get_model(name)
        target = (body or ReloadRequest()).target
        ms = guard.rollout.models
        old = ms.production if target == "production" else ms.canary
        try:
            new = guard.rollout.reload_model(target)
        except AdvguardError as e:
            raise Problem("reload-failed", str(e)) from None
        now_v = new.production if target == "production" else new.canary
        assert now_v is not None
        return {
            "model": name,
            "target": target,
            "previous_version": old.model.version if old is not None else None,
            "version": now_v.model.version,
            "digest": now_v.model.digest,
            "generation": new.generation,
        }


# -- a client of the admin API (the CLI's ``advguard guard rollout``) ------------------------
def admin_request(
    base_url: str,
    key: str,
    method: Literal["GET", "POST"],
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Call a guard admin endpoint; a refusal (problem document), a network failure or an
    answer that is not a JSON object raises :class:`InputError` with one line."""
    import httpx

    if not base_url.startswith(("http://", "https://")):
        raise InputError(f"--url must start with http:// or https://, got {base_url!r}")
    url = base_url.rstrip("/") + path
    try:
        r = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach the guard at {base_url}: {type(e).__name__}") from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code != 200:
        detail = data.get("detail") if isinstance(data, dict) else None
        why = str(detail or r.reason_phrase)[:300]
        raise InputError(f"the guard answered {r.status_code}: {why}")
    if not isinstance(data, dict):
        raise InputError("the guard's answer is not a JSON object")
    return data
