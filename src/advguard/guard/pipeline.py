"""The guard pipeline: authenticate -> limit -> validate -> sanitize -> detect -> decide ->
answer (with output hardening) -> record.

Detectors plug in through two protocols. A *per-input* detector scores each row
(``score(x) -> (n,)``, higher = more suspicious, with a calibrated ``threshold``); its score
bands map scores to actions. A *stateful* detector watches each client's stream of queries
(``observe(client_id, x) -> verdict``, e.g. Chen, Carlini & Wagner 2020 kNN or PRADA) and
flags clients, not rows. The YAML sections ``detectors:`` and ``stateful:`` configure them;
:class:`Guard` also takes ready objects (tests, embedding).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from advguard.errors import InputError
from advguard.guard.auth import AuthError, authenticate, extract_key, key_id_of, load_pepper
from advguard.guard.batching import BackgroundWriter, GroupCommit, MicroBatcher, process_batch
from advguard.guard.config import SEVERITY, GuardConfig
from advguard.guard.controlcache import ControlCache
from advguard.guard.drift import DriftMonitor, load_profile
from advguard.guard.edge import as_float_array, check_batch
from advguard.guard.failsafe import DEPENDENCY_ERRORS, note_fail_open, unavailable
from advguard.guard.forensics import encode_payload, fingerprint, load_fernet
from advguard.guard.inline import InlineGate
from advguard.guard.metrics import GuardMetrics
from advguard.guard.modalities import tabular_batch, text_batch
from advguard.guard.problems import Problem
from advguard.guard.ratelimit import Limiter, LimitResult
from advguard.guard.rollout import Rollout, load_canary
from advguard.guard.serving import ServedModel, load_served_model
from advguard.guard.storage import (
    BlockRecord,
    DecisionRecord,
    GuardStore,
    KeyRecord,
    OutputPolicy,
    now,
)
from advguard.guard.telemetry import RequestObs, Telemetry, build_provider, tracing_requested

if TYPE_CHECKING:  # cryptography is an optional extra (guard)
    from cryptography.fernet import Fernet
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("advguard.guard")


@runtime_checkable
class InputDetector(Protocol):
    """Scores each input row; higher is more suspicious."""

    threshold: float | None

    def score(self, x: np.ndarray) -> np.ndarray: ...


class StatefulVerdictLike(Protocol):
    """Read-only view of a stateful detector's verdict (a frozen dataclass satisfies it)."""

    @property
    def flagged(self) -> bool: ...
    @property
    def detector(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def queries_seen(self) -> int: ...


@runtime_checkable
class StatefulDetectorLike(Protocol):
    """Watches one client's queries over time."""

    def observe(self, client_id: str, x: np.ndarray) -> StatefulVerdictLike: ...


@dataclass
class DetectorSlot:
    name: str
    detector: InputDetector
    #: (min score, action), ascending by min; a score above ``min`` takes ``action``.
    bands: list[tuple[float, str]]

    def actions(self, scores: np.ndarray) -> list[str]:
        out = []
        for s in scores:
            act = "allow"
            for lo, a in self.bands:
                if s > lo:
                    act = a
            out.append(act)
        return out


@dataclass
class StatefulSlot:
    name: str
    detector: StatefulDetectorLike
    action: str
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Detection:
    """What the detectors said about one batch: per-detector scores, the reasons of every flag,
    each row's action, and whether a stateful detector blocks the client."""

    row_actions: list[str]
    scores: dict[str, list[float] | float | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    flagged: bool = False
    block: bool = False
    #: Names of the detectors (input or stateful) that flagged a row or the client.
    flagged_by: list[str] = field(default_factory=list)

    def escalate_row(self, i: int, action: str) -> None:
        if SEVERITY[action] > SEVERITY[self.row_actions[i]]:
            self.row_actions[i] = action

    def action(self) -> str:
        """The batch's action: block, else the most severe row action."""
        return "block" if self.block else max(self.row_actions, key=SEVERITY.__getitem__)


@dataclass
class Outcome:
    """What the API answers for one accepted request."""

    decision_id: str
    action: str
    model: ServedModel
    fallback: ServedModel | None
    probabilities: np.ndarray
    row_actions: list[str]
    policy: OutputPolicy

    def body(self) -> dict[str, Any]:
        p = self.probabilities
        labels = p.argmax(1)
        out: dict[str, Any] = {
            "decision_id": self.decision_id,
            "action": self.action,
            "model": self.model.name,
            "model_version": self.model.version,
            "labels": labels.tolist(),
            "row_actions": self.row_actions,
        }
        if self.fallback is not None and any(a != "allow" for a in self.row_actions):
            out["fallback_version"] = self.fallback.version
        pol = self.policy
        rounded = np.round(p, pol.decimals) if pol.decimals is not None else p
        if pol.mode == "probabilities":
            out["probabilities"] = rounded.tolist()
        elif pol.mode == "top_k":
            k = min(pol.top_k, p.shape[1])
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            out["top_k"] = [
                [{"label": int(j), "probability": float(rounded[i, j])} for j in row]
                for i, row in enumerate(order)
            ]
        return out


@dataclass
class Pending:
    """A request decided but not yet answered (between :meth:`Guard.decide` and
    :meth:`Guard.conclude`)."""

    decision_id: str
    key: KeyRecord
    model: ServedModel
    #: The validated batch (recorded) and its sanitized form (scored and answered).
    x: np.ndarray
    xs: np.ndarray
    det: Detection
    action: str
    forensic: bool
    started: float

    @property
    def refused(self) -> bool:
        return self.action in ("reject", "block")

    @property
    def row_actions(self) -> list[str]:
        return self.det.row_actions


def _stage(obs: RequestObs | None, name: str) -> AbstractContextManager[Any]:
    """``obs.stage(name)``, or nothing for work that no request observer follows (the
    micro-batcher's shared steps)."""
    return nullcontext() if obs is None else obs.stage(name)


def _quantize(x: np.ndarray, bits: int, bounds: tuple[float, float]) -> np.ndarray:
    """Bit-depth reduction (feature squeezing; Xu, Evans & Qi, NDSS 2018) within ``bounds``."""
    lo, hi = bounds
    levels = (1 << bits) - 1
    z = np.round((x - lo) / (hi - lo) * levels) / levels
    return (z * (hi - lo) + lo).astype(np.float32)


class Guard:
    """Everything one guard process needs; the HTTP layer (:mod:`advguard.guard.app`) only
    parses requests and renders answers."""

    def __init__(
        self,
        cfg: GuardConfig,
        *,
        store: GuardStore,
        model: ServedModel,
        fallback: ServedModel | None = None,
        detectors: Sequence[DetectorSlot] = (),
        stateful: Sequence[StatefulSlot] = (),
        limiter: Limiter | None = None,
        pepper: bytes | None = None,
        fernet: Fernet | None = None,
        rng: random.Random | None = None,
        drift: DriftMonitor | None = None,
        tracer_provider: TracerProvider | None = None,
        canary: ServedModel | None = None,
        canary_detectors: Sequence[DetectorSlot] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        #: Keys, blocks, throttles and isolations read by requests, kept auth.cache_ttl_s.
        self.controls = ControlCache(store, cfg.auth.cache_ttl_s, clock=clock or time.monotonic)
        self.model = model
        self.fallback = fallback
        self.detectors = list(detectors)
        self.stateful = list(stateful)
        self.limiter = limiter or Limiter(cfg.limits)
        self.pepper = pepper
        self.fernet = fernet
        self.rng = rng or random.Random()
        self.metrics = GuardMetrics(cfg.telemetry.top_clients)
        self.telemetry = Telemetry(self.metrics, tracer_provider)
        #: Which small requests run on the event loop (edge.inline_max_*; advguard.guard.inline).
        self.inline = self._inline_gate(clock)
        from advguard.defenses.transforms.text import TextNormalizer

        self.normalizer = TextNormalizer()
        check_modality(cfg, model, self.detectors, self.stateful)
        self.drift = drift
        if drift is not None:
            drift.check(model.spec.shape, model.spec.num_classes, model.digest)
            self.metrics.watch_drift(model.name, drift.current)
        #: The output policy of keys that set none (built once, not per request).
        self.default_output = OutputPolicy(**cfg.output.model_dump())
        #: Decision records are committed in groups (each answer still waits for its own).
        self.recorder = GroupCommit(store.add_decisions)
        #: Records that need not precede the answer (forensics.plain_records: background).
        self.background: BackgroundWriter[DecisionRecord] | None = None
        if cfg.forensics.plain_records == "background" and cfg.forensics.record_all_decisions:
            self.background = BackgroundWriter(
                store.add_decisions,
                self._background_failed,
                linger_s=cfg.forensics.plain_records_linger_ms / 1000.0,
            )
        #: The micro-batcher (``batching:`` in the config; None: every request alone).
        self.batcher: MicroBatcher | None = None
        if cfg.batching is not None:
            self.batcher = MicroBatcher(
                partial(process_batch, self),
                max_rows=cfg.batching.max_batch,
                max_wait_s=cfg.batching.max_wait_ms / 1000.0,
            )
        needs_fallback = any(
            a in ("fallback", "review") for d in self.detectors for _, a in d.bands
        )
        needs_fallback |= any(s.action in ("fallback", "review") for s in self.stateful)
        if needs_fallback and fallback is None:
            raise InputError("an action 'fallback' or 'review' needs a fallback model")
        if fallback is not None and (fallback.spec, fallback.kind) != (model.spec, model.kind):
            raise InputError(
                f"the fallback model takes {fallback.spec} but the model takes {model.spec}"
            )
        if cfg.forensics.mode == "encrypted" and fernet is None:
            raise InputError("forensics.mode 'encrypted' needs a Fernet key")
        #: Canary, shadow, rollback and hot swaps (advguard.guard.rollout).
        self.rollout = Rollout(
            self, canary=canary, canary_detectors=canary_detectors, build_detectors=build_detectors
        )

    # -- construction from the config --------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg: GuardConfig,
        *,
        model: ServedModel | None = None,
        fallback: ServedModel | None = None,
        store: GuardStore | None = None,
    ) -> Guard:
        """Load what ``cfg`` names: models, database, detectors, keys for pepper/forensics."""
        if model is None:
            if cfg.model is None:
                raise InputError("no model: give --model FILE, --model-name NAME or 'model:'")
            model = load_served_model(cfg.model, cfg)
        if fallback is None and cfg.fallback is not None:
            fallback = load_served_model(cfg.fallback, cfg)
        check_modality(cfg, model, [], [])
        pepper = load_pepper(cfg.auth.pepper_env, cfg.resolve(cfg.auth.pepper_file))
        fernet = None
        if cfg.forensics.mode == "encrypted":
            fernet = load_fernet(cfg.forensics.key_env, cfg.resolve(cfg.forensics.key_file))
        drift = None
        if cfg.drift.profile is not None:
            profile = load_profile(cfg.resolve(cfg.drift.profile))
            drift = DriftMonitor(profile, cfg.drift.window, cfg.drift.min_rows)
        provider = build_provider() if tracing_requested(cfg.telemetry.tracing) else None
        canary, canary_detectors = None, None
        if cfg.rollout.canary is not None:
            canary, canary_detectors = load_canary(cfg, model, build_detectors)
        store = store or GuardStore(cfg.database_url, table_prefix=cfg.storage.table_prefix)
        return cls(
            cfg,
            store=store,
            model=model,
            fallback=fallback,
            detectors=build_detectors(cfg, model),
            stateful=build_stateful_detectors(cfg, model),
            pepper=pepper,
            fernet=fernet,
            drift=drift,
            tracer_provider=provider,
            canary=canary,
            canary_detectors=canary_detectors,
        )

    def flush_records(self, timeout_s: float = 30.0) -> bool:
        """Wait until the decision rows queued for the background writer are committed."""
        return self.background is None or self.background.flush(timeout_s)

    def close(self) -> None:
        self.rollout.close()
        if self.background is not None:
            self.background.close()
        self.store.close()
        self.telemetry.shutdown()
        self.metrics.close()

    def get_model(self, name: str) -> ServedModel:
        if name != self.model.name:
            raise Problem("model-not-found", f"this guard serves the model {self.model.name!r}")
        return self.model

    def swap_model(self, name: str, new: ServedModel, target: str = "production") -> None:
        """Hot swap: serve ``new`` as model ``name``'s production (or canary) version; requests
        in flight finish on the old one (:meth:`advguard.guard.rollout.Rollout.swap_model`)."""
        self.get_model(name)
        self.rollout.swap_model(new, target="canary" if target == "canary" else "production")

    def reload_model(self, name: str, target: str = "production") -> None:
        """Re-read model ``name`` from its configured source (registry stage or file) and swap
        it in (what ``POST /v1/admin/models/{name}/reload`` does)."""
        self.get_model(name)
        self.rollout.reload_model("canary" if target == "canary" else "production")

    # -- steps ----------------------------------------------------------------------------
    def authenticate(
        self, authorization: str | None, x_api_key: str | None, scope: str
    ) -> KeyRecord:
        try:
            return authenticate(
                self.store,
                extract_key(authorization, x_api_key),
                scope,
                pepper=self.pepper,
                lookup=self._key_and_block,
            )
        except DEPENDENCY_ERRORS as exc:  # keys cannot be read: always fail closed
            log.error("database unavailable during authentication (%s)", type(exc).__name__)
            raise unavailable("database") from None
        except AuthError as e:
            self.metrics.auth_failures.labels(e.kind).inc()
            headers = {"WWW-Authenticate": 'Bearer realm="advguard"'} if e.status == 401 else {}
            raise Problem(e.kind, e.detail, headers=headers) from None

    def _key_and_block(self, key_id: str) -> tuple[KeyRecord | None, BlockRecord | None]:
        state = self.controls.client(key_id)
        if state is None:
            return None, None
        block = state.block
        return state.key, block if block is not None and block.active(now()) else None

    def auth_is_local(self, authorization: str | None, x_api_key: str | None) -> bool:
        """Whether :meth:`authenticate` would answer without reading the database (no or a
        malformed key, or the client's rows are cached): then it may run on the event loop."""
        kid = key_id_of(extract_key(authorization, x_api_key))
        return kid is None or self.controls.client_is_fresh(kid)

    def runs_inline(self, body_bytes: int, model: ServedModel) -> bool:
        """Whether a request of ``body_bytes`` for ``model`` runs on the event loop (no
        thread-pool hop): ``edge.inline_max_body_bytes``, in-memory limits, the model's
        isolation cached (no database read) and the inline gate (``edge.inline_max_ms``). With
        micro-batching only its admission (parse, validation, budget) does; the batch runs in
        the batcher's thread. A True answer must be followed by ``inline.record``."""
        return (
            body_bytes <= self.cfg.edge.inline_max_body_bytes
            and not self.limiter.shared
            and self.controls.isolation_is_fresh(model.name)
            and self.inline.admit(model.name)
        )

    def warm_isolation(self, model: str) -> None:
        """Read the isolation of ``model`` (if served here) into the control cache unless it
        is cached: done in a thread-pool hop a request takes anyway (authentication), so that
        its pipeline then reads no database on the event loop. A failed read is left to the
        request's own (which fails closed)."""
        cache = self.controls
        if model != self.model.name or cache.ttl_s <= 0 or cache.isolation_is_fresh(model):
            return  # (nothing is cached with auth.cache_ttl_s 0: every request reads)
        with contextlib.suppress(*DEPENDENCY_ERRORS):
            self.controls.isolation(model)

    def _inline_gate(self, clock: Callable[[], float] | None) -> InlineGate:
        """The inline gate of ``edge.inline_max_*`` on ``clock`` (wall and CPU time alike;
        default: ``time.perf_counter`` and the thread's CPU time)."""
        edge = self.cfg.edge
        return InlineGate(
            edge.inline_max_ms / 1000.0 if edge.inline_max_body_bytes else 0.0,
            clock=clock or time.perf_counter,
            cpu_clock=clock or time.thread_time,
            on_switch=self._inline_switched,
            on_new=self.metrics.watch_inline,
        )

    def _inline_switched(self, model: str, inline: bool) -> None:
        """The inline gate moved ``model`` to the thread pool (False) or back (True)."""
        self.metrics.inline.labels(model).set(1.0 if inline else 0.0)
        self.metrics.inline_switches.labels(model, "loop" if inline else "pool").inc()
        st = self.inline.state(model)
        ms = (st.ewma_s or 0.0) * 1000.0
        if inline:
            log.info("model %s runs inline again (probe took %.2f ms)", model, ms)
        else:
            log.info(
                "model %s takes the thread pool: its inline runs average %.2f ms (bound %.2f)",
                model,
                ms,
                self.cfg.edge.inline_max_ms,
            )

    def rate_is_local(self, key: KeyRecord) -> bool:
        """Whether :meth:`check_rate` does no I/O (memory limits, the client's rows cached)."""
        return not self.limiter.shared and self.controls.client_is_fresh(key.key_id)

    def _refuse(self, res: LimitResult, model: str) -> Problem:
        self.metrics.rate_limited.labels(model, res.which or "rate").inc()
        if res.which == "budget":
            return Problem(
                "budget-exhausted",
                f"the query budget of {res.limit} input rows per "
                f"{self.cfg.limits.budget_period} is used up for this key",
                headers=res.headers(),
            )
        return Problem(
            "rate-limited",
            f"at most {res.limit} requests per {res.policy.split('=')[1]} s for this key",
            headers=res.headers(),
        )

    def _hit(self, what: str, hit: Callable[[], LimitResult | None]) -> LimitResult | None:
        """Run one limiter check; an unreachable store fails closed (503) unless
        ``limits.fail_open``, which skips the check (None)."""
        try:
            return hit()
        except DEPENDENCY_ERRORS as exc:
            if not self.cfg.limits.fail_open:
                log.error("rate-limit store unavailable (%s)", type(exc).__name__)
                raise unavailable("rate-limit store") from None
            note_fail_open("rate-limit store", what, exc)
            return None

    def check_rate(self, key: KeyRecord, model: str) -> LimitResult | None:
        try:
            state = self.controls.client(key.key_id)
        except DEPENDENCY_ERRORS:
            raise unavailable("database") from None
        throttle = state.limit if state is not None else None  # incident throttle-client
        if throttle is not None and not throttle.active(now()):
            throttle = None
        item = self.limiter.client_item(throttle.rate, throttle.burst) if throttle else None
        res = self._hit("rate limit", lambda: self.limiter.hit_rate(key.key_id, item))
        if res is not None and not res.allowed:
            raise self._refuse(res, model)
        return res

    def check_budget(self, key: KeyRecord, model: str, rows: int) -> LimitResult | None:
        budget = self.cfg.limits.budget
        if budget is not None and rows > budget:
            raise Problem(
                "batch-too-large",
                f"{rows} input rows exceed the whole query budget of {budget} rows per "
                f"{self.cfg.limits.budget_period}",
            )
        res = self._hit("query budget", lambda: self.limiter.hit_budget(key.key_id, rows))
        if res is not None and not res.allowed:
            raise self._refuse(res, model)
        return res

    def validate(self, raw: Any, model: ServedModel) -> np.ndarray:
        """The request's ``inputs`` (a parsed JSON list or an array) as a checked batch of the
        model's kind: float32 tensors, a 1-D array of texts, or schema-checked tabular rows."""
        edge = self.cfg.edge
        if model.kind == "text":
            return text_batch(raw, max_batch=edge.max_batch, max_chars=edge.max_text_chars)
        if isinstance(raw, np.ndarray) and raw.dtype.kind not in "iuf":
            raise Problem("invalid-input", f"model {model.name} takes numbers, not strings")
        clip = edge.out_of_bounds == "clip"
        if model.kind == "tabular":
            assert model.schema is not None
            return tabular_batch(raw, model.schema, model.spec, max_batch=edge.max_batch, clip=clip)
        x = raw if isinstance(raw, np.ndarray) else as_float_array(raw, '"inputs"')
        return check_batch(x, model.spec, max_batch=edge.max_batch, clip=clip)

    def sanitize(self, x: np.ndarray, model: ServedModel) -> np.ndarray:
        if model.kind == "text":
            if not self.cfg.sanitize.text_normalize:
                return x
            out = np.empty(len(x), dtype=object)
            out[:] = [self.normalizer.normalize(str(t)) for t in x]
            return out
        bits = self.cfg.sanitize.quantize_bits
        return _quantize(x, bits, model.spec.bounds) if bits else x

    # -- the whole request ------------------------------------------------------------
    def process(
        self,
        key: KeyRecord,
        model: ServedModel,
        x: np.ndarray,
        started: float,
        obs: RequestObs | None = None,
        records: list[DecisionRecord] | None = None,
    ) -> Outcome:
        """Route the request (production or canary, a shadow copy; :mod:`.rollout`), then run
        :meth:`run_stages` on the chosen model and its detectors (``records``: see
        :meth:`conclude`)."""
        return self.rollout.process(key, model, x, started, obs, records)

    def run_stages(
        self,
        key: KeyRecord,
        model: ServedModel,
        x: np.ndarray,
        started: float,
        obs: RequestObs | None = None,
        detectors: Sequence[DetectorSlot] | None = None,
        records: list[DecisionRecord] | None = None,
    ) -> Outcome:
        """Run sanitize -> detect -> decide -> answer -> record on a validated batch whose
        rate and budget were already taken. Raises :class:`Problem` for reject/block. Each
        stage is timed (and traced) through ``obs`` (default: a fresh one, finished here).
        With ``records`` a record to commit before the answer is left there (:meth:`conclude`).
        """
        own = obs is None
        run = self.telemetry.request(model.name) if obs is None else obs
        try:
            pending = self.decide(key, model, x, started, run, detectors)
            probs = None
            if not pending.refused:
                with run.stage("predict"):
                    probs = self.answer(model, pending.xs, pending.row_actions)
            return self.conclude(pending, probs, records, obs=run)
        except Problem as p:
            if p.slug == "dependency-unavailable":  # the decision store failed: an error
                self.metrics.decisions.labels(model.name, model.version, "error").inc()
            raise
        except Exception:
            self.metrics.decisions.labels(model.name, model.version, "error").inc()
            raise
        finally:
            if own:
                run.finish()

    def decide(
        self,
        key: KeyRecord,
        model: ServedModel,
        x: np.ndarray,
        started: float,
        obs: RequestObs | None = None,
        detectors: Sequence[DetectorSlot] | None = None,
        *,
        scores: Sequence[np.ndarray] | None = None,
    ) -> Pending:
        """Sanitize, detect (``scores``: the detectors' scores of the sanitized batch, already
        computed, e.g. by the micro-batcher on several requests at once), observe the client
        and decide; nothing is answered or recorded yet."""
        decision_id = uuid.uuid4().hex
        with _stage(obs, "sanitize"):
            xs = self.sanitize(x, model)
        with _stage(obs, "detect"):
            det = self.detect(xs, detectors, scores)
        with _stage(obs, "stateful"):
            self.observe_stateful(key, xs, det)
        self.isolate_if_needed(model, det)
        action = det.action()
        sampled = self.rng.random() < self.cfg.forensics.sample_rate
        if sampled and not det.flagged and action == "allow":
            det.reasons.append("sampled")
        forensic = det.flagged or action != "allow" or sampled
        return Pending(decision_id, key, model, x, xs, det, action, forensic, started)

    def conclude(
        self,
        p: Pending,
        probs: np.ndarray | None,
        records: list[DecisionRecord] | None = None,
        obs: RequestObs | None = None,
    ) -> Outcome:
        """Record, count and answer a decided request (``probs``: its scores, None when
        refused). With ``records`` a record to commit before the answer is appended there for
        the caller to commit (with others) before the answer leaves and to count
        (:meth:`count_committed`). Raises for reject/block."""
        latency_ms = (time.perf_counter() - p.started) * 1000.0
        model, key, action = p.model, p.key, p.action
        deferred = False
        if p.forensic or self.cfg.forensics.record_all_decisions:
            rec = self.decision_record(p, latency_ms)
            if not p.forensic and self.background is not None:
                with _stage(obs, "record"):
                    self.background.put(rec)  # committed soon after, off the request path
            elif records is None:
                with _stage(obs, "record"):
                    self.commit_record(rec, model)  # committed before the answer leaves
            else:  # its decision is counted once it is committed (:meth:`count_committed`)
                records.append(rec)
                deferred = True
        if not deferred:
            self.count_decision(model.name, model.version, action)
        self.observe(model, key, p.x, p.det, action, probs, obs)
        if obs is not None and obs.recording:
            obs.set({"advguard.decision.id": p.decision_id})
        self.refuse_if_needed(action, key, p.decision_id, p.det.reasons)
        assert probs is not None
        self.metrics.child(self.metrics.rows, model.name, model.version).inc(len(p.xs))
        return Outcome(
            p.decision_id,
            action,
            model,
            self.fallback,
            probs,
            p.det.row_actions,
            key.output or self.default_output,
        )

    def score_inputs(
        self, xs: np.ndarray, detectors: Sequence[DetectorSlot] | None = None
    ) -> list[np.ndarray]:
        """Every input detector's scores of the sanitized batch ``xs`` (checked)."""
        out = []
        for slot in self.detectors if detectors is None else detectors:
            s = np.asarray(slot.detector.score(xs), dtype=np.float64).reshape(-1)
            if s.shape != (len(xs),) or not np.isfinite(s).all():
                raise RuntimeError(f"detector {slot.name} returned bad scores")
            out.append(s)
        return out

    def detect(
        self,
        xs: np.ndarray,
        detectors: Sequence[DetectorSlot] | None = None,
        scores: Sequence[np.ndarray] | None = None,
    ) -> Detection:
        """Score the sanitized batch with every input detector (``detectors``, default the
        production model's; or take their ``scores``) and map scores to row actions."""
        slots = self.detectors if detectors is None else detectors
        det = Detection(row_actions=["allow"] * len(xs))
        scores = self.score_inputs(xs, slots) if scores is None else scores
        for slot, s in zip(slots, scores, strict=True):
            det.scores[slot.name] = [round(float(v), 6) for v in s]
            acts = slot.actions(s)
            if any(a != "allow" for a in acts):
                det.flagged_by.append(slot.name)
            for i, a in enumerate(acts):
                if a != "allow":
                    det.flagged = True
                    det.reasons.append(f"{slot.name}:row{i}:{a}")
                det.escalate_row(i, a)
        return det

    def observe_stateful(self, key: KeyRecord, xs: np.ndarray, det: Detection) -> None:
        """Feed the batch to every per-client stateful detector; a flag escalates all rows to
        the detector's action (or blocks the client)."""
        for st in self.stateful:
            with st.lock:
                v = st.detector.observe(key.key_id, xs)
            det.scores[st.name] = float(v.score)
            if not v.flagged:
                continue
            det.flagged = True
            det.flagged_by.append(st.name)
            det.reasons.append(
                f"{st.name}:{st.action} (score {float(v.score):.4g} < "
                f"{float(v.threshold):.4g} after {int(v.queries_seen)} queries)"
            )
            if st.action == "block":
                det.block = True
            else:
                for i in range(len(det.row_actions)):
                    det.escalate_row(i, st.action)

    def isolate_if_needed(self, model: ServedModel, det: Detection) -> None:
        """An isolated model (``advguard incident isolate``) sends every row to the fallback, or
        rejects it (also when there is no fallback)."""
        try:
            iso = self.controls.isolation(model.name)
        except DEPENDENCY_ERRORS:
            raise unavailable("database") from None
        if iso is None:
            return
        mode = iso.mode if iso.mode == "reject" or self.fallback is not None else "reject"
        det.reasons.append(f"isolated:{mode}")
        for i in range(len(det.row_actions)):
            det.escalate_row(i, mode)

    def answer(self, model: ServedModel, xs: np.ndarray, row_actions: list[str]) -> np.ndarray:
        """Scores for the batch: allowed rows from ``model``, flagged rows from the fallback
        (flagged rows never reach the primary model)."""
        probs = np.empty((len(xs), model.num_classes), dtype=np.float64)
        fb = [i for i, a in enumerate(row_actions) if a in ("fallback", "review")]
        ok = [i for i, a in enumerate(row_actions) if a == "allow"]
        if ok:
            probs[ok] = model.predict_proba(xs[ok])
        if fb:
            assert self.fallback is not None
            probs[fb] = self.fallback.predict_proba(xs[fb])
        return probs

    def refuse_if_needed(
        self, action: str, key: KeyRecord, decision_id: str, reasons: list[str]
    ) -> None:
        """Raise the problem for a block (and record the block) or a reject."""
        if action == "block":
            try:
                self.store.add_block(key.key_id, f"stateful detector: {'; '.join(reasons)}")
            except DEPENDENCY_ERRORS as exc:  # refused all the same; the block is not stored
                log.error("block of client %s not stored (%s)", key.key_id, type(exc).__name__)
            log.warning(
                "client %s blocked by a stateful detector (decision %s)", key.key_id, decision_id
            )
            raise Problem("client-blocked", "this client is blocked", decision_id=decision_id)
        if action == "reject":
            raise Problem(
                "rejected",
                "the guard's detectors flagged this request; it was not answered",
                decision_id=decision_id,
                headers={"X-Decision-Id": decision_id},
            )

    def decision_record(self, p: Pending, latency_ms: float) -> DecisionRecord:
        """The decision record of ``p`` (with the encrypted payload when forensic)."""
        payload = None
        if p.forensic and self.fernet is not None:
            payload = encode_payload(p.x, self.fernet)
        return DecisionRecord(
            id=p.decision_id,
            ts=now(),
            key_id=p.key.key_id,
            model=p.model.name,
            version=p.model.version,
            action=p.action,  # type: ignore[arg-type]
            flagged=p.det.flagged,
            forensic=p.forensic,
            reasons=p.det.reasons[:64],
            scores=p.det.scores,
            fingerprint=fingerprint(p.x),
            n_rows=len(p.x),
            shape=list(p.x.shape),
            latency_ms=latency_ms,
            payload=payload,
            payload_encrypted=payload is not None,
            review_status="pending" if p.action == "review" else None,
        )

    def count_decision(self, model: str, version: str, action: str) -> None:
        self.metrics.child(self.metrics.decisions, model, version, action).inc()

    def count_committed(self, rec: DecisionRecord, error: BaseException | None) -> None:
        """Count the decision of a record :meth:`conclude` left for its caller to commit:
        its action, or ``error`` when the commit failed (and the request with it), as when
        :meth:`conclude` commits it."""
        self.count_decision(rec.model, rec.version, "error" if error is not None else rec.action)

    def commit_records(self, records: Sequence[DecisionRecord], model: ServedModel) -> None:
        """Commit the records :meth:`conclude` left in its ``records`` list (the inline path
        does this in the thread pool, before the answer or the refusal leaves), each counted
        (:meth:`count_committed`); raises what :meth:`commit_record` raises."""
        for rec in records:
            try:
                self.commit_record(rec, model)
            except Exception as exc:
                self.count_committed(rec, exc)
                raise
            self.count_committed(rec, None)

    def commit_record(self, rec: DecisionRecord, model: ServedModel) -> None:
        """Commit one decision record (in a group with concurrent ones); see
        :meth:`record_failure` for a failed write."""
        try:
            self.recorder.add(rec)
        except Exception as exc:
            err = self.record_failure(exc, model, rec.id)
            if err is not None:
                raise err from None

    def _background_failed(self, rec: DecisionRecord, exc: BaseException) -> None:
        """A non-forensic record the background writer could not commit: counted and logged
        (its answer has left)."""
        self.metrics.forensic_write_failures.labels(rec.model).inc()
        log.error("decision %s not recorded (%s)", rec.id, type(exc).__name__)

    def record_failure(
        self, exc: BaseException, model: ServedModel, decision_id: str
    ) -> BaseException | None:
        """What a failed record write becomes: it is counted; a store outage fails closed (the
        503 problem) unless ``forensics.fail_open`` (None: answer without the record); any
        other error stays (a 5xx: no answer leaves without its record)."""
        self.metrics.forensic_write_failures.labels(model.name).inc()
        if not isinstance(exc, DEPENDENCY_ERRORS):
            return exc
        if self.cfg.forensics.fail_open:
            note_fail_open("database", f"record of decision {decision_id}", exc)
            return None
        log.error("decision %s not recorded (%s)", decision_id, type(exc).__name__)
        return unavailable("database")

    def observe(
        self,
        model: ServedModel,
        key: KeyRecord,
        x: np.ndarray,
        det: Detection,
        action: str,
        probs: np.ndarray | None,
        obs: RequestObs | None,
    ) -> None:
        """Metrics of one decision (detector scores and flags, stateful alerts, top-1
        confidence), the drift window, and the request span's attributes."""
        m = self.metrics
        for slot in self.detectors:
            s = det.scores.get(slot.name)
            if isinstance(s, list):
                m.observe_scores(model.name, slot.name, np.asarray(s, dtype=np.float64))
        for name in det.flagged_by:
            m.detector_flags.labels(model.name, model.version, name).inc()
        for st in self.stateful:
            if st.name in det.flagged_by:
                m.stateful_alerts.labels(model.name, st.name, st.action).inc()
        if probs is not None:
            m.observe_confidence(model.name, model.version, probs)
        if self.drift is not None:
            self.drift.update(x, probs)
        if obs is not None and obs.recording:
            attrs: dict[str, Any] = {
                "advguard.model.name": model.name,
                "advguard.model.version": model.version,
                "advguard.decision": action,
                "advguard.client.key_id": key.key_id,
                "advguard.input.fingerprint": fingerprint(x),
                "advguard.input.rows": len(x),
                "advguard.detectors.flagged": list(det.flagged_by),
            }
            for name, sc in det.scores.items():
                if sc is not None:
                    attrs[f"advguard.detector.{name}.score"] = (
                        sc[:64] if isinstance(sc, list) else sc
                    )
            obs.set(attrs)

    def decision(self, decision_id: str) -> dict[str, Any]:
        import re

        if not re.fullmatch(r"[0-9a-f]{32}", decision_id):
            raise Problem("decision-not-found", "no decision with this id")
        try:
            rec = self.store.get_decision(decision_id)  # a malformed row raises StoreCorrupt
            if rec is None and self.background is not None:
                rec = self._queued_decision(decision_id)
        except DEPENDENCY_ERRORS:
            raise unavailable("database") from None
        if rec is None:
            raise Problem("decision-not-found", "no decision with this id")
        return rec.public()

    def _queued_decision(self, decision_id: str) -> DecisionRecord | None:
        """A decision not found yet may wait in this process's background writer (flushed
        now) or in another replica's, which commits it within one linger: read again for up
        to two lingers (a 404 for an unknown id waits that long)."""
        assert self.background is not None
        if self.background.flush(5.0):
            rec = self.store.get_decision(decision_id)
            if rec is not None:
                return rec
        linger = self.cfg.forensics.plain_records_linger_ms / 1000.0
        deadline = time.monotonic() + 2 * linger
        while time.monotonic() < deadline:
            time.sleep(min(0.005, linger))
            rec = self.store.get_decision(decision_id)
            if rec is not None:
                return rec
        return None


def check_modality(
    cfg: GuardConfig,
    model: ServedModel,
    detectors: Sequence[DetectorSlot],
    stateful: Sequence[StatefulSlot],
) -> None:
    """Refuse settings that do not apply to the model's kind of input.

    A text model takes stateful detectors on text features (``features: text-ngrams``, the
    default for it) and input detectors that score strings (a confidence detector calibrated
    on it: ``takes_text``), but no numeric input detectors (feature squeezing, Mahalanobis,
    a confidence detector calibrated on a numeric model), no bit-depth reduction and no drift
    profile; a numeric model takes no text features and no text detectors.
    """
    from advguard.guard.stateful import spec_features

    text = model.kind == "text"
    for s in cfg.stateful:
        spec = dict(s.spec)
        if text:
            spec.setdefault("features", "text-ngrams")
        feats = spec_features(spec)
        if text and feats == "input":
            raise InputError(
                f"stateful detector {s.name!r}: model {model.name} is a text model; its "
                "queries are strings, use features: text-ngrams (the default for text)"
            )
        if not text and feats == "text-ngrams":
            raise InputError(
                f"stateful detector {s.name!r}: features: text-ngrams embed strings; model "
                f"{model.name} takes numeric inputs"
            )
    hint = " (only a confidence detector calibrated on it scores strings)" if text else ""
    slots = [("stateful", sl, "") for sl in stateful] + [("input", d, hint) for d in detectors]
    for kind, slot, why in slots:
        takes_text = getattr(slot.detector, "takes_text", None)  # None: a detector of code
        if takes_text is not None and bool(takes_text) != text:
            what = "strings" if text else "numeric inputs"
            raise InputError(
                f"{kind} detector {slot.name!r} does not take {what} (model {model.name} is a "
                f"{model.kind} model){why}"
            )
    if not text:
        return
    if cfg.sanitize.quantize_bits:
        raise InputError("sanitize.quantize_bits applies to numeric inputs, not a text model")
    if cfg.drift.profile is not None:
        raise InputError("drift profiles describe numeric inputs; a text model takes none yet")


# -- builders for the configured detectors --------------------------------------------
def build_detectors(cfg: GuardConfig, model: ServedModel) -> list[DetectorSlot]:
    """Load the ``detectors:`` of ``cfg`` with ``advguard.defenses.detectors.load_detector``
    (safetensors + JSON, no pickle), each checked against the served model (input shape,
    classes and the digest it was calibrated for)."""
    if not cfg.detectors:
        return []
    from advguard.defenses.detectors import load_detector, model_digest

    digest = model_digest(model.classifier)
    if digest is None and model.digest:
        digest = f"file-sha256:{model.digest}"
    slots = []
    for d in cfg.detectors:
        det = load_detector(cfg.resolve(d.path), model.classifier, digest=digest)
        slots.append(DetectorSlot(d.name, det, resolve_bands(d.name, d.bands, det)))
    return slots


def resolve_bands(name: str, bands: Sequence[Any], det: Any) -> list[tuple[float, str]]:
    out = []
    for b in bands:
        lo = b.min
        if lo is None:
            lo = getattr(det, "threshold", None)
            if lo is None:
                raise InputError(
                    f"detector {name!r} has no calibrated threshold; set 'min' in its bands or "
                    "calibrate it (advguard detector calibrate)"
                )
        out.append((float(lo), b.action))
    return sorted(out)


def build_stateful_detectors(cfg: GuardConfig, model: ServedModel) -> list[StatefulSlot]:
    """Build the ``stateful:`` of ``cfg`` with ``advguard.guard.stateful.build_stateful``
    (PRADA keeps its per-class sets by the served model's predictions). A text model's
    detectors embed its strings with ``features: text-ngrams`` unless the spec says otherwise
    (:func:`check_modality` refuses ``features: input`` for text)."""
    if not cfg.stateful:
        return []
    from advguard.guard.stateful import build_stateful

    predict: Callable[[Any], np.ndarray]
    if model.kind == "text":

        def predict(x: Any) -> np.ndarray:
            return np.asarray(model.predict_proba(x).argmax(1), dtype=np.int64)

        specs = [{"features": "text-ngrams", **dict(s.spec)} for s in cfg.stateful]
    else:
        predict = model.tensor_classifier.predict
        specs = [dict(s.spec) for s in cfg.stateful]
    slots = []
    for s, spec in zip(cfg.stateful, specs, strict=True):
        if spec.get("kind") == "knn" and spec.get("threshold") is None:
            raise InputError(
                f"stateful detector {s.name!r}: a knn detector in the guard needs a "
                "'threshold' (calibrate one on benign traffic: KNNStatefulDetector.calibrate)"
            )
        slots.append(StatefulSlot(s.name, build_stateful(spec, predict=predict), s.action))
    return slots


def block_client(store: GuardStore, client_id: str, reason: str, ttl_s: int | None) -> Any:
    import re

    if not re.fullmatch(r"[0-9a-f]{16}", client_id):
        raise InputError(f"a client id is a key id (16 hex digits), got {client_id!r}")
    return store.add_block(client_id, reason, timedelta(seconds=ttl_s) if ttl_s else None)
