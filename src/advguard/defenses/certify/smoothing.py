"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The *smoothed* classifier ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` is certifiably
robust in L2: if the top class has probability at least ``pA_lower > 1/2`` under the noise,
then ``g`` predicts that class everywhere within ``sigma * Phi^{-1}(pA_lower)`` of ``x``.
The probabilities are estimated by Monte Carlo; every statement holds with probability at
least ``1 - alpha`` over the noise draws.

Conventions (as in Cohen et al.):

* The noise is Gaussian in the model's *raw* input space and the noisy inputs are **not**
  clamped to the model's bounds: clamping would change the distribution the guarantee is
  stated for. The base model therefore sees out-of-bounds inputs. Adapter ``logits``
  methods do not validate bounds (only :meth:`ClassifierBase.predict_logits` does, via
  :func:`advguard.models.base.check_inputs`), so the noisy batches go through
  ``model.logits`` directly; the *clean* inputs are still checked.
* The guarantee is about the smoothed classifier ``g``, never about the base model ``f``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from advguard.errors import InputError
from advguard.models.base import Classifier, check_inputs

ABSTAIN = -1
Progress = Callable[[str, int, int], None]


@dataclass
class CertifyResult:
    """Per-sample outcome of :meth:`SmoothedClassifier.certify`."""

    labels: np.ndarray
    """Predicted class, or ``-1`` (abstain) where ``pA_lower <= 1/2``."""
    radii: np.ndarray
    """Certified L2 radius ``sigma * Phi^{-1}(pA_lower)`` (0 where abstaining)."""
    p_a_lower: np.ndarray
    """One-sided Clopper-Pearson lower bound on the top-class probability."""
    counts: np.ndarray
    """Top-class counts among the ``n`` estimation samples."""


class SmoothedClassifier:
    """Gaussian smoothing of any adapter with ``logits`` (black-box access is enough).

    Parameters
    ----------
    model:
        The base classifier ``f`` (an advguard adapter).
    sigma:
        Noise standard deviation, in raw input units.
    batch_size:
        Noisy samples per forward pass (bounds the memory of any ``n``).
    seed:
        Default seed; each call re-seeds, so equal calls give equal results.
    """

    def __init__(
        self, model: Classifier, sigma: float, *, batch_size: int = 1000, seed: int = 0
    ) -> None:
        if not hasattr(model, "logits") or not hasattr(model, "num_classes"):
            raise InputError(
                f"SmoothedClassifier needs an advguard model adapter with logits(), "
                f"got {type(model).__name__}"
            )
        sigma = float(sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise InputError(f"sigma must be a positive number, got {sigma}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.sigma = sigma
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    # ------------------------------------------------------------------ sampling
    def _prepare(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(x)
        if not torch.is_floating_point(t):
            t = t.to(torch.float32)
        t = t.to(dtype=torch.float32)
        check_inputs(self.model, t)
        return t

    def sample_counts(
        self,
        x: np.ndarray | torch.Tensor,
        num: int,
        *,
        seed: int | None = None,
        stage: str = "sampling",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Class counts ``(N, num_classes)`` of ``f`` over ``num`` noisy copies of each input.

        Noise for sample ``i`` comes from its own generator seeded with ``(seed, i)``, drawn
        in chunks of at most ``batch_size``; copies of several samples share a forward pass
        when ``num`` is smaller than ``batch_size``.
        """
        xt = self._prepare(x)
        return self._counts(xt, int(num), self.seed if seed is None else int(seed), stage, progress)

    def _generators(self, n: int, seed: int) -> list[torch.Generator]:
        seqs = np.random.SeedSequence(seed).spawn(n)
        return [torch.Generator().manual_seed(int(s.generate_state(1)[0])) for s in seqs]

    def _counts(
        self,
        xt: torch.Tensor,
        num: int,
        seed: int,
        stage: str,
        progress: Progress | None,
        generators: list[torch.Generator] | None = None,
    ) -> np.ndarray:
        if num < 1:
            raise InputError(f"the number of noise samples must be >= 1, got {num}")
        n = len(xt)
        k = self.model.num_classes
        counts = np.zeros((n, k), dtype=np.int64)
        gens = generators if generators is not None else self._generators(n, seed)
        total = n * num
        done = 0
        # queue of (sample index, copies still to draw)
        todo = [[i, num] for i in range(n)]
        pos = 0
        shape = tuple(xt.shape[1:])
        while pos < n:
            room = self.batch_size
            parts: list[torch.Tensor] = []
            owners: list[torch.Tensor] = []
            while room > 0 and pos < n:
                i, left = todo[pos]
                m = min(left, room)
                noise = torch.randn((m, *shape), generator=gens[i]) * self.sigma
                parts.append(xt[i].unsqueeze(0) + noise)
                owners.append(torch.full((m,), i, dtype=torch.long))
                todo[pos][1] -= m
                room -= m
                if todo[pos][1] == 0:
                    pos += 1
            batch = torch.cat(parts)
            pred = self.model.logits(batch).argmax(dim=1).cpu()
            who = torch.cat(owners)
            flat = (who * k + pred).numpy()
            counts += np.bincount(flat, minlength=n * k).reshape(n, k)
            done += len(batch)
            if progress is not None:
                progress(stage, done, total)
        return counts

    # ------------------------------------------------------------------ Cohen et al.
    def predict(
        self,
        x: np.ndarray | torch.Tensor,
        n: int = 100,
        alpha: float = 0.001,
        *,
        seed: int | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """PREDICT of Cohen et al.: the top class, or ``-1`` where a two-sided binomial test
        of the top two counts does not reject equality at level ``alpha``.

        The probability of returning a class other than ``g(x)`` is at most ``alpha``.
        """
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, seed=seed, stage="predict", progress=progress)
        out = np.full(len(counts), ABSTAIN, dtype=np.int64)
        for i, c in enumerate(counts):
            order = np.argsort(-c, kind="stable")
            n_a, n_b = int(c[order[0]]), int(c[order[1]])
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = int(order[0])
        return out

    def certify(
        self,
        x: np.ndarray | torch.Tensor,
        n0: int = 100,
        n: int = 10000,
        alpha: float = 0.001,
        *,
        seed: int | None = None,
        progress: Progress | None = None,
    ) -> CertifyResult:
        """CERTIFY of Cohen et al.: guess the top class from ``n0`` samples, bound its
        probability from ``n`` fresh samples (one-sided Clopper-Pearson at level ``alpha``).

        Returns labels (``-1`` = abstain) and L2 radii ``sigma * Phi^{-1}(pA_lower)``.
        With probability at least ``1 - alpha`` per sample, a non-abstaining label is
        ``g``'s prediction everywhere within the radius.
        """
        _check_alpha(alpha)
        if int(n0) < 1 or int(n) < 1:
            raise InputError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
        xt = self._prepare(x)
        s = self.seed if seed is None else int(seed)
        # one generator per sample, used first for selection and then for estimation:
        # the two sample sets are independent draws, as CERTIFY requires.
        gens = self._generators(len(xt), s)
        c0 = self._counts(xt, int(n0), s, "selection", progress, gens)
        guess = c0.argmax(axis=1)
        c = self._counts(xt, int(n), s, "estimation", progress, gens)
        n_a = c[np.arange(len(c)), guess]
        p_lower = np.array([lower_confidence_bound(int(k), int(n), alpha) for k in n_a])
        certified = p_lower > 0.5
        radii = np.where(certified, self.sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
        labels = np.where(certified, guess, ABSTAIN).astype(np.int64)
        return CertifyResult(labels=labels, radii=radii, p_a_lower=p_lower, counts=n_a)


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound for ``k`` successes of ``n``."""
    if k <= 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def certified_accuracy_curve(
    labels: np.ndarray, radii: np.ndarray, y: np.ndarray, radii_grid: np.ndarray | list[float]
) -> np.ndarray:
    """Fraction of samples with the correct (non-abstain) label and radius >= r, for each r.

    A radius exactly equal to ``r`` counts as certified at ``r`` (so ``r = 0`` gives the
    accuracy of the smoothed classifier with abstentions counted as errors).
    """
    labels, radii, y = np.asarray(labels), np.asarray(radii, dtype=float), np.asarray(y)
    if not (labels.shape == radii.shape == y.shape) or labels.ndim != 1:
        raise InputError(
            f"labels, radii and y must be 1-D of equal length, got "
            f"{labels.shape}, {radii.shape}, {y.shape}"
        )
    grid = np.asarray(radii_grid, dtype=float)
    if len(y) == 0:
        raise InputError("cannot compute certified accuracy on an empty set")
    correct = (labels == y) & (labels != ABSTAIN)
    return np.array([float((correct & (radii >= r)).mean()) for r in grid])


def train_with_noise(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    sigma: float,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    preprocess: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> nn.Module:
    """Gaussian data augmentation training (Cohen et al. Sec. 4): like
    :func:`advguard.models.fit.fit`, with fresh ``N(0, sigma^2)`` noise added to every batch
    (unclamped, as at certification time). Returns the module in eval mode.

    ``progress(epoch, epochs, mean_loss)`` is called after each epoch.
    """
    from advguard.models.fit import fit

    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    return fit(
        module,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        preprocess=preprocess,
        seed=seed,
        device=device,
        progress=progress,
        augment=lambda xb, g: xb + torch.randn(xb.shape, generator=g) * sigma,
    )


def _check_alpha(alpha: float) -> None:
    if not 0 < float(alpha) < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
