"""Evaluation: threat models, runner, metrics, sanity checks, reports."""
