"""Resume state of an adversarial-training run: tensors in safetensors, the rest in JSON
(nothing is unpickled), written atomically after every epoch and removed when a run ends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.atomic import atomic_path, atomic_write_text
from advguard.errors import InputError

STATE_NAME = "resume-state.safetensors"
STATE_META_NAME = "resume-state.json"
STATE_SCHEMA = "advguard-train-state/1"
#: Config keys that may change between the interrupted and the resumed run.
RESUMABLE_CHANGES = ("max_time_s", "device")


def save_state(
    out: Path,
    *,
    module: nn.Module,
    best_state: Mapping[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    meta: dict[str, Any],
) -> None:
    """Write the end-of-epoch training state atomically (tensors first, then the JSON)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in (best_state or {}).items():
        tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(out / STATE_NAME) as tmp:
        save_file(tensors, str(tmp))
    from advguard.models.io import file_sha256

    doc = {
        "schema": STATE_SCHEMA,
        **meta,
        "optimizer_scalars": opt_scalars,
        "has_best": best_state is not None,
        "tensors_sha256": file_sha256(out / STATE_NAME),
    }
    atomic_write_text(out / STATE_META_NAME, json.dumps(doc, indent=1, default=str) + "\n")


def load_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The saved state of an interrupted run in ``out``, or None when there is none."""
    meta_p, tens_p = out / STATE_META_NAME, out / STATE_NAME
    if not meta_p.exists() or not tens_p.exists():
        return None
    from safetensors.torch import load_file

    from advguard.models.io import file_sha256

    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the resume state {meta_p}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("schema") != STATE_SCHEMA:
        raise InputError(f"{meta_p} is not an advguard training state ({STATE_SCHEMA})")
    if file_sha256(tens_p) != meta.get("tensors_sha256"):
        raise InputError(
            f"{tens_p} does not match {meta_p} (interrupted while saving?); delete both to "
            "start over"
        )
    return meta, load_file(str(tens_p))


def clear_state(out: Path | None) -> None:
    if out is not None:
        (out / STATE_META_NAME).unlink(missing_ok=True)
        (out / STATE_NAME).unlink(missing_ok=True)


def check_compatible(meta: Mapping[str, Any], config: Mapping[str, Any], data_sha: str) -> None:
    """Refuse to resume when the configuration (JSON form) or the data differ."""
    old_cfg = {k: v for k, v in meta["config"].items() if k not in RESUMABLE_CHANGES}
    new_cfg = {
        k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in RESUMABLE_CHANGES
    }
    diff = sorted(k for k in new_cfg if old_cfg.get(k) != new_cfg[k])
    if diff:
        raise InputError(
            "cannot resume: the configuration differs from the interrupted run in "
            + ", ".join(f"{k} ({old_cfg.get(k)!r} -> {new_cfg[k]!r})" for k in diff)
        )
    if meta["data_sha256"] != data_sha:
        raise InputError("cannot resume: the training data differ from the interrupted run")


def restore(
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> dict[str, torch.Tensor] | None:
    """Load the saved weights, optimizer state and RNG states; return the best weights."""
    try:
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise InputError(f"cannot resume: the saved weights do not fit the model ({exc})") from None
    best_state = None
    if meta["has_best"]:
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, scal in meta["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scal)
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return best_state


__all__ = [
    "STATE_META_NAME",
    "STATE_NAME",
    "STATE_SCHEMA",
    "check_compatible",
    "clear_state",
    "load_state",
    "restore",
    "save_state",
]
