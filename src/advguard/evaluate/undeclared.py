"""Escalation for undeclared randomized, non-differentiable defenses.

A model that hides a random *and* non-differentiable preprocessing inside itself (stochastic
quantization with dithering, random resize-and-pad as in Xie et al. 2018, the randomized
image transformations of Guo et al. 2018) defeats both remedies the runner knows for a
declared defense: there is no transform to attack with BPDA, and EOT over zero gradients is
still zero. The sanity checks see it (``randomness`` and ``gradients`` fail together); this
module then attacks it with methods that need neither true gradients nor a declaration
(Athalye, Carlini & Wagner 2018; Uesato et al. 2018; Tramer et al. 2020, sec. 5):

1. ``transfer``: a white-box surrogate of the *whole* model is trained on the model's own
   answers, averaged over draws (Papernot et al. 2017, attacks/transfer.py's
   :func:`~advguard.attacks.transfer.train_surrogate`), and PGD examples crafted on it are sent
   to the model;
2. ``bpda-surrogate``: BPDA (Athalye et al. 2018, sec. 4.1) with the surrogate as the
   differentiable approximation of the whole model, and EOT on the forward pass
   (:class:`~advguard.models.wrappers.SurrogateGradientClassifier` around an
   :class:`~advguard.models.wrappers.EOTClassifier`);
3. ``square``: Square Attack (Andriushchenko et al. 2020) on EOT-averaged scores;
4. ``spsa``: SPSA (Uesato et al. 2018) on EOT-averaged scores.

They run as a cascade on the surviving samples at every epsilon (stage ``escalation``), and
every adversarial example they claim is verified, as for every other attack, in bounds, in the
ball and misclassified by the judged model; here the judge is the model's logits averaged over
``eot_samples`` draws, so one lucky draw neither hides nor fakes an example.

Convergence: rounds at 1x, 2x and 4x the base budget (queries, steps, restarts, surrogate data;
the same draws per query) run on the survivors; the escalation stops at the first round after
the first that changes robust accuracy by at most one point at every epsilon (the
``convergence`` check's criterion). Then the escalated numbers have converged: the checks
whose failure the masking explains (``randomness``, ``gradients``,
``black-box-vs-white-box``, and ``large-epsilon`` once the gradient-free attack reaches at most
10% at the unbounded budget) become warnings, and the report can be trustworthy. Otherwise
this check fails and the evaluation stays untrustworthy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from advguard.attacks.registry import SuiteAttack, build_attack
from advguard.attacks.transfer import train_surrogate
from advguard.evaluate.report import SanityCheck
from advguard.models.wrappers import EOTClassifier, SurrogateGradientClassifier

if TYPE_CHECKING:
    from advguard.evaluate.api import EvaluationContext
    from advguard.evaluate.state import RunState

CHECK_ID = "undeclared-defense"
REFERENCE = (
    "Athalye, Carlini & Wagner 2018 (BPDA, EOT); Uesato et al. 2018 (SPSA, sec. 3); "
    "Andriushchenko et al. 2020 (Square Attack); Papernot et al. 2017 (surrogates); "
    "Tramer et al. 2020 (On Adaptive Attacks), sec. 5"
)
MAX_SURROGATE_INPUTS = 20_000
"""Cap on the surrogate's training inputs per round (evaluated samples times copies)."""
FACTORS = (1, 2, 4)
"""Budget multipliers of the escalation's rounds (it stops at the first converged round)."""
EXPLAINED = ("randomness", "gradients", "black-box-vs-white-box")
"""Checks whose failure the undeclared random, non-differentiable defense explains."""


def triggered(checks: list[SanityCheck]) -> bool:
    """Randomness and useless gradients found together (before any escalation)."""
    by = {c.id: c for c in checks}
    rnd, grad = by.get("randomness"), by.get("gradients")
    return (
        rnd is not None
        and "fail" in (rnd.status, rnd.status_before_escalation)
        and grad is not None
        and grad.status == "fail"
    )


def _budget(tm: Any, factor: int) -> dict[str, int]:
    """The escalation's budget at ``factor`` x the base (per attacked sample and epsilon)."""
    return {
        "draws": tm.eot_samples,
        "square_queries": 500 * factor,
        "spsa_steps": 20 * factor,
        "spsa_samples": 8,
        "pgd_steps": 50 * factor,
        "pgd_restarts": factor,
        "surrogate_copies": 8 * factor,
        "surrogate_epochs": min(15 * factor, 30),
    }


def _surrogate_data(
    ev: EvaluationContext, state: RunState, copies: int, gen: torch.Generator
) -> torch.Tensor:
    """Inputs the surrogate learns the model on: the evaluated samples and random points
    (uniform and ``+-eps`` corners) of the largest ball around each of them."""
    idx = state.records.index
    copies = max(1, min(copies, MAX_SURROGATE_INPUTS // max(1, len(idx)) - 1))
    x = torch.as_tensor(ev.x[idx], dtype=torch.float32)
    lo, hi = ev.model.bounds
    eps = max(state.epsilons)
    parts = [x]
    norm = ev.tm.norm
    for i in range(copies):
        if norm == "linf":
            u = torch.rand(x.shape, generator=gen) * 2 - 1
            d = eps * (u.sign() if i % 2 else u)
        else:
            from advguard.attacks.norms import parse_norm, random_in_ball

            d = random_in_ball(x, parse_norm(norm), eps, gen)
        parts.append((x + d).clamp(lo, hi))
    return torch.cat(parts)


def _cascade(
    ev: EvaluationContext,
    state: RunState,
    attacks: list[tuple[str, SuiteAttack, Any]],
    per_attack: dict[str, int],
    among: np.ndarray | None,
) -> list[int]:
    """Run ``attacks`` as a cascade on the survivors (``among`` these positions, default all)
    at every epsilon; returns the new finds per epsilon."""
    rec = state.records
    bs = ev.tm.batch_size
    found = []
    for e, eps in enumerate(state.epsilons):
        n_e = 0
        surv = np.nonzero(rec.robust_at(e))[0]
        if among is not None:
            surv = np.intersect1d(surv, among)
        for i in range(0, len(surv), bs):
            pos = surv[i : i + bs]
            ds = rec.index[pos]
            x = torch.as_tensor(ev.x[ds], dtype=torch.float32)
            y = torch.as_tensor(ev.y[ds], dtype=torch.long)
            for label, a, model in attacks:
                k = ev.attack_survivors(
                    state, a, pos, x, y, e, eps, None, "escalation", label, model=model
                )
                per_attack[label] = per_attack.get(label, 0) + k
                n_e += k
        found.append(n_e)
    return found


def _round(
    ev: EvaluationContext,
    state: RunState,
    factor: int,
    per_attack: dict[str, int],
    info: dict[str, Any],
    among: np.ndarray | None = None,
) -> list[int]:
    tm = ev.tm
    b = _budget(tm, factor)
    seed = tm.seed + 1800 + factor
    pool = np.arange(len(state.records.index)) if among is None else among
    if not any(state.records.robust_at(e)[pool].any() for e in range(len(state.epsilons))):
        info[f"round_{factor}x"] = {"skipped": "no surviving sample to attack"}
        return [0] * len(state.epsilons)
    eot = EOTClassifier(ev.model, samples=b["draws"])
    gen = torch.Generator().manual_seed(seed)
    f0 = ev.model.queries.forward
    sx = _surrogate_data(ev, state, b["surrogate_copies"], gen)
    b["surrogate_copies"] = len(sx) // len(state.records.index) - 1  # after the cap
    surrogate, sinfo = train_surrogate(
        sx.numpy(),
        target=eot,
        epochs=b["surrogate_epochs"],
        seed=seed,
        holdout=0.1,
    )
    surrogate_forward = ev.model.queries.forward - f0
    draws = b["draws"]
    attacks = _round_attacks(ev, state, factor, b, seed, eot, surrogate)
    found = _cascade(ev, state, attacks, per_attack, among)
    info[f"round_{factor}x"] = {
        "budget_per_sample_and_epsilon": {
            **b,
            "square_model_evaluations": b["square_queries"] * draws,
            "spsa_model_evaluations": (2 * b["spsa_samples"] + 1) * b["spsa_steps"] * draws,
        },
        "surrogate": {
            "training_inputs": len(sx),
            "model_evaluations": int(surrogate_forward),
            "agreement": sinfo.get("agreement"),
            "architecture": sinfo.get("architecture"),
        },
        "attacks": [label for label, _, _ in attacks],
        "attacked": "all survivors" if among is None else f"survivors among {len(among)} samples",
        "newly_fooled_per_epsilon": {
            f"{eps:g}": n for eps, n in zip(state.epsilons, found, strict=True)
        },
    }
    return found


def _round_attacks(
    ev: EvaluationContext,
    state: RunState,
    factor: int,
    b: dict[str, int],
    seed: int,
    eot: EOTClassifier,
    surrogate: Any,
) -> list[tuple[str, SuiteAttack, Any]]:
    """One round's attacks (label, attack, model they query): transfer and BPDA through the
    surrogate, and (for Lp norms) Square and SPSA on EOT-averaged scores."""
    tm = ev.tm
    tag = f" x{factor}" if factor > 1 else ""
    draws = b["draws"]
    attacks: list[tuple[str, SuiteAttack, Any]] = [
        (
            f"transfer-surrogate{tag}",
            build_attack("transfer", norm=tm.norm, seed=seed, surrogates=[surrogate]),
            eot,
        ),
        (
            f"bpda-surrogate+eot{draws}{tag}",
            build_attack(
                "pgd",
                norm=tm.norm,
                seed=seed,
                steps=b["pgd_steps"],
                restarts=b["pgd_restarts"],
                loss="margin",
            ),
            SurrogateGradientClassifier(eot, surrogate),
        ),
    ]
    if tm.norm in ("linf", "l2") and len(ev.model.input_shape) in (2, 3):
        attacks.append(
            (
                f"square+eot{draws}{tag}",
                build_attack("square", norm=tm.norm, seed=seed, max_queries=b["square_queries"]),
                eot,
            )
        )
    if tm.norm in ("linf", "l2"):
        d = int(np.prod(ev.model.input_shape))
        scale = max(state.epsilons) / (1.0 if tm.norm == "linf" else d**0.5)
        attacks.append(
            (
                f"spsa+eot{draws}{tag}",
                build_attack(
                    "spsa",
                    norm=tm.norm,
                    seed=seed,
                    steps=b["spsa_steps"],
                    samples=b["spsa_samples"],
                    # steps wider than a quantizer's plateaus (delta 0.01 sees none)
                    delta=scale / 2,
                    lr=scale / 4,
                ),
                eot,
            )
        )
    return attacks


def escalate_undeclared(
    ev: EvaluationContext,
    state: RunState,
    checks: list[SanityCheck],
    subset: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    clock: Callable[[], float],
) -> SanityCheck:
    """Run the gradient-free / surrogate escalation and return its check (see module doc).

    Every round attacks every survivor; the unbounded-budget re-measurement runs on the
    sanity subset (``subset`` positions, ``x``/``y`` their inputs). Mutates ``checks`` when the
    escalation converged (see the module docstring).
    """
    t0 = clock()
    f0 = ev.model.queries.forward
    n = len(state.records.index)
    tolerance = int(0.01 * n)
    judge_before = ev.judge_model
    if not isinstance(judge_before, EOTClassifier):
        ev.judge_model = EOTClassifier(ev.model, samples=ev.tm.eot_samples)
    per_attack: dict[str, int] = {}
    info: dict[str, Any] = {}
    rounds: list[list[int]] = []
    try:
        for factor in FACTORS:  # escalate the budget until a round finds (almost) nothing
            rounds.append(_round(ev, state, factor, per_attack, info))
            if len(rounds) > 1 and max(rounds[-1]) <= tolerance:
                break
        large = _large_epsilon(ev, x, y)
    finally:
        ev.judge_model = judge_before
    last = rounds[-1]
    converged = len(rounds) > 1 and max(last) <= tolerance
    seconds = clock() - t0
    details: dict[str, Any] = {
        "converged": converged,
        "tolerance_samples": tolerance,
        "samples": n,
        "rounds": [f"{f}x" for f in FACTORS[: len(rounds)]],
        "newly_fooled_per_epsilon": {
            f"{eps:g}": sum(r[e] for r in rounds) for e, eps in enumerate(state.epsilons)
        },
        "found_by": {k: v for k, v in per_attack.items() if v},
        "judged_on": f"logits averaged over {ev.tm.eot_samples} draws",
        "model_evaluations": int(ev.model.queries.forward - f0),
        "seconds": seconds,
        "large_epsilon": large,
        **info,
    }
    return _escalation_check(checks, details, rounds, converged, large, n)


def _escalation_check(
    checks: list[SanityCheck],
    details: dict[str, Any],
    rounds: list[list[int]],
    converged: bool,
    large: dict[str, Any],
    n: int,
) -> SanityCheck:
    """The escalation's check: warn when it converged (and downgrade the checks it makes
    moot), fail when its last round still fooled samples."""
    last = rounds[-1]
    found_by = ", ".join(f"{k}: {v}" for k, v in details["found_by"].items()) or "none"
    text = (
        "re-ran all epsilons on the surviving samples with gradient-free attacks on "
        "EOT-averaged scores (Square, SPSA) and BPDA/transfer through a surrogate trained on "
        f"the model's answers, at {', '.join(details['rounds'])} the base budget: "
        f"{sum(map(sum, rounds))} more fooled ({found_by}); the last round fooled {sum(last)}"
    )
    title = "Undeclared randomized, non-differentiable defense attacked without gradients"
    if converged:
        status = "warn"
        explanation = (
            "The model is randomized and its gradients are useless, but it declares no defense. "
            "The runner attacked it with methods that need neither: Square and SPSA on scores "
            "averaged over draws, BPDA through a surrogate of the whole model, and transfer "
            "from that surrogate. Doubling their budget changed robust accuracy by at most one "
            "point, so the escalated numbers above are the ones to read (the defense is still "
            "undeclared: declare it to have it attacked with exact BPDA/EOT)."
        )
        _downgrade(checks, large)
    else:
        status = "fail"
        explanation = (
            "The model is randomized and its gradients are useless, and the gradient-free "
            f"escalation had not converged: its last round ({details['rounds'][-1]} the base "
            f"budget) still fooled {max(last)} more of {n} samples at one epsilon. The robust "
            "accuracy above is very likely still overstated."
        )
    c = SanityCheck(
        id=CHECK_ID,
        title=title,
        status=status,  # type: ignore[arg-type]
        explanation=explanation,
        suggestion=(
            "Declare the defense (randomized / non-differentiable input transforms) so it is "
            "attacked with exact BPDA and EOT, or raise the budget of the escalation."
        ),
        reference=REFERENCE,
        details=details,
    )
    c.status_before_escalation = "fail"
    c.escalation = text
    return c


def _large_epsilon(ev: EvaluationContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Square on EOT scores at the whole input range: must reach ~0% robust accuracy."""
    tm = ev.tm
    if tm.norm not in ("linf", "l2") or len(ev.model.input_shape) not in (2, 3):
        return {"measured": False}
    lo, hi = ev.model.bounds
    d = int(np.prod(ev.model.input_shape))
    big = (hi - lo) if tm.norm == "linf" else (hi - lo) * d**0.5
    eot = EOTClassifier(ev.model, samples=tm.eot_samples)
    a = build_attack("square", norm=tm.norm, seed=tm.seed + 3, max_queries=500)
    res = a.run(eot, x, y, big)
    ok = res.success.cpu()
    if ok.any():  # verified like every other example, on the averaged judge
        fi = ok.nonzero().squeeze(1)
        ok[fi[~ev.verify(res.x_adv.cpu()[fi], x[fi], y[fi], big)]] = False
    ra = 1.0 - float(ok.float().mean())
    return {"measured": True, "epsilon": big, "attack": "square+eot", "robust_accuracy": ra}


def _downgrade(checks: list[SanityCheck], large: dict[str, Any]) -> None:
    """After a converged escalation, failures the masking explains become warnings."""
    note = f"explained by the undeclared defense; see the {CHECK_ID} check, which escalated"
    for c in checks:
        if c.status != "fail":
            continue
        if c.id in EXPLAINED:
            c.status_before_escalation = c.status_before_escalation or "fail"
            c.status = "warn"
            c.escalation = (c.escalation + "; " if c.escalation else "") + note
        elif c.id == "large-epsilon" and large.get("measured"):
            ra = float(large["robust_accuracy"])
            c.details["gradient_free_robust_accuracy"] = ra
            if ra <= 0.1:  # the large-epsilon check's own warn threshold
                c.status_before_escalation = c.status_before_escalation or "fail"
                c.status = "warn"
                c.escalation = (c.escalation + "; " if c.escalation else "") + (
                    f"Square on EOT-averaged scores reaches {ra:.1%} robust at epsilon "
                    f"{large['epsilon']:g}: the unbounded attacker wins once gradients are "
                    "not needed"
                )
