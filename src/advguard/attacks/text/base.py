"""What text attacks share: the result type, budgets, word ranking and the call protocol.

A text attack is configured once and called on a text model with texts and labels::

    result = CharAttack(ops=("homoglyph", "zero_width"), max_char_edits=8)(model, texts, y)
    result.adversarial     # list[str]
    result.success         # bool per text: label flipped (or target reached)
    result.evasion_rate    # share of the attacked (correctly classified) texts that evade

Attacks are black-box and score-guided: they only call ``model.predict_proba``.
Each text is attacked on its own with its own query budget; the queries spent on
it (including the first query on the clean text) are in ``result.queries`` and
never exceed ``max_queries``. Texts that the model already gets wrong (or that
already have the target label) are left unchanged and marked ``attacked=False``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from advguard import _validate as check
from advguard.attacks.text.model import (
    TextModel,
    as_text_classifier,
    check_text_labels,
    check_texts,
)
from advguard.errors import InputError

WORD_RE = re.compile(r"(\w+)")
"""Words are maximal runs of word characters; splitting with this pattern keeps the
separators at even and the words at odd positions of the resulting list."""

Progress = Callable[[int, int], None]


@dataclass
class TextAttackResult:
    """Outcome of one text attack call (one entry per input text)."""

    original: list[str]
    adversarial: list[str]
    """The perturbed texts (the original where nothing was changed)."""
    labels: np.ndarray
    success: np.ndarray
    """Bool: the adversarial text is misclassified (untargeted) or has the target label."""
    attacked: np.ndarray
    """Bool: False where the clean text was already misclassified/on target and was skipped."""
    char_edits: np.ndarray
    """Character edits (Levenshtein, counted word by word) from original to adversarial."""
    word_edits: np.ndarray
    """Number of words changed or deleted."""
    queries: np.ndarray
    """Model queries spent on each text (the clean query included)."""
    predictions: np.ndarray
    """Predicted class of each adversarial text (from the attack's own last query)."""
    targets: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.adversarial)

    @property
    def evasion_rate(self) -> float:
        """Share of the attacked texts (correctly classified before) that now evade; 0 if none."""
        if not self.attacked.any():
            return 0.0
        return float(self.success[self.attacked].mean())

    def summary(self) -> dict[str, float | int]:
        """Headline numbers for reports (means over the attacked texts)."""
        a = self.attacked
        ok = a & self.success
        return {
            "texts": len(self),
            "attacked": int(a.sum()),
            "evaded": int(ok.sum()),
            "evasion_rate": self.evasion_rate,
            "mean_char_edits": float(self.char_edits[ok].mean()) if ok.any() else 0.0,
            "mean_word_edits": float(self.word_edits[ok].mean()) if ok.any() else 0.0,
            "mean_queries": float(self.queries[a].mean()) if a.any() else 0.0,
        }


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def split_words(text: str) -> list[str]:
    """``[sep, word, sep, word, ..., sep]``; ``"".join`` gives the text back."""
    return WORD_RE.split(text)


def delete_word(parts: list[str], j: int) -> tuple[list[str], int]:
    """Copy of ``parts`` without word ``j`` (and one now-redundant space); with its cost."""
    new = list(parts)
    cost = len(new[j])
    new[j] = ""
    before = "".join(new[:j])
    if new[j + 1].startswith(" ") and (before == "" or before.endswith(" ")):
        new[j + 1] = new[j + 1][1:]
        cost += 1
    return new, cost


class _Oracle:
    """Queries the model for one text under its budget and scores the answers."""

    def __init__(self, model: TextModel, limit: int, label: int, target: int | None) -> None:
        self.model = model
        self.limit = limit
        self.used = 0
        self.label = label
        self.target = target

    @property
    def remaining(self) -> int:
        return self.limit - self.used

    def query(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores to minimise, predictions, success flags) for the candidate texts."""
        if len(texts) > self.remaining:  # pragma: no cover - guarded by the callers
            raise RuntimeError("query budget exceeded")
        p = np.asarray(self.model.predict_proba(texts), dtype=np.float64)
        self.used += len(texts)
        pred = p.argmax(axis=1)
        if self.target is None:
            return p[:, self.label], pred, pred != self.label
        return 1.0 - p[:, self.target], pred, pred == self.target


@dataclass
class _State:
    """The text being attacked: its parts, current score and the budget spent."""

    orig: list[str]
    parts: list[str]
    score: float
    pred: int
    success: bool = False
    cost: int = 0
    touched: set[int] = field(default_factory=set)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def n_words(self) -> int:
        return sum(1 for j in range(1, len(self.orig), 2) if self.orig[j])


def _check_int(value: Any, name: str, minimum: int) -> int:
    limit = "queries" if "queries" in name else None
    return check.integer(name, value, low=minimum, limit=limit)


def _check_share(value: Any, name: str) -> float | None:
    if value is None:
        return None
    return check.fraction(name, value, low_open=True)


class TextAttack:
    """Base class of the score-guided text attacks (``CharAttack``, ``WordAttack``)."""

    name: ClassVar[str] = "text-attack"
    supports_targeted: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False

    def __init__(
        self,
        *,
        max_words: int | None,
        max_word_share: float | None,
        max_queries: int,
        seed: int,
    ) -> None:
        self.max_words = None if max_words is None else _check_int(max_words, "max_words", 1)
        self.max_word_share = _check_share(max_word_share, "max_word_share")
        self.max_queries = _check_int(max_queries, "max_queries", 2)
        self.seed = check.integer("seed", seed, low=0)

    # -- public entry point -----------------------------------------------------
    def __call__(
        self,
        model: Any,
        texts: Sequence[str],
        labels: Any,
        *,
        targets: Any = None,
        progress: Progress | None = None,
    ) -> TextAttackResult:
        """Attack every text; ``model`` is a text model adapter (or anything
        :class:`~advguard.attacks.text.model.TextClassifier` accepts)."""
        clf = as_text_classifier(model)
        items = check_texts(texts)
        n = len(items)
        y = check_text_labels(labels, n, clf.num_classes)
        t = None
        if targets is not None:
            if not self.supports_targeted:
                raise InputError(f"{self.name} does not support targeted attacks")
            t = check_text_labels(targets, n, clf.num_classes, "targets")
            if n and (t == y).any():
                raise InputError("targets must differ from the true labels for every text")
        if progress is not None and not callable(progress):
            raise InputError("progress must be a callable progress(done, total)")

        adv = list(items)
        success = np.zeros(n, dtype=bool)
        attacked = np.zeros(n, dtype=bool)
        char_edits = np.zeros(n, dtype=np.int64)
        word_edits = np.zeros(n, dtype=np.int64)
        queries = np.zeros(n, dtype=np.int64)
        preds = np.zeros(n, dtype=np.int64)
        for i, text in enumerate(items):
            oracle = _Oracle(clf, self.max_queries, int(y[i]), None if t is None else int(t[i]))
            score, pred, ok = oracle.query([text])
            preds[i] = pred[0]
            if ok[0]:
                success[i] = True
            else:
                attacked[i] = True
                parts = split_words(text)
                state = _State(
                    orig=list(parts), parts=parts, score=float(score[0]), pred=int(pred[0])
                )
                rng = np.random.default_rng([self.seed, zlib.crc32(text.encode("utf-8"))])
                self._attack_one(oracle, state, rng)
                adv[i] = state.text
                success[i] = state.success
                preds[i] = state.pred
                char_edits[i] = sum(
                    edit_distance(a, b) for a, b in zip(state.orig, state.parts, strict=True)
                )
                word_edits[i] = sum(
                    1 for j in range(1, len(state.orig), 2) if state.orig[j] != state.parts[j]
                )
            queries[i] = oracle.used
            if progress is not None:
                progress(i + 1, n)
        return TextAttackResult(
            original=items,
            adversarial=adv,
            labels=y,
            success=success,
            attacked=attacked,
            char_edits=char_edits,
            word_edits=word_edits,
            queries=queries,
            predictions=preds,
            targets=t,
            info={"attack": self.name, "params": self.params()},
        )

    # -- to implement -------------------------------------------------------------
    def _attack_one(self, oracle: _Oracle, state: _State, rng: np.random.Generator) -> None:
        """Perturb ``state`` in place (parts, score, pred, success, cost, touched)."""
        raise NotImplementedError  # pragma: no cover

    # -- shared helpers ---------------------------------------------------------------
    def word_limit(self, n_words: int) -> int:
        """How many distinct words may be changed in a text of ``n_words`` words."""
        limit = n_words
        if self.max_words is not None:
            limit = min(limit, self.max_words)
        if self.max_word_share is not None:
            limit = min(limit, max(1, int(self.max_word_share * n_words + 1e-9)))
        return limit

    def _rank_words(self, oracle: _Oracle, state: _State) -> list[int]:
        """Word positions, most important first.

        Importance is how much the score improves for the attacker when the word is
        deleted (one query per word). If the budget is short, at most half of what is
        left is spent on ranking; unranked words follow, longest first.
        """
        words = [j for j in range(1, len(state.parts), 2) if state.parts[j]]
        by_len = sorted(words, key=lambda j: -len(state.parts[j]))
        n_rank = min(len(words), oracle.remaining // 2)
        scored = by_len[:n_rank]
        if not scored:
            return by_len
        probes = ["".join(delete_word(state.parts, j)[0]) for j in scored]
        scores, _, _ = oracle.query(probes)
        gain = state.score - scores
        ranked = [scored[k] for k in np.argsort(-gain, kind="stable")]
        return ranked + by_len[n_rank:]

    def _try(
        self,
        oracle: _Oracle,
        state: _State,
        candidates: list[tuple[list[str], int]],
        j: int,
    ) -> bool:
        """Query candidate part lists for word ``j``; keep the best if it helps. True if kept."""
        candidates = candidates[: oracle.remaining]
        if not candidates:
            return False
        scores, preds, oks = oracle.query(["".join(p) for p, _ in candidates])
        if oks.any():
            idx = np.flatnonzero(oks)
            edits = np.array([candidates[k][1] for k in idx])
            b = int(idx[np.lexsort((scores[idx], edits))[0]])
        else:
            b = int(np.argmin(scores))
        if not (oks[b] or scores[b] < state.score - 1e-12):
            return False
        state.parts = candidates[b][0]
        state.cost += candidates[b][1]
        state.score = float(scores[b])
        state.pred = int(preds[b])
        state.success = bool(oks[b])
        state.touched.add(j)
        return True

    def params(self) -> dict[str, Any]:
        """The attack's configuration (everything needed to re-run it)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


__all__ = [
    "WORD_RE",
    "TextAttack",
    "TextAttackResult",
    "delete_word",
    "edit_distance",
    "split_words",
]
