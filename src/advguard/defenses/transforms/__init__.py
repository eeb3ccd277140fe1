"""Input transforms applied before a model (e.g. text normalization in ``text``)."""
