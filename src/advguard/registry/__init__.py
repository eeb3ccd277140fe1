"""Model registry: signed models, robustness attestations and the CI release gate."""
