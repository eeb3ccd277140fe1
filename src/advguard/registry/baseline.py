"""The gate's baseline: a report file, or the registry's production report (verified).

It sits above both the gate (pure report checks) and the store (the registry), so neither
imports the other's side of this: no import cycle.
"""

from __future__ import annotations

from pathlib import Path

from advguard import _safejson
from advguard.errors import InputError
from advguard.evaluate.report import Report, load_report, parse_report
from advguard.registry.gate import canonical

__all__ = ["resolve_baseline"]


def resolve_baseline(
    spec: str | Path,
    *,
    registry_model: str | None = None,
    threat_model: str | None = None,
    public_key: str | Path | None = None,
) -> Report:
    """Load the baseline: a report path, or ``production`` (the registry's production report).

    ``production`` reads the report of the model ``registry_model`` now in production (for
    ``threat_model`` when given; the registry location comes from ``ADVGUARD_REGISTRY`` /
    ``ADVGUARD_REGISTRY_DB``) and always verifies its signed attestation with ``public_key``
    against the production version's model digest: without a key it refuses.
    """
    if str(spec) != "production":
        return load_report(spec)
    if not registry_model:
        raise InputError(
            "--baseline production needs --registry-model NAME (the registered model whose "
            "production report is the baseline), or pass --baseline path/to/report.json"
        )
    if public_key is None:
        raise InputError(
            "--baseline production needs --public-key: the production report is only trusted "
            "once its signed attestation verifies"
        )
    from advguard.registry import signing
    from advguard.registry.objects import digest_of_ref
    from advguard.registry.store import Registry

    with Registry() as reg:
        info = reg.get(f"{registry_model}@production")
        reg.require_consistent(info)  # a stage edited in the database is not production
        picks = [r for r in info.reports if threat_model is None or r.threat_model == threat_model]
        if not picks:
            have = ", ".join(sorted({r.threat_model for r in info.reports})) or "none"
            raise InputError(
                f"{info.ref} has no report for threat model {threat_model!r} (it has: {have})"
            )
        rep = picks[-1]
        if not rep.attestation:
            raise signing.SignatureError(
                f"the production report of {info.ref} ({rep.threat_model}) has no attestation; "
                "push the version with --key so its reports are attested"
            )
        raw = reg.objects.read_bytes(rep.digest, name=f"report {rep.threat_model}")
        env = reg.objects.read_bytes(
            digest_of_ref(rep.attestation), name=f"attestation of report {rep.threat_model}"
        )
    source = f"production report of {info.ref}"
    _safejson.loads(env, source=f"attestation of the {source}")
    predicate = signing.verify_report_attestation(env, Path(public_key), info.model_digest)
    if canonical(_safejson.loads(raw, source=source)) != canonical(predicate):
        raise signing.SignatureError(f"the {source} does not match its attestation")
    return parse_report(predicate, source)
