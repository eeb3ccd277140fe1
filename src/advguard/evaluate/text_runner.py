"""Evaluate a text classifier under a text threat model (``norm: edits``).

The same report as for images and tables, with text semantics:

* ``epsilon`` is the **edit budget**: the most character edits (Levenshtein distance between
  the original and the adversarial text) an attacker may make to one text;
* the suite's text attacks (``char``, ``word``) run as a cascade per epsilon, ascending: a
  text evaded by an earlier attack or at a smaller budget is not attacked again and counts
  as evaded from then on;
* every claimed evasion is re-verified before it counts: the Levenshtein distance is
  recomputed on the whole strings and must be ``<= epsilon``, and the model is queried again
  on the adversarial text (untargeted: any other class; targeted: the target);
* perturbation statistics are ``edits`` (character edits) and ``words`` (words changed, as
  counted by the attack) of the verified adversarial texts;
* the sanity checks are text checks: ``text-verification`` (claims the re-check rejected)
  and ``text-larger-budget`` (whether the attacks can still evade the survivors with four
  times the largest budget; if not, the robust accuracy at the largest budget may measure
  the attacks' reach rather than the model).

Text evaluations are fast and are not checkpointed (no ``resume``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from advguard import __version__
from advguard.attacks.registry import SuiteAttack, build_attack
from advguard.attacks.text import as_text_classifier, check_texts, edit_distance
from advguard.errors import InputError
from advguard.evaluate.report import (
    AttackRow,
    EpsilonResult,
    Example,
    Report,
    SanityCheck,
    Stat,
    SuiteEntry,
)
from advguard.evaluate.runner import Progress, environment, findings, select_samples
from advguard.evaluate.sanity import sanity_disabled_check
from advguard.evaluate.threat_model import ThreatModel
from advguard.stats import proportion, summary

#: Budget multiplier of the ``text-larger-budget`` sanity check.
LARGER_BUDGET_FACTOR = 4
_BUDGET_PARAMS = ("max_char_edits",)


def _digest(texts: Sequence[str], y: np.ndarray, idx: np.ndarray | None = None) -> str:
    h = hashlib.sha256(b"advguard-text-v1\n")
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    if idx is not None:
        h.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()


def text_attack(spec_attack: str, params: dict[str, Any], budget: int, seed: int) -> Any:
    """The text attack ``spec_attack`` limited to ``budget`` character edits per text."""
    clash = [k for k in _BUDGET_PARAMS if k in params]
    if clash:
        raise InputError(
            f"attack {spec_attack!r}: {', '.join(clash)} comes from the threat model's "
            "epsilons (the edit budget); remove it from the attack's parameters"
        )
    kw = dict(params)
    if spec_attack == "word" and "max_words" not in kw and "max_word_share" not in kw:
        kw["max_words"], kw["max_word_share"] = None, 1.0  # the edit budget binds
    return build_attack(spec_attack, norm="edits", seed=seed, max_char_edits=budget, **kw)


@dataclass
class _Samples:
    """The evaluated texts, their labels, clean predictions and (targeted) goals."""

    idx: np.ndarray
    texts: list[str]
    y: np.ndarray
    clean_pred: np.ndarray
    clean_conf: np.ndarray
    targets: np.ndarray | None
    correct: np.ndarray


@dataclass
class _Evasions:
    """Per text: the epsilon index it was first evaded at (-1: never), its verified edits,
    words changed and true-class confidence; claims the re-check rejected; kept examples."""

    fooled_eps: np.ndarray
    edits: np.ndarray
    words: np.ndarray
    adv_conf: np.ndarray
    rejected: int = 0
    examples: list[Example] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> _Evasions:
        return cls(
            np.full(n, -1, dtype=np.int64), np.full(n, np.nan), np.full(n, np.nan),
            np.full(n, np.nan),
        )  # fmt: skip


class TextEvaluator:
    """Configure once, then :meth:`run`; see :func:`evaluate_text`."""

    def __init__(
        self,
        model: Any,
        texts: Sequence[str],
        y: Any,
        threat_model: ThreatModel,
        *,
        model_info: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        baseline: Report | None = None,
        progress: Progress | None = None,
        keep_examples: int = 8,
    ) -> None:
        tm = threat_model
        if not tm.is_text:
            raise InputError(
                f"threat model {tm.name!r} has norm {tm.norm}; a text evaluation needs a text "
                "threat model (norm: edits, attacks char/word), e.g. the text-standard preset"
            )
        self.model = as_text_classifier(model)
        self.texts = check_texts(texts)
        self.y = np.asarray(y)
        if len(self.texts) != len(self.y) or not self.texts:
            raise InputError(f"{len(self.texts)} texts but {len(self.y)} labels")
        k = self.model.num_classes
        if self.y.dtype.kind not in "iu" or self.y.min() < 0 or self.y.max() >= k:
            raise InputError(f"labels must be integers in [0, {k - 1}] for a {k}-class model")
        self.tm = tm
        self.model_info = dict(model_info or {})
        self.data_info = dict(data_info or {})
        self.baseline = baseline
        self.progress = progress or (lambda stage, done, total: None)
        self.keep_examples = keep_examples
        top = int(max(tm.epsilons))
        # build every attack once at the largest budget: bad parameters fail before any query
        self.suite: list[SuiteAttack] = [
            text_attack(s.attack, s.params, max(top, 1), tm.seed) for s in tm.attacks
        ]

    # -- helpers ----------------------------------------------------------------
    def _goal_targets(self, probs: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        if self.tm.goal != "targeted":
            return None
        p = probs.copy()
        p[np.arange(len(y)), y] = -1.0
        return p.argmax(1)

    def _verify(
        self, orig: list[str], adv: list[str], y: np.ndarray, t: np.ndarray | None, eps: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ok, edits, adversarial probabilities): within budget and evading, re-queried."""
        edits = np.array([edit_distance(a, b) for a, b in zip(orig, adv, strict=True)])
        probs = self.model.predict_proba(adv)
        pred = probs.argmax(1)
        evades = pred != y if t is None else pred == t
        return (edits <= eps) & evades, edits, probs

    # -- main loop ------------------------------------------------------------------
    def run(self) -> Report:
        t_start = time.perf_counter()
        tm, model = self.tm, self.model
        idx = select_samples(len(self.texts), tm.samples, tm.seed)
        texts = [self.texts[i] for i in idx]
        y = self.y[idx].astype(np.int64)
        n = len(idx)
        f0 = model.queries.forward
        clean = model.predict_proba(texts)
        clean_pred = clean.argmax(1)
        s = _Samples(
            idx=idx,
            texts=texts,
            y=y,
            clean_pred=clean_pred,
            clean_conf=clean[np.arange(n), y],
            targets=self._goal_targets(clean, y),
            correct=clean_pred == y,
        )
        ev = _Evasions.empty(n)
        rows = self._cascade(s, ev)
        t_suite = time.perf_counter() - t_start
        results = self._epsilon_results(s, ev, rows)
        checks: list[SanityCheck] = []
        t0 = time.perf_counter()
        if tm.sanity_checks:
            survivors = s.correct & (ev.fooled_eps < 0)
            checks = [
                self._check_verification(ev.rejected),
                self._check_larger_budget(texts, y, s.targets, survivors),
            ]
        else:
            checks = [sanity_disabled_check()]
        timing = {
            "suite_seconds": t_suite,
            "sanity_and_escalation_seconds": time.perf_counter() - t0,
            "total_seconds": time.perf_counter() - t_start,
        }
        return self._report(idx, y, s.correct, results, checks, ev.examples, timing, f0)

    def _cascade(self, s: _Samples, ev: _Evasions) -> dict[int, list[AttackRow]]:
        """The suite's attacks per epsilon, ascending, each on the texts still standing."""
        tm, model = self.tm, self.model
        n = len(s.idx)
        rows: dict[int, list[AttackRow]] = {}
        total = len(tm.epsilons) * len(tm.attacks)
        step = 0
        self.progress("suite", 0, total)
        for e, eps_f in enumerate(tm.epsilons):
            eps = int(eps_f)
            rows[e] = []
            for order, spec in enumerate(tm.attacks, start=1):
                alive = np.flatnonzero(s.correct & (ev.fooled_eps < 0))
                t0, q0 = time.perf_counter(), model.queries.forward
                newly = 0
                if eps >= 1 and len(alive):
                    newly = self._attack(spec, e, eps_f, alive, s, ev)
                secs = time.perf_counter() - t0
                robust_now = int((s.correct & (ev.fooled_eps < 0)).sum())
                rows[e].append(
                    AttackRow(
                        attack=spec.attack,
                        order=order,
                        attacked=len(alive) if eps >= 1 else 0,
                        newly_fooled=newly,
                        attack_success_rate=proportion(newly, len(alive) if eps >= 1 else 0),
                        robust_accuracy_after=proportion(robust_now, n),
                        forward_evals=model.queries.forward - q0,
                        gradient_evals=0,
                        seconds=secs,
                        examples_per_second=(len(alive) / secs) if secs > 0 and eps else None,
                        stage="suite",
                    )
                )
                step += 1
                self.progress("suite", step, total)
        return rows

    def _attack(
        self, spec: Any, e: int, eps_f: float, alive: np.ndarray, s: _Samples, ev: _Evasions
    ) -> int:
        """One attack on the ``alive`` texts; records the verified evasions, returns their count."""
        eps = int(eps_f)
        targets = s.targets
        attack = text_attack(spec.attack, spec.params, eps, self.tm.seed).attack
        sub = [s.texts[i] for i in alive]
        res = attack(
            self.model, sub, s.y[alive], targets=None if targets is None else targets[alive]
        )
        claim = np.flatnonzero(res.success & res.attacked)
        if not len(claim):
            return 0
        orig = [sub[i] for i in claim]
        adv = [res.adversarial[i] for i in claim]
        tt = None if targets is None else targets[alive[claim]]
        ok, d, probs = self._verify(orig, adv, s.y[alive[claim]], tt, eps)
        ev.rejected += int((~ok).sum())
        newly = 0
        for j in np.flatnonzero(ok):
            i = int(alive[claim[j]])
            ev.fooled_eps[i] = e
            ev.edits[i] = d[j]
            ev.words[i] = res.word_edits[claim[j]]
            ev.adv_conf[i] = probs[j, s.y[i]]
            newly += 1
            if len(ev.examples) < self.keep_examples:
                ev.examples.append(
                    Example(
                        epsilon=eps_f,
                        attack=spec.attack,
                        index=int(s.idx[i]),
                        label=int(s.y[i]),
                        clean_prediction=int(s.clean_pred[i]),
                        clean_confidence=float(s.clean_conf[i]),
                        adversarial_prediction=int(probs[j].argmax()),
                        adversarial_confidence=float(probs[j].max()),
                        x=[s.texts[i]],
                        x_adv=[adv[j]],
                    )
                )
        return newly

    def _epsilon_results(
        self, s: _Samples, ev: _Evasions, rows: dict[int, list[AttackRow]]
    ) -> list[EpsilonResult]:
        """Robust accuracy, fooling rate and perturbation statistics per epsilon."""
        n, correct = len(s.idx), s.correct
        n_correct = int(correct.sum())
        results = []
        for e, eps_f in enumerate(self.tm.epsilons):
            fooled = correct & (ev.fooled_eps >= 0) & (ev.fooled_eps <= e)
            robust = n_correct - int(fooled.sum())
            drop = s.clean_conf[fooled] - ev.adv_conf[fooled]
            results.append(
                EpsilonResult(
                    epsilon=eps_f,
                    robust_accuracy=proportion(robust, n),
                    fooling_rate=proportion(int(fooled.sum()), n_correct),
                    first_robust_accuracy=None,
                    perturbation={
                        "edits": Stat(**summary(ev.edits[fooled])),
                        "words": Stat(**summary(ev.words[fooled])),
                    },
                    mean_true_class_confidence_drop=float(drop.mean()) if len(drop) else None,
                    per_attack=rows[e],
                )
            )
        return results

    # -- sanity checks ------------------------------------------------------------
    def _check_verification(self, rejected: int) -> SanityCheck:
        return SanityCheck(
            id="text-verification",
            title="Claimed evasions hold when re-checked",
            status="pass" if rejected == 0 else "warn",
            explanation=(
                "Every evasion an attack claimed was re-checked: Levenshtein distance within "
                "the budget and the model queried again on the adversarial text. "
                + (
                    "All claims held."
                    if rejected == 0
                    else f"{rejected} claim(s) did not hold and were not counted (a "
                    "non-deterministic model, or an attack miscounting its edits)."
                )
            ),
            suggestion="" if rejected == 0 else "Check that the model is deterministic.",
            details={"rejected_claims": rejected},
            escalation=None,
        )

    def _check_larger_budget(
        self, texts: list[str], y: np.ndarray, targets: np.ndarray | None, alive: np.ndarray
    ) -> SanityCheck:
        tm = self.tm
        top = int(max(tm.epsilons))
        big = max(LARGER_BUDGET_FACTOR * top, 1)
        pick = np.flatnonzero(alive)[: tm.sanity_samples]
        cid = "text-larger-budget"
        title = f"Attacks still work with {LARGER_BUDGET_FACTOR}x the largest budget"
        if len(pick) == 0:
            return SanityCheck(
                id=cid,
                title=title,
                escalation=None,
                status="skip",
                explanation=f"No text survived edit budget {top}; nothing to re-attack.",
                details={"budget": big, "survivors_tested": 0},
            )
        todo = pick.copy()
        for spec in tm.attacks:
            if not len(todo):
                break
            attack = text_attack(spec.attack, spec.params, big, tm.seed).attack
            sub = [texts[i] for i in todo]
            tt = None if targets is None else targets[todo]
            res = attack(self.model, sub, y[todo], targets=tt)
            claim = np.flatnonzero(res.success & res.attacked)
            if len(claim):
                ok, _, _ = self._verify(
                    [sub[i] for i in claim],
                    [res.adversarial[i] for i in claim],
                    y[todo[claim]],
                    None if tt is None else tt[claim],
                    big,
                )
                todo = np.setdiff1d(todo, todo[claim[ok]])
        evaded = len(pick) - len(todo)
        details = {"budget": big, "survivors_tested": len(pick), "evaded": evaded}
        if evaded:
            return SanityCheck(
                id=cid,
                title=title,
                escalation=None,
                status="pass",
                explanation=(
                    f"With {big} edits the attacks evaded {evaded} of {len(pick)} texts that "
                    f"survived budget {top}: they work on this model, the survivors need more "
                    "edits."
                ),
                details=details,
            )
        return SanityCheck(
            id=cid,
            title=title,
            escalation=None,
            status="warn",
            explanation=(
                f"Even with {big} edits the attacks evaded none of the {len(pick)} texts that "
                f"survived budget {top}. The robust accuracy may reflect what these attacks "
                "can do (they substitute and delete, they never insert words) rather than a "
                "property of the model."
            ),
            suggestion="Add attack operations (ops: typo, leet, spacing) or more max_queries.",
            details=details,
        )

    # -- report -------------------------------------------------------------------
    def _report(
        self,
        idx: np.ndarray,
        y: np.ndarray,
        correct: np.ndarray,
        results: list[EpsilonResult],
        checks: list[SanityCheck],
        examples: list[Example],
        timing: dict[str, float],
        f0: int,
    ) -> Report:
        from advguard.evaluate.verdict import judge

        tm, model = self.tm, self.model
        n = len(idx)
        clean = proportion(int(correct.sum()), n)
        trustworthy = not any(c.status == "fail" for c in checks)
        verdict = judge(tm, clean, results, trustworthy, self.baseline)
        suite = [
            SuiteEntry(
                order=i + 1,
                attack=a.name,
                description=a.entry.description,
                knowledge=a.entry.knowledge,
                params={k: v for k, v in a.params().items() if k != "max_char_edits"},
                atlas=list(a.entry.atlas),
            )
            for i, a in enumerate(self.suite)
        ]
        return Report(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            advguard_version=__version__,
            environment=environment(model),
            model={
                "adapter": type(model).__name__,
                "modality": "text",
                "num_classes": model.num_classes,
                "input_shape": [],
                "bounds": None,
                "white_box": False,
                "queries": {"forward": model.queries.forward - f0},
                **self.model_info,
            },
            data={
                "n_total": len(self.texts),
                "n_evaluated": n,
                "sha256": self.data_info.get("sha256") or _digest(self.texts, self.y),
                "modality": "text",
                **self.data_info,
            },
            threat_model=tm.model_dump(),
            suite=suite,
            sample_indices_sha256=hashlib.sha256(
                np.ascontiguousarray(idx, dtype="<i8").tobytes()
            ).hexdigest(),
            clean_accuracy=clean,
            results=results,
            sanity_checks=checks,
            trustworthy=trustworthy,
            verdict=verdict,
            findings=findings(tm, results, self.suite),
            examples=examples,
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


def evaluate_text(
    model: Any, texts: Sequence[str], y: Any, threat_model: ThreatModel, **kwargs: Any
) -> Report:
    """Evaluate a text model on ``(texts, y)`` under a text threat model; see the module doc."""
    return TextEvaluator(model, texts, y, threat_model, **kwargs).run()


__all__ = ["LARGER_BUDGET_FACTOR", "TextEvaluator", "evaluate_text", "text_attack"]
