"""Evaluation: threat models, runner, metrics, sanity checks, reports."""

from advguard.evaluate.report import Report, load_report
from advguard.evaluate.runner import Evaluator, evaluate
from advguard.evaluate.threat_model import ThreatModel, load_threat_model, parse_threat_model

__all__ = [
    "Evaluator",
    "Report",
    "ThreatModel",
    "evaluate",
    "load_report",
    "load_threat_model",
    "parse_threat_model",
]
