"""Markdown model card for a registry version: what it is, where it came from, how robust."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from advguard.registry.types import VersionInfo


def _pct(v: Any) -> str:
    """A rate as a percentage. Reports hold proportions ``{k, n, value, ci_low, ci_high}``
    (:class:`advguard.stats.Proportion`); those show the 95% interval and k/n."""
    if isinstance(v, bool):
        return "n/a"
    if isinstance(v, int | float):
        return f"{100 * float(v):.1f}%"
    if isinstance(v, dict):
        value, k, n = v.get("value"), v.get("k"), v.get("n")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"n/a (n={n})" if isinstance(n, int) else "n/a"
        text = f"{100 * float(value):.1f}%"
        lo, hi = v.get("ci_low"), v.get("ci_high")
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            text += f" [{100 * float(lo):.1f}%, {100 * float(hi):.1f}%]"
        if isinstance(k, int) and isinstance(n, int):
            text += f" ({k}/{n})"
        return text
    return "n/a"


def _cell(v: Any) -> str:
    return "n/a" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def render_model_card(
    info: VersionInfo, reports: Sequence[dict[str, Any]], signature_status: str
) -> str:
    """Markdown card from the version's metadata and its attached (parsed) reports.

    ``reports`` are the stored report dicts, in the order of ``info.reports``;
    ``signature_status`` is what verification said (verified / unsigned / not checked).
    """
    spec, prov = info.input_spec, info.provenance
    lines = [
        f"# Model card: {info.name} v{info.version}",
        "",
        f"- **Stage:** {info.stage}",
        f"- **Format:** {info.format}",
        f"- **Model digest:** `sha256:{info.model_digest}`",
        f"- **Created:** {_cell(info.created_at)}",
        f"- **Signature:** {signature_status}",
        "",
        "## Artifacts",
        "",
        "| file | sha256 | bytes |",
        "|---|---|---:|",
    ]
    for name, art in info.artifacts.items():
        lines.append(f"| {_cell(name)} | `{art['sha256']}` | {art.get('size', 'n/a')} |")
    lines += ["", "## Input", ""]
    if spec:
        for key in ("shape", "bounds", "num_classes", "preprocessing", "factory", "factory_kwargs"):
            if key in spec:
                lines.append(f"- **{key}:** {_cell(spec[key])}")
    else:
        lines.append("No input specification recorded.")
    lines += [
        "",
        "## Provenance",
        "",
        f"- **Training data sha256:** {_cell(prov.get('training_data_sha256'))}",
        f"- **Training config:** {_cell(prov.get('training_config'))}",
        f"- **Code revision:** {_cell(prov.get('code_revision'))}",
        f"- **Pushed by:** {_cell(prov.get('user'))} at {_cell(prov.get('pushed_at'))}",
        "",
        "## Robustness",
        "",
    ]
    if not reports:
        lines.append("No robustness report attached: robustness is unknown.")
    for meta, rep in zip(info.reports, reports, strict=True):
        tm = rep.get("threat_model", {})
        verdict = rep.get("verdict", {}) or {}
        sanity = rep.get("sanity_checks", []) or []
        failed = [c.get("id", "?") for c in sanity if c.get("status") == "fail"]
        trust = "trustworthy" if rep.get("trustworthy") is True else "UNTRUSTWORTHY"
        evaluated = (rep.get("model") or {}).get("sha256")
        bound = (
            "this model"
            if evaluated == info.model_digest
            else f"ANOTHER MODEL (sha256:{_cell(evaluated)})"
        )
        lines += [
            f"### Threat model `{_cell(tm.get('name'))}` ({_cell(tm.get('norm'))})",
            "",
            f"- **Report digest:** `sha256:{meta.digest}`"
            + (" (attested)" if meta.attestation else " (not attested)"),
            f"- **Evaluated model:** {bound}",
            f"- **Clean accuracy:** {_pct(rep.get('clean_accuracy'))}",
            f"- **Verdict:** {_cell(verdict.get('status'))} - {_cell(verdict.get('summary'))}",
            f"- **Sanity checks:** {trust}; {len(sanity)} run"
            + (f", failed: {', '.join(failed)}" if failed else ", none failed"),
            "",
            "| epsilon | robust accuracy (95% CI, k/n) | fooling rate (95% CI, k/n) |",
            "|---:|---:|---:|",
        ]
        for r in rep.get("results", []) or []:
            lines.append(
                f"| {_cell(r.get('epsilon'))} | {_pct(r.get('robust_accuracy'))} "
                f"| {_pct(r.get('fooling_rate'))} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
