"""The models a guard serves: loaded with the safe loaders of :mod:`advguard.models.io`, from a
file or from a registry version (pulled and re-hashed first)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from advguard.errors import InputError
from advguard.guard.config import GuardConfig, ModelSpec
from advguard.guard.edge import InputSpec
from advguard.guard.modalities import Kind, text_spec
from advguard.models.base import Classifier

if TYPE_CHECKING:
    from advguard.attacks.tabular.schema import FeatureSchema
    from advguard.attacks.text.model import TextModel


@dataclass
class ServedModel:
    """A classifier with the name and version the API reports, and the kind of input it takes
    (see :mod:`advguard.guard.modalities`)."""

    name: str
    version: str
    classifier: Classifier | TextModel
    digest: str | None = None
    kind: Kind = "tensor"
    #: The feature schema of a tabular model.
    schema: FeatureSchema | None = None

    @property
    def num_classes(self) -> int:
        return int(self.classifier.num_classes)

    @property
    def tensor_classifier(self) -> Classifier:
        """The classifier of a tensor or tabular model (what detectors attach to)."""
        if self.kind == "text":
            raise InputError(f"model {self.name} is a text model: it takes strings, not arrays")
        return cast(Classifier, self.classifier)

    @property
    def spec(self) -> InputSpec:
        if self.kind == "text":
            return text_spec(self.num_classes)
        c = self.tensor_classifier
        return InputSpec(
            tuple(int(d) for d in c.input_shape),
            (float(c.bounds[0]), float(c.bounds[1])),
            int(c.num_classes),
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        batch: Any = [str(t) for t in x] if self.kind == "text" else x
        p = np.asarray(self.classifier.predict_proba(batch), dtype=np.float64)
        if p.shape != (len(x), self.num_classes) or not np.isfinite(p).all():
            raise RuntimeError(
                f"model {self.name} answered scores of shape {p.shape} or non-finite"
            )
        return p


def _load_file(path: Path, spec: ModelSpec, cfg: GuardConfig) -> tuple[Any, Kind, Any]:
    """(classifier, kind, schema) for a model file: a text model (``*.textmodel.json``), or a
    tensor model through the safe loaders, made tabular by ``spec.schema_path``."""
    from advguard.models.io import load_model
    from advguard.models.text_io import is_text_model_file, load_text_model

    if is_text_model_file(path):
        if spec.schema_path is not None:
            raise InputError(f"model {spec.name!r}: a text model takes no feature schema")
        from advguard.attacks.text import TextClassifier

        pipeline, info = load_text_model(path)
        return TextClassifier(pipeline, class_names=info["class_names"]), "text", None
    model = load_model(path, **_kwargs(spec))
    if spec.schema_path is None:
        return model, "tensor", None
    from advguard.attacks.tabular.schema import FeatureSchema

    schema = FeatureSchema.load(cfg.resolve(spec.schema_path))
    width = len(schema.compiled.names)
    if tuple(model.input_shape) != (width,):
        raise InputError(
            f"model {spec.name!r} takes inputs of shape {list(model.input_shape)} but its "
            f"feature schema has {width} features"
        )
    return model, "tabular", schema


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
    if spec.device is not None:
        from advguard.models.devices import configure_determinism, resolve_device

        configure_determinism(resolve_device(spec.device))
        kw["device"] = spec.device
    return kw


def load_served_model(spec: ModelSpec, cfg: GuardConfig) -> ServedModel:
    """Load ``spec``: a file through :func:`advguard.models.io.load_model`, or the registry
    version in ``spec.registry.stage`` (pulled, re-hashed, then loaded the same way).

    Only an explicit ``factory`` (YAML or ``--factory``) or the one saved in a safetensors file
    is imported, exactly as ``advguard evaluate --factory``; a registry row never names code.
    """
    from advguard.models.io import file_sha256

    if spec.path is not None:
        path = cfg.resolve(spec.path)
        assert path is not None
        model, kind, schema = _load_file(path, spec, cfg)
        digest = file_sha256(path)
        return ServedModel(spec.name, f"sha256:{digest[:12]}", model, digest, kind, schema)
    if spec.registry is not None:
        from advguard.registry.store import Registry

        src = spec.registry
        root = cfg.resolve(src.root)
        with Registry(root, db_url=src.db_url) as reg:
            info = reg.get(f"{src.model_name}@{src.stage}")
            primary = next(iter(info.artifacts))
            with tempfile.TemporaryDirectory(prefix="advguard-guard-") as tmp:
                pulled = reg.pull(info.ref, tmp)
                model, kind, schema = _load_file(pulled.out / primary, spec, cfg)
        return ServedModel(spec.name, info.ref, model, info.model_digest, kind, schema)
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
