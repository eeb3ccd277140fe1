"""Run a sweep: the trials of a :class:`~advguard.defenses.sweep.spec.SweepSpec` on Ray Tune
(``backend="ray"``, trials in parallel) or one after the other (``backend="local"``), with
the same trial function (:func:`~advguard.defenses.sweep.trial.run_trial`), into
``sweep.json`` (schema ``advguard-sweep/1``) and ``sweep.html``.

``sweep.json`` is rewritten (atomically) after every trial, so an interrupted sweep loses at
most the trials in flight; ``resume=True`` keeps the finished trials recorded there (matched
by their key, the hash of everything that determines their numbers) and runs the rest.
A failed trial is recorded with its error and run again on resume.

Ray Tune schedules and runs the trials (``max_concurrent`` at a time, ``resources`` each;
a trial whose worker process dies is run again from the start, twice at most, then recorded
as failed);
the trials themselves (grid x random draws) are drawn by advguard from the spec's seed, so
both backends run exactly the same trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from advguard.atomic import atomic_write_text
from advguard.defenses.sweep.report import pareto_front, plotted, sweep_html
from advguard.defenses.sweep.spec import SweepSpec
from advguard.defenses.sweep.trial import Clock, run_trial
from advguard.errors import InputError, MissingDependencyError

SWEEP_SCHEMA = "advguard-sweep/1"
SWEEP_JSON, SWEEP_HTML = "sweep.json", "sweep.html"
OnTrial = Callable[[int, int, dict[str, Any] | None], None]
"""``on_trial(done, total, record)``: called once with ``record=None`` before the first
trial, then after every trial with its record."""


@dataclass
class SweepResult:
    document: dict[str, Any]
    json_path: Path
    html_path: Path
    ran: int
    """Trials run by this call (the others were finished before: resume)."""


def trial_dir(out: Path, trial: dict[str, Any]) -> Path:
    """Where a trial writes model.safetensors, manifest.json and report.json."""
    return out / "trials" / trial["key"][:12]


def _record(
    trial: dict[str, Any], result: dict[str, Any], out: Path, headline: float
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": trial["id"],
        "key": trial["key"],
        "params": trial["params"],
        **result,
    }
    if rec["status"] == "ok":
        rob = {r["epsilon"]: r["value"] for r in rec["robust_accuracy"]}
        rec["robust_headline"] = rob.get(headline)
        folder = trial_dir(out, trial).relative_to(out).as_posix()
        rec["model"] = {**rec["model"], "path": f"{folder}/{rec['model']['path']}"}
        rec["report"] = f"{folder}/report.json"
    return rec


def build_document(
    spec: SweepSpec,
    headline: float,
    tm: dict[str, Any],
    records: list[dict[str, Any]],
    backend: str,
) -> dict[str, Any]:
    """The ``sweep.json`` document (Pareto flags computed here)."""
    pts = [r for r in records if plotted(r)]
    front = set(pareto_front([(r["clean_accuracy"], r["robust_headline"]) for r in pts]))
    on = {id(r) for i, r in enumerate(pts) if i in front}
    trials = [{**r, "pareto": id(r) in on} for r in records]
    from advguard import __version__

    return {
        "schema": SWEEP_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "advguard_version": __version__,
        "backend": backend,
        "spec": spec.model_dump(mode="json"),
        "threat_model": {k: tm[k] for k in ("name", "norm", "epsilons", "samples", "seed")},
        "headline_epsilon": headline,
        "pareto_front": [t["id"] for t in trials if t["pareto"]],
        "trials": trials,
    }


def load_previous(out: Path) -> dict[str, dict[str, Any]]:
    """Finished trials of an earlier run in ``out`` by key (their model file still there)."""
    p = out / SWEEP_JSON
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not valid JSON ({e}); remove it to start afresh") from None
    if not isinstance(doc, dict) or doc.get("schema") != SWEEP_SCHEMA:
        raise InputError(f"{p} is not an advguard sweep ({SWEEP_SCHEMA})")
    kept = {}
    trials = doc.get("trials")
    for t in trials if isinstance(trials, list) else []:
        try:  # a record that is not what sweep.json promises is run again, not trusted
            check_result(t)
            ok = t["status"] == "ok" and isinstance(t["key"], str)
            ok = ok and isinstance(t["params"], dict) and (out / t["model"]["path"]).is_file()
        except (TypeError, ValueError, KeyError, OSError):
            ok = False
        if ok:
            kept[t["key"]] = t
    return kept


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    backend: Literal["local", "ray"] = "local",
    address: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    base_dir: str | Path | None = None,
    on_trial: OnTrial | None = None,
    clock: Clock | None = None,
) -> SweepResult:
    """Run every trial of ``spec`` (see the module docstring) into ``out_dir``.

    ``base_dir``: where a threat-model file named in the spec is looked up (the spec's
    folder). ``max_concurrent`` overrides the spec's (Ray only). Without ``resume``, an
    ``out_dir`` that already holds a ``sweep.json`` is refused."""
    if backend not in ("local", "ray"):
        raise InputError(f"backend must be local or ray, got {backend!r}")
    out = Path(out_dir)
    if not resume and (out / SWEEP_JSON).exists():
        raise InputError(f"{out / SWEEP_JSON} exists; pass resume=True (--resume) or another --out")
    tm = spec.threat(Path(base_dir) if base_dir is not None else None)
    headline = spec.headline(tm)
    if backend == "ray":
        import_tune()  # before any work: say which extra to install
    trials = spec.trials(tm)
    previous = load_previous(out) if resume else {}
    records: dict[str, dict[str, Any]] = {
        t["key"]: {**previous[t["key"]], "id": t["id"]} for t in trials if t["key"] in previous
    }
    todo = [t for t in trials if t["key"] not in records]
    tm_doc = tm.model_dump(mode="json")
    out.mkdir(parents=True, exist_ok=True)

    def write() -> dict[str, Any]:
        done = [records[t["key"]] for t in trials if t["key"] in records]
        doc = build_document(spec, headline, tm_doc, done, backend)
        atomic_write_text(out / SWEEP_JSON, json.dumps(doc, indent=2) + "\n")
        atomic_write_text(out / SWEEP_HTML, sweep_html(doc))
        return doc

    def finished(trial: dict[str, Any], result: dict[str, Any]) -> None:
        records[trial["key"]] = _record(trial, result, out, headline)
        write()
        if on_trial is not None:
            on_trial(len(records), len(trials), records[trial["key"]])

    if on_trial is not None:
        on_trial(len(records), len(trials), None)
    if backend == "local":
        for t in todo:
            finished(t, run_trial(t["config"], trial_dir(out, t), clock))
    elif todo:
        n = max_concurrent if max_concurrent is not None else spec.max_concurrent
        _run_tune(spec, todo, out, address, n, finished)
    doc = write()
    return SweepResult(doc, out / SWEEP_JSON, out / SWEEP_HTML, ran=len(todo))


# -- Ray Tune ----------------------------------------------------------------------------
def import_tune() -> Any:
    """``ray.tune``, or :class:`MissingDependencyError` naming the ``ray`` extra."""
    try:
        from ray import tune
    except ImportError:
        raise MissingDependencyError(
            "ray[tune]",
            "ray",
            "the Ray Tune sweep backend (--backend ray; --backend local runs without Ray)",
        ) from None
    return tune


RESULT_KEY = "advguard_trial"


def tune_trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial, reported as a JSON string (plain data)."""
    from ray import tune

    t = config["trial"]
    result = run_trial(t["config"], t["dir"])
    tune.report({RESULT_KEY: json.dumps(result), "status_ok": result["status"] == "ok"})


def _number(v: Any, what: str, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what} is not a number")


def check_result(r: Any) -> None:
    """Raise ``ValueError`` unless ``r`` is a trial result (or a recorded trial) whose
    fields have the types ``sweep.json`` promises."""
    if not isinstance(r, dict) or r.get("status") not in ("ok", "error"):
        raise ValueError("no status")
    if r["status"] == "error":
        if not isinstance(r.get("error"), str):
            raise ValueError("a failed trial without an error message")
        return
    for k in ("clean_accuracy", "train_time_s", "eval_time_s"):
        _number(r[k], k, optional=k == "clean_accuracy")
    rob = r["robust_accuracy"]
    if not isinstance(rob, list) or not all(isinstance(e, dict) for e in rob):
        raise ValueError("robust_accuracy is not a list of epsilons")
    for e in rob:
        _number(e["epsilon"], "epsilon", optional=False)
        _number(e["value"], "robust accuracy")
    m = r["model"]
    if not isinstance(m, dict) or not all(
        isinstance(m.get(k), str) for k in ("path", "sha256", "weights_sha256")
    ):
        raise ValueError("model is not {path, sha256, weights_sha256}")


def result_from_wire(text: Any) -> dict[str, Any]:
    """A trial result a Tune worker reported, checked at the edge."""
    try:
        r = json.loads(text)
        check_result(r)
        return dict(r)
    except (TypeError, ValueError, KeyError) as e:
        return {"status": "error", "error": f"the trial sent a malformed result ({e})"}


def _tune_init(address: str | None, cpus: float) -> Any:
    """Ray, connected; ``(ray, True)`` when this call started or joined it (and the caller
    shuts it down), ``(ray, False)`` when it was already initialised."""
    from advguard.evaluate.distributed import connect_ray, import_ray

    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    n = max(1, math.ceil(cpus))
    return connect_ray(address, num_cpus=n, logging_level=logging.WARNING), True


class _Listener:
    """The driver's side of a Tune run: each trial's result, once, to ``finished``."""

    def __init__(
        self,
        by_id: dict[str, dict[str, Any]],
        finished: Callable[[dict[str, Any], dict[str, Any]], None],
    ) -> None:
        self.by_id, self.finished, self.got = by_id, finished, set[str]()

    def result(self, tid: str, wire: Any) -> None:
        if tid in self.by_id and tid not in self.got:
            self.got.add(tid)
            self.finished(self.by_id[tid], result_from_wire(wire))

    def error(self, tid: str, message: str) -> None:
        if tid in self.by_id and tid not in self.got:
            self.got.add(tid)
            self.finished(self.by_id[tid], {"status": "error", "error": message})


_LISTENERS: dict[str, _Listener] = {}


def _listener(token: str) -> _Listener:
    return _LISTENERS[token]


def _trial_name(trial: Any) -> str:
    return str(trial.config["trial"]["id"])


def _run_tune(
    spec: SweepSpec,
    todo: list[dict[str, Any]],
    out: Path,
    address: str | None,
    max_concurrent: int,
    finished: Callable[[dict[str, Any], dict[str, Any]], None],
) -> None:
    """Run ``todo`` as Ray Tune trials; ``finished(trial, result)`` on the driver as each ends."""
    tune = import_tune()
    if address is not None and address != "auto" and not address.startswith("ray://"):
        raise InputError(f"--address must be 'auto' or ray://host:port, got {address!r}")
    res = spec.resources
    ray, started = _tune_init(address, max_concurrent * res.cpu)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    listener = _Listener({t["id"]: t for t in todo}, finished)
    token = uuid.uuid4().hex
    _LISTENERS[token] = listener

    class Collector(tune.Callback):  # type: ignore[name-defined]
        """Tune pickles its callbacks with the experiment: this one holds only a token."""

        def __init__(self, token: str) -> None:
            self.token = token

        def on_trial_result(
            self, iteration: int, trials: Any, trial: Any, result: dict, **info: Any
        ) -> None:
            if RESULT_KEY in result:
                _listener(self.token).result(trial.config["trial"]["id"], result[RESULT_KEY])

        def on_trial_error(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            err = " ".join(str(getattr(trial, "error_message", None) or "worker failed").split())
            _listener(self.token).error(trial.config["trial"]["id"], f"Ray Tune: {err[:300]}")

    space = [
        {"id": t["id"], "config": t["config"], "dir": str(trial_dir(out, t).resolve())}
        for t in todo
    ]
    tuner = tune.Tuner(
        tune.with_resources(tune_trainable, {"cpu": res.cpu, "gpu": res.gpu}),
        param_space={"trial": tune.grid_search(space)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent, reuse_actors=False,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"advguard-sweep-{int(time.time())}",
            storage_path=str((out / ".tune").resolve()), verbose=0,
            callbacks=[Collector(token)], failure_config=tune.FailureConfig(max_failures=2),
        ),
    )  # fmt: skip
    try:
        tuner.fit()
    finally:
        _LISTENERS.pop(token, None)
        if started:  # leave no Ray instance behind that this sweep started
            ray.shutdown()
    for tid in sorted(set(listener.by_id) - listener.got):  # never reported: recorded, not lost
        listener.error(tid, "Ray Tune did not run this trial")
