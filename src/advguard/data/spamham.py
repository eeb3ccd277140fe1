"""A tiny offline spam/ham demo set of short SMS-style messages.

The messages were written for advguard (they are not taken from any existing
corpus); every name, phone number and ``.example`` domain in them is made up.
There are 343 messages, 170 spam and 173 ham, covering prizes, loans, phishing
links, crypto, pharmacy, dating and job scams against everyday messages (some of
them deliberately mentioning money, banks, parcels or winning).

>>> texts, labels, class_names = load_spamham()
>>> class_names
['ham', 'spam']

The data file ``spamham.tsv`` ships inside the package and is read with
:mod:`importlib.resources`, so this works from an installed wheel too.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from advguard.errors import InputError

SPAMHAM_CLASS_NAMES: tuple[str, ...] = ("ham", "spam")
"""Class names; label ``0`` is ham, ``1`` is spam."""

_RESOURCE = "spamham.tsv"


def load_spamham() -> tuple[list[str], np.ndarray, list[str]]:
    """Load the demo set.

    Returns ``(texts, labels, class_names)``: a list of strings, an ``int64``
    array with ``0`` for ham and ``1`` for spam, and ``["ham", "spam"]``.
    """
    raw = files("advguard.data").joinpath(_RESOURCE).read_text(encoding="utf-8")
    texts: list[str] = []
    labels: list[int] = []
    header_seen = False
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if not header_seen:
            if line.split("\t") != ["label", "text"]:
                raise InputError(
                    f"{_RESOURCE}: line {lineno} should be the header 'label<TAB>text'"
                )
            header_seen = True
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in SPAMHAM_CLASS_NAMES or not text.strip():
            raise InputError(f"{_RESOURCE}: malformed line {lineno}: {line[:60]!r}")
        texts.append(text)
        labels.append(SPAMHAM_CLASS_NAMES.index(label))
    return texts, np.asarray(labels, dtype=np.int64), list(SPAMHAM_CLASS_NAMES)


__all__ = ["SPAMHAM_CLASS_NAMES", "load_spamham"]
