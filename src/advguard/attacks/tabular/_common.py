"""Shared plumbing of the constrained tabular attacks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from advguard.attacks.base import AttackResult
from advguard.attacks.tabular.schema import FeatureSchema
from advguard.errors import InputError


def check_model(schema: FeatureSchema, model: Any, attack: str) -> None:
    """The model must take flat rows with one column per schema feature."""
    shape = tuple(getattr(model, "input_shape", ()))
    if len(shape) != 1:
        raise InputError(
            f"{attack} attacks tabular models with inputs of shape (n_features,); "
            f"the model's input_shape is {shape}"
        )
    schema.check_shape(math.prod(shape), "model input")


def enforce_schema(
    schema: FeatureSchema,
    x: torch.Tensor | np.ndarray,
    result: AttackResult,
    epsilon: float | None,
    norm: str,
) -> AttackResult:
    """Revert every row the base class's final clip may have made invalid.

    The attacks already return schema-valid rows inside the ball, so this normally changes
    nothing; it guarantees that no invalid row ever leaves the attack. A reverted row is
    the (correctly classified) original, so its success becomes False.
    """
    x_adv = result.x_adv.clone()
    x0 = torch.as_tensor(x).detach().to(device=x_adv.device, dtype=x_adv.dtype)
    valid = schema.validate_rows(x0, x_adv, epsilon=epsilon, norm=norm)
    bad = torch.from_numpy(~valid).to(x_adv.device)
    success = result.success.clone()
    if bad.any():
        x_adv[bad] = x0[bad]
        success[bad] = success[bad] & ~result.attacked[bad]
    result.x_adv = x_adv
    result.success = success
    result.info.update(
        {
            "schema": schema.name,
            "schema_valid": int(valid.sum()),
            "reverted_after_clip": int(bad.sum()),
        }
    )
    return result


def schema_params(schema: FeatureSchema) -> dict[str, Any]:
    """The schema as plain data for reports (enough to rebuild it)."""
    return schema.model_dump(exclude_defaults=True)
