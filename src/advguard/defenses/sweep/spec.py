"""The sweep specification (a YAML file, validated with pydantic) and its trials.

A spec names one defense (``pgd-at``, ``trades`` or ``fast-at``), a data set, an advguard zoo
architecture, fixed training arguments and a search space over the others; trials are the
grid (every combination of the grid dimensions) crossed with ``num_samples`` draws of the
random dimensions (``uniform``, ``loguniform``, ``choice``), drawn here from ``seed`` so that
every backend runs the same trials in the same order, and ``--resume`` can tell which trials
are already done (a trial's ``key`` is the SHA-256 of everything that determines its result).

The spec is data: the architecture must be one of advguard's zoo factories (a file never
chooses code to run), and the threat model is a preset name, a YAML file (relative to the
spec's folder) or an inline mapping.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advguard.errors import InputError
from advguard.evaluate.threat_model import PRESETS, ThreatModel, load_threat_model

SPEC_FIELDS_NOT_TUNABLE = ("method", "seed", "bounds", "device", "max_time_s")
"""TrainConfig fields a sweep sets itself (``seed``: one held-out split for every trial)."""


def tunable_fields() -> tuple[str, ...]:
    """The :class:`~advguard.defenses.training.TrainConfig` fields a sweep may fix or search."""
    from advguard.defenses.training import TrainConfig

    return tuple(f.name for f in fields(TrainConfig) if f.name not in SPEC_FIELDS_NOT_TUNABLE)


Scalar = bool | int | float | str | None


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grid(_M):
    grid: list[Scalar] = Field(min_length=1)


class Choice(_M):
    choice: list[Scalar] = Field(min_length=1)


class Uniform(_M):
    uniform: tuple[float, float]

    @field_validator("uniform")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError(f"uniform needs [low, high] with low < high, got {list(v)}")
        return v


class LogUniform(_M):
    loguniform: tuple[float, float]

    @field_validator("loguniform")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] < v[1] and math.isfinite(v[1])):
            raise ValueError(f"loguniform needs [low, high] with 0 < low < high, got {list(v)}")
        return v


Dimension = Grid | Choice | Uniform | LogUniform
"""A search dimension: a plain list (grid), ``{grid: [...]}``, ``{choice: [...]}``,
``{uniform: [low, high]}`` or ``{loguniform: [low, high]}``."""
_KINDS: dict[str, type[BaseModel]] = {
    "grid": Grid, "choice": Choice, "uniform": Uniform, "loguniform": LogUniform,
}  # fmt: skip


def _dimension(key: str, v: Any) -> BaseModel:
    """One search dimension from its YAML form, with a message that names what is wrong."""
    if isinstance(v, BaseModel):
        return v
    if isinstance(v, list):
        v = {"grid": v}
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in _KINDS:
        raise ValueError(
            f"{key}: a search dimension is a list (grid) or one of {{grid: [...]}}, "
            "{choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}"
        )
    try:
        return _KINDS[next(iter(v))].model_validate(v)
    except ValidationError as e:
        raise ValueError(f"{key}: {_first_error(e)}") from None


class Resources(_M):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)


class SweepSpec(_M):
    """A hyper-parameter sweep of one adversarial-training defense (see the module docstring)."""

    name: str = "sweep"
    defense: Literal["pgd-at", "trades", "fast-at"]
    data: str = Field(description="data set spec, as advguard.data.load_dataset takes it")
    arch: str = Field(
        default="small_cnn", validate_default=True, description="an advguard zoo factory"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="fixed TrainConfig fields")
    search: dict[str, Dimension] = Field(default_factory=dict)
    num_samples: int = Field(default=1, ge=1, le=10_000)
    threat_model: str | dict[str, Any] = "quick"
    eval_samples: int | None = Field(default=None, ge=1)
    headline_epsilon: float | None = None
    seed: int = Field(default=0, ge=0)
    device: str = "cpu"
    max_concurrent: int = Field(default=2, ge=1)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        from advguard.models.io import ZOO_FACTORIES, ZOO_MODULE

        name = v.removeprefix(f"{ZOO_MODULE}:")
        if name not in ZOO_FACTORIES:
            raise ValueError(
                f"arch must be an advguard zoo factory ({', '.join(sorted(ZOO_FACTORIES))}), "
                f"got {v!r} (a spec file never chooses code to run)"
            )
        return f"{ZOO_MODULE}:{name}"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        text = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {v!r}")
        return text

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {k: _dimension(str(k), d) for k, d in v.items()}

    @model_validator(mode="after")
    def _keys(self) -> SweepSpec:
        allowed = tunable_fields()
        for where, keys in (("train", self.train), ("search", self.search)):
            bad = sorted(set(keys) - set(allowed))
            if bad:
                raise ValueError(
                    f"{where}: unknown or fixed training argument(s) {', '.join(bad)}; "
                    f"use {', '.join(allowed)}"
                )
        if self.device.startswith("cuda") and self.resources.gpu == 0:
            raise ValueError(
                f"device {self.device} needs resources.gpu > 0 (Ray Tune gives a trial only "
                "the GPUs it asks for)"
            )
        both = sorted(set(self.train) & set(self.search))
        if both:
            raise ValueError(f"{', '.join(both)} both fixed (train) and searched (search)")
        return self

    # -- derived -------------------------------------------------------------------
    def threat(self, base_dir: Path | None = None) -> ThreatModel:
        """The threat model of every trial's evaluation (``eval_samples`` applied)."""
        tm = _threat_model(self.threat_model, base_dir)
        if tm.is_text or not tm.has_evasion:
            raise InputError(f"threat model {tm.name!r} has no image/tabular evasion attacks")
        if self.eval_samples is not None:
            tm = tm.with_overrides(samples=self.eval_samples)
        return tm

    def headline(self, tm: ThreatModel) -> float:
        """The epsilon whose robust accuracy is the Pareto front's y axis (default: the
        threat model's largest)."""
        if self.headline_epsilon is None:
            return max(tm.epsilons)
        for e in tm.epsilons:
            if abs(e - self.headline_epsilon) < 1e-12:
                return e
        raise InputError(
            f"headline_epsilon {self.headline_epsilon:g} is not one of the threat model's "
            f"epsilons {tm.epsilons}"
        )

    def trials(self, tm: ThreatModel) -> list[dict[str, Any]]:
        """Every trial: ``{"id", "key", "params", "config"}`` (plain data, see
        :func:`trial_config`), in a fixed order."""
        grid: dict[str, list[Any]] = {}
        for k, d in self.search.items():
            values = _values(d)
            if values is not None:
                grid[k] = values
        rand = {k: d for k, d in self.search.items() if k not in grid}
        rng = np.random.default_rng(self.seed)
        combos = list(itertools.product(*grid.values())) if grid else [()]
        out: list[dict[str, Any]] = []
        for _ in range(self.num_samples):
            drawn = {k: _draw(d, rng) for k, d in rand.items()}
            for combo in combos:
                params = {**dict(zip(grid, combo, strict=True)), **drawn}
                cfg = trial_config(self, tm, params)
                key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
                out.append({"id": f"t{len(out):03d}", "key": key, "params": params, "config": cfg})
        return out


def trial_config(spec: SweepSpec, tm: ThreatModel, params: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines a trial's numbers, as plain data (what a worker gets)."""
    return {
        "defense": spec.defense,
        "data": spec.data,
        "arch": spec.arch,
        "train": {**spec.train, **params},
        "seed": spec.seed,
        "device": spec.device,
        "threads": max(1, int(spec.resources.cpu)),
        "threat_model": tm.model_dump(mode="json"),
    }


def _values(d: Any) -> list[Any] | None:
    return d.grid if isinstance(d, Grid) else None


def _draw(d: Any, rng: np.random.Generator) -> Any:
    if isinstance(d, Choice):
        return d.choice[int(rng.integers(len(d.choice)))]
    if isinstance(d, Uniform):
        return float(rng.uniform(*d.uniform))
    if not isinstance(d, LogUniform):  # pragma: no cover - the spec validated every dimension
        raise TypeError(f"not a search dimension: {d!r}")
    lo, hi = d.loguniform
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _threat_model(ref: str | dict[str, Any], base_dir: Path | None) -> ThreatModel:
    if isinstance(ref, dict):
        try:
            return ThreatModel.model_validate(ref)
        except ValidationError as e:
            raise InputError(f"threat_model: {_first_error(e)}") from None
    if ref in PRESETS or base_dir is None or Path(ref).is_absolute():
        return load_threat_model(ref)
    return load_threat_model(base_dir / ref)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_sweep_spec(text: str, source: str = "<spec>") -> SweepSpec:
    """A :class:`SweepSpec` from YAML text; a one-line :class:`InputError` when it is bad."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{source} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source} must be a YAML mapping (defense, data, search, ...)")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{source}: {_first_error(e)}") from None


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sweep spec not found: {p}")
    return parse_sweep_spec(p.read_text(encoding="utf-8"), str(p))
