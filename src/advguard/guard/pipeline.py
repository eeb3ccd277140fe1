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

import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from advguard.errors import InputError
from advguard.guard.auth import AuthError, authenticate, extract_key, load_pepper
from advguard.guard.batching import GroupCommit, MicroBatcher, process_batch
from advguard.guard.config import SEVERITY, GuardConfig
from advguard.guard.edge import check_batch
from advguard.guard.forensics import encode_payload, fingerprint, load_fernet
from advguard.guard.metrics import GuardMetrics
from advguard.guard.problems import Problem
from advguard.guard.ratelimit import Limiter, LimitResult
from advguard.guard.serving import ServedModel, load_served_model
from advguard.guard.storage import (
    DecisionRecord,
    GuardStore,
    KeyRecord,
    OutputPolicy,
    now,
)

if TYPE_CHECKING:  # cryptography is an optional extra (guard)
    from cryptography.fernet import Fernet

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
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.model = model
        self.fallback = fallback
        self.detectors = list(detectors)
        self.stateful = list(stateful)
        self.limiter = limiter or Limiter(cfg.limits)
        self.pepper = pepper
        self.fernet = fernet
        self.rng = rng or random.Random()
        self.metrics = GuardMetrics()
        #: The output policy of keys that set none (built once, not per request).
        self.default_output = OutputPolicy(**cfg.output.model_dump())
        #: Decision records are committed in groups (each answer still waits for its own).
        self.recorder = GroupCommit(store.add_decisions)
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
        if fallback is not None and fallback.spec != model.spec:
            raise InputError(
                f"the fallback model takes {fallback.spec} but the model takes {model.spec}"
            )
        if cfg.forensics.mode == "encrypted" and fernet is None:
            raise InputError("forensics.mode 'encrypted' needs a Fernet key")

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
        pepper = load_pepper(cfg.auth.pepper_env, cfg.resolve(cfg.auth.pepper_file))
        fernet = None
        if cfg.forensics.mode == "encrypted":
            fernet = load_fernet(cfg.forensics.key_env, cfg.resolve(cfg.forensics.key_file))
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
        )

    def close(self) -> None:
        self.store.close()

    def get_model(self, name: str) -> ServedModel:
        if name != self.model.name:
            raise Problem("model-not-found", f"this guard serves the model {self.model.name!r}")
        return self.model

    # -- steps ----------------------------------------------------------------------------
    def authenticate(
        self, authorization: str | None, x_api_key: str | None, scope: str
    ) -> KeyRecord:
        try:
            return authenticate(
                self.store, extract_key(authorization, x_api_key), scope, pepper=self.pepper
            )
        except AuthError as e:
            self.metrics.auth_failures.labels(e.kind).inc()
            headers = {"WWW-Authenticate": 'Bearer realm="advguard"'} if e.status == 401 else {}
            raise Problem(e.kind, e.detail, headers=headers) from None

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

    def check_rate(self, key: KeyRecord, model: str) -> LimitResult:
        res = self.limiter.hit_rate(key.key_id)
        if not res.allowed:
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
        res = self.limiter.hit_budget(key.key_id, rows)
        if res is not None and not res.allowed:
            raise self._refuse(res, model)
        return res

    def validate(self, x: np.ndarray, model: ServedModel) -> np.ndarray:
        return check_batch(
            x,
            model.spec,
            max_batch=self.cfg.edge.max_batch,
            clip=self.cfg.edge.out_of_bounds == "clip",
        )

    def sanitize(self, x: np.ndarray, model: ServedModel) -> np.ndarray:
        bits = self.cfg.sanitize.quantize_bits
        return _quantize(x, bits, model.spec.bounds) if bits else x

    # -- the whole request ------------------------------------------------------------
    def process(self, key: KeyRecord, model: ServedModel, x: np.ndarray, started: float) -> Outcome:
        """Run sanitize -> detect -> decide -> answer -> record on a validated batch whose
        rate and budget were already taken. Raises :class:`Problem` for reject/block."""
        pending = self.decide(key, model, x, started)
        probs = None if pending.refused else self.answer(model, pending.xs, pending.row_actions)
        return self.conclude(pending, probs)

    def decide(
        self,
        key: KeyRecord,
        model: ServedModel,
        x: np.ndarray,
        started: float,
        *,
        scores: Sequence[np.ndarray] | None = None,
    ) -> Pending:
        """Sanitize, detect (``scores``: the detectors' scores of the sanitized batch, already
        computed, e.g. by the micro-batcher on several requests at once), observe the client
        and decide; nothing is answered or recorded yet."""
        decision_id = uuid.uuid4().hex
        xs = self.sanitize(x, model)
        det = self.detect(xs, scores)
        self.observe_stateful(key, xs, det)
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
    ) -> Outcome:
        """Record, count and answer a decided request (``probs``: its scores, None when
        refused). With ``records`` the decision record is appended there for the caller to
        commit (with others) before the answer leaves. Raises for reject/block."""
        latency_ms = (time.perf_counter() - p.started) * 1000.0
        model, key, action = p.model, p.key, p.action
        if p.forensic or self.cfg.forensics.record_all_decisions:
            rec = self.decision_record(p, latency_ms)
            if records is None:
                self.recorder.add(rec)  # committed before the answer leaves
            else:
                records.append(rec)
        self.metrics.decisions.labels(model.name, model.version, action).inc()
        self.refuse_if_needed(action, key, p.decision_id, p.det.reasons)
        assert probs is not None
        self.metrics.rows.labels(model.name, model.version).inc(len(p.xs))
        return Outcome(
            p.decision_id,
            action,
            model,
            self.fallback,
            probs,
            p.det.row_actions,
            key.output or self.default_output,
        )

    def score_inputs(self, xs: np.ndarray) -> list[np.ndarray]:
        """Every input detector's scores of the sanitized batch ``xs`` (checked)."""
        out = []
        for slot in self.detectors:
            s = np.asarray(slot.detector.score(xs), dtype=np.float64).reshape(-1)
            if s.shape != (len(xs),) or not np.isfinite(s).all():
                raise RuntimeError(f"detector {slot.name} returned bad scores")
            out.append(s)
        return out

    def detect(self, xs: np.ndarray, scores: Sequence[np.ndarray] | None = None) -> Detection:
        """Score the sanitized batch with every input detector (or take its ``scores``) and
        map scores to row actions."""
        det = Detection(row_actions=["allow"] * len(xs))
        scores = self.score_inputs(xs) if scores is None else scores
        for slot, s in zip(self.detectors, scores, strict=True):
            det.scores[slot.name] = [round(float(v), 6) for v in s]
            for i, a in enumerate(slot.actions(s)):
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
            det.reasons.append(
                f"{st.name}:{st.action} (score {float(v.score):.4g} > "
                f"{float(v.threshold):.4g} after {int(v.queries_seen)} queries)"
            )
            if st.action == "block":
                det.block = True
            else:
                for i in range(len(det.row_actions)):
                    det.escalate_row(i, st.action)

    def answer(self, model: ServedModel, xs: np.ndarray, row_actions: list[str]) -> np.ndarray:
        """Scores for the batch: allowed rows from ``model``, flagged rows from the fallback
        (flagged rows never reach the primary model)."""
        probs = np.empty((len(xs), model.spec.num_classes), dtype=np.float64)
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
            self.store.add_block(key.key_id, f"stateful detector: {'; '.join(reasons)}")
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

    def decision(self, decision_id: str) -> dict[str, Any]:
        import re

        if not re.fullmatch(r"[0-9a-f]{32}", decision_id):
            raise Problem("decision-not-found", "no decision with this id")
        rec = self.store.get_decision(decision_id)  # a malformed row raises StoreCorrupt
        if rec is None:
            raise Problem("decision-not-found", "no decision with this id")
        return rec.public()


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
    (PRADA keeps its per-class sets by the served model's predictions)."""
    if not cfg.stateful:
        return []
    from advguard.guard.stateful import build_stateful

    predict = model.classifier.predict
    return [
        StatefulSlot(s.name, build_stateful(dict(s.spec), predict=predict), s.action)
        for s in cfg.stateful
    ]


def block_client(store: GuardStore, client_id: str, reason: str, ttl_s: int | None) -> Any:
    import re

    if not re.fullmatch(r"[0-9a-f]{16}", client_id):
        raise InputError(f"a client id is a key id (16 hex digits), got {client_id!r}")
    return store.add_block(client_id, reason, timedelta(seconds=ttl_s) if ttl_s else None)
