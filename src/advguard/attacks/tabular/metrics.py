"""What a tabular attack changed, and at what cost."""

from __future__ import annotations

from typing import Any

import numpy as np

from advguard.attacks.tabular.arrays import as_2d
from advguard.attacks.tabular.schema import FeatureSchema
from advguard.errors import InputError


def tabular_metrics(
    schema: FeatureSchema,
    x: Any,
    x_adv: Any,
    success: Any,
    *,
    attacked: Any = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Summarise a tabular attack.

    Counts are per *unit*: a plain feature, or a one-hot group (switching category is one
    change, of cost 1 times the members' mean cost). Per-row statistics are taken over the
    successful rows (the adversarial examples); ``None`` when there are none.

    Returns a JSON-friendly dict: ``n``, ``n_success``, ``evasion_rate``, ``valid_rate``
    (rows valid under the schema), ``features_changed_mean`` / ``_median`` / ``_max``,
    ``cost_mean`` / ``cost_median`` (weighted L1 of the change with each feature's
    ``cost``), and ``most_changed``: up to ``top_k`` units with the share of successful
    rows that changed them and their mean absolute change. With ``attacked`` (the
    ``AttackResult.attacked`` mask) also ``n_attacked`` and ``evasion_rate_attacked``
    (success among the samples the attack had to fool).
    """
    x0 = as_2d(x, "x").astype(np.float64)
    xa = as_2d(x_adv, "x_adv")
    if xa.dtype == np.float32:
        x0 = x0.astype(np.float32).astype(np.float64)
    xa = xa.astype(np.float64)
    schema.check_shape(x0.shape[1])
    ok = np.asarray(
        success.detach().cpu().numpy() if hasattr(success, "detach") else success, dtype=bool
    ).reshape(-1)
    if len(ok) != len(x0) or xa.shape != x0.shape:
        raise InputError("x, x_adv and success must describe the same rows")
    names, unit_changed, unit_abs, cost = _unit_changes(schema, x0, xa)
    n_changed = unit_changed.sum(1)

    valid = schema.validate_rows(x0, xa)
    out: dict[str, Any] = {
        "n": len(x0),
        "n_success": int(ok.sum()),
        "evasion_rate": float(ok.mean()) if len(ok) else 0.0,
        "valid_rate": float(valid.mean()) if len(valid) else 1.0,
    }
    if attacked is not None:
        att = np.asarray(
            attacked.detach().cpu().numpy() if hasattr(attacked, "detach") else attacked,
            dtype=bool,
        ).reshape(-1)
        if len(att) != len(ok):
            raise InputError("attacked must have one entry per row")
        out["n_attacked"] = int(att.sum())
        out["evasion_rate_attacked"] = float(ok[att].mean()) if att.any() else 0.0
    out.update(_change_stats(ok, names, unit_changed, unit_abs, n_changed, cost, top_k))
    return out


def _unit_changes(
    schema: FeatureSchema, x0: np.ndarray, xa: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per row and unit (plain features, then one-hot groups): the unit names, whether it
    changed, its absolute change and the row's weighted cost."""
    c = schema.compiled
    d = np.abs(xa - x0)
    changed = d > 0
    plain = np.flatnonzero(c.group_of < 0)
    names = [c.names[j] for j in plain] + list(c.group_names)
    unit_changed = np.concatenate(
        [changed[:, plain]] + [changed[:, cols].any(1, keepdims=True) for cols in c.groups],
        axis=1,
    )
    unit_abs = np.concatenate(
        [d[:, plain]] + [d[:, cols].sum(1, keepdims=True) / 2 for cols in c.groups], axis=1
    )
    unit_cost = np.concatenate(
        [c.cost[plain]] + [np.array([c.cost[cols].mean()]) for cols in c.groups]
    )
    return names, unit_changed, unit_abs, (unit_abs * unit_cost).sum(1)


def _change_stats(
    ok: np.ndarray,
    names: list[str],
    unit_changed: np.ndarray,
    unit_abs: np.ndarray,
    n_changed: np.ndarray,
    cost: np.ndarray,
    top_k: int,
) -> dict[str, Any]:
    """Changed units and cost over the successful rows, and the most changed units."""
    if ok.any():
        nc, co = n_changed[ok], cost[ok]
        share = unit_changed[ok].mean(0)
        mean_abs = np.where(
            unit_changed[ok].sum(0) > 0,
            unit_abs[ok].sum(0) / np.maximum(unit_changed[ok].sum(0), 1),
            0.0,
        )
        order = [i for i in np.argsort(-share, kind="stable") if share[i] > 0][:top_k]
        return dict(
            features_changed_mean=float(nc.mean()),
            features_changed_median=float(np.median(nc)),
            features_changed_max=int(nc.max()),
            cost_mean=float(co.mean()),
            cost_median=float(np.median(co)),
            most_changed=[
                {
                    "feature": names[i],
                    "share_of_rows": float(share[i]),
                    "mean_abs_change": float(mean_abs[i]),
                }
                for i in order
            ],
        )
    return dict(
        features_changed_mean=None,
        features_changed_median=None,
        features_changed_max=None,
        cost_mean=None,
        cost_median=None,
        most_changed=[],
    )
