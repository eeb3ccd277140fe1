"""DeepFool, Moosavi-Dezfooli et al. 2016 ("DeepFool: a simple and accurate method...")."""

from __future__ import annotations

import torch

from advguard import _validate as check
from advguard.attacks.base import Attack, RunResult
from advguard.attacks.norms import per_sample
from advguard.attacks.randomness import SampleRandom
from advguard.models.base import Classifier, is_white_box


class DeepFool(Attack):
    """Minimum-norm untargeted attack by iterated linearisation of the decision boundaries.

    At each step, the logit differences ``f_k = Z_k - Z_y`` between the ``candidates - 1``
    runner-up classes ``k`` (ranked once by the clean logits) and the true class ``y`` are
    linearised around the current point, ``w_k = grad f_k``, and the step goes to the nearest
    linearised boundary ``l = argmin_k |f_k| / ||w_k||_q``:

    * L2: ``r = (|f_l| + 1e-4) / ||w_l||_2^2 * w_l``
    * Linf: ``r = (|f_l| + 1e-4) / ||w_l||_1 * sign(w_l)``

    (``q`` is the dual norm). Steps accumulate into ``r_tot`` and the iterate is
    ``x + (1 + overshoot) * r_tot``, clipped to the model's bounds. A sample stops as soon as
    it is misclassified.

    Parameters
    ----------
    steps:
        Maximum number of linearisation steps.
    candidates:
        Number of classes considered, the true class included (capped at ``num_classes``).
    overshoot:
        Relative amount by which the accumulated perturbation overshoots the boundary.

    Gradients of the ``candidates - 1`` differences are computed in one batched
    ``value_and_grad`` call per step (the batch repeats each sample once per candidate),
    so every per-class gradient is counted as a gradient query.
    Samples not fooled within ``steps`` return their **last iterate**.
    """

    name = "deepfool"
    norms = ("l2", "linf")
    minimum_norm = True
    supports_targeted = False

    def __init__(
        self,
        *,
        norm: str | float = "l2",
        steps: int = 50,
        candidates: int = 10,
        overshoot: float = 0.02,
        seed: int = 0,
        allow_large: bool = False,
    ) -> None:
        super().__init__(norm=norm, seed=seed, allow_large=allow_large)
        self.steps = check.steps("steps", steps, allow_large=allow_large)
        self.candidates = check.integer("candidates", candidates, low=2)
        self.overshoot = check.non_negative("overshoot", overshoot)

    def _run(
        self,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilon: float | None,
        targets: torch.Tensor | None,
        rng: SampleRandom,
    ) -> RunResult:
        assert is_white_box(model)  # needs_gradients: the base class checked it
        lo, hi = model.bounds
        n, dev = len(x), x.device
        k = min(self.candidates, model.num_classes)

        # the k - 1 strongest other classes by the clean logits, fixed for the whole attack
        z0 = model.logits(x)
        others = z0.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices  # [n, k-1]

        x_adv = x.clone()
        r_tot = torch.zeros_like(x)
        idx = torch.arange(n, device=dev)
        shape = x.shape[1:]
        for _ in range(self.steps):  # the base class checks the last iterate
            m = len(idx)
            xi, yi, oi = x_adv[idx], y[idx], others[idx]
            # one row per (sample, candidate): d(Z_k - Z_y)/dx
            x_rep = xi.repeat_interleave(k - 1, dim=0)
            y_rep = yi.repeat_interleave(k - 1)
            o_rep = oi.reshape(-1)

            def diff(z: torch.Tensor, y_rep=y_rep, o_rep=o_rep) -> torch.Tensor:
                z_k = z.gather(1, o_rep[:, None]).squeeze(1)
                return z_k - z.gather(1, y_rep[:, None]).squeeze(1)

            z, f, w = model.value_and_grad(x_rep, diff)
            fooled = z.view(m, k - 1, -1)[:, 0].argmax(1) != yi
            if fooled.all():
                break
            keep = ~fooled
            idx, m = idx[keep], int(keep.sum())
            f = f.view(-1, k - 1)[keep]  # [m, k-1]
            w = w.view(-1, k - 1, *shape)[keep]  # [m, k-1, ...]
            wf = w.reshape(m, k - 1, -1)
            # dual norm of the boundary normals: L2 for L2, L1 for Linf
            wn = wf.norm(p=2, dim=2) if self.norm == "l2" else wf.abs().sum(dim=2)
            dist = f.abs() / wn.clamp_min(1e-12)
            best = dist.argmin(dim=1)
            f_l = f.gather(1, best[:, None]).squeeze(1)
            w_l = w[torch.arange(m, device=dev), best]  # [m, ...]
            wn_l = wn.gather(1, best[:, None]).squeeze(1).clamp_min(1e-12)
            if self.norm == "l2":
                r = per_sample((f_l.abs() + 1e-4) / wn_l.pow(2), w_l) * w_l
            else:
                r = per_sample((f_l.abs() + 1e-4) / wn_l, w_l) * w_l.sign()
            r_tot[idx] = r_tot[idx] + r
            x_adv[idx] = (x[idx] + (1.0 + self.overshoot) * r_tot[idx]).clamp(lo, hi)
        return RunResult(x_adv)
