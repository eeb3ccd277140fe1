"""The evaluation runner: every attack at every epsilon, worst case per sample, as a cascade.

For each batch and each epsilon (ascending), the attacks of the suite run in order on the
samples that are still robust: a sample fooled by an earlier attack, or at a smaller epsilon,
is not attacked again and counts as fooled from then on. Only per-sample records are kept
(which epsilon and attack first fooled a sample, perturbation sizes, confidences), never all
adversarial inputs, so memory stays flat with the sample count. Per-batch records are written
to a checkpoint directory so an interrupted run resumes where it stopped.

After the suite, the sanity checks (``advguard.evaluate.sanity``) look for signs of false
robustness; when one fires, the runner escalates (stronger attacks on the survivors) and the
report keeps both numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard import __version__, _safejson
from advguard.atomic import atomic_path, atomic_write_text
from advguard.attacks.norms import norm_of
from advguard.attacks.registry import ATLAS_TECHNIQUES, ATLAS_VERSION, SuiteAttack, build_attack
from advguard.errors import InputError
from advguard.evaluate.report import (
    AttackRow,
    EpsilonResult,
    Example,
    FeatureChange,
    Finding,
    Report,
    SanityCheck,
    Stat,
    SuiteEntry,
)
from advguard.evaluate.threat_model import ThreatModel, check_epsilons
from advguard.models.base import check_inputs, is_evasion, is_white_box, label_count, mask_reject
from advguard.models.checks import check_finite_logits
from advguard.models.wrappers import EOTClassifier
from advguard.stats import proportion, summary

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "suite", "sanity", "escalation"."""

NOT_FOOLED = -1
NEVER = np.iinfo(np.int64).max
STAGES = ("suite", "sanity", "escalation")


def row_key(stage: str, e: int, order: int) -> int:
    """Total order of attack rows: stage, then epsilon, then position in the stage."""
    return STAGES.index(stage) * 1_000_000 + e * 1_000 + order


@dataclass
class Records:
    """Per-sample outcome of the evaluation (arrays of length n_samples)."""

    index: np.ndarray  # position in the data set
    label: np.ndarray
    clean_pred: np.ndarray
    clean_conf: np.ndarray  # probability of the true class on the clean input
    fooled_eps: np.ndarray  # index into epsilons of the first epsilon that fooled it, or -1
    fooled_by: np.ndarray  # suite index of the attack that fooled it (or escalation id), or -1
    linf: np.ndarray
    l2: np.ndarray
    l0: np.ndarray
    adv_conf: np.ndarray  # probability of the true class on the adversarial input
    row_at: np.ndarray  # (n, n_eps): smallest row key that fooled the sample at that epsilon

    @classmethod
    def empty(cls, n: int, n_eps: int) -> Records:
        f = np.full(n, np.nan, dtype=np.float64)
        i = np.full(n, NOT_FOOLED, dtype=np.int64)
        return cls(
            index=i.copy(),
            label=i.copy(),
            clean_pred=i.copy(),
            clean_conf=f.copy(),
            fooled_eps=i.copy(),
            fooled_by=i.copy(),
            linf=f.copy(),
            l2=f.copy(),
            l0=f.copy(),
            adv_conf=f.copy(),
            row_at=np.full((n, n_eps), NEVER, dtype=np.int64),
        )

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(vars(self))

    @property
    def correct(self) -> np.ndarray:
        return self.clean_pred == self.label

    def robust_at(self, e: int, before_key: int = NEVER) -> np.ndarray:
        """Bool mask: correctly classified and not fooled at epsilon index ``e`` or below
        (by rows ordered at or before ``before_key``, default all)."""
        if before_key == NEVER:
            return self.correct & (self.row_at[:, : e + 1] == NEVER).all(1)
        return self.correct & (self.row_at[:, : e + 1] > before_key).all(1)


@dataclass
class StageStats:
    """Bookkeeping of one attack at one epsilon (summed over batches)."""

    attacked: int = 0
    newly_fooled: int = 0
    forward: int = 0
    gradient: int = 0
    seconds: float = 0.0

    def add(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class RunState:
    epsilons: list[float]
    attacks: list[SuiteAttack]
    records: Records
    stats: dict[tuple[int, str, str], StageStats] = field(default_factory=dict)
    order: dict[tuple[str, str], int] = field(default_factory=dict)
    examples: dict[int, list[Example]] = field(default_factory=dict)
    feature_abs: dict[int, np.ndarray] = field(default_factory=dict)
    feature_changed: dict[int, np.ndarray] = field(default_factory=dict)
    feature_count: dict[int, int] = field(default_factory=dict)

    def stat(self, e: int, attack: str, stage: str) -> StageStats:
        self.order.setdefault((stage, attack), len([k for k in self.order if k[0] == stage]))
        return self.stats.setdefault((e, attack, stage), StageStats())

    def key(self, e: int, attack: str, stage: str) -> int:
        self.stat(e, attack, stage)
        return row_key(stage, e, self.order[(stage, attack)])


def sha256_array(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def select_samples(n_total: int, n: int, seed: int) -> np.ndarray:
    """Deterministic random subset (in random order) of ``n`` of ``n_total`` indices."""
    if n_total == 0:
        raise InputError("the data set is empty")
    perm = np.random.default_rng(seed).permutation(n_total)
    return np.sort(perm[: min(n, n_total)])


def declared_defense(model: Any) -> tuple[list[str], bool]:
    """(non-differentiable transform names, randomized?) that ``model`` declares."""
    return list(getattr(model, "nondifferentiable", None) or []), bool(
        getattr(model, "randomized", False)
    )


def adaptive_models(model: Any, tm: ThreatModel) -> tuple[Any, Any, dict[str, Any]]:
    """The model the attacks differentiate/query, the model that judges, and what was adapted.

    A model that declares non-differentiable input transforms is attacked through BPDA
    (straight-through gradients, Athalye et al. 2018); one that declares randomness is
    attacked with EOT over ``tm.eot_samples`` draws. A randomized model is always judged (clean
    and adversarial predictions) on its logits averaged over as many draws, so one lucky draw
    neither hides nor fakes an adversarial example.
    """
    nondiff, randomized = declared_defense(model)
    attack_model, judge, used = model, model, []
    if randomized:  # measuring, not attacking: always judge on the mean over draws
        judge = EOTClassifier(model, samples=tm.eot_samples)
    if tm.adaptive:
        if nondiff and is_white_box(model) and hasattr(model, "with_bpda"):
            attack_model = model.with_bpda()
            used.append(f"BPDA (straight-through gradients) through {', '.join(nondiff)}")
        if randomized:
            attack_model = EOTClassifier(attack_model, samples=tm.eot_samples)
            used.append(f"EOT: gradients and scores averaged over {tm.eot_samples} draws")
    info = {
        "declared_nondifferentiable": nondiff,
        "declared_randomized": randomized,
        "enabled": tm.adaptive,
        "used": used,
    }
    return attack_model, judge, info


def looks_random(model: Any, x: np.ndarray, calls: int = 4) -> bool:
    """Whether ``model`` gives different logits for the same inputs (up to 64 of ``x``)."""
    xs = torch.as_tensor(x[:64], dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(0)
        z = model.logits(xs).cpu()
        scale = max(1.0, float(z.abs().max()))
        return any(
            float((model.logits(xs).cpu() - z).abs().max()) > 1e-5 * scale for _ in range(calls - 1)
        )


class Evaluator:
    """Configure once, then :meth:`run`. See :func:`evaluate` for the one-call form."""

    def __init__(
        self,
        model: Any,
        x: np.ndarray,
        y: np.ndarray,
        threat_model: ThreatModel,
        *,
        model_info: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        feature_names: Sequence[str] | None = None,
        baseline: Report | None = None,
        progress: Progress | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        keep_examples: int = 8,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.model = model
        self.tm = threat_model
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        self.model_info = dict(model_info or {})
        self.data_info = dict(data_info or {})
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.baseline = baseline
        self.progress = progress or (lambda stage, done, total: None)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.keep_examples = keep_examples
        self.clock = clock or time.perf_counter  # injectable for tests: every timing uses it
        self._validate()
        self.attack_model, self.judge_model, self.adaptive = adaptive_models(model, threat_model)
        if (  # probe local models only: a remote one's query budget is the user's
            not isinstance(self.judge_model, EOTClassifier)
            and is_white_box(model)
            and looks_random(model, self.x)
        ):
            # undeclared randomness: judge on averaged logits too, so that one lucky draw
            # neither hides nor fakes an adversarial example (the sanity checks report it)
            self.judge_model = EOTClassifier(model, samples=threat_model.eot_samples)

    # -- set-up ---------------------------------------------------------------
    def _validate(self) -> None:
        m, tm = self.model, self.tm
        if tm.is_text:
            raise InputError(
                f"threat model {tm.name!r} is a text threat model (norm {tm.norm}); evaluate text "
                "with advguard.evaluate.text_runner.evaluate_text or job.run_evaluation"
            )
        if len(self.x) != len(self.y):
            raise InputError(f"{len(self.x)} inputs but {len(self.y)} labels")
        if len(self.x) == 0:
            raise InputError("the data set is empty")
        if tuple(self.x.shape[1:]) != tuple(m.input_shape):
            raise InputError(
                f"data samples have shape {tuple(self.x.shape[1:])} but the model expects "
                f"{tuple(m.input_shape)}"
            )
        check_epsilons(tm, getattr(m, "bounds", None), m.input_shape)
        n_labels = label_count(m)
        if self.y.dtype.kind not in "iu" or self.y.min() < 0 or self.y.max() >= n_labels:
            raise InputError(
                f"labels must be integers in [0, {n_labels - 1}] for a {n_labels}-class model"
            )
        check_inputs(m, torch.as_tensor(self.x[: min(len(self.x), 4096)], dtype=torch.float32))
        self.attacks = [
            build_attack(s.attack, norm=tm.norm, seed=tm.seed, **s.params) for s in tm.attacks
        ]
        needs_grad = [a.name for a in self.attacks if a.entry.knowledge == "white-box"]
        if needs_grad and not is_white_box(m):
            raise InputError(
                f"attacks {', '.join(needs_grad)} need gradients but the model "
                f"({type(m).__name__}) is black-box; use a black-box threat model"
            )
        if tm.goal == "targeted" and any(a.entry.sweep_targets for a in self.attacks):
            raise InputError(
                "apgd-t is an untargeted suite member; use apgd-dlr for a targeted goal"
            )

    # -- main loop --------------------------------------------------------------
    def run(self) -> Report:
        """Run the suite and the sanity checks; returns the report.

        The global torch RNG is seeded with the threat model's seed for the run (randomized
        defenses draw from it) and restored afterwards.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tm.seed)
            return self._run()

    def _run(self) -> Report:
        t_start = self.clock()
        tm = self.tm
        idx = select_samples(len(self.x), tm.samples, tm.seed)
        state = RunState(list(tm.epsilons), self.attacks, Records.empty(len(idx), len(tm.epsilons)))
        for a in self.attacks:
            state.stat(0, a.name, "suite")
        state.records.index[:] = idx
        state.records.label[:] = self.y[idx]
        batches = [
            np.arange(i, min(i + tm.batch_size, len(idx)))
            for i in range(0, len(idx), tm.batch_size)
        ]
        if self.resume:
            done = self._load_checkpoint(state, idx)
        else:
            self.clear_checkpoint()
            done = set()
        self.progress("suite", 0, len(batches))
        for b, pos in enumerate(batches):
            if b in done:
                self.progress("suite", b + 1, len(batches))
                continue
            self._run_batch(state, pos, stage="suite")
            self._save_checkpoint(state, idx, b, pos)
            self.progress("suite", b + 1, len(batches))
        t_suite = self.clock() - t_start

        first_robust = [int(state.records.robust_at(e).sum()) for e in range(len(state.epsilons))]
        checks: list[SanityCheck] = []
        t_sanity = 0.0
        if tm.sanity_checks:
            from advguard.evaluate.sanity import run_sanity_checks

            t0 = self.clock()
            checks = run_sanity_checks(self, state)
            t_sanity = self.clock() - t0
        return self._build_report(
            state,
            idx,
            checks,
            first_robust,
            timing={
                "suite_seconds": t_suite,
                "sanity_and_escalation_seconds": t_sanity,
                **{  # the undeclared-defense escalation's own time, when it ran
                    f"{c.id.replace('-', '_')}_escalation_seconds": c.details["seconds"]
                    for c in checks
                    if c.id == "undeclared-defense"
                },
                "total_seconds": self.clock() - t_start,
            },
        )

    def _tensor(self, pos: np.ndarray, state: RunState) -> tuple[torch.Tensor, torch.Tensor]:
        ds_idx = state.records.index[pos]
        x = torch.as_tensor(self.x[ds_idx], dtype=torch.float32)
        y = torch.as_tensor(self.y[ds_idx], dtype=torch.long)
        return x, y

    def _run_batch(self, state: RunState, pos: np.ndarray, stage: str) -> None:
        rec, model = state.records, self.judge_model
        x, y = self._tensor(pos, state)
        logits = model.logits(x)
        check_finite_logits(logits)  # NaN/Inf outputs: stop now, not after a misleading run
        probs = torch.softmax(logits.double(), 1).cpu()
        rec.clean_pred[pos] = probs.argmax(1).numpy()
        rec.clean_conf[pos] = probs.gather(1, y[:, None]).squeeze(1).numpy()
        targets = self._targets(probs, y)
        for e, eps in enumerate(state.epsilons):
            for a in state.attacks:
                self.attack_survivors(state, a, pos, x, y, e, eps, targets, stage, a.name)

    def _targets(self, probs: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor] | None:
        if self.tm.goal != "targeted":
            return None
        k = min(self.tm.target_classes, self.model.num_classes - 1)
        p = mask_reject(self.model, probs, -2.0)  # the reject class is never a target
        p[torch.arange(len(y)), y] = -1.0
        ranked = p.argsort(1, descending=True)
        return [ranked[:, r] for r in range(k)]

    def attack_survivors(
        self,
        state: RunState,
        attack: SuiteAttack,
        pos: np.ndarray,
        x: torch.Tensor,
        y: torch.Tensor,
        e: int,
        eps: float,
        targets: list[torch.Tensor] | None,
        stage: str,
        label: str,
        model: Any = None,
    ) -> int:
        """Run ``attack`` at epsilon index ``e`` on the still-robust samples among ``pos``.

        ``x``/``y`` are the inputs for ``pos``. Returns the number of newly fooled samples.
        """
        rec = state.records
        model = model if model is not None else self.attack_model
        alive = rec.robust_at(e)[pos]
        st = state.stat(e, label, stage)
        if not alive.any() or eps == 0:
            return 0
        sel = np.nonzero(alive)[0]
        xs, ys = x[sel], y[sel]
        t0 = self.clock()
        f0, g0 = self.model.queries.snapshot()
        fooled = torch.zeros(len(sel), dtype=torch.bool)
        x_adv = xs.clone()
        for t in targets if targets is not None else [None]:
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            res = attack.run(model, xs[todo], ys[todo], eps, None if t is None else t[sel][todo])
            # success is re-verified below with the real model, bounds and ball
            ok = res.success.cpu()
            x_adv[todo[ok]] = res.x_adv.cpu()[ok]
            fooled[todo[ok]] = True
        f1, g1 = self.model.queries.snapshot()
        # trust nothing: re-check every claimed adversarial with the real model
        if fooled.any():
            fi = fooled.nonzero().squeeze(1)
            check = self._verify(x_adv[fi], xs[fi], ys[fi], eps)
            schema = getattr(attack.attack, "schema", None)
            if schema is not None:  # tabular constraints: an invalid row is no adversarial
                valid = schema.validate_rows(
                    xs[fi].numpy(), x_adv[fi].numpy(), epsilon=eps, norm=self.tm.norm
                )
                check &= torch.as_tensor(np.asarray(valid, dtype=bool))
            fooled[fi[~check]] = False
        n_new = int(fooled.sum())
        st.add(
            {
                "attacked": len(sel),
                "newly_fooled": n_new,
                "forward": f1 - f0,
                "gradient": g1 - g0,
                "seconds": self.clock() - t0,
            }
        )
        if n_new:
            fi = fooled.nonzero().squeeze(1)
            self._record(
                state,
                pos[sel[fi.numpy()]],
                xs[fi],
                x_adv[fi],
                ys[fi],
                e,
                eps,
                label,
                state.key(e, label, stage),
            )
        return n_new

    def _verify(
        self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """An adversarial counts only if it is in bounds, in the ball, and misclassified."""
        lo, hi = self.model.bounds
        tol = 1e-5 * max(1.0, eps)
        d = norm_of(x_adv - x, self.tm.norm)
        ok = (
            (d <= eps + tol)
            & (x_adv.flatten(1).amin(1) >= lo - 1e-6)
            & (x_adv.flatten(1).amax(1) <= hi + 1e-6)
        )
        pred = self.judge_model.logits(x_adv).argmax(1).cpu()
        # a rejection by a guarded model is no evasion; for a targeted goal the target is one
        # of the wrong classes
        return ok & is_evasion(self.model, pred, y)

    def _record(
        self,
        state: RunState,
        pos: np.ndarray,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        e: int,
        eps: float,
        label: str,
        key: int,
    ) -> None:
        rec = state.records
        d = x_adv - x
        probs = torch.softmax(self.judge_model.logits(x_adv).double(), 1).cpu()
        rec.fooled_eps[pos] = e
        rec.fooled_by[pos] = key
        rec.row_at[pos, e] = np.minimum(rec.row_at[pos, e], key)
        rec.linf[pos] = norm_of(d, "linf").double().numpy()
        rec.l2[pos] = norm_of(d, "l2").double().numpy()
        rec.l0[pos] = norm_of(d, "l0").double().numpy()
        rec.adv_conf[pos] = probs.gather(1, y[:, None]).squeeze(1).numpy()
        if self.feature_names is not None and x.ndim == 2:
            a = d.abs().double().sum(0).numpy()
            c = (d.abs() > 1e-9).double().sum(0).numpy()
            state.feature_abs[e] = state.feature_abs.get(e, 0) + a
            state.feature_changed[e] = state.feature_changed.get(e, 0) + c
            state.feature_count[e] = state.feature_count.get(e, 0) + len(d)
        kept = state.examples.setdefault(e, [])
        for i in range(len(pos)):
            if len(kept) >= self.keep_examples:
                break
            p = int(pos[i])
            kept.append(
                Example(
                    epsilon=eps,
                    attack=label,
                    index=int(rec.index[p]),
                    label=int(y[i]),
                    clean_prediction=int(rec.clean_pred[p]),
                    clean_confidence=float(rec.clean_conf[p]),
                    adversarial_prediction=int(probs[i].argmax()),
                    adversarial_confidence=float(probs[i].max()),
                    x=x[i].tolist(),
                    x_adv=x_adv[i].tolist(),
                )
            )

    # -- checkpoints ----------------------------------------------------------
    def clear_checkpoint(self) -> None:
        """Drop an earlier run's checkpoint files (a fresh run must not list stale batches)."""
        d = self.checkpoint_dir
        if d is None or not d.is_dir():
            return
        for p in [*d.glob("batch-*.npz"), d / "state.json"]:
            if p.is_file():
                p.unlink()

    def _run_key(self, idx: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(self.tm.model_dump_json().encode())
        h.update(str(self.model_info.get("sha256", "")).encode())
        h.update(sha256_array(self.x, self.y, idx).encode())
        return h.hexdigest()

    def _save_checkpoint(self, state: RunState, idx: np.ndarray, b: int, pos: np.ndarray) -> None:
        if self.checkpoint_dir is None:
            return
        d = self.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        rec = {k: v[pos] for k, v in state.records.as_dict().items()}
        with atomic_path(d / f"batch-{b:05d}.npz") as tmp:
            np.savez(tmp, pos=pos, **rec)
        stats = {f"{e}|{a}|{s}": vars(v) for (e, a, s), v in state.stats.items()}
        meta = {
            "run_key": self._run_key(idx),
            "batches": sorted(
                int(p.stem.split("-")[1]) for p in d.glob("batch-*.npz") if ".tmp" not in p.name
            ),
            "stats": stats,
            "order": [[a, b, o] for (a, b), o in state.order.items()],
            "examples": {str(e): [x.model_dump() for x in v] for e, v in state.examples.items()},
        }
        atomic_write_text(d / "state.json", json.dumps(meta))

    def _load_checkpoint(self, state: RunState, idx: np.ndarray) -> set[int]:
        """Restore finished batches; a checkpoint that cannot be read is an :class:`InputError`
        (never a partial restore: the caller's state is only changed on success)."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "state.json").exists():
            return set()
        trial = RunState(
            state.epsilons,
            state.attacks,
            Records(**{k: v.copy() for k, v in state.records.as_dict().items()}),
            stats=dict(state.stats),
            order=dict(state.order),
            examples=dict(state.examples),
        )
        try:
            done = self._read_checkpoint(trial, idx)
        except InputError:
            raise
        except (
            ValueError,  # bad JSON/npz content, wrong shapes, bad numbers
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            OSError,  # unreadable file
            EOFError,
            MemoryError,  # a header claiming a huge array
            zipfile.BadZipFile,
        ) as e:
            raise InputError(
                f"checkpoint in {self.checkpoint_dir} is corrupt ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); delete it or drop --resume"
            ) from None
        state.records, state.stats, state.order = trial.records, trial.stats, trial.order
        state.examples = trial.examples
        return done

    def _read_checkpoint(self, state: RunState, idx: np.ndarray) -> set[int]:
        assert self.checkpoint_dir is not None
        meta = _safejson.load_file(self.checkpoint_dir / "state.json", what="checkpoint state")
        if not isinstance(meta, dict):
            raise ValueError("state.json is not a JSON object")
        if meta.get("run_key") != self._run_key(idx):
            raise InputError(
                f"checkpoint in {self.checkpoint_dir} belongs to a different run (model, data or "
                "threat model changed); delete it or drop --resume"
            )
        done: set[int] = set()
        n = len(idx)
        for b in meta["batches"]:
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < max(n, 1):
                raise ValueError(f"batch number {b!r} is out of range")
            path = self.checkpoint_dir / f"batch-{b:05d}.npz"
            if not path.exists():
                continue
            with np.load(path, allow_pickle=False) as z:
                pos = np.asarray(z["pos"])
                if (
                    pos.dtype.kind not in "iu"
                    or pos.ndim != 1
                    or (len(pos) and (pos.min() < 0 or pos.max() >= n))
                ):
                    raise ValueError(f"{path.name}: sample positions are not indices < {n}")
                for k, arr in state.records.as_dict().items():
                    v = np.asarray(z[k])
                    if v.shape != (len(pos), *arr.shape[1:]):
                        raise ValueError(f"{path.name}: {k} has shape {v.shape}")
                    arr[pos] = v
            done.add(b)
        for key, v in meta["stats"].items():
            e, a, s = key.split("|")
            state.stats[(int(e), a, s)] = StageStats(**v)
        for a, b, o in meta.get("order", []):
            state.order[(a, b)] = o
        for e, exs in meta.get("examples", {}).items():
            state.examples[int(e)] = [Example.model_validate(x) for x in exs]
        return done

    # -- report ---------------------------------------------------------------
    def _build_report(
        self,
        state: RunState,
        idx: np.ndarray,
        checks: list[SanityCheck],
        first_robust: list[int],
        timing: dict[str, float],
    ) -> Report:
        from advguard.evaluate.verdict import judge

        rec, tm = state.records, self.tm
        n = len(idx)
        n_correct = int(rec.correct.sum())
        results = []
        for e, eps in enumerate(state.epsilons):
            robust = int(rec.robust_at(e).sum())
            fooled = rec.correct & ~rec.robust_at(e)
            rows = []
            keyed = sorted(
                (
                    (state.key(ee, name, st), name, st, v)
                    for (ee, name, st), v in state.stats.items()
                    if ee == e
                )
            )
            for order, (k, name, stage, v) in enumerate(keyed, start=1):
                rows.append(
                    AttackRow(
                        attack=name,
                        order=order,
                        attacked=v.attacked,
                        newly_fooled=v.newly_fooled,
                        attack_success_rate=proportion(v.newly_fooled, v.attacked),
                        robust_accuracy_after=proportion(int(rec.robust_at(e, k).sum()), n),
                        forward_evals=v.forward,
                        gradient_evals=v.gradient,
                        seconds=v.seconds,
                        examples_per_second=(v.attacked / v.seconds) if v.seconds > 0 else None,
                        stage=stage,
                    )
                )
            pert = {k: Stat(**summary(getattr(rec, k)[fooled])) for k in ("linf", "l2", "l0")}
            drop = rec.clean_conf[fooled] - rec.adv_conf[fooled]
            results.append(
                EpsilonResult(
                    epsilon=eps,
                    robust_accuracy=proportion(robust, n),
                    fooling_rate=proportion(int(fooled.sum()), n_correct),
                    first_robust_accuracy=(
                        proportion(first_robust[e], n) if first_robust[e] != robust else None
                    ),
                    perturbation=pert,
                    mean_true_class_confidence_drop=float(drop.mean()) if len(drop) else None,
                    per_attack=rows,
                )
            )
        clean = proportion(n_correct, n)
        trustworthy = not any(c.status == "fail" for c in checks)
        verdict = judge(tm, clean, results, trustworthy, self.baseline)
        suite = [
            SuiteEntry(
                order=i + 1,
                attack=a.name,
                description=a.entry.description,
                knowledge=a.entry.knowledge,
                params=a.params(),
                atlas=list(a.entry.atlas),
            )
            for i, a in enumerate(state.attacks)
        ]
        feature_changes: dict[str, list[FeatureChange]] = {}
        if self.feature_names is not None:
            for e, tot in state.feature_abs.items():
                cnt = state.feature_count[e]
                order_f = np.argsort(-tot)[:15]
                feature_changes[f"{state.epsilons[e]:g}"] = [
                    FeatureChange(
                        feature=self.feature_names[j],
                        mean_abs_change=float(tot[j] / cnt),
                        share_changed=float(state.feature_changed[e][j] / cnt),
                    )
                    for j in order_f
                ]
        examples = [x for e in sorted(state.examples) for x in state.examples[e]]
        return Report(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            advguard_version=__version__,
            environment=environment(self.model),
            model={
                "adapter": type(self.model).__name__,
                "num_classes": self.model.num_classes,
                "input_shape": list(self.model.input_shape),
                "bounds": list(self.model.bounds),
                "white_box": is_white_box(self.model),
                **(
                    {"defense": self.model.describe(), "adaptive_attacks": self.adaptive}
                    if (
                        declared_defense(self.model) != ([], False)
                        or hasattr(self.model, "reject_class")
                    )
                    and hasattr(self.model, "describe")
                    else {}
                ),
                **self.model_info,
            },
            data={
                "n_total": len(self.x),
                "n_evaluated": n,
                "sha256": self.data_info.get("sha256") or sha256_array(self.x, self.y),
                **self.data_info,
            },
            threat_model=tm.model_dump(),
            suite=suite,
            sample_indices_sha256=sha256_array(idx),
            clean_accuracy=clean,
            results=results,
            sanity_checks=checks,
            trustworthy=trustworthy,
            verdict=verdict,
            findings=findings(tm, results, state.attacks),
            examples=examples,
            feature_changes=feature_changes,
            timing=timing,
            baseline=(
                {
                    "clean_accuracy": self.baseline.clean_accuracy.value,
                    "created": self.baseline.created,
                    "model": self.baseline.model,
                }
                if self.baseline is not None
                else None
            ),
        )


def findings(
    tm: ThreatModel, results: list[EpsilonResult], attacks: list[SuiteAttack]
) -> list[Finding]:
    """One ATLAS-tagged finding per epsilon where attacks evaded the model."""
    out = []
    techniques = sorted({t for a in attacks for t in a.entry.atlas if t.startswith("AML.T0043.")})
    for r in results:
        fr = r.fooling_rate.value
        if not fr:
            continue
        severity = "high" if fr >= 0.5 else "medium" if fr >= 0.2 else "low"
        for tid in ["AML.T0015", *techniques]:
            out.append(
                Finding(
                    atlas_technique=tid,
                    atlas_name=ATLAS_TECHNIQUES[tid],
                    atlas_version=ATLAS_VERSION,
                    epsilon=r.epsilon,
                    severity=severity,
                    summary=(
                        f"{r.fooling_rate.k} of {r.fooling_rate.n} correctly classified samples "
                        f"({fr:.1%}) were evaded within {tm.norm} epsilon {r.epsilon:g}"
                    ),
                )
            )
    return out


def environment(model: Any) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "onnxruntime", "pydantic"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    dev = getattr(model, "device", torch.device("cpu"))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "gpu": gpu,
        "packages": versions,
    }


def evaluate(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    threat_model: ThreatModel,
    **kwargs: Any,
) -> Report:
    """Evaluate ``model`` on ``(x, y)`` under ``threat_model``; see :class:`Evaluator`."""
    return Evaluator(model, x, y, threat_model, **kwargs).run()
