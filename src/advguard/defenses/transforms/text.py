"""Text normalization against character-level evasion.

:class:`TextNormalizer` undoes the cheap tricks that make a text look unchanged to
people while changing what a model sees:

1. strip invisible characters (zero-width space/joiners, word joiner, BOM, soft
   hyphen, bidirectional controls, variation selectors, tags and every other
   Unicode format character, category ``Cf``);
2. fold confusables: Cyrillic, Greek, Armenian and other look-alikes of Latin
   letters (``CONFUSABLES``), and fullwidth forms, to plain Latin;
3. Unicode NFKC (fullwidth, ligatures, mathematical alphanumerics, compatibility
   spaces), then fold confusables again (for letters NFKC exposes);
4. optionally fold leetspeak inside words (``fr33`` -> ``free``; numbers alone are kept);
5. optionally collapse runs of whitespace to one space and trim.

It does not undo typos or spaces inserted inside words.

>>> TextNormalizer().normalize("Fr\u0435\u0435 \u0441a\u200bsh")
'Free cash'
>>> defended = NormalizedTextClassifier(TextClassifier(pipeline))
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from advguard import _validate as check
from advguard.attacks.text.model import (
    TextModel,
    as_text_classifier,
    check_text_labels,
    check_texts,
)
from advguard.errors import InputError
from advguard.models.base import QueryCounter

INVISIBLE: frozenset[str] = frozenset(
    [
        "\u00ad",  # soft hyphen
        "\u034f",  # combining grapheme joiner
        "\u061c",  # arabic letter mark
        "\u115f",  # hangul choseong filler
        "\u1160",  # hangul jungseong filler
        "\u17b4",  # khmer vowel inherent aq
        "\u17b5",  # khmer vowel inherent aa
        "\u180e",  # mongolian vowel separator
        "\u200b",  # zero width space
        "\u200c",  # zero width non-joiner
        "\u200d",  # zero width joiner
        "\u200e",  # left-to-right mark
        "\u200f",  # right-to-left mark
        "\u2060",  # word joiner
        "\u2061",  # function application
        "\u2062",  # invisible times
        "\u2063",  # invisible separator
        "\u2064",  # invisible plus
        "\u3164",  # hangul filler
        "\ufeff",  # zero width no-break space (BOM)
        "\uffa0",  # halfwidth hangul filler
        *(chr(c) for c in range(0x202A, 0x202F)),  # bidi embeddings and overrides
        *(chr(c) for c in range(0x2066, 0x2070)),  # bidi isolates, deprecated format chars
        *(chr(c) for c in range(0xFE00, 0xFE10)),  # variation selectors
        *(chr(c) for c in range(0xE0000, 0xE0080)),  # tag characters
    ]
)
"""Invisible characters that are removed (every other category ``Cf`` character is too)."""

# fmt: off
_LATIN_LOOKALIKES: dict[str, str] = {
    # Cyrillic lower case
    "\u0430": "a", "\u0441": "c", "\u0501": "d", "\u0435": "e", "\u0451": "e",
    "\u04bd": "e", "\u0261": "g", "\u04bb": "h", "\u0456": "i", "\u0457": "i",
    "\u0458": "j", "\u04cf": "l", "\u043e": "o", "\u0440": "p", "\u051b": "q", "\u0455": "s",
    "\u0475": "v", "\u051d": "w", "\u0445": "x", "\u0443": "y", "\u04af": "y", "\u043a": "k",
    "\u04c0": "l",
    # Cyrillic upper case
    "\u0410": "A", "\u0412": "B", "\u0421": "C", "\u0500": "D", "\u0415": "E", "\u0401": "E",
    "\u041d": "H", "\u0406": "I", "\u0407": "I", "\u0408": "J", "\u041a": "K", "\u041c": "M",
    "\u041e": "O", "\u0420": "P", "\u051a": "Q", "\u0405": "S", "\u0422": "T", "\u0425": "X",
    "\u04ae": "Y", "\u0423": "Y", "\u051c": "W",
    # Greek lower case
    "\u03b1": "a", "\u03f2": "c", "\u03b5": "e", "\u03b3": "y", "\u03b7": "n",
    "\u03b9": "i", "\u03af": "i", "\u03ba": "k", "\u03bd": "v", "\u03bf": "o", "\u03cc": "o",
    "\u03c1": "p", "\u03c4": "t", "\u03c5": "u", "\u03cd": "u", "\u03c7": "x", "\u03c9": "w",
    "\u03f3": "j", "\u03ac": "a", "\u03ad": "e",
    # Greek upper case
    "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0396": "Z", "\u0397": "H", "\u0399": "I",
    "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T",
    "\u03a5": "Y", "\u03a7": "X", "\u03f9": "C", "\u037f": "J",
    # Armenian
    "\u0585": "o", "\u0578": "n", "\u057d": "u", "\u0581": "g", "\u0570": "h", "\u0566": "q",
    "\u0575": "j", "\u0561": "w",
    # Latin look-alikes outside ASCII (IPA, small capitals, dotless i...)
    "\u0131": "i", "\u0269": "i", "\u0251": "a", "\u0250": "a", "\u025b": "e", "\u0252": "a",
    "\u1d00": "A", "\u0299": "B", "\u1d04": "C", "\u1d05": "D", "\u1d07": "E", "\u0262": "G",
    "\u029c": "H", "\u026a": "I", "\u1d0a": "J", "\u1d0b": "K", "\u029f": "L", "\u1d0d": "M",
    "\u0274": "N", "\u1d0f": "O", "\u1d18": "P", "\u0280": "R", "\ua731": "S", "\u1d1b": "T",
    "\u1d1c": "U", "\u1d20": "V", "\u1d21": "W", "\u028f": "Y", "\u1d22": "Z",
    "\u01c0": "l", "\u2223": "l",
    # Cherokee capitals that pass for Latin
    "\u13a0": "D", "\u13a1": "R", "\u13a2": "T", "\u13a5": "i", "\u13aa": "A", "\u13ab": "J",
    "\u13ac": "E", "\u13b3": "W", "\u13b7": "M", "\u13bb": "H", "\u13c0": "G", "\u13c2": "h",
    "\u13c3": "Z", "\u13cf": "b", "\u13d2": "R", "\u13da": "S", "\u13de": "L", "\u13df": "C",
    "\u13e2": "P", "\u13e6": "K", "\u13f4": "B",
}
# Fullwidth ASCII (U+FF01..U+FF5E) -> ASCII; NFKC does this too, the table keeps it working
# with nfkc=False.
_LATIN_LOOKALIKES.update({chr(0xFF01 + i): chr(0x21 + i) for i in range(94)})

CONFUSABLES: Mapping[str, str] = MappingProxyType(
    {k: v for k, v in _LATIN_LOOKALIKES.items() if len(k) == 1}
)
"""Single look-alike character -> the Latin/ASCII character it imitates."""

LEET_FOLD: Mapping[str, str] = MappingProxyType(
    {"4": "a", "@": "a", "8": "b", "3": "e", "9": "g", "1": "i", "!": "i", "0": "o",
     "5": "s", "$": "s", "7": "t", "2": "z", "|": "l"}
)
# fmt: on
"""Leetspeak character -> letter (only applied inside words that contain letters)."""

_CONFUSABLE_TABLE = {ord(k): v for k, v in CONFUSABLES.items()}
_LEET_TOKEN = re.compile(r"[\w@$!|]+")
_LEET_CHARS = frozenset(LEET_FOLD)
_WS = re.compile(r"\s+")


class TextNormalizer:
    """Maps a text to a canonical form; see the module docstring for the steps.

    Parameters
    ----------
    nfkc:
        Apply Unicode NFKC normalization.
    confusables:
        Fold look-alike letters (``CONFUSABLES``) to Latin.
    strip_invisible:
        Remove zero-width and other invisible format characters.
    leet:
        Fold leetspeak inside words (off by default: it can change ordinary words
        with digits, e.g. ``4u`` -> ``au``).
    collapse_whitespace:
        Collapse whitespace runs to one space and strip the ends.
    lowercase:
        Lower-case the result.
    extra_confusables:
        More ``{character: replacement}`` entries for the confusable table.
    """

    def __init__(
        self,
        *,
        nfkc: bool = True,
        confusables: bool = True,
        strip_invisible: bool = True,
        leet: bool = False,
        collapse_whitespace: bool = True,
        lowercase: bool = False,
        extra_confusables: Mapping[str, str] | None = None,
    ) -> None:
        for name, value in (
            ("nfkc", nfkc),
            ("confusables", confusables),
            ("strip_invisible", strip_invisible),
            ("leet", leet),
            ("collapse_whitespace", collapse_whitespace),
            ("lowercase", lowercase),
        ):
            check.flag(name, value)
        self.nfkc = nfkc
        self.confusables = confusables
        self.strip_invisible = strip_invisible
        self.leet = leet
        self.collapse_whitespace = collapse_whitespace
        self.lowercase = lowercase
        table = dict(_CONFUSABLE_TABLE)
        if extra_confusables is not None:
            if not isinstance(extra_confusables, Mapping):
                raise InputError("extra_confusables must be a mapping {character: replacement}")
            for k, v in extra_confusables.items():
                if not (isinstance(k, str) and len(k) == 1 and isinstance(v, str)):
                    raise InputError(
                        f"extra_confusables entries must map one character to a string, "
                        f"got {k!r}: {v!r}"
                    )
                table[ord(k)] = v
        self._table = table
        self.extra_confusables = dict(extra_confusables or {})

    def normalize(self, text: str) -> str:
        """The normalized form of one text."""
        if not isinstance(text, str):
            raise InputError(
                f"normalize expects a string, got {type(text).__name__}"
                + ("; decode bytes first" if isinstance(text, (bytes, bytearray)) else "")
            )
        if self.strip_invisible:
            text = "".join(
                ch for ch in text if ch not in INVISIBLE and unicodedata.category(ch) != "Cf"
            )
        if self.confusables:
            text = text.translate(self._table)
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
            if self.confusables:
                text = text.translate(self._table)
        if self.leet:
            text = _LEET_TOKEN.sub(_fold_leet, text)
        if self.collapse_whitespace:
            text = _WS.sub(" ", text).strip()
        if self.lowercase:
            text = text.lower()
        return text

    def normalize_many(self, texts: Sequence[str]) -> list[str]:
        """Normalize a list of texts (``InputError`` for anything but a list of strings)."""
        return [self.normalize(t) for t in check_texts(texts)]

    def __call__(self, texts: str | Sequence[str]) -> str | list[str]:
        if isinstance(texts, str):
            return self.normalize(texts)
        return self.normalize_many(texts)

    def __repr__(self) -> str:
        flags = ", ".join(
            f"{k}={getattr(self, k)}"
            for k in (
                "nfkc",
                "confusables",
                "strip_invisible",
                "leet",
                "collapse_whitespace",
                "lowercase",
            )
        )
        return f"TextNormalizer({flags})"


def _fold_leet(match: re.Match[str]) -> str:
    token = match.group(0)
    if not any(ch.isalpha() for ch in token) or not any(ch in _LEET_CHARS for ch in token):
        return token
    # keep trailing punctuation-like leet characters ("now!") and leading symbols of amounts
    core_end = len(token)
    while core_end > 0 and token[core_end - 1] in "!|":
        core_end -= 1
    core = "".join(LEET_FOLD.get(ch, ch) for ch in token[:core_end])
    return core + token[core_end:]


class NormalizedTextClassifier:
    """A text model that normalizes every input first (same interface as ``TextClassifier``).

    ``queries`` counts the texts sent through this wrapper; the wrapped model keeps
    counting its own queries too.
    """

    def __init__(self, model: Any, normalizer: TextNormalizer | None = None) -> None:
        if normalizer is None:
            normalizer = TextNormalizer()
        if not isinstance(normalizer, TextNormalizer) and not callable(
            getattr(normalizer, "normalize", None)
        ):
            raise InputError("normalizer must be a TextNormalizer (or have a normalize method)")
        self.model: TextModel = as_text_classifier(model)
        self.normalizer = normalizer
        self.num_classes = int(self.model.num_classes)
        self.class_names = getattr(self.model, "class_names", None)
        self.classes = getattr(self.model, "classes", None)
        self.queries = QueryCounter()

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        items = check_texts(texts)
        self.queries.forward += len(items)
        return self.model.predict_proba([self.normalizer.normalize(t) for t in items])

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_proba(texts).argmax(axis=1)

    def accuracy(self, texts: Sequence[str], labels: Any) -> float:
        items = check_texts(texts)
        if not items:
            raise InputError("cannot compute accuracy on an empty set")
        y = check_text_labels(labels, len(items), self.num_classes)
        return float((self.predict(items) == y).mean())

    def __repr__(self) -> str:
        return f"NormalizedTextClassifier({self.model!r}, {self.normalizer!r})"


__all__ = [
    "CONFUSABLES",
    "INVISIBLE",
    "LEET_FOLD",
    "NormalizedTextClassifier",
    "TextNormalizer",
]
