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
    goals:                      # optional: training-time and privacy threats
      - kind: backdoor          # poisoning | backdoor | membership-inference | extraction
        params: {train_data: train.npz, rate: 0.05, target: 0}
        slos: [attack_success_rate <= 0.05]

A threat model with ``goals`` may leave out ``epsilons`` and ``attacks`` (no evasion part);
see :mod:`advguard.evaluate.goals`.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advguard import _safejson
from advguard import _validate as check
from advguard.attacks.norms import parse_norm
from advguard.errors import InputError
from advguard.evaluate.goals import GOAL_PATH_PARAMS, GoalSpec

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


def max_epsilon(norm: str, bounds: Any, input_shape: Any) -> float | None:
    """The largest meaningful budget: the diameter of the input box ``bounds`` (per feature)
    under ``norm`` for inputs of ``input_shape``; ``None`` when the bounds are not finite."""
    try:
        lo, hi = (float(b) for b in bounds)
        d = math.prod(int(s) for s in input_shape)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo and d > 0):
        return None
    width = hi - lo
    return {"linf": width, "l2": width * math.sqrt(d), "l1": width * d, "l0": float(d)}.get(
        parse_norm(norm)
    )


def check_epsilons(tm: ThreatModel, bounds: Any, input_shape: Any) -> None:
    """Raise :class:`InputError` when an epsilon of ``tm`` exceeds the input box's diameter
    (any larger budget is the same attack; a huge one is almost always a units mistake)."""
    top = max_epsilon(tm.norm, bounds, input_shape)
    if top is None:
        return
    big = [e for e in tm.epsilons if e > top * (1 + 1e-9)]
    if big:
        raise InputError(
            f"epsilon {big[0]:g} is larger than any {tm.norm} perturbation inside the input "
            f"bounds {list(bounds)} ({top:g}); epsilons are in the model's input units"
        )


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
    epsilons: list[float] = Field(default_factory=list)
    samples: int = Field(default=1000, ge=1)
    seed: int = 0
    batch_size: int = Field(default=256, ge=1)
    target_classes: int = Field(default=1, ge=1, description="targeted goal: top-k runner-ups")
    attacks: list[AttackSpec] = Field(default_factory=list)
    slos: list[SLO] = Field(default_factory=list)
    goals: list[GoalSpec] = Field(
        default_factory=list,
        description="training-time and privacy goals (advguard.evaluate.goals)",
    )
    sanity_checks: bool = True
    escalate: bool = True
    sanity_samples: int = Field(default=100, ge=8)
    adaptive: bool = Field(
        default=True,
        description="attack declared defenses adaptively: BPDA through non-differentiable "
        "input transforms, EOT over randomized ones",
    )
    eot_samples: int = Field(default=10, ge=1, description="draws per EOT gradient/prediction")
    allow_large: bool = Field(
        default=False,
        description="lift the upper bounds on samples and on every attack's steps, restarts "
        "and queries (advguard._validate.LIMITS)",
    )

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
        bad = [e for e in v if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(
                f"epsilons must be finite numbers > 0, got {bad[0]!r} (the budget is in the "
                "model's input units: e.g. 8/255 for images in [0, 1])"
            )
        if len(set(v)) != len(v):
            raise ValueError("epsilons must be distinct")
        return sorted(float(e) for e in v)

    @model_validator(mode="after")
    def _parts(self) -> ThreatModel:
        if not self.goals or self.epsilons or self.attacks:
            if not self.epsilons:
                raise ValueError("epsilons: give at least one (or only goals, without attacks)")
            if not self.attacks:
                raise ValueError("attacks: give at least one (or only goals, without epsilons)")
        names = [g.name for g in self.goals]
        if len(set(names)) != len(names):
            raise ValueError("goals: two goals have the same name; give each a 'name'")
        return self

    @property
    def has_evasion(self) -> bool:
        """The threat model has an evasion part (attacks at epsilons)."""
        return bool(self.attacks)

    @model_validator(mode="after")
    def _large(self) -> ThreatModel:
        if self.allow_large:
            self._lift_limits()
        return self

    def _lift_limits(self) -> None:
        """``allow_large``: lift the limits here and for every attack of the suite."""
        self.allow_large = True
        for spec in self.attacks:
            extra = spec.model_extra if spec.model_extra is not None else {}
            extra.setdefault("allow_large", True)

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


def load_threat_model(spec: str | Path, *, allow_large: bool = False) -> ThreatModel:
    """Load a preset by name (``linf-standard``, ``l2-standard``, ``quick``,
    ``text-standard``) or a YAML file.

    ``allow_large=True`` (CLI ``--allow-large``) is the file's ``allow_large: true``."""
    if str(spec) in PRESETS:
        text = resources.files("advguard.evaluate.presets").joinpath(f"{spec}.yaml").read_text()
        return parse_threat_model(text, f"preset {spec}", allow_large=allow_large)
    path = Path(spec)
    if not path.exists():
        raise InputError(
            f"threat model {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    return parse_threat_model(
        path.read_text(), str(path), base_dir=path.parent, allow_large=allow_large
    )


def _resolve_paths(tm: ThreatModel, base_dir: Path) -> None:
    """File parameters are relative to the threat-model file."""
    for extra, keys in [(s.model_extra or {}, PATH_PARAMS) for s in tm.attacks] + [
        (g.params, GOAL_PATH_PARAMS) for g in tm.goals
    ]:
        for key in keys:
            value = extra.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                candidate = base_dir / value.split("?", 1)[0]
                if candidate.exists():
                    extra[key] = str(base_dir / value)


def _check_params(tm: ThreatModel, text: str, source: str) -> None:
    """Check the work-size limits and build every attack of the suite once, so a bad
    parameter (``steps: abc``, an unknown key, a value over the limits) is a usage error
    naming its line before any work is done."""
    from advguard.attacks.registry import build_attack

    def fail(loc: list[Any], e: Exception) -> None:
        try:
            line = _line_of(yaml.compose(text, Loader=yaml.SafeLoader), loc)
        except yaml.YAMLError:  # pragma: no cover - the text parsed a moment ago
            line = None
        at = f"line {line}, " if line else ""
        where = ".".join(str(p) for p in loc)
        raise InputError(f"{source}: invalid threat model\n  {at}field '{where}': {e}") from None

    for key in ("samples", "sanity_samples"):
        try:
            check.samples(key, getattr(tm, key), allow_large=tm.allow_large)
        except InputError as e:
            fail([key], e)
    for i, spec in enumerate(tm.attacks):
        try:
            build_attack(spec.attack, norm=tm.norm, seed=tm.seed, **spec.params)
        except InputError as e:
            param = getattr(e, "param", None)
            fail(["attacks", i] + ([param] if param in spec.params else []), e)


def parse_yaml_model(
    text: str, source: str, model: type[M], what: str, *, empty: dict[str, Any] | None = None
) -> M:
    """Validate YAML ``text`` as pydantic ``model``; errors name the line and field at fault.

    ``what`` names the document in messages ("threat model", "gate policy"); ``empty`` is
    used for an empty document (``None``: an empty document is an error).
    """
    text = _safejson.yaml_text(text, source=source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deeply; refusing it") from None
    _safejson.check_depth(data, source=source, max_containers=100_000)
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


def parse_threat_model(
    text: str,
    source: str = "<string>",
    *,
    base_dir: Path | None = None,
    allow_large: bool = False,
) -> ThreatModel:
    """Validate a threat model, its attacks' parameters included (errors name the line).

    ``base_dir``: folder that relative file parameters (``schema``, ``surrogate_data``) are
    read from (the threat-model file's folder). ``allow_large``: as ``allow_large: true``.
    """
    tm = parse_yaml_model(text, source, ThreatModel, "threat model")
    if allow_large:
        tm._lift_limits()
    if base_dir is not None:
        _resolve_paths(tm, base_dir)
    _check_params(tm, text, source)
    return tm


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
