"""Promotion policy: what a registry version must show before it may enter a stage.

By default it applies to ``production``, where a version must be

- **signed**: it has a signature, and the signature (and every report attestation) verifies
  with the public key given to ``promote`` (``--public-key``); a signature that cannot be
  checked does not count;
- **reported**: at least one robustness report is attached, every attached report is bound
  to this model (its ``model.sha256`` is the version's model digest) and is trustworthy;
- **gated**: every attached report passes the release gate (:func:`advguard.registry.gate.run_gate`)
  under the gate policy given to ``promote`` (``--policy policy.yaml``; default: the defaults
  of :class:`advguard.registry.policy.Policy`), with the current production version's report
  for the same threat model as the baseline when there is one.

The gate is evaluated at promote time from the stored (hash-verified) reports rather than
recorded by ``advguard gate`` beforehand: nothing recorded elsewhere has to be trusted, and a
changed policy applies to the next promotion at once. A refused promotion can be forced with
a reason (``--force --reason "..."``); the override, the reason, the actor and the checks
that failed are recorded in the audit log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from advguard.errors import AdvguardError

StageName = Literal["candidate", "canary", "production", "archived"]


class PromotionRules(BaseModel):
    """Which stages are guarded and what they require."""

    model_config = ConfigDict(extra="forbid")
    stages: list[StageName] = Field(
        default_factory=lambda: list[StageName](["production"]),
        description="stages the rules apply to",
    )
    require_signature: bool = True
    require_report: bool = True
    require_gate: bool = True


@dataclass
class PromotionCheck:
    name: str
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromotionRefusedError(AdvguardError):
    """The promotion policy refused a promotion (the CLI exits 1: a check failed)."""

    def __init__(self, ref: str, stage: str, failed: list[PromotionCheck]) -> None:
        self.ref, self.stage, self.failed = ref, stage, failed
        why = "; ".join(f"{c.name}: {c.message}" for c in failed)
        super().__init__(
            f"promotion of {ref} to {stage} refused by the promotion policy ({why}); fix it, "
            'or override with --force --reason "..." (recorded in the audit log)'
        )
