"""Checkpoints of an evaluation: finished batches' records, written as the suite runs, so an
interrupted run resumes where it stopped.

A checkpoint directory holds one ``batch-NNNNN.npz`` per finished batch (that batch's rows of
:class:`~advguard.evaluate.state.Records`) and ``state.json`` (the run key, the finished
batches, the per-attack bookkeeping and the kept examples). The run key hashes the threat
model, the model's hash and the data, so a checkpoint of another run is refused. A checkpoint
is data: read with size limits and without pickle, and restored all or nothing.
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
    for p in [*d.glob("batch-*.npz"), d / "state.json"]:
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


def save_checkpoint(
    directory: Path | None, key: RunKey, state: RunState, b: int, pos: np.ndarray
) -> None:
    """Write batch ``b`` (sample positions ``pos``) and the run's bookkeeping."""
    if directory is None:
        return
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    rec = {k: v[pos] for k, v in state.records.as_dict().items()}
    with atomic_path(d / f"batch-{b:05d}.npz") as tmp:
        np.savez(tmp, pos=pos, **rec)
    stats = {f"{e}|{a}|{s}": vars(v) for (e, a, s), v in state.stats.items()}
    meta = {
        "run_key": key(),
        "batches": sorted(
            int(p.stem.split("-")[1]) for p in d.glob("batch-*.npz") if ".tmp" not in p.name
        ),
        "stats": stats,
        "order": [[a, b, o] for (a, b), o in state.order.items()],
        "examples": {str(e): [x.model_dump() for x in v] for e, v in state.examples.items()},
    }
    atomic_write_text(d / "state.json", json.dumps(meta))


def load_checkpoint(
    directory: Path | None, key: RunKey, state: RunState, idx: np.ndarray
) -> set[int]:
    """Restore finished batches; a checkpoint that cannot be read is an :class:`InputError`
    (never a partial restore: the caller's state is only changed on success)."""
    if directory is None or not (directory / "state.json").exists():
        return set()
    trial = RunState(
        state.epsilons,
        state.attacks,
        Records(**{k: v.copy() for k, v in state.records.as_dict().items()}),
        stats=dict(state.stats),
        order=dict(state.order),
        examples=dict(state.examples),
    )
    try:
        done = _read_checkpoint(directory, key, trial, idx)
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
    return done


def _read_checkpoint(directory: Path, key: RunKey, state: RunState, idx: np.ndarray) -> set[int]:
    meta = _safejson.load_file(directory / "state.json", what="checkpoint state")
    if not isinstance(meta, dict):
        raise ValueError("state.json is not a JSON object")
    if meta.get("run_key") != key():
        raise InputError(
            f"checkpoint in {directory} belongs to a different run (model, data or "
            "threat model changed); delete it or drop --resume"
        )
    done: set[int] = set()
    n = len(idx)
    for b in meta["batches"]:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < max(n, 1):
            raise ValueError(f"batch number {b!r} is out of range")
        path = directory / f"batch-{b:05d}.npz"
        if not path.exists():
            continue
        with np.load(path, allow_pickle=False) as z:
            pos = np.asarray(z["pos"])
            if (
                pos.dtype.kind not in "iu"
                or pos.ndim != 1
                or (len(pos) and (pos.min() < 0 or pos.max() >= n))
            ):
                raise ValueError(f"{path.name}: sample positions are not indices < {n}")
            for k, arr in state.records.as_dict().items():
                v = np.asarray(z[k])
                if v.shape != (len(pos), *arr.shape[1:]):
                    raise ValueError(f"{path.name}: {k} has shape {v.shape}")
                arr[pos] = v
        done.add(b)
    for k, v in meta["stats"].items():
        e, a, s = k.split("|")
        state.stats[(int(e), a, s)] = StageStats(**v)
    for a, b, o in meta.get("order", []):
        state.order[(a, b)] = o
    for e, exs in meta.get("examples", {}).items():
        state.examples[int(e)] = [Example.model_validate(x) for x in exs]
    return done
