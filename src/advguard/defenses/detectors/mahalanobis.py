"""Mahalanobis-distance detector on penultimate features (Lee et al. 2018, NeurIPS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from advguard import _validate as check
from advguard.defenses.detectors.base import Detector
from advguard.errors import InputError

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class MahalanobisDetector(Detector):
    """Class-conditional Gaussians with a shared (tied) covariance on penultimate features.

    Fit: class means ``mu_c`` and the pooled within-class covariance ``S`` of the features
    ``h(x)`` of benign training data, shrunk towards a scaled identity for stability,
    ``S' = (1 - a) S + a * tr(S) / d * I`` (``a = shrinkage``), and inverted with a
    pseudo-inverse. Score: ``min_c (h(x) - mu_c)^T S'^+ (h(x) - mu_c)``. This is the
    single-layer detector of Lee et al. without their input pre-processing (a small gradient
    step towards the closest class) and without the logistic-regression ensemble over layers.

    Features come from ``features`` (a callable on a raw input batch) or from a forward hook
    on ``model.module``: ``layer`` names a sub-module (as in ``named_modules()``) whose output
    is taken; by default the *input* of the last ``nn.Linear`` (the penultimate features of
    the usual classifier head). Feature maps ``(N, C, H, W)`` are averaged over space to one
    value per channel, as Lee et al. do for intermediate layers (``pool=False`` keeps all
    ``C * H * W`` values: the covariance is then ``(CHW)^2``, slow beyond a few thousand).
    Labels given to :meth:`fit` are used; without them the model's predictions define the
    classes.
    """

    name = "mahalanobis"
    needs_fit = True

    def __init__(
        self,
        model: Any,
        layer: str | None = None,
        *,
        features: FeatureFn | None = None,
        shrinkage: float = 0.01,
        pool: bool = True,
    ) -> None:
        super().__init__(model)
        if features is not None and layer is not None:
            raise InputError("give either features or layer, not both")
        if features is not None and not callable(features):
            raise InputError(f"features must be callable, got {type(features).__name__}")
        check.fraction("shrinkage", shrinkage, high_open=True)
        self.layer = layer
        self.shrinkage = float(shrinkage)
        self.pool = bool(pool)
        self._features_fn = features
        self._hook_target: torch.nn.Module | None = None
        self._hook_input = False
        if features is None:
            self._hook_target, self._hook_input = self._resolve_layer(model, layer)
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @staticmethod
    def _resolve_layer(model: Any, layer: str | None) -> tuple[torch.nn.Module, bool]:
        module = getattr(model, "module", None)
        if not isinstance(module, torch.nn.Module):
            raise InputError(
                f"MahalanobisDetector cannot reach the layers of {type(model).__name__} "
                "(no torch module at model.module); pass features=callable(x) -> features"
            )
        named = dict(module.named_modules())
        if layer is not None:
            if layer not in named:
                some = ", ".join(repr(n) for n in list(named)[1:12])
                raise InputError(f"no sub-module named {layer!r} in the model; known: {some}")
            return named[layer], False
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise InputError(
                "the model has no nn.Linear head to take penultimate features from; "
                "pass layer='<module name>' or features=callable"
            )
        return linears[-1], True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened penultimate features ``(N, d)`` (float64) of a raw input batch."""
        if self._features_fn is not None:
            with torch.no_grad():
                f = self._features_fn(x)
            if not isinstance(f, torch.Tensor) or f.ndim < 1 or len(f) != len(x):
                raise InputError("features(x) must return a tensor with one row per input")
            return self._flat(f.detach())
        captured: list[torch.Tensor] = []

        def hook(_m: torch.nn.Module, inp: Any, out: Any) -> None:
            captured.append(inp[0] if self._hook_input else out)

        assert self._hook_target is not None
        handle = self._hook_target.register_forward_hook(hook)
        try:
            self.model.logits(x)
        finally:
            handle.remove()
        if not captured or not isinstance(captured[-1], torch.Tensor):
            raise InputError("the hooked layer produced no tensor during the forward pass")
        return self._flat(captured[-1].detach())

    def _flat(self, f: torch.Tensor) -> torch.Tensor:
        if self.pool and f.ndim > 2:  # feature maps: mean per channel (Lee et al., Sec. 2)
            f = f.flatten(2).mean(2)
        return f.flatten(1).double()

    def _fit(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        feats, labels = [], []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            feats.append(self.features(xb))
            if y is None:
                labels.append(self.model.logits(xb).argmax(1))
        f = torch.cat(feats)
        lab = y if y is not None else torch.cat(labels)
        lab = lab.to(f.device)
        classes = torch.unique(lab)
        if len(classes) < 2:
            raise InputError("MahalanobisDetector.fit needs benign samples of at least 2 classes")
        d = f.shape[1]
        means = torch.stack([f[lab == c].mean(0) for c in classes])
        centred = f - means[torch.searchsorted(classes, lab)]
        cov = centred.T @ centred / len(f)
        a = self.shrinkage
        cov = (1 - a) * cov + a * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype)
        self.classes = classes
        self.means = means
        self.precision = torch.linalg.pinv(cov, hermitian=True)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.means is not None and self.precision is not None
        f = self.features(x)
        diff = f[:, None, :] - self.means[None]  # (N, C, d)
        m = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return m.amin(1)

    def params(self) -> dict[str, Any]:
        return {
            "layer": self.layer
            if self.layer is not None
            else ("callable" if self._features_fn else "input of last nn.Linear"),
            "shrinkage": self.shrinkage,
            "pool": self.pool,
        }
