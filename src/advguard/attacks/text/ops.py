"""Character-level perturbations of one word, each with its edit cost.

Every operation takes a word and a numpy ``Generator`` and returns up to ``k``
distinct variants as ``(new_word, cost)`` pairs, where ``cost`` is the number of
character edits (insertions, deletions, substitutions) that turns the word into
the variant. An adjacent swap counts as 2, so the costs added up are always an
upper bound on the Levenshtein distance between the original and the result.

Operations (names accepted by ``CharAttack(ops=...)``):

``homoglyph``
    Replace one Latin letter with a Cyrillic or Greek look-alike (``a`` -> ``а``).
``zero_width``
    Insert an invisible character (U+200B, U+200C, U+200D, U+2060, U+FEFF).
``typo``
    Adjacent-key substitution, swap of two neighbours, deletion or duplication.
``leet``
    Replace one letter with a digit or symbol (``a`` -> ``4``, ``s`` -> ``5``...).
``spacing``
    Insert a space inside the word (``free`` -> ``fr ee``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import numpy as np

HOMOGLYPHS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "a": ("\u0430", "\u03b1"),  # Cyrillic a, Greek alpha
        "c": ("\u0441", "\u03f2"),  # Cyrillic es, Greek lunate sigma
        "d": ("\u0501",),  # Cyrillic komi de
        "e": ("\u0435",),  # Cyrillic ie
        "h": ("\u04bb",),  # Cyrillic shha
        "i": ("\u0456", "\u03b9"),  # Cyrillic byelorussian-ukrainian i, Greek iota
        "j": ("\u0458",),  # Cyrillic je
        "k": ("\u03ba",),  # Greek kappa
        "l": ("\u04cf",),  # Cyrillic palochka
        "o": ("\u043e", "\u03bf"),  # Cyrillic o, Greek omicron
        "p": ("\u0440", "\u03c1"),  # Cyrillic er, Greek rho
        "q": ("\u051b",),  # Cyrillic qa
        "s": ("\u0455",),  # Cyrillic dze
        "u": ("\u03c5",),  # Greek upsilon
        "v": ("\u03bd",),  # Greek nu
        "w": ("\u051d",),  # Cyrillic we
        "x": ("\u0445", "\u03c7"),  # Cyrillic ha, Greek chi
        "y": ("\u0443",),  # Cyrillic u
        "A": ("\u0410", "\u0391"),
        "B": ("\u0412", "\u0392"),
        "C": ("\u0421",),
        "E": ("\u0415", "\u0395"),
        "H": ("\u041d", "\u0397"),
        "I": ("\u0406", "\u0399"),
        "J": ("\u0408",),
        "K": ("\u041a", "\u039a"),
        "M": ("\u041c", "\u039c"),
        "N": ("\u039d",),
        "O": ("\u041e", "\u039f"),
        "P": ("\u0420", "\u03a1"),
        "S": ("\u0405",),
        "T": ("\u0422", "\u03a4"),
        "X": ("\u0425", "\u03a7"),
        "Y": ("\u04ae", "\u03a5"),
        "Z": ("\u0396",),
    }
)
"""Latin letter -> visually confusable Cyrillic/Greek letters."""

ZERO_WIDTH: tuple[str, ...] = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")
"""Invisible characters: zero-width space, non-joiner, joiner, word joiner, BOM."""

LEET: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "a": ("4", "@"),
        "b": ("8",),
        "e": ("3",),
        "g": ("9",),
        "i": ("1",),
        "o": ("0",),
        "s": ("5", "$"),
        "t": ("7",),
        "z": ("2",),
    }
)
"""Letter (either case) -> leetspeak replacements."""

_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(_QWERTY_ROWS) for i, c in enumerate(row)}
    out: dict[str, str] = {}
    for c, (r, i) in pos.items():
        near = []
        for r2, row in enumerate(_QWERTY_ROWS):
            for j, c2 in enumerate(row):
                # rows are staggered by about half a key: one row and one column away at most
                if c2 != c and abs(r2 - r) <= 1 and abs(j - i) <= 1:
                    near.append(c2)
        out[c] = "".join(near)
    return out


KEYBOARD_NEIGHBOURS: Mapping[str, str] = MappingProxyType(_keyboard_neighbours())
"""Lower-case letter -> letters next to it on a QWERTY keyboard."""

Variant = tuple[str, int]
CharOp = Callable[[str, np.random.Generator, int], list[Variant]]


def _pick(rng: np.random.Generator, n: int, k: int) -> list[int]:
    if n <= 0 or k <= 0:
        return []
    return [int(i) for i in rng.choice(n, size=min(k, n), replace=False)]


def _dedupe(word: str, variants: list[Variant]) -> list[Variant]:
    seen = {word}
    out = []
    for v, c in variants:
        if v not in seen:
            seen.add(v)
            out.append((v, c))
    return out


def homoglyph(word: str, rng: np.random.Generator, k: int = 2) -> list[Variant]:
    """Swap one Latin letter for a Cyrillic/Greek look-alike (cost 1)."""
    pos = [i for i, ch in enumerate(word) if ch in HOMOGLYPHS]
    out = []
    for j in _pick(rng, len(pos), k):
        i = pos[j]
        subs = HOMOGLYPHS[word[i]]
        out.append((word[:i] + subs[int(rng.integers(len(subs)))] + word[i + 1 :], 1))
    return _dedupe(word, out)


def zero_width(word: str, rng: np.random.Generator, k: int = 2) -> list[Variant]:
    """Insert one invisible character strictly inside the word (cost 1)."""
    if len(word) < 2:
        return []
    out = []
    for j in _pick(rng, len(word) - 1, k):
        i = j + 1
        zw = ZERO_WIDTH[int(rng.integers(len(ZERO_WIDTH)))]
        out.append((word[:i] + zw + word[i:], 1))
    return _dedupe(word, out)


def typo(word: str, rng: np.random.Generator, k: int = 2) -> list[Variant]:
    """One keyboard typo: neighbour-key substitution, swap (cost 2), deletion or duplication."""
    letters = [i for i, ch in enumerate(word) if ch.isascii() and ch.isalpha()]
    if not letters:
        return []
    out: list[Variant] = []
    for _ in range(3 * k):
        if len(out) >= k:
            break
        kind = int(rng.integers(4))
        i = letters[int(rng.integers(len(letters)))]
        ch = word[i]
        if kind == 0:
            near = KEYBOARD_NEIGHBOURS.get(ch.lower(), "")
            if not near:
                continue
            new = near[int(rng.integers(len(near)))]
            new = new.upper() if ch.isupper() else new
            out.append((word[:i] + new + word[i + 1 :], 1))
        elif kind == 1:
            if i + 1 >= len(word) or word[i + 1] == ch:
                continue
            out.append((word[:i] + word[i + 1] + ch + word[i + 2 :], 2))
        elif kind == 2:
            if len(word) < 3:
                continue
            out.append((word[:i] + word[i + 1 :], 1))
        else:
            out.append((word[:i] + ch + word[i:], 1))
        out = _dedupe(word, out)
    return out[:k]


def leet(word: str, rng: np.random.Generator, k: int = 2) -> list[Variant]:
    """Replace one letter with a leetspeak digit/symbol (cost 1)."""
    pos = [i for i, ch in enumerate(word) if ch.lower() in LEET]
    out = []
    for j in _pick(rng, len(pos), k):
        i = pos[j]
        subs = LEET[word[i].lower()]
        out.append((word[:i] + subs[int(rng.integers(len(subs)))] + word[i + 1 :], 1))
    return _dedupe(word, out)


def spacing(word: str, rng: np.random.Generator, k: int = 2) -> list[Variant]:
    """Insert a space strictly inside the word (cost 1)."""
    if len(word) < 2:
        return []
    inner = [i for i in range(1, len(word)) if word[i] != " " and word[i - 1] != " "]
    out = [(word[: inner[j]] + " " + word[inner[j] :], 1) for j in _pick(rng, len(inner), k)]
    return _dedupe(word, out)


CHAR_OPS: Mapping[str, CharOp] = MappingProxyType(
    {
        "homoglyph": homoglyph,
        "zero_width": zero_width,
        "typo": typo,
        "leet": leet,
        "spacing": spacing,
    }
)
"""Name -> operation, in the order used when several are enabled."""


def parse_ops(ops: object, what: str = "ops") -> tuple[str, ...]:
    """Validate a selection of operation names (a name, or a sequence of names)."""
    from advguard.errors import InputError

    if isinstance(ops, str):
        ops = (ops,)
    if ops is None:
        raise InputError(f"{what} must name at least one of {', '.join(CHAR_OPS)}")
    try:
        if not isinstance(ops, Iterable):
            raise TypeError(f"{type(ops).__name__} is not iterable")
        names = tuple(ops)
    except TypeError:
        raise InputError(
            f"{what} must be a sequence of operation names from {', '.join(CHAR_OPS)}"
        ) from None
    bad = [o for o in names if not isinstance(o, str) or o not in CHAR_OPS]
    if bad:
        raise InputError(f"unknown {what} {bad!r}; choose from {', '.join(CHAR_OPS)}")
    return tuple(dict.fromkeys(names))


__all__ = [
    "CHAR_OPS",
    "HOMOGLYPHS",
    "KEYBOARD_NEIGHBOURS",
    "LEET",
    "ZERO_WIDTH",
    "homoglyph",
    "leet",
    "parse_ops",
    "spacing",
    "typo",
    "zero_width",
]
