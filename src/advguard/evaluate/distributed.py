"""Evaluation across processes and machines: shards of samples on a pool of Ray workers.

The attack suite is cut into work units of contiguous sample shards (``Evaluator.shard_indices``).
Each worker is a Ray actor that loads the model and data **once**, from the references in a
:class:`WorkSpec` (a model file path with its loader options, a data set spec), never from a
pickled model object; it runs shards with ``Evaluator.run_shard`` and returns plain data
(numbers, strings, numpy arrays; :func:`shard_to_wire`), which the driver checks at the edge
(:func:`shard_from_wire`) and merges with ``Evaluator.finish``. Every random draw is keyed by
the sample's index, so the merged report is the report of a local run, whatever the number of
workers, the shard size or the order shards finish in.

A killed worker is restarted by Ray (the actor reloads the model) and its unfinished shards
run again (``max_retries`` times each). The sanity checks and escalations run once, on the
driver, on the merged results.

Ray is an optional dependency (``pip install 'advguard[ray]'``); without it the backend raises
:class:`~advguard.errors.MissingDependencyError` naming the extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from advguard.attacks.base import AttackResult
from advguard.attacks.registry import SuiteAttack, build_attack
from advguard.errors import InputError, MissingDependencyError
from advguard.evaluate.report import Example, Report
from advguard.evaluate.runner import Evaluator
from advguard.evaluate.state import STAGES, Records, RunState, Shard, StageStats, absorb_shard
from advguard.evaluate.threat_model import ThreatModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkSpec:
    """How a worker rebuilds the evaluation: references and options, no live objects."""

    model: str
    """Model file (or reference) as :func:`advguard.models.io.load_model` takes it."""
    data: str
    """Data set spec as :func:`advguard.data.load_dataset` takes it."""
    threat_model: dict[str, Any]
    """The threat model, as ``ThreatModel.model_dump(mode="json")``."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model: str,
        data: str,
        tm: ThreatModel,
        model_kwargs: dict[str, Any] | None = None,
        data_kwargs: dict[str, Any] | None = None,
    ) -> WorkSpec:
        return cls(
            str(model),
            str(data),
            tm.model_dump(mode="json"),
            dict(model_kwargs or {}),
            dict(data_kwargs or {}),
        )


def build_evaluator(spec: WorkSpec) -> Evaluator:
    """Load the model and data of ``spec`` and configure an evaluator on them (a worker's
    set-up, run once per worker process)."""
    from advguard.evaluate.job import load_model_and_data

    tm = ThreatModel.model_validate(spec.threat_model)
    model, data, _ = load_model_and_data(
        spec.model, spec.data, model_kwargs=spec.model_kwargs, data_kwargs=spec.data_kwargs
    )
    names = data.feature_names if data.modality == "tabular" else None
    return Evaluator(model, data.x, data.y, tm, feature_names=names)


# -- shards as plain data ----------------------------------------------------------------------
def shard_to_wire(shard: Shard) -> dict[str, Any]:
    """A shard as numbers, strings, lists and numpy arrays (no objects of ours)."""
    return {
        "positions": np.asarray(shard.positions, dtype=np.int64),
        "records": {k: np.asarray(v) for k, v in shard.records.as_dict().items()},
        "stats": [[e, a, s, vars(st)] for (e, a, s), st in shard.stats.items()],
        "examples": {
            str(e): [x.model_dump(mode="json") for x in v] for e, v in shard.examples.items()
        },
        "seconds": float(shard.seconds),
    }


def shard_from_wire(d: Any) -> Shard:
    """Check and rebuild a shard a worker sent (every field validated; nothing executed)."""
    try:
        pos = np.asarray(d["positions"])
        if pos.ndim != 1 or (len(pos) and pos.dtype.kind not in "iu"):
            raise ValueError("positions are not a 1-D integer array")
        want = Records.empty(0, 0).as_dict().keys()
        rec_in = d["records"]
        if set(rec_in) != set(want):
            raise ValueError(f"record fields {sorted(rec_in)} are not {sorted(want)}")
        arrays = {k: np.asarray(rec_in[k]) for k in want}
        if any(a.dtype.kind not in "iuf" or len(a) != len(pos) for a in arrays.values()):
            raise ValueError("a record field is not a numeric array with one row per sample")
        stats: dict[tuple[int, str, Any], StageStats] = {}
        for e, a, s, v in d["stats"]:
            if not isinstance(e, int) or not isinstance(a, str) or s not in STAGES:
                raise ValueError(f"bad stats key {(e, a, s)!r}")
            stats[(e, a, s)] = StageStats(**{k: v[k] for k in vars(StageStats())})
        examples = {
            int(e): [Example.model_validate(x) for x in v] for e, v in d["examples"].items()
        }
        return Shard(pos.astype(np.int64), Records(**arrays), stats, examples, float(d["seconds"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"a worker sent a malformed shard ({type(e).__name__}: {e})") from None


# -- attack calls as plain data -----------------------------------------------------------------
def attack_result_to_wire(res: AttackResult) -> dict[str, Any]:
    """An attack call's result as numpy arrays (no objects of ours)."""
    out = {
        "x_adv": res.x_adv.detach().cpu().numpy(),
        "raw": res.raw.detach().cpu().numpy(),
        "success": res.success.cpu().numpy(),
        "attacked": res.attacked.cpu().numpy(),
    }
    if res.queries is not None:
        out["queries"] = res.queries.cpu().numpy()
    return out


def attack_result_from_wire(d: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Check the result a worker sent for the rows ``x`` (shapes, dtypes, finite inputs);
    nothing is trusted further: the caller re-verifies every claimed adversarial."""
    try:
        n, shape = len(x), tuple(x.shape)
        out: dict[str, torch.Tensor] = {}
        for k in ("x_adv", "raw"):
            a = np.asarray(d[k])
            if a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all():
                raise ValueError(f"{k} is not a finite float array of shape {shape}")
            out[k] = torch.tensor(a, dtype=x.dtype)  # a copy: Ray's arrays are read-only
        for k in ("success", "attacked"):
            a = np.asarray(d[k])
            if a.shape != (n,) or a.dtype != np.bool_:
                raise ValueError(f"{k} is not {n} booleans")
            out[k] = torch.tensor(a)
        if "queries" in d:
            q = np.asarray(d["queries"])
            if q.shape != (n,) or q.dtype.kind not in "iu" or (q < 0).any():
                raise ValueError(f"queries is not {n} counts")
            out["queries"] = torch.tensor(q, dtype=torch.int64)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(
            f"a worker sent a malformed attack result ({type(e).__name__}: {e})"
        ) from None


# -- the Ray worker ----------------------------------------------------------------------------
class ShardWorker:
    """One worker process: loads the model and data once, then runs shards on request."""

    def __init__(self, spec: WorkSpec) -> None:
        self.evaluator = build_evaluator(spec)

    def pid(self) -> int:
        return os.getpid()

    def run(self, indices: np.ndarray) -> tuple[int, dict[str, Any]]:
        """``(this process's id, the shard of data-set ``indices`` as plain data)``."""
        return os.getpid(), shard_to_wire(self.evaluator.run_shard(indices))

    def attack(
        self,
        recipe: dict[str, Any],
        x: np.ndarray,
        y: np.ndarray,
        eps: float,
        targets: np.ndarray | None,
        sample_ids: np.ndarray,
        stream: tuple[Any, ...],
    ) -> tuple[dict[str, Any], int, int]:
        """One attack call on this worker's attack model (the attack rebuilt from its
        recipe): ``(result as plain data, forward queries, gradient queries)``."""
        ev = self.evaluator
        attack = build_attack(
            str(recipe["name"]),
            norm=str(recipe["norm"]),
            seed=int(recipe["seed"]),
            **dict(recipe["params"]),
        )
        f0, g0 = ev.model.queries.snapshot()
        res = ev.run_attack(  # copies: Ray hands read-only arrays over
            attack,
            ev.attack_model,
            torch.tensor(x),
            torch.tensor(y),
            float(eps),
            None if targets is None else torch.tensor(targets),
            sample_ids=torch.tensor(sample_ids),
            stream=tuple(stream),
        )
        f1, g1 = ev.model.queries.snapshot()
        return attack_result_to_wire(res), f1 - f0, g1 - g0


class RayAttackPool:
    """The Ray backend's :class:`~advguard.evaluate.api.AttackPool`: an attack call's rows
    split into one contiguous part per actor (every draw keyed by the rows' sample ids, so
    the joined result is the local call's)."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        self.ray, self.actors = ray, actors
        self.calls = 0
        """Attack calls run on the actors so far."""

    def run(
        self,
        attack: SuiteAttack,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        targets: torch.Tensor | None,
        sample_ids: torch.Tensor,
        stream: tuple[Any, ...],
    ) -> AttackResult:
        parts = [p for p in np.array_split(np.arange(len(x)), len(self.actors)) if len(p)]
        xs, ys = x.detach().cpu(), y.cpu()
        ts = None if targets is None else targets.cpu()
        ids = torch.as_tensor(sample_ids).cpu()
        refs = [
            a.attack.remote(
                attack.recipe,
                xs[p].numpy(),
                ys[p].numpy(),
                float(eps),
                None if ts is None else ts[p].numpy(),
                ids[p].numpy(),
                tuple(stream),
            )
            for a, p in zip(self.actors, parts, strict=False)
        ]
        try:
            got = self.ray.get(refs)
        except self.ray.exceptions.RayError as e:
            raise _workers_failed(e) from None
        self.calls += 1
        outs = [attack_result_from_wire(w, xs[p]) for (w, _, _), p in zip(got, parts, strict=True)]

        def cat(k: str) -> torch.Tensor:
            return torch.cat([o[k] for o in outs])

        queries = cat("queries") if all("queries" in o for o in outs) else None
        return AttackResult(
            x_adv=cat("x_adv"),
            success=cat("success"),
            raw=cat("raw"),
            attacked=cat("attacked"),
            forward_evals=sum(int(f) for _, f, _ in got),
            gradient_evals=sum(int(g) for _, _, g in got),
            queries=queries,
        )


def _workers_failed(e: BaseException) -> InputError:
    return InputError(
        f"the Ray workers failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    )


def import_ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("ray", "ray", "the Ray backend (--backend ray)") from None
    return ray


#: ``ray.init`` attempts for a ``ray://`` address: a loaded head node sometimes fails to start
#: the per-client server it needs (an ``Initialization failure from server``), and a new
#: attempt gets a new one.
CLIENT_ATTEMPTS = 3


def connect_ray(
    address: str | None,
    *,
    num_cpus: int,
    logging_level: int | None = None,
    attempts: int = CLIENT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Ray, initialised: a local instance with ``num_cpus`` CPUs (``address`` None), the
    cluster of this machine (``"auto"``) or a Ray client (``"ray://host:port"``, retried
    ``attempts`` times, 1 s then 2 s apart, when the head fails to start the client's server).
    Any failure is one :class:`InputError` line naming the address and Ray's own last words."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if logging_level is not None:
        kwargs["logging_level"] = logging_level
    client = address is not None and address.startswith("ray://")
    for attempt in range(1, attempts + 1):
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
            return ray
        except ConnectionAbortedError as e:
            if not client or attempt == attempts:
                raise _unreachable(address, e) from None
            log.warning("Ray client start failed (%s); retrying", _last_words(e))
            with contextlib.suppress(Exception):
                ray.shutdown()
            sleep(float(attempt))
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            raise _unreachable(address, e) from None
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _last_words(e: BaseException) -> str:
    """An exception's message for one line: a relayed traceback's last line (the error
    itself), else the message, at most 300 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if len(lines) > 1 and "Traceback" in str(e) else " ".join(lines)
    return f"{type(e).__name__}: {text[:300]}"


def _unreachable(address: str | None, e: BaseException) -> InputError:
    where = "a local Ray instance" if address is None else address
    hint = ""
    if address is not None and address.startswith("ray://"):
        hint = (
            "; a cluster with token authentication needs RAY_AUTH_MODE=token and its "
            "token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here too"
        )
    return InputError(f"cannot start or reach {where} ({_last_words(e)}){hint}")


class RayBackend:
    """Run the suite's shards on Ray workers and merge them (see the module docstring).

    ``address``: None starts a local Ray instance with ``workers`` CPUs; ``"auto"`` joins the
    cluster this machine belongs to; ``"ray://host:port"`` connects a Ray client (the model
    and data references must then resolve on the workers, e.g. on a shared file system).
    ``shards``: how many work units (default 4 per worker, so a slow or restarted worker
    delays the run by a quarter of its share). ``max_retries``: restarts of a killed worker
    and re-runs of its unfinished shards.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int = 2,
        shards: int | None = None,
        max_retries: int = 3,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be an integer >= 1, got {workers!r}")
        if shards is not None and (
            isinstance(shards, bool) or not isinstance(shards, int) or shards < 1
        ):
            raise InputError(f"shards must be an integer >= 1, got {shards!r}")
        if address is not None and address != "auto" and not address.startswith("ray://"):
            raise InputError(f"--address must be 'auto' or ray://host:port, got {address!r}")
        self.address = address
        self.workers = workers
        self.shards = shards if shards is not None else 4 * workers
        self.max_retries = max_retries
        self.worker_pids: list[int] = []
        """Processes that started a worker (after ``run``: the initial ones)."""
        self.shard_pids: list[int] = []
        """The process that returned each shard, in completion order."""
        self.pool: RayAttackPool | None = None
        """The last ``run``'s pool of workers for the checks' attack calls."""
        self.submitted: list[np.ndarray] = []
        """The shards (data-set indices) sent to workers by the last ``run`` (a resumed run
        sends only the samples its checkpoint lacks)."""

    def _ray(self) -> Any:
        return connect_ray(self.address, num_cpus=self.workers)

    def run(
        self,
        evaluator: Evaluator,
        spec: WorkSpec,
        on_shard: Callable[[int, int], None] | None = None,
    ) -> Report:
        """The report of ``evaluator``'s run, its suite computed by workers built from
        ``spec`` (which must describe the same model, data and threat model).

        With the evaluator's ``checkpoint_dir``, every finished shard is checkpointed as it
        arrives (the format of a local run's batches), and ``resume`` restores the finished
        samples of an interrupted run of either backend: only the rest is sent to workers.
        ``on_shard(done, total)`` is called once the first shards are submitted (``done`` =
        0) and after each shard is merged and checkpointed; an exception it raises stops the
        run (the finished shards stay in the checkpoint). Once the shards are merged, the
        workers run the attack calls of the sanity checks and escalations
        (:class:`RayAttackPool`)."""
        if ThreatModel.model_validate(spec.threat_model) != evaluator.tm:
            raise InputError("the work spec's threat model is not the evaluator's")
        idx = evaluator.samples()
        state = evaluator.new_state(idx)
        done = evaluator.open_checkpoint(state, idx)
        shards = [Shard.of(state, np.flatnonzero(done))] if done.any() else []
        parts = evaluator.plan_shards(self.shards, done, at_least=self.workers)
        self.submitted = [np.asarray(p) for p in parts]
        if not parts:  # all restored from the checkpoint: the checks run here
            if on_shard is not None:
                on_shard(0, 0)
            return evaluator.finish(shards)
        ray = self._ray()
        actor = ray.remote(max_restarts=self.max_retries, max_task_retries=self.max_retries)(
            ShardWorker
        )
        actors = [actor.remote(spec) for _ in range(self.workers)]
        try:
            self._collect(ray, actors, evaluator, state, parts, shards, on_shard)
            # the workers, idle now, run the attack calls of the checks and escalations
            self.pool = evaluator.pool = RayAttackPool(ray, actors)
            try:
                return evaluator.finish(shards)
            finally:
                evaluator.pool = None
        finally:
            for a in actors:
                ray.kill(a)

    def _collect(
        self,
        ray: Any,
        actors: list[Any],
        evaluator: Evaluator,
        state: RunState,
        parts: list[np.ndarray],
        shards: list[Shard],
        on_shard: Callable[[int, int], None] | None,
    ) -> None:
        """Run ``parts`` on ``actors``; merge each shard into ``state`` as it arrives,
        checkpoint it and append it to ``shards``."""
        idx = state.records.index
        try:
            self.worker_pids = list(ray.get([a.pid.remote() for a in actors]))
            # one shard in flight per actor; the next goes to the first actor free (shards of
            # uneven cost, e.g. Square on a shard's survivors, do not leave an actor idle)
            queue = list(range(len(parts)))
            pending = {a.run.remote(parts[queue.pop(0)]): a for a in actors if queue}
            if on_shard is not None:  # the first shards submitted, none collected yet
                on_shard(0, len(parts))
            for n_done in range(1, len(parts) + 1):
                ready, _ = ray.wait(list(pending), num_returns=1)
                pid, wire = ray.get(ready[0])
                free = pending.pop(ready[0])
                if queue:
                    pending[free.run.remote(parts[queue.pop(0)])] = free
                self.shard_pids.append(int(pid))
                shard = shard_from_wire(wire)
                absorb_shard(state, shard, evaluator.keep_examples)
                evaluator.save_checkpoint(state, idx, shard.positions)
                shards.append(shard)
                if on_shard is not None:
                    on_shard(n_done, len(parts))
        except ray.exceptions.RayError as e:
            raise _workers_failed(e) from None
