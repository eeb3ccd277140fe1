"""The models a guard serves: loaded with the safe loaders of :mod:`advguard.models.io`, from a
file or from a registry version (pulled and re-hashed first)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from advguard.errors import InputError
from advguard.guard.config import GuardConfig, ModelSpec
from advguard.guard.edge import InputSpec
from advguard.models.base import Classifier


@dataclass
class ServedModel:
    """A classifier with the name and version the API reports."""

    name: str
    version: str
    classifier: Classifier
    digest: str | None = None

    @property
    def spec(self) -> InputSpec:
        c = self.classifier
        return InputSpec(
            tuple(int(d) for d in c.input_shape),
            (float(c.bounds[0]), float(c.bounds[1])),
            int(c.num_classes),
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.asarray(self.classifier.predict_proba(x), dtype=np.float64)
        if p.shape != (len(x), self.spec.num_classes) or not np.isfinite(p).all():
            raise RuntimeError(
                f"model {self.name} answered scores of shape {p.shape} or non-finite"
            )
        return p


def _kwargs(spec: ModelSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if spec.factory:
        kw["factory"] = spec.factory
    if spec.input_shape is not None:
        kw["input_shape"] = tuple(spec.input_shape)
    if spec.num_classes is not None:
        kw["num_classes"] = spec.num_classes
    if spec.bounds is not None:
        kw["bounds"] = (spec.bounds[0], spec.bounds[1])
    return kw


def load_served_model(spec: ModelSpec, cfg: GuardConfig) -> ServedModel:
    """Load ``spec``: a file through :func:`advguard.models.io.load_model`, or the registry
    version in ``spec.registry.stage`` (pulled, re-hashed, then loaded the same way).

    Only an explicit ``factory`` (YAML or ``--factory``) or the one saved in a safetensors file
    is imported, exactly as ``advguard evaluate --factory``; a registry row never names code.
    """
    from advguard.models.io import file_sha256, load_model

    if spec.path is not None:
        path = cfg.resolve(spec.path)
        assert path is not None
        model = load_model(path, **_kwargs(spec))
        digest = file_sha256(path)
        return ServedModel(spec.name, f"sha256:{digest[:12]}", model, digest)
    if spec.registry is not None:
        from advguard.registry.store import Registry

        src = spec.registry
        root = cfg.resolve(src.root)
        with Registry(root, db_url=src.db_url) as reg:
            info = reg.get(f"{src.model_name}@{src.stage}")
            primary = next(iter(info.artifacts))
            with tempfile.TemporaryDirectory(prefix="advguard-guard-") as tmp:
                pulled = reg.pull(info.ref, tmp)
                path = pulled.out / primary
                model = load_model(path, **_kwargs(spec))
        return ServedModel(spec.name, info.ref, model, info.model_digest)
    raise InputError(
        f"model {spec.name!r} has no source: give --model FILE or --model-name NAME "
        "(registry), or 'path'/'registry' in the config"
    )


def with_overrides(spec: ModelSpec | None, **overrides: Any) -> ModelSpec:
    """``spec`` with the command line's non-None values on top (a registry source replaces a
    path and vice versa)."""
    data = spec.model_dump() if spec is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "path" in given:
        data["registry"] = None
    if "registry" in given:
        data["path"] = None
    data.update(given)
    return ModelSpec.model_validate(data)
