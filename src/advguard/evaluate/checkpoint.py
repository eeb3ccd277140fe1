"""Checkpoints of an evaluation: finished batches' records, written as the suite runs, so an
interrupted run resumes where it stopped.

A checkpoint directory holds one ``unit-PPPPPPP.npz`` per finished work unit (a batch of a
local run or a shard of a Ray run; ``PPPPPPP`` is its first sample position; the file holds the
unit's sample positions and their rows of :class:`~advguard.evaluate.state.Records`) and
``state.json`` (the run key, the finished units, the per-attack bookkeeping and the kept
examples of exactly those units). Both backends write and read the same format, so a run
interrupted on one backend resumes on the other: what is restored is the set of finished
*samples*, whatever unit finished them. The run key hashes the threat model, the model's hash
and the data, so a checkpoint of another run is refused. A checkpoint is data: read with size
limits and without pickle, and restored all or nothing. (Checkpoints of earlier versions,
``batch-NNNNN.npz`` files listed as ``batches``, are still read.)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from advguard import _safejson
from advguard.atomic import atomic_path, atomic_write_text
from advguard.errors import InputError
from advguard.evaluate.report import Example
from advguard.evaluate.state import Records, RunState, StageStats, sha256_array
from advguard.evaluate.threat_model import ThreatModel

RunKey = Callable[[], str]
"""Computes the run key on demand (it hashes the whole data set, so only when needed)."""


def clear_checkpoint(directory: Path | None) -> None:
    """Drop an earlier run's checkpoint files (a fresh run must not list stale batches)."""
    d = directory
    if d is None or not d.is_dir():
        return
    for p in [*d.glob("batch-*.npz"), *d.glob("unit-*.npz"), d / "state.json"]:
        if p.is_file():
            p.unlink()


def run_key(
    tm: ThreatModel, model_info: dict[str, Any], x: np.ndarray, y: np.ndarray, idx: np.ndarray
) -> str:
    """What identifies a run: threat model, model hash, data and the evaluated samples."""
    h = hashlib.sha256()
    h.update(tm.model_dump_json().encode())
    h.update(str(model_info.get("sha256", "")).encode())
    h.update(sha256_array(x, y, idx).encode())
    return h.hexdigest()


def unit_name(first: int) -> str:
    """File of the work unit whose first sample position is ``first``."""
    return f"unit-{first:07d}.npz"


def save_checkpoint(
    directory: Path | None, key: RunKey, state: RunState, units: list[int], pos: np.ndarray
) -> None:
    """Write the finished unit of sample positions ``pos`` and the run's bookkeeping.

    ``units`` lists the units already in the checkpoint (first positions; updated here), and
    ``state`` must hold exactly those units' outcomes plus this one's: ``state.json`` lists
    the units its counters and examples belong to, so a unit file written before a crash but
    not listed is ignored on resume (and redone)."""
    if directory is None or len(pos) == 0:
        return
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    first = int(pos[0])
    rec = {k: v[pos] for k, v in state.records.as_dict().items()}
    with atomic_path(d / unit_name(first)) as tmp:
        np.savez(tmp, pos=pos, **rec)
    if first not in units:
        units.append(first)
    stats = {f"{e}|{a}|{s}": vars(v) for (e, a, s), v in state.stats.items()}
    meta = {
        "run_key": key(),
        "units": sorted(units),
        "stats": stats,
        "order": [[a, b, o] for (a, b), o in state.order.items()],
        "examples": {str(e): [x.model_dump() for x in v] for e, v in state.examples.items()},
    }
    atomic_write_text(d / "state.json", json.dumps(meta))


def load_checkpoint(
    directory: Path | None, key: RunKey, state: RunState, idx: np.ndarray, units: list[int]
) -> np.ndarray:
    """Restore finished units into ``state`` (and their first positions into ``units``);
    returns the mask of finished sample positions. A checkpoint that cannot be read is an
    :class:`InputError` (never a partial restore: the caller's state is only changed on
    success)."""
    if directory is None or not (directory / "state.json").exists():
        return np.zeros(len(idx), dtype=bool)
    trial = RunState(
        state.epsilons,
        state.attacks,
        Records(**{k: v.copy() for k, v in state.records.as_dict().items()}),
        stats=dict(state.stats),
        order=dict(state.order),
        examples=dict(state.examples),
    )
    try:
        done, found = _read_checkpoint(directory, key, trial, idx)
    except InputError:
        raise
    except (
        ValueError,  # bad JSON/npz content, wrong shapes, bad numbers
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OSError,  # unreadable file
        EOFError,
        MemoryError,  # a header claiming a huge array
        zipfile.BadZipFile,
    ) as e:
        raise InputError(
            f"checkpoint in {directory} is corrupt ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}); delete it or drop --resume"
        ) from None
    state.records, state.stats, state.order = trial.records, trial.stats, trial.order
    state.examples = trial.examples
    units[:] = found
    return done


def _read_checkpoint(
    directory: Path, key: RunKey, state: RunState, idx: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    meta = _safejson.load_file(directory / "state.json", what="checkpoint state")
    if not isinstance(meta, dict):
        raise ValueError("state.json is not a JSON object")
    if meta.get("run_key") != key():
        raise InputError(
            f"checkpoint in {directory} belongs to a different run (model, data or "
            "threat model changed); delete it or drop --resume"
        )
    n = len(idx)
    done = np.zeros(n, dtype=bool)
    units: list[int] = []
    legacy = "units" not in meta  # an earlier version's per-batch files
    for u in meta["batches"] if legacy else meta["units"]:
        if not isinstance(u, int) or isinstance(u, bool) or not 0 <= u < max(n, 1):
            raise ValueError(f"unit {u!r} is out of range")
        path = directory / (f"batch-{u:05d}.npz" if legacy else unit_name(u))
        if not path.exists():
            if legacy:
                continue
            raise ValueError(f"{path.name} is listed in state.json but missing")
        pos = _read_unit(path, state, n)
        if done[pos].any():
            raise ValueError(f"{path.name}: samples already restored from another unit")
        done[pos] = True
        units.append(int(pos[0]) if len(pos) else u)
    for k, v in meta["stats"].items():
        e, a, s = k.split("|")
        state.stats[(int(e), a, s)] = StageStats(**v)
    for a, b, o in meta.get("order", []):
        state.order[(a, b)] = o
    for e, exs in meta.get("examples", {}).items():
        state.examples[int(e)] = [Example.model_validate(x) for x in exs]
    return done, units


def _read_unit(path: Path, state: RunState, n: int) -> np.ndarray:
    """Copy a unit file's rows into ``state.records``; returns its sample positions."""
    with np.load(path, allow_pickle=False) as z:
        pos = np.asarray(z["pos"])
        if (
            pos.dtype.kind not in "iu"
            or pos.ndim != 1
            or (len(pos) and (pos.min() < 0 or pos.max() >= n))
            or len(np.unique(pos)) != len(pos)
        ):
            raise ValueError(f"{path.name}: sample positions are not distinct indices < {n}")
        for k, arr in state.records.as_dict().items():
            v = np.asarray(z[k])
            if v.shape != (len(pos), *arr.shape[1:]):
                raise ValueError(f"{path.name}: {k} has shape {v.shape}")
            arr[pos] = v
    return pos.astype(np.int64)
