"""Score-guided character-level attack on text classifiers.

Words are ranked by importance (how much the true-class probability drops when the
word is deleted: one query per word). The most important words are then perturbed
greedily: for the current word, ``candidates_per_op`` variants per enabled operation
are queried and the best one is kept only if it lowers the true-class probability
(targeted: raises the target's). This repeats (up to ``max_edits_per_word`` edits per
word) and moves on to the next word until the label flips, the character-edit budget
or word budget is spent, or the query budget runs out.

>>> attack = CharAttack(ops=("homoglyph", "zero_width"), max_char_edits=8, seed=0)
>>> result = attack(TextClassifier(pipeline), spam_texts, spam_labels)
>>> result.evasion_rate, result.char_edits.max()

The default operations (homoglyphs and zero-width characters) leave the text looking
unchanged to a human reader; ``typo``, ``leet`` and ``spacing`` are visible.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from advguard import _validate as check
from advguard.attacks.text.base import TextAttack, _Oracle, _State
from advguard.attacks.text.ops import CHAR_OPS, parse_ops
from advguard.errors import InputError


class CharAttack(TextAttack):
    """Character-level evasion: homoglyphs, invisible characters, typos, leetspeak, spacing.

    Parameters
    ----------
    ops:
        Operations to use, any of ``"homoglyph"``, ``"zero_width"``, ``"typo"``,
        ``"leet"``, ``"spacing"`` (see :mod:`advguard.attacks.text.ops`).
    max_char_edits:
        Character edits allowed per text (each operation costs 1, a swap 2). ``None``
        for no limit (then ``max_words`` or ``max_word_share`` must bound the attack).
    max_words, max_word_share:
        At most this many words (or this share of the text's words, at least one) changed.
    max_edits_per_word:
        How many edits one word may receive (1 is enough against word-level models;
        more helps against character n-gram models).
    candidates_per_op:
        Variants of a word tried per operation and step (each is one query).
    max_queries:
        Model queries per text, the clean query included; never exceeded.
    seed:
        Seeds the random choice of positions and look-alikes (per text, so results do
        not depend on batch order).
    """

    name: ClassVar[str] = "char"

    def __init__(
        self,
        *,
        ops: str | tuple[str, ...] | list[str] = ("homoglyph", "zero_width"),
        max_char_edits: int | None = 8,
        max_words: int | None = None,
        max_word_share: float | None = None,
        max_edits_per_word: int = 1,
        candidates_per_op: int = 2,
        max_queries: int = 300,
        seed: int = 0,
    ) -> None:
        super().__init__(
            max_words=max_words,
            max_word_share=max_word_share,
            max_queries=max_queries,
            seed=seed,
        )
        self.ops = parse_ops(ops)
        if max_char_edits is not None:
            check.positive_int("max_char_edits", max_char_edits)
        if max_char_edits is None and max_words is None and max_word_share is None:
            raise InputError(
                "CharAttack needs an edit budget: set max_char_edits, max_words or max_word_share"
            )
        self.max_char_edits = None if max_char_edits is None else int(max_char_edits)
        for name, value in (
            ("max_edits_per_word", max_edits_per_word),
            ("candidates_per_op", candidates_per_op),
        ):
            check.positive_int(name, value)
        self.max_edits_per_word = int(max_edits_per_word)
        self.candidates_per_op = int(candidates_per_op)

    def _attack_one(self, oracle: _Oracle, state: _State, rng: np.random.Generator) -> None:
        order = self._rank_words(oracle, state)
        word_limit = self.word_limit(len(order))
        for j in order:
            if state.success or oracle.remaining <= 0:
                return
            if self.max_char_edits is not None and state.cost >= self.max_char_edits:
                return
            for _ in range(self.max_edits_per_word):
                if j not in state.touched and len(state.touched) >= word_limit:
                    break
                left = (
                    self.max_char_edits - state.cost if self.max_char_edits is not None else np.inf
                )
                word = state.parts[j]
                candidates = []
                for op in self.ops:
                    for new, cost in CHAR_OPS[op](word, rng, self.candidates_per_op):
                        if cost <= left:
                            parts = list(state.parts)
                            parts[j] = new
                            candidates.append((parts, cost))
                if not self._try(oracle, state, candidates, j) or state.success:
                    break


__all__ = ["CharAttack"]
