"""Release-gate policies: what a robustness report must show before a model ships.

A policy is YAML validated with pydantic; errors name the file, line and field::

    name: release
    require_trustworthy: true       # cannot be turned off: untrustworthy never passes
    slo_mode: confidence            # confidence | point-estimate
    report_slos: true               # also judge the SLOs of the report's threat model
    slos:                           # extra SLOs, same syntax as threat-model SLOs
      - robust_accuracy >= 0.60 at eps 0.1
      - clean_accuracy >= 0.95
    min_samples: 500                # evaluated samples (clean accuracy n) at least this
    # regression limits vs --baseline, in percentage points
    max_robust_accuracy_drop: 1.0   # at every epsilon evaluated in both reports
    max_clean_accuracy_drop: 0.5
    require_same_threat_model: true # else the gate fails: the numbers are not comparable
    require_baseline: false         # true: fail when no --baseline is given
    require_attestation: false      # true: refuse to run without --public-key and --model
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from advguard import _safejson
from advguard.errors import InputError
from advguard.evaluate.threat_model import SLO, parse_yaml_model

MAX_POLICY_BYTES = 1024 * 1024


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "policy"
    description: str = ""
    require_trustworthy: bool = True
    slo_mode: Literal["confidence", "point-estimate"] = "confidence"
    report_slos: bool = Field(default=True, description="judge the report's threat-model SLOs too")
    slos: list[SLO] = Field(default_factory=list)
    min_samples: int | None = Field(default=None, ge=1)
    # regression limits against --baseline (e.g. the model now in production)
    max_robust_accuracy_drop: float | None = Field(
        default=1.0, ge=0, lt=100, description="points, at every epsilon in both; null: no limit"
    )
    max_clean_accuracy_drop: float | None = Field(
        default=0.5, ge=0, lt=100, description="points; null: no limit"
    )
    require_same_threat_model: bool = Field(
        default=True,
        description="baseline must use the same norm, knowledge, goal, attacks, epsilons",
    )
    require_baseline: bool = Field(default=False, description="fail when no baseline is given")
    require_attestation: bool = Field(
        default=False,
        description="the report must carry a signed attestation (the gate refuses to run "
        "without --public-key and --model)",
    )

    @field_validator("require_trustworthy")
    @classmethod
    def _always(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "cannot be false: an untrustworthy evaluation (failed sanity checks) never "
                "passes the gate; fix the evaluation instead"
            )
        return v


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"policy {str(p)!r} does not exist (see docs/ci/policy.yaml)")
    raw = _safejson.read_bytes(p, what="policy", max_bytes=MAX_POLICY_BYTES)
    return parse_policy(_safejson.yaml_text(raw, source=str(p), max_bytes=MAX_POLICY_BYTES), str(p))


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy YAML; errors give the line and field of each problem."""
    return parse_yaml_model(text, source, Policy, "gate policy", empty={})
