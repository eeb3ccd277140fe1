"""Observability: robustness SLOs compiled to Prometheus rules and Alertmanager routes
(:mod:`advguard.observe.slo`), and offline jobs' headline numbers as Prometheus metrics
(:mod:`advguard.observe.offline`).

This package sits at the registry/guard layer: it reads evaluation, gate and certification
reports; nothing below it imports it.
"""
