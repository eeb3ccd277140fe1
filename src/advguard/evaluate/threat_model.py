"""Threat-model files: what the attacker knows, wants and may change, and the SLOs to judge.

A threat model is YAML validated with pydantic; errors name the file, line and field::

    name: my-model-linf
    knowledge: white-box        # white-box | black-box | transfer
    goal: untargeted            # untargeted | targeted
    norm: linf                  # linf | l2 | l1 | l0 | edits (text: character edits)
    epsilons: [0.05, 0.1, 0.2]  # in raw input units (the model's bounds)
    samples: 1000
    seed: 0
    batch_size: 256
    attacks:                    # run in this order, as a cascade
      - attack: apgd-ce
        steps: 100
      - attack: apgd-t
        steps: 100
    slos:
      - robust_accuracy >= 0.80 at eps 0.1
      - clean_accuracy_drop <= 0.02
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advguard.attacks.norms import parse_norm
from advguard.errors import InputError

METRICS = (
    "robust_accuracy",
    "clean_accuracy",
    "clean_accuracy_drop",
    "robust_accuracy_drop",
    "fooling_rate",
)
OPS = (">=", "<=", ">", "<")
_SLO_RE = re.compile(
    r"^\s*(?P<metric>[a-z_]+)\s*(?P<op>>=|<=|>|<)\s*(?P<thr>[-+0-9.eE%]+)"
    r"(\s+at\s+(eps|epsilon)\s*=?\s*(?P<eps>[-+0-9.eE]+))?\s*$"
)


M = TypeVar("M", bound=BaseModel)


class SLO(BaseModel):
    """One service-level objective, e.g. ``robust_accuracy >= 0.80 at eps 0.1``."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal[
        "robust_accuracy",
        "clean_accuracy",
        "clean_accuracy_drop",
        "robust_accuracy_drop",
        "fooling_rate",
    ]
    op: Literal[">=", "<=", ">", "<"]
    threshold: float
    epsilon: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _SLO_RE.match(v)
            if not m:
                raise ValueError(
                    f"cannot read SLO {v!r}; write e.g. 'robust_accuracy >= 0.8 at eps 0.1'"
                )
            thr = m["thr"]
            value = float(thr[:-1]) / 100 if thr.endswith("%") else float(thr)
            return {
                "metric": m["metric"],
                "op": m["op"],
                "threshold": value,
                "epsilon": float(m["eps"]) if m["eps"] else None,
            }
        return v

    @model_validator(mode="after")
    def _needs_eps(self) -> SLO:
        per_eps = self.metric in ("robust_accuracy", "robust_accuracy_drop", "fooling_rate")
        if per_eps and self.epsilon is None:
            raise ValueError(f"SLO on {self.metric} needs an epsilon: '... at eps 0.1'")
        if not per_eps and self.epsilon is not None:
            raise ValueError(f"SLO on {self.metric} takes no epsilon")
        return self

    def __str__(self) -> str:
        s = f"{self.metric} {self.op} {self.threshold:g}"
        return s + (f" at eps {self.epsilon:g}" if self.epsilon is not None else "")


class AttackSpec(BaseModel):
    """An attack of the suite: its registry name and its parameters."""

    model_config = ConfigDict(extra="allow")
    attack: str

    @field_validator("attack")
    @classmethod
    def _known(cls, v: str) -> str:
        from advguard.attacks.registry import ATTACKS

        if v not in ATTACKS:
            raise ValueError(f"unknown attack {v!r}; known: {', '.join(sorted(ATTACKS))}")
        return v

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ThreatModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    description: str = ""
    knowledge: Literal["white-box", "black-box", "transfer"] = "white-box"
    goal: Literal["untargeted", "targeted"] = "untargeted"
    norm: str = "linf"
    epsilons: list[float] = Field(min_length=1)
    samples: int = Field(default=1000, ge=1)
    seed: int = 0
    batch_size: int = Field(default=256, ge=1)
    target_classes: int = Field(default=1, ge=1, description="targeted goal: top-k runner-ups")
    attacks: list[AttackSpec] = Field(min_length=1)
    slos: list[SLO] = Field(default_factory=list)
    sanity_checks: bool = True
    escalate: bool = True
    sanity_samples: int = Field(default=100, ge=8)
    adaptive: bool = Field(
        default=True,
        description="attack declared defenses adaptively: BPDA through non-differentiable "
        "input transforms, EOT over randomized ones",
    )
    eot_samples: int = Field(default=10, ge=1, description="draws per EOT gradient/prediction")

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        from advguard.attacks.registry import TEXT_NORMS

        if isinstance(v, str) and v.strip().lower() in TEXT_NORMS:
            return v.strip().lower()
        try:
            return parse_norm(v)
        except InputError as e:
            raise ValueError(str(e)) from None

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v: list[float]) -> list[float]:
        if any(e < 0 or e != e for e in v):
            raise ValueError("epsilons must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("epsilons must be distinct")
        return sorted(float(e) for e in v)

    @model_validator(mode="after")
    def _slo_eps_listed(self) -> ThreatModel:
        from advguard.attacks.registry import ATTACKS

        for slo in self.slos:
            if slo.epsilon is not None and not any(
                abs(slo.epsilon - e) < 1e-12 for e in self.epsilons
            ):
                raise ValueError(
                    f"SLO '{slo}' uses eps {slo.epsilon:g}, not in epsilons {self.epsilons}"
                )
        if self.is_text and any(e != int(e) for e in self.epsilons):
            raise ValueError(f"epsilons of norm {self.norm} are edit counts (whole numbers)")
        for spec in self.attacks:
            entry = ATTACKS[spec.attack]
            if self.norm not in entry.norms:
                raise ValueError(
                    f"attack {spec.attack!r} does not support norm {self.norm}; "
                    f"it supports {', '.join(entry.norms)}"
                )
        return self

    @property
    def is_text(self) -> bool:
        """A text threat model: the norm is an edit budget and epsilons count edits."""
        from advguard.attacks.registry import TEXT_NORMS

        return self.norm in TEXT_NORMS

    def with_overrides(self, **kw: Any) -> ThreatModel:
        data = self.model_dump()
        data.update({k: v for k, v in kw.items() if v is not None})
        return parse_threat_model(
            yaml.safe_dump(data), f"threat model {self.name!r} with overrides"
        )


PRESETS = ("linf-standard", "l2-standard", "quick", "text-standard")
PATH_PARAMS = ("schema", "surrogate_data")
"""Attack parameters that name files; relative ones are read from the threat model's folder."""


def load_threat_model(spec: str | Path) -> ThreatModel:
    """Load a preset by name (``linf-standard``, ``l2-standard``, ``quick``,
    ``text-standard``) or a YAML file."""
    text: str
    source: str
    if str(spec) in PRESETS:
        source = f"preset {spec}"
        text = resources.files("advguard.evaluate.presets").joinpath(f"{spec}.yaml").read_text()
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(
                f"threat model {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
            )
        source, text = str(path), path.read_text()
        tm = parse_threat_model(text, source)
        for spec in tm.attacks:  # file parameters are relative to the threat-model file
            extra = spec.model_extra or {}
            for key in PATH_PARAMS:
                value = extra.get(key)
                if isinstance(value, str) and not Path(value).is_absolute():
                    candidate = path.parent / value.split("?", 1)[0]
                    if candidate.exists():
                        extra[key] = str(path.parent / value)
        return tm
    return parse_threat_model(text, source)


def parse_yaml_model(
    text: str, source: str, model: type[M], what: str, *, empty: dict[str, Any] | None = None
) -> M:
    """Validate YAML ``text`` as pydantic ``model``; errors name the line and field at fault.

    ``what`` names the document in messages ("threat model", "gate policy"); ``empty`` is
    used for an empty document (``None``: an empty document is an error).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from None
    if data is None and empty is not None:
        data = dict(empty)
    if not isinstance(data, dict):
        raise InputError(f"{source}: a {what} is a YAML mapping (key: value lines)")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(node, loc)
            at = f"line {line}, " if line else ""
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {at}field '{where}': {msg}")
        raise InputError(f"{source}: invalid {what}\n" + "\n".join(lines)) from None


def parse_threat_model(text: str, source: str = "<string>") -> ThreatModel:
    return parse_yaml_model(text, source, ThreatModel, "threat model")


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest existing parent)."""
    best = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        best = node.start_mark.line + 1
    return best
