"""Hyper-parameter sweeps of a defense with a clean-vs-robust Pareto front.

``advguard sweep run SPEC.yaml --out DIR`` trains one model per trial (PGD-AT, TRADES or
fast-AT hyper-parameters from a grid or random search), evaluates each saved model under a
threat model on the held-out split, and writes ``sweep.json`` (``advguard-sweep/1``) and a
self-contained ``sweep.html`` with the Pareto front. Trials run on Ray Tune in parallel
(extra ``ray``) or one after another locally, with the same numbers.

Modules: ``spec`` (:class:`SweepSpec`, the trials), ``trial`` (:func:`run_trial`),
``runner`` (:func:`run_sweep`, the backends, ``sweep.json``), ``report`` (Pareto front, HTML).
"""

from advguard.defenses.sweep.report import pareto_front, sweep_html
from advguard.defenses.sweep.runner import (
    SWEEP_HTML,
    SWEEP_JSON,
    SWEEP_SCHEMA,
    SweepResult,
    import_tune,
    run_sweep,
)
from advguard.defenses.sweep.spec import SweepSpec, load_sweep_spec, parse_sweep_spec
from advguard.defenses.sweep.trial import run_trial

__all__ = [
    "SWEEP_HTML",
    "SWEEP_JSON",
    "SWEEP_SCHEMA",
    "SweepResult",
    "SweepSpec",
    "import_tune",
    "load_sweep_spec",
    "pareto_front",
    "parse_sweep_spec",
    "run_sweep",
    "run_trial",
    "sweep_html",
]
