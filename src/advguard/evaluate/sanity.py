"""Sanity checks against false robustness, and the escalations they trigger.

Each check follows published advice; see ``docs/sanity-checks.md`` for the references:

* ``randomness``  - outputs must be deterministic, else attacks need EOT
  (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients", sec. 4.3; Carlini et al. 2019,
  "On Evaluating Adversarial Robustness", sec. 4.6).
* ``gradients``   - gradients must not be zero, NaN or vanishing, and outputs not saturated
  (Athalye et al. 2018, sec. 3; Carlini et al. 2019, sec. 5.6; Croce & Hein 2020 on CE vs DLR).
* ``monotonic``   - robust accuracy must not rise with epsilon (Carlini et al. 2019, sec. 5.3).
* ``large-epsilon`` - at an unbounded budget robust accuracy must reach ~0
  (Carlini et al. 2019, sec. 5.4; Athalye et al. 2018, sec. 3.1).
* ``iterative-vs-single-step`` - an iterative attack must beat FGSM (Carlini et al. 2019, 5.5).
* ``convergence`` - more steps / restarts must not lower robust accuracy by more than a point
  (Carlini et al. 2019, sec. 5.2; Mosbach et al. 2018; Croce & Hein 2020).
* ``black-box-vs-white-box`` - black-box attacks must not beat white-box ones
  (Carlini et al. 2019, sec. 5.7; Athalye et al. 2018).
* ``adaptive-attacks`` - a model that declares non-differentiable or randomized input
  transforms must be attacked with BPDA / EOT (Athalye et al. 2018; Tramer et al. 2020).
* ``undeclared-defense`` - only when ``randomness`` and ``gradients`` fail together: the model
  hides a random, non-differentiable defense, and is attacked without gradients or a
  declaration (``advguard.evaluate.undeclared``: Square/SPSA on EOT scores, BPDA and transfer
  through a surrogate of the whole model).

Every adversarial example a check finds is a real one (it is verified in bounds, in the ball
and misclassified), so it is merged into the results: checks can only make the numbers more
pessimistic, never more optimistic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from advguard.attacks.registry import SuiteAttack, build_attack
from advguard.evaluate.report import SanityCheck, Status
from advguard.evaluate.undeclared import escalate_undeclared, triggered
from advguard.models.base import is_white_box
from advguard.models.wrappers import EOTClassifier

if TYPE_CHECKING:
    from advguard.evaluate.api import EvaluationContext
    from advguard.evaluate.state import RunState

RANDOMNESS_CALLS = 4
"""Calls of the model on the same inputs by the randomness check."""

REF = {
    "randomness": "Athalye, Carlini & Wagner 2018 (Obfuscated Gradients), sec. 4.3 (EOT); "
    "Carlini et al. 2019 (On Evaluating Adversarial Robustness), sec. 4.6",
    "gradients": "Athalye et al. 2018, sec. 3; Carlini et al. 2019, sec. 5.6; "
    "Croce & Hein 2020 (DLR loss for saturated softmax)",
    "monotonic": "Carlini et al. 2019, sec. 5.3 (robustness should decrease with distortion)",
    "large-epsilon": "Carlini et al. 2019, sec. 5.4 (unbounded attacks must reach 100% success); "
    "Athalye et al. 2018, sec. 3.1",
    "iterative-vs-single-step": "Carlini et al. 2019, sec. 5.5 (iterative attacks must "
    "outperform single-step attacks)",
    "convergence": "Carlini et al. 2019, sec. 5.2 (run attacks to convergence); "
    "Croce & Hein 2020 (AutoAttack)",
    "adaptive-attacks": "Athalye, Carlini & Wagner 2018 (BPDA, EOT); Tramer et al. 2020 (On "
    "Adaptive Attacks to Adversarial Example Defenses); Carlini et al. 2019, sec. 4.3",
    "black-box-vs-white-box": "Carlini et al. 2019, sec. 5.7 (white-box attacks must beat "
    "black-box ones); Athalye et al. 2018",
}


def run_sanity_checks(ev: EvaluationContext, state: RunState) -> list[SanityCheck]:
    rec = state.records
    correct_pos = np.nonzero(rec.correct)[0]
    subset = correct_pos[: ev.tm.sanity_samples]
    white = is_white_box(ev.model)
    checks: list[SanityCheck] = []
    steps_total = 8
    done = 0
    ev.progress("sanity", 0, steps_total)

    def tick() -> None:
        nonlocal done
        done += 1
        ev.progress("sanity", done, steps_total)

    if len(subset) == 0:
        return [
            SanityCheck(
                id="samples",
                title="Enough correctly classified samples",
                status="fail",
                explanation="No sample is classified correctly, so robustness cannot be measured.",
                suggestion="Check the data, its labels, its bounds and the model's preprocessing.",
            )
        ]
    x, y = ev.inputs(subset, state)

    checks.append(_randomness(ev, state, x, y))
    tick()
    if white:
        checks.append(_gradients(ev, state, x, y))
    tick()
    checks.append(_monotonic(ev, state, subset, x, y))
    tick()
    checks.append(_large_epsilon(ev, state, x, y))
    tick()
    if white and ev.tm.norm in ("linf", "l2"):
        checks.append(_iterative_vs_fgsm(ev, state, subset, x, y))
    tick()
    checks.append(_convergence(ev, state, subset, x, y))
    tick()
    checks.append(_black_vs_white(ev, state))
    tick()
    checks.append(_adaptive(ev))
    tick()
    if ev.tm.escalate and triggered(checks):  # random + masked, undeclared: escalate blind
        checks.append(escalate_undeclared(ev, state, checks, subset, x, y, ev.clock))
    return checks


# -- helpers ------------------------------------------------------------------------------
def _white_attacks(state: RunState) -> list[SuiteAttack]:
    return [a for a in state.attacks if a.entry.knowledge == "white-box"]


def _stronger(ev: EvaluationContext, a: SuiteAttack, factor: int = 2) -> SuiteAttack:
    params = dict(a.spec_params)
    p = a.attack.params()
    if "steps" in p:
        params["steps"] = int(p["steps"]) * factor
    if "restarts" in p:
        params["restarts"] = int(p["restarts"]) * factor
    # the doubling is the tool's own choice, not the user's: it may pass the work-size limits
    params["allow_large"] = True
    return build_attack(a.name, norm=ev.tm.norm, seed=ev.tm.seed + 1000, **params)


def _escalate(
    ev: EvaluationContext,
    state: RunState,
    attacks: list[tuple[str, SuiteAttack]],
    model: Any = None,
) -> int:
    """Re-run ``attacks`` on every surviving sample at every epsilon (stage 'escalation')."""
    rec = state.records
    total_new = 0
    bs = ev.tm.batch_size
    n_eps = len(state.epsilons)
    ev.progress("escalation", 0, n_eps)
    for e, eps in enumerate(state.epsilons):
        surv = np.nonzero(rec.robust_at(e))[0]
        for i in range(0, len(surv), bs):
            pos = surv[i : i + bs]
            x, y = ev.inputs(pos, state)
            for label, a in attacks:
                total_new += ev.attack_survivors(
                    state, a, pos, x, y, e, eps, None, "escalation", label, model=model
                )
        ev.progress("escalation", e + 1, n_eps)
    return total_new


def _escalation_text(n_new: int, what: str) -> str:
    return f"re-ran all epsilons on the surviving samples with {what}: {n_new} more fooled"


def _check(
    cid: str, title: str, status: Status, explanation: str, suggestion: str = "", /, **details: Any
) -> SanityCheck:
    return SanityCheck(
        id=cid,
        title=title,
        status=status,
        explanation=explanation,
        suggestion=suggestion,
        reference=REF.get(cid, ""),
        details=details,
    )


def sanity_disabled_check() -> SanityCheck:
    """The failed check a report carries when its threat model turned the sanity checks off:
    nothing then shows that the attacks were strong enough, so the robust accuracy it reports
    is an upper bound nobody checked and the report is not trustworthy (the gate refuses it)."""
    return SanityCheck(
        id="sanity-checks-disabled",
        title="Sanity checks were turned off",
        status="fail",
        explanation=(
            "the threat model sets sanity_checks: false, so no check confirmed that the attacks "
            "were strong enough (gradients, larger budgets, black-box vs white-box); the robust "
            "accuracy may overstate robustness"
        ),
        suggestion="remove 'sanity_checks: false' from the threat model and run it again",
        reference="Carlini et al. 2019, On Evaluating Adversarial Robustness, section 5",
    )


# -- checks -------------------------------------------------------------------------------
def _randomness(
    ev: EvaluationContext, state: RunState, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    z1 = ev.model.logits(x).cpu()
    # several calls: a defense drawing once per batch may repeat a draw (e.g. an identity resize)
    others = [ev.model.logits(x).cpu() for _ in range(RANDOMNESS_CALLS - 1)]
    z2 = max(others, key=lambda z: float((z1 - z).abs().max()))
    diff = float((z1 - z2).abs().max())
    scale = float(z1.abs().max()) + 1e-12
    flips = int((z1.argmax(1) != z2.argmax(1)).sum())
    if diff <= 1e-5 * max(1.0, scale):
        return _check(
            "randomness",
            "Deterministic model outputs",
            "pass",
            "The same input gives the same output twice.",
            max_logit_difference=diff,
        )
    if isinstance(ev.attack_model, EOTClassifier):  # declared randomness, attacked with EOT
        return _check(
            "randomness",
            "Deterministic model outputs",
            "pass",
            f"The model is randomized, as it declares ({flips} of {len(x)} predictions changed "
            f"between two calls); every attack used EOT over {ev.attack_model.samples} draws and "
            "predictions were judged on the mean logits over as many draws.",
            max_logit_difference=diff,
            prediction_flips=flips,
        )
    c = _check(
        "randomness",
        "Deterministic model outputs",
        "fail",
        f"The model gives different outputs for the same input (max logit difference {diff:.3g}, "
        f"{flips} of {len(x)} predictions changed). Gradient attacks against a randomized model "
        "see one noisy draw and understate what an attacker averaging over draws can do.",
        "Attack with Expectation over Transformation (EOT): average gradients over many draws.",
        max_logit_difference=diff,
        prediction_flips=flips,
    )
    if ev.tm.escalate and is_white_box(ev.model):
        c.status_before_escalation = "fail"
        eot = EOTClassifier(ev.attack_model, samples=ev.tm.eot_samples)
        n_new = _escalate(
            ev,
            state,
            [(f"{a.name}+eot{eot.samples}", a) for a in _white_attacks(state)],
            model=eot,
        )
        c.escalation = _escalation_text(n_new, f"EOT over {eot.samples} draws per gradient")
        c.status = "warn"
        c.explanation += " The runner re-ran the white-box attacks with EOT; numbers include it."
    return c


def _gradients(
    ev: EvaluationContext, state: RunState, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    from advguard.attacks import losses

    dev = ev.attack_model.device
    yd = y.to(dev)

    def stats(loss_fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, g = ev.attack_model.value_and_grad(x.to(dev), loss_fn)
        return logits, g.flatten(1).norm(dim=1).cpu()

    logits, gn = stats(lambda z: losses.ce(z, yd))
    _, gm = stats(lambda z: losses.margin(z, yd))
    n = len(gn)

    def bad(v: torch.Tensor) -> int:
        return int((~torch.isfinite(v)).sum() + (v == 0).sum())

    def tiny(v: torch.Tensor) -> int:
        return int(((v > 0) & (v < 1e-8)).sum())

    p = torch.softmax(logits.float(), 1)
    saturated = int((p.max(1).values >= 1.0 - 1e-7).sum())
    details = {
        "samples": n,
        "ce_zero_or_nonfinite": bad(gn),
        "ce_vanishing": tiny(gn),
        "margin_zero_or_nonfinite": bad(gm),
        "saturated_softmax": saturated,
        "median_ce_gradient_norm": float(gn.median()),
        "median_margin_gradient_norm": float(gm.median()),
    }
    title = "Useful gradients"
    if bad(gm) > 0.5 * n:
        return _check(
            "gradients",
            title,
            "fail",
            f"The gradient of the logits is zero or not finite on {bad(gm)} of {n} samples: "
            "gradient attacks are blind here, so a high robust accuracy says nothing (typical "
            "of a non-differentiable step such as quantization, rounding or thresholding).",
            "Declare the non-differentiable transform so it can be attacked with BPDA "
            "(straight-through gradients), and add black-box attacks to the suite.",
            **details,
        )
    ce_bad = bad(gn) + tiny(gn)
    if ce_bad > 0.1 * n or saturated > 0.5 * n:
        c = _check(
            "gradients",
            title,
            "warn",
            f"Cross-entropy gradients vanish on {ce_bad} of {n} samples (softmax saturated on "
            f"{saturated}), while logit-margin gradients are fine: CE-based attacks stall on "
            "saturated outputs and understate what an attacker can do.",
            "Use scale-invariant margin losses (DLR, CW margin); the runner re-ran with them.",
            **details,
        )
        if ev.tm.escalate and ev.tm.norm in ("linf", "l2"):
            _escalate_margin_losses(ev, state, c)
        return c
    return _check(
        "gradients",
        title,
        "pass",
        f"Gradients are finite and non-zero on {n - ce_bad} of {n} samples.",
        **details,
    )


def _escalate_margin_losses(ev: EvaluationContext, state: RunState, c: SanityCheck) -> None:
    """Re-run the survivors with margin losses (PGD-margin, APGD-DLR); note it on ``c``."""
    c.status_before_escalation = "warn"
    steps = max(100, *(int(a.attack.params().get("steps", 0)) for a in state.attacks))
    extra = [
        (
            "pgd-margin",
            build_attack(
                "pgd",
                norm=ev.tm.norm,
                seed=ev.tm.seed + 7,
                steps=steps,
                loss="margin",
                restarts=2,
            ),
        ),
        (
            "apgd-dlr",
            build_attack("apgd-dlr", norm=ev.tm.norm, seed=ev.tm.seed + 7, steps=steps),
        ),
    ]
    n_new = _escalate(ev, state, extra)
    c.escalation = _escalation_text(n_new, "margin losses (PGD-margin, APGD-DLR)")


def _independent(
    ev: EvaluationContext,
    state: RunState,
    subset: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: SuiteAttack,
    label: str,
) -> list[int]:
    """Run ``attack`` independently (not as a cascade) on the subset at every epsilon.

    Returns robust counts per epsilon; every adversarial found is merged into the results.
    """
    robust = []
    model = ev.attack_model
    ids = torch.arange(len(subset))  # draws keyed by place in the subset (fixed by the run)
    for e, eps in enumerate(state.epsilons):
        t0 = ev.clock()
        f0, g0 = ev.model.queries.snapshot()
        res = ev.run_attack(attack, model, x, y, eps, sample_ids=ids)
        f1, g1 = ev.model.queries.snapshot()
        ok = res.success.cpu() & res.attacked.cpu()
        if eps > 0 and ok.any():
            fi = ok.nonzero().squeeze(1)
            ok[fi[~ev.verify(res.x_adv.cpu()[fi], x[fi], y[fi], eps)]] = False
        robust.append(int((~ok).sum()))
        # merge: samples still robust in the results but fooled here
        alive = state.records.robust_at(e)[subset]
        new = ok.numpy() & alive
        st = state.stat(e, label, "sanity")
        st.add(
            {
                "attacked": len(subset),
                "newly_fooled": int(new.sum()),
                "forward": f1 - f0,
                "gradient": g1 - g0,
                "seconds": ev.clock() - t0,
            }
        )
        if new.any():
            i = np.nonzero(new)[0]
            ev.record(
                state,
                subset[i],
                x[i],
                res.x_adv.cpu()[i],
                y[i],
                e,
                eps,
                label,
                state.key(e, label, "sanity"),
            )
    return robust


def _monotonic(
    ev: EvaluationContext, state: RunState, subset: np.ndarray, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    title = "Robust accuracy falls as epsilon grows"
    if len(state.epsilons) < 2:
        return _check("monotonic", title, "skip", "Only one epsilon: nothing to compare.")
    base = _white_attacks(state)[0] if _white_attacks(state) else state.attacks[0]
    robust = _independent(ev, state, subset, x, y, base, f"{base.name} (independent)")
    rises = [
        (state.epsilons[i], state.epsilons[i + 1], robust[i], robust[i + 1])
        for i in range(len(robust) - 1)
        if robust[i + 1] > robust[i]
    ]
    n = len(subset)
    details = {
        "attack": base.name,
        "samples": n,
        "robust_per_epsilon": dict(zip([f"{e:g}" for e in state.epsilons], robust, strict=True)),
    }
    if not rises:
        return _check(
            "monotonic",
            title,
            "pass",
            f"Run independently at each epsilon on {n} samples, {base.name} finds "
            "robust accuracy that never rises with epsilon.",
            **details,
        )
    worst = max(b - a for _, _, a, b in rises)
    status: Status = "fail" if worst > max(1, 0.02 * n) else "warn"
    txt = "; ".join(f"{b} robust at eps {e2:g} vs {a} at eps {e1:g}" for e1, e2, a, b in rises)
    return _check(
        "monotonic",
        title,
        status,
        f"Run independently per epsilon, {base.name} leaves more samples robust at a larger "
        f"epsilon ({txt}). A larger budget can only help the attacker, so the attack is not "
        "finding what exists: a sign of gradient masking or a badly tuned step size. The "
        "reported numbers count a sample fooled at a small epsilon as fooled at larger ones.",
        "Use more steps and restarts, step sizes relative to epsilon, and margin losses.",
        **details,
    )


def _large_epsilon(
    ev: EvaluationContext, state: RunState, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    lo, hi = ev.model.bounds
    d = int(np.prod(ev.model.input_shape))
    norm = ev.tm.norm
    span = hi - lo
    big = {"linf": span, "l2": span * d**0.5, "l1": span * d, "l0": float(d)}[norm]
    title = "Unbounded attack reaches ~0% robust accuracy"
    ids = torch.arange(len(x))  # draws keyed by place in the subset (fixed by the run)
    candidates = [a.name for a in _white_attacks(state)] if is_white_box(ev.model) else []
    if not candidates:
        name, params = state.attacks[0].name, dict(state.attacks[0].spec_params)
    elif norm in ("linf", "l2", "l1"):
        name, params = "pgd", {"steps": 100, "loss": "margin"}
    else:
        name, params = candidates[0], {}

    def measure(restarts: int, steps_mult: int) -> float:
        p = dict(params)
        if name == "pgd":
            p.update(restarts=restarts, steps=100 * steps_mult)
        a = build_attack(name, norm=norm, seed=ev.tm.seed + 3, **p)
        res = ev.run_attack(a, ev.attack_model, x, y, big, sample_ids=ids)
        return 1.0 - float(res.success.float().mean())

    ra = measure(1, 1)
    status: Status = "pass" if ra <= 0.02 else "warn" if ra <= 0.1 else "fail"
    details = {"epsilon": big, "attack": name, "robust_accuracy": ra, "samples": len(x)}
    explanation = (
        f"At epsilon {big:g} (the whole input range) {name} leaves "
        f"{ra:.1%} of {len(x)} samples robust."
    )
    c = _check("large-epsilon", title, status, explanation)
    c.details = details
    if status != "pass":
        c.explanation += (
            " An attacker who may change the input arbitrarily must always win; "
            "if the attack cannot, it is failing (masked or obfuscated gradients, "
            "too few steps) and robust accuracy at small epsilons is overstated."
        )
        c.suggestion = (
            "Check for gradient masking (non-differentiable or randomized layers), "
            "add black-box attacks, use more steps and restarts."
        )
        if ev.tm.escalate and name == "pgd":
            c.status_before_escalation = c.status
            ra2 = measure(3, 2)
            c.details["escalated_robust_accuracy"] = ra2
            c.escalation = (
                f"re-ran at epsilon {big:g} with 3 restarts and 200 steps: {ra2:.1%} robust"
            )
            c.status = "pass" if ra2 <= 0.02 else "warn" if ra2 <= 0.1 else "fail"
    return c


def _iterative_vs_fgsm(
    ev: EvaluationContext, state: RunState, subset: np.ndarray, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    title = "Iterative attacks beat single-step FGSM"
    rec = state.records
    before = [rec.robust_at(e)[subset].copy() for e in range(len(state.epsilons))]
    fgsm = build_attack("fgsm", norm=ev.tm.norm, seed=ev.tm.seed)
    fg_robust = _independent(ev, state, subset, x, y, fgsm, "fgsm (sanity)")
    missed = [int((before[e] & ~rec.robust_at(e)[subset]).sum()) for e in range(len(before))]
    n = len(subset)
    details = {
        "samples": n,
        "fgsm_robust": fg_robust,
        "suite_robust": [int(b.sum()) for b in before],
        "fgsm_only_fooled": missed,
    }
    worst = max(missed)
    if worst == 0:
        return _check(
            "iterative-vs-single-step",
            title,
            "pass",
            f"FGSM finds no adversarial example on {n} samples that the suite missed.",
            **details,
        )
    status: Status = "fail" if worst > max(1, 0.02 * n) else "warn"
    c = _check(
        "iterative-vs-single-step",
        title,
        status,
        f"Single-step FGSM fooled up to {worst} of {n} samples that the iterative suite left "
        "robust: the iterative attacks are not converging or the loss surface is masked. "
        "These FGSM examples are counted in the results.",
        "Use more steps and restarts (the runner escalates below) and check for gradient masking.",
        **details,
    )
    if ev.tm.escalate and _white_attacks(state):
        c.status_before_escalation = status
        n_new = _escalate(
            ev, state, [(f"{a.name} x2", _stronger(ev, a)) for a in _white_attacks(state)]
        )
        c.escalation = _escalation_text(n_new, "twice the steps and restarts")
    return c


def _convergence(
    ev: EvaluationContext, state: RunState, subset: np.ndarray, x: torch.Tensor, y: torch.Tensor
) -> SanityCheck:
    title = "Attacks have converged"
    wb = _white_attacks(state)
    if not wb:
        return _check("convergence", title, "skip", "No iterative white-box attack in the suite.")
    a = wb[0]
    if "steps" not in a.attack.params():
        return _check("convergence", title, "skip", f"{a.name} has no step count to double.")
    strong = _stronger(ev, a)
    label = f"{a.name} x2 (sanity)"
    n = len(subset)
    new_total = 0
    per_eps = {}
    for e, eps in enumerate(state.epsilons):
        new = ev.attack_survivors(state, strong, subset, x, y, e, eps, None, "sanity", label)
        per_eps[f"{eps:g}"] = new
        new_total = max(new_total, new)
    details = {
        "attack": a.name,
        "doubled": strong.attack.params(),
        "samples": n,
        "newly_fooled_per_epsilon": per_eps,
    }
    if new_total <= max(0, int(0.01 * n)):
        return _check(
            "convergence",
            title,
            "pass",
            f"Doubling {a.name}'s steps and restarts on {n} samples changes robust "
            "accuracy by at most one point.",
            **details,
        )
    c = _check(
        "convergence",
        title,
        "warn",
        f"Doubling {a.name}'s steps and restarts fooled {new_total} more of {n} samples "
        f"({new_total / n:.1%}) at one epsilon: the attack had not converged.",
        "Use more steps and restarts; the runner re-ran the suite stronger below.",
        **details,
    )
    if ev.tm.escalate:
        c.status_before_escalation = "warn"
        n_new = _escalate(ev, state, [(f"{b.name} x2", _stronger(ev, b)) for b in wb])
        c.escalation = _escalation_text(n_new, "twice the steps and restarts")
    return c


def _black_vs_white(ev: EvaluationContext, state: RunState) -> SanityCheck:
    title = "Black-box attacks do not beat white-box ones"
    kinds = {a.entry.knowledge for a in state.attacks}
    if kinds != {"white-box", "black-box"}:
        return _check(
            "black-box-vs-white-box",
            title,
            "skip",
            "The suite does not mix white-box and black-box attacks.",
        )
    names = {a.name: a.entry.knowledge for a in state.attacks}
    worst, details = 0.0, {}
    for (e, name, stage), s in state.stats.items():
        if stage != "suite" or names.get(name) != "black-box" or s.attacked == 0:
            continue
        share = s.newly_fooled / s.attacked
        details[f"{name}@{state.epsilons[e]:g}"] = {
            "attacked": s.attacked,
            "newly_fooled": s.newly_fooled,
        }
        worst = max(worst, share)
    if worst == 0:
        return _check(
            "black-box-vs-white-box",
            title,
            "pass",
            "Black-box attacks found nothing the white-box attacks missed.",
            **details,
        )
    counts = [(d["newly_fooled"], d["attacked"]) for d in details.values()]
    status = black_box_status(counts)
    evidence = (
        "their gradients are probably masked"
        if status == "fail"
        else "too few samples to tell chance from masked gradients (no epsilon's share is above "
        "5% with 95% confidence)"
    )
    return _check(
        "black-box-vs-white-box",
        title,
        status,
        f"Black-box attacks fooled up to {worst:.1%} of the samples that survived the white-box "
        f"attacks. With full gradient access the white-box attacks should find at least as much: "
        f"{evidence}.",
        "Investigate gradient masking (BPDA/EOT) before trusting the white-box numbers.",
        **details,
    )


def black_box_status(counts: list[tuple[int, int]], share: float = 0.05) -> Status:
    """``fail`` when, at some epsilon, black-box attacks fooled more than ``share`` of the
    white-box survivors with 95% confidence (one-sided Clopper-Pearson lower bound of
    ``newly_fooled / attacked``), ``warn`` when they fooled any, else ``pass``. One survivor
    of one fooled at one epsilon is a warning, two of two already a failure."""
    from scipy.stats import beta

    if not any(k for k, _ in counts):
        return "pass"
    for k, n in counts:
        if k > 0 and float(beta.ppf(0.05, k, n - k + 1)) > share:
            return "fail"
    return "warn"


def _adaptive(ev: EvaluationContext) -> SanityCheck:
    """A declared defense must be attacked through (BPDA) and over (EOT) its transforms."""
    info = ev.adaptive
    nondiff, randomized = info["declared_nondifferentiable"], info["declared_randomized"]
    title = "Declared defenses attacked adaptively"
    if not nondiff and not randomized:
        return _check(
            "adaptive-attacks", title, "skip", "The model declares no input-transform defense."
        )
    missing = []
    if nondiff and is_white_box(ev.model) and not any("BPDA" in u for u in info["used"]):
        missing.append(f"BPDA through the non-differentiable {', '.join(nondiff)}")
    if randomized and not any("EOT" in u for u in info["used"]):
        missing.append("EOT over the randomized transforms")
    if not missing:
        return _check(
            "adaptive-attacks",
            title,
            "pass",
            "The attacks saw the defense: " + "; ".join(info["used"]) + ".",
            **info,
        )
    return _check(
        "adaptive-attacks",
        title,
        "fail",
        "The model declares a defense that the attacks did not account for (missing: "
        + "; ".join(missing)
        + "). Gradients through a non-differentiable transform are zero or meaningless, and "
        "one random draw is not what an attacker averaging over draws sees: the robust "
        "accuracy above is very likely overstated.",
        "Re-run with `adaptive: true` in the threat model (the default).",
        **info,
    )
