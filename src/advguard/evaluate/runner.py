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

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.attacks.base import AttackResult
from advguard.attacks.norms import norm_of, parse_norm
from advguard.attacks.registry import SuiteAttack, build_attack
from advguard.errors import InputError
from advguard.evaluate.api import AttackPool
from advguard.evaluate.build_report import (
    build_report,
    declared_defense,
    environment,
    findings,
)
from advguard.evaluate.checkpoint import (
    clear_checkpoint,
    load_checkpoint,
    run_key,
    save_checkpoint,
)
from advguard.evaluate.report import Example, Report, SanityCheck, Stage
from advguard.evaluate.sanity import run_sanity_checks, sanity_disabled_check
from advguard.evaluate.state import (
    NEVER,
    NOT_FOOLED,
    STAGES,
    Records,
    RunState,
    Shard,
    StageStats,
    keep_examples,
    merge_shards,
    row_key,
    select_samples,
    sha256_array,
)
from advguard.evaluate.threat_model import ThreatModel, check_epsilons
from advguard.models.base import check_inputs, is_evasion, is_white_box, label_count, mask_reject
from advguard.models.checks import check_finite_logits
from advguard.models.wrappers import EOTClassifier

__all__ = [  # run state, checkpoints and report building moved out; their names stay here
    "NEVER",
    "NOT_FOOLED",
    "STAGES",
    "Evaluator",
    "Progress",
    "Records",
    "RunState",
    "Shard",
    "StageStats",
    "adaptive_models",
    "declared_defense",
    "environment",
    "evaluate",
    "findings",
    "looks_random",
    "query_only",
    "row_key",
    "select_samples",
    "sha256_array",
]

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "suite", "sanity", "escalation"."""


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


QUERY_ONLY_TECHNIQUE = "AML.T0043.001"
"""ATLAS "Craft Adversarial Data: Black-Box Optimization": the attack only queries the model."""


def query_only(attack: SuiteAttack) -> bool:
    """Whether ``attack`` only queries the model (score- or decision-based black-box search:
    Square, HopSkipJump, SPSA, constrained search), never differentiating anything, not even a
    surrogate (transfer attacks do). The runner runs such attacks under
    ``torch.inference_mode`` (about 10% less CPU for Square on the digits CNN, same outputs)."""
    entry = attack.entry
    return entry.knowledge == "black-box" and QUERY_ONLY_TECHNIQUE in entry.atlas


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
        self._units: list[int] = []  # finished units in the checkpoint (first positions)
        self.pool: AttackPool | None = None
        """Workers for the attack calls of the sanity checks and escalations (set by a
        distributed backend around :meth:`finish`); None runs them here."""
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

    def samples(self) -> np.ndarray:
        """The data-set indices this run evaluates (sorted; the threat model's sample draw)."""
        return select_samples(len(self.x), self.tm.samples, self.tm.seed)

    def new_state(self, idx: np.ndarray) -> RunState:
        """A fresh run state for the samples ``idx`` (data-set indices)."""
        tm = self.tm
        n_feat = len(self.feature_names or ()) if self.x.ndim == 2 else 0
        records = Records.empty(len(idx), len(tm.epsilons), n_feat)
        state = RunState(list(tm.epsilons), self.attacks, records)
        for a in self.attacks:
            state.stat(0, a.name, "suite")
        state.records.index[:] = idx
        state.records.label[:] = self.y[idx]
        return state

    def batches(self, positions: np.ndarray) -> list[np.ndarray]:
        """``positions`` cut into batches of the threat model's batch size."""
        bs = self.tm.batch_size
        return [positions[i : i + bs] for i in range(0, len(positions), bs)]

    # -- shards: the suite on part of the samples, merged into one report ----------------
    def shard_indices(self, count: int) -> list[np.ndarray]:
        """The run's samples (data-set indices) split into ``count`` contiguous shards."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"shard count must be an integer >= 1, got {count!r}")
        return [a for a in np.array_split(self.samples(), count) if len(a)]

    def run_shard(self, indices: Sequence[int] | np.ndarray | None = None) -> Shard:
        """Run the attack suite (no sanity checks) on some of the run's samples.

        ``indices`` are data-set indices among :meth:`samples` (default: all). Every random
        draw is keyed by the sample's index, so a sample's outcome is the same whatever the
        shard it is in, the batch size or the order shards run in; :meth:`finish` merges
        the shards into the report :meth:`run` would give.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tm.seed)
            t0 = self.clock()
            idx = self.samples()
            pos = self._positions(idx, indices)
            state = self.new_state(idx)
            for b in self.batches(pos):
                self._run_batch(state, b, stage="suite")
            return Shard.of(state, pos, seconds=self.clock() - t0)

    def _positions(self, idx: np.ndarray, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(len(idx))
        want = np.asarray(indices)
        if want.ndim != 1 or (len(want) and want.dtype.kind not in "iu"):
            raise InputError("shard indices must be a 1-D list of integer data-set indices")
        want = np.unique(want.astype(np.int64))
        pos = np.searchsorted(idx, want)
        bad = (pos >= len(idx)) | (idx[np.minimum(pos, len(idx) - 1)] != want)
        if bad.any():
            raise InputError(
                f"{int(bad.sum())} shard indices (e.g. {int(want[bad][0])}) are not among the "
                f"run's {len(idx)} samples"
            )
        return pos

    def finish(self, shards: Sequence[Shard]) -> Report:
        """Merge shards covering every sample once (any order), run the sanity checks
        and build the report: the same report as :meth:`run` (up to timings)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tm.seed)
            t_start = self.clock()
            idx = self.samples()
            state = self.new_state(idx)
            merge_shards(state, list(shards), self.keep_examples)
            t_suite = float(sum(sh.seconds for sh in sorted(shards, key=_first_position)))
            return self._conclude(state, idx, t_start - t_suite, t_suite)

    def _run(self) -> Report:
        t_start = self.clock()
        idx = self.samples()
        state = self.new_state(idx)
        batches = self.batches(np.arange(len(idx)))
        done = self.open_checkpoint(state, idx)
        self.progress("suite", 0, len(batches))
        for b, pos in enumerate(batches):
            todo = pos[~done[pos]]  # a batch a Ray shard finished is skipped whole
            if len(todo):
                self._run_batch(state, todo, stage="suite")
                self.save_checkpoint(state, idx, todo)
            self.progress("suite", b + 1, len(batches))
        t_suite = self.clock() - t_start
        return self._conclude(state, idx, t_start, t_suite)

    def _conclude(self, state: RunState, idx: np.ndarray, t_start: float, t_suite: float) -> Report:
        """Sanity checks (and escalations) on the finished suite, then the report."""
        tm = self.tm
        first_robust = [int(state.records.robust_at(e).sum()) for e in range(len(state.epsilons))]
        checks: list[SanityCheck] = []
        t_sanity = 0.0
        if tm.sanity_checks:
            t0 = self.clock()
            checks = run_sanity_checks(self, state)
            t_sanity = self.clock() - t0
        else:
            checks = [sanity_disabled_check()]
        return self.build_report(
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

    def inputs(self, pos: np.ndarray, state: RunState) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the samples at positions ``pos`` of the run."""
        ds_idx = state.records.index[pos]
        x = torch.as_tensor(self.x[ds_idx], dtype=torch.float32)
        y = torch.as_tensor(self.y[ds_idx], dtype=torch.long)
        return x, y

    def _run_batch(self, state: RunState, pos: np.ndarray, stage: Stage) -> None:
        rec, model = state.records, self.judge_model
        x, y = self.inputs(pos, state)
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
        stage: Stage,
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
        ids = torch.as_tensor(rec.index[pos[sel]], dtype=torch.int64)  # data-set indices
        for r, t in enumerate(targets if targets is not None else [None]):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            res = self.run_attack(
                attack,
                model,
                xs[todo],
                ys[todo],
                eps,
                None if t is None else t[sel][todo],
                sample_ids=ids[todo],  # random draws keyed per sample, not by position
                stream=(label, stage, r),
            )
            # success is re-verified below with the real model, bounds and ball
            ok = res.success.cpu()
            x_adv[todo[ok]] = res.x_adv.cpu()[ok]
            fooled[todo[ok]] = True
        f1, g1 = self.model.queries.snapshot()
        self.reverify(attack, fooled, x_adv, xs, ys, eps)
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
            self.record(
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

    def run_attack(
        self,
        attack: SuiteAttack,
        model: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        targets: torch.Tensor | None = None,
        *,
        sample_ids: torch.Tensor,
        stream: tuple[Any, ...] = (),
    ) -> AttackResult:
        """One attack call. With a :attr:`pool`, a call on the evaluation's own attack model
        with an attack rebuildable from its recipe runs on the pool's workers (their query
        counts are added to this model's counter); anything else runs here, a query-only
        attack under ``torch.inference_mode``."""
        pool = self.pool
        if pool is not None and model is self.attack_model and attack.recipe is not None:
            res = pool.run(attack, x, y, eps, targets, sample_ids, stream)
            self.model.queries.forward += res.forward_evals
            self.model.queries.gradient += res.gradient_evals
            return res
        with torch.inference_mode() if query_only(attack) else nullcontext():
            return attack.run(model, x, y, eps, targets, sample_ids=sample_ids, stream=stream)

    def reverify(
        self,
        attack: SuiteAttack,
        fooled: torch.Tensor,
        x_adv: torch.Tensor,
        xs: torch.Tensor,
        ys: torch.Tensor,
        eps: float,
    ) -> None:
        """Trust nothing: re-check every claimed adversarial (``fooled``, updated in place)
        with the real model, the bounds and the ball, and a tabular schema's constraints."""
        if not fooled.any():
            return
        fi = fooled.nonzero().squeeze(1)
        check = self.verify(x_adv[fi], xs[fi], ys[fi], eps)
        schema = getattr(attack.attack, "schema", None)
        if schema is not None:  # tabular constraints: an invalid row is no adversarial
            valid = schema.validate_rows(
                xs[fi].numpy(), x_adv[fi].numpy(), epsilon=eps, norm=self.tm.norm
            )
            check &= torch.as_tensor(np.asarray(valid, dtype=bool))
        fooled[fi[~check]] = False

    def verify(
        self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """An adversarial counts only if it is in bounds, in the ball, and misclassified."""
        lo, hi = self.model.bounds
        tol = 1e-5 * max(1.0, eps)
        d = norm_of(x_adv - x, parse_norm(self.tm.norm))
        ok = (
            (d <= eps + tol)
            & (x_adv.flatten(1).amin(1) >= lo - 1e-6)
            & (x_adv.flatten(1).amax(1) <= hi + 1e-6)
        )
        with torch.inference_mode():  # a query: no autograd bookkeeping
            pred = self.judge_model.logits(x_adv).argmax(1).cpu()
        # a rejection by a guarded model is no evasion; for a targeted goal the target is one
        # of the wrong classes
        return ok & is_evasion(self.model, pred, y)

    def record(
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
        with torch.inference_mode():
            probs = torch.softmax(self.judge_model.logits(x_adv).double(), 1).cpu()
        rec.fooled_eps[pos] = e
        rec.fooled_by[pos] = key
        rec.row_at[pos, e] = np.minimum(rec.row_at[pos, e], key)
        rec.linf[pos] = norm_of(d, "linf").double().numpy()
        rec.l2[pos] = norm_of(d, "l2").double().numpy()
        rec.l0[pos] = norm_of(d, "l0").double().numpy()
        rec.adv_conf[pos] = probs.gather(1, y[:, None]).squeeze(1).numpy()
        if rec.feat_abs.shape[1] and x.ndim == 2:
            rec.feat_abs[pos] = d.abs().double().numpy()
            rec.feat_changed[pos] = (d.abs() > 1e-9).long().numpy()
        self._keep_examples(state, pos, x, x_adv, y, probs, e, eps, label)

    def _keep_examples(
        self,
        state: RunState,
        pos: np.ndarray,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        probs: torch.Tensor,
        e: int,
        eps: float,
        label: str,
    ) -> None:
        """Keep, per epsilon, the fooled samples of lowest data-set index (batch-invariant)."""
        rec, k = state.records, self.keep_examples
        kept = state.examples.get(e, [])
        worst = max((ex.index for ex in kept), default=None) if len(kept) >= k else None
        new = []
        for i in np.argsort(rec.index[pos], kind="stable")[:k]:
            p = int(pos[i])
            if worst is not None and int(rec.index[p]) > worst:
                break
            new.append(
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
        state.examples[e] = keep_examples(kept, new, k)

    # -- checkpoints ----------------------------------------------------------
    def clear_checkpoint(self) -> None:
        """Drop an earlier run's checkpoint files (a fresh run must not list stale units)."""
        clear_checkpoint(self.checkpoint_dir)
        self._units = []

    def open_checkpoint(self, state: RunState, idx: np.ndarray) -> np.ndarray:
        """Start checkpointing: with ``resume``, restore the finished units into ``state``
        (written by either backend) and return the mask of finished sample positions;
        otherwise clear the directory (nothing finished)."""
        if not self.resume:
            self.clear_checkpoint()
            return np.zeros(len(idx), dtype=bool)
        return self.load_checkpoint(state, idx)

    def run_key(self, idx: np.ndarray) -> str:
        """The key a checkpoint of this run (samples ``idx``) is stored under."""
        return run_key(self.tm, self.model_info, self.x, self.y, idx)

    def save_checkpoint(self, state: RunState, idx: np.ndarray, pos: np.ndarray) -> None:
        """Write the finished unit of positions ``pos`` (``state`` holds the outcomes of it
        and of every unit saved before, nothing else) to the checkpoint directory, if any."""
        save_checkpoint(self.checkpoint_dir, lambda: self.run_key(idx), state, self._units, pos)

    def load_checkpoint(self, state: RunState, idx: np.ndarray) -> np.ndarray:
        """Restore finished units into ``state``; returns the mask of finished positions
        (see :func:`advguard.evaluate.checkpoint.load_checkpoint`)."""
        return load_checkpoint(
            self.checkpoint_dir, lambda: self.run_key(idx), state, idx, self._units
        )

    def plan_shards(
        self, count: int, done: np.ndarray | None = None, at_least: int = 1
    ) -> list[np.ndarray]:
        """The unfinished samples (data-set indices) as work units of whole batches.

        Units are groups of consecutive batches of the run (``min(count, batches)`` of
        them), so every sample is attacked in the batch it has in a local run and the
        merged report is bit-identical to it. With fewer unfinished batches than
        ``at_least`` (e.g. the number of workers) the samples are split into ``count``
        units across batch boundaries instead: the same outcomes, float fields equal up to
        the last bits of batch-size dependent kernels (docs/scale.md)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"shard count must be an integer >= 1, got {count!r}")
        idx = self.samples()
        left = np.ones(len(idx), dtype=bool) if done is None else ~np.asarray(done, dtype=bool)
        todo = [b[left[b]] for b in self.batches(np.arange(len(idx)))]
        todo = [b for b in todo if len(b)]
        if not todo:
            return []
        if len(todo) < at_least:
            parts = np.array_split(np.concatenate(todo), count)
        else:
            groups = np.array_split(np.arange(len(todo)), min(count, len(todo)))
            parts = [np.concatenate([todo[i] for i in g]) for g in groups]
        return [idx[p] for p in parts if len(p)]

    # -- report ---------------------------------------------------------------
    def build_report(
        self,
        state: RunState,
        idx: np.ndarray,
        checks: list[SanityCheck],
        first_robust: list[int],
        timing: dict[str, float],
    ) -> Report:
        """The report of this run's samples ``idx`` (see :func:`build_report.build_report`)."""
        return build_report(
            state,
            idx,
            checks,
            first_robust,
            timing,
            tm=self.tm,
            model=self.model,
            adaptive=self.adaptive,
            model_info=self.model_info,
            data_info=self.data_info,
            x=self.x,
            y=self.y,
            feature_names=self.feature_names,
            baseline=self.baseline,
        )


def _first_position(shard: Shard) -> int:
    return int(shard.positions[0]) if len(shard.positions) else -1


def evaluate(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    threat_model: ThreatModel,
    *,
    backend: Any = None,
    work: Any = None,
    **kwargs: Any,
) -> Report:
    """Evaluate ``model`` on ``(x, y)`` under ``threat_model``; see :class:`Evaluator`.

    ``backend`` (e.g. :class:`advguard.evaluate.distributed.RayBackend`) runs the attack suite
    elsewhere, on workers that rebuild the model and data from ``work`` (a
    :class:`~advguard.evaluate.distributed.WorkSpec` naming the same model and data); the
    report is the one the local run gives.
    """
    ev = Evaluator(model, x, y, threat_model, **kwargs)
    if backend is None:
        return ev.run()
    if work is None:
        raise InputError("a distributed backend needs work=WorkSpec(model file, data spec, ...)")
    progress = ev.progress
    return backend.run(ev, work, on_shard=lambda done, total: progress("shards", done, total))
