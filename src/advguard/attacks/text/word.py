"""Score-guided word-level attack on text classifiers.

Words are ranked by importance (one deletion query per word); then, most important
first, each word is replaced by the best of: its entries in a small built-in synonym
and obfuscation table (``SYNONYMS``, extendable), a few character-level variants
(``char_ops``), or nothing (deletion). A replacement is kept only if it lowers the
true-class probability (targeted: raises the target's). The attack stops when the
label flips or ``max_words`` words have been changed.

>>> result = WordAttack(max_words=3)(TextClassifier(pipeline), spam_texts, spam_labels)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from advguard import _validate as check
from advguard.attacks.text.base import TextAttack, _Oracle, _State, delete_word, edit_distance
from advguard.attacks.text.ops import CHAR_OPS, parse_ops
from advguard.errors import InputError

SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "account": ("profile", "acct", "login"),
        "apply": ("sign up", "register", "enrol"),
        "award": ("reward", "present", "gift"),
        "bank": ("lender", "bnk", "branch"),
        "bitcoin": ("btc", "digital coin", "b-coin"),
        "bonus": ("extra", "top-up", "treat"),
        "call": ("ring", "phone", "dial"),
        "cash": ("money", "funds", "c.a.s.h"),
        "casino": ("games site", "kasino", "gaming lounge"),
        "chosen": ("picked", "named", "listed"),
        "claim": ("collect", "grab", "pick up"),
        "click": ("tap", "press", "open"),
        "congratulations": ("well done", "great news", "nice one"),
        "congrats": ("well done", "great news", "nice one"),
        "credit": ("finance", "borrowing", "kredit"),
        "crypto": ("digital assets", "coins", "krypto"),
        "customer": ("client", "user", "member"),
        "debt": ("balance owed", "arrears", "bills"),
        "delivery": ("shipping", "drop-off", "drop"),
        "deposit": ("top up", "payment", "transfer"),
        "earn": ("make", "receive", "get"),
        "exclusive": ("special", "private", "members"),
        "fee": ("charge", "cost", "amount"),
        "free": ("complimentary", "no-cost", "gratis"),
        "gift": ("present", "treat", "surprise"),
        "guaranteed": ("assured", "certain", "promised"),
        "investment": ("opportunity", "venture", "plan"),
        "jackpot": ("top prize", "big pot", "pot"),
        "limited": ("few", "restricted", "only some"),
        "loan": ("advance", "lending", "l0an"),
        "loans": ("advances", "lending", "l0ans"),
        "lottery": ("draw", "raffle", "sweepstake"),
        "money": ("funds", "dosh", "m0ney"),
        "now": ("today", "right away", "asap"),
        "offer": ("deal", "proposal", "opportunity"),
        "parcel": ("package", "item", "delivery"),
        "pay": ("settle", "send", "cover"),
        "pills": ("tablets", "capsules", "meds"),
        "prescription": ("script", "doctor note", "rx"),
        "prize": ("reward", "gift", "surprise"),
        "profit": ("gain", "return", "earnings"),
        "refund": ("repayment", "money back", "rebate"),
        "reply": ("respond", "answer", "write back"),
        "reward": ("bonus", "gift", "thank-you"),
        "selected": ("chosen", "picked", "named"),
        "stop": ("end", "quit", "halt"),
        "subscription": ("membership", "plan", "sub"),
        "suspended": ("paused", "on hold", "frozen"),
        "text": ("message", "send", "msg"),
        "txt": ("message", "send", "msg"),
        "urgent": ("important", "time-sensitive", "pressing"),
        "verify": ("check", "confirm", "validate"),
        "voucher": ("coupon", "token", "card"),
        "win": ("get", "bag", "score"),
        "winner": ("lucky one", "selected person", "champ"),
        "won": ("got", "bagged", "secured"),
    }
)
"""Lower-case word -> replacements (synonyms and spam-filter-dodging spellings)."""


def _match_case(template: str, word: str) -> str:
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class WordAttack(TextAttack):
    """Word-level evasion: synonym/obfuscation substitution, character variants, deletion.

    Parameters
    ----------
    max_words:
        Words changed per text at most (the edit budget).
    max_word_share:
        Optionally also at most this share of the text's words (at least one).
    max_char_edits:
        Optional cap on the character edits per text (Levenshtein, word by word).
    synonyms:
        Extra or overriding entries for :data:`SYNONYMS` (lower-case keys).
    char_ops:
        Character-level operations whose variants are also tried for each word
        (``()`` for none); ``char_candidates`` variants per operation.
    allow_delete:
        Also try deleting the word.
    max_queries, seed:
        Query budget per text (clean query included) and seed, as for ``CharAttack``.
    """

    name: ClassVar[str] = "word"

    def __init__(
        self,
        *,
        max_words: int | None = 3,
        max_word_share: float | None = None,
        max_char_edits: int | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        char_ops: Sequence[str] = ("typo", "leet"),
        char_candidates: int = 2,
        allow_delete: bool = True,
        max_queries: int = 300,
        seed: int = 0,
    ) -> None:
        if max_words is None and max_word_share is None:
            raise InputError("WordAttack needs a word budget: set max_words or max_word_share")
        super().__init__(
            max_words=max_words,
            max_word_share=max_word_share,
            max_queries=max_queries,
            seed=seed,
        )
        if max_char_edits is not None:
            check.positive_int("max_char_edits", max_char_edits)
        self.max_char_edits = None if max_char_edits is None else int(max_char_edits)
        table = dict(SYNONYMS)
        if synonyms is not None:
            if not isinstance(synonyms, Mapping):
                raise InputError("synonyms must be a mapping word -> list of replacements")
            for key, values in synonyms.items():
                if isinstance(values, str) or not isinstance(key, str):
                    raise InputError(
                        f"synonyms[{key!r}] must be a list of strings keyed by a string"
                    )
                values = tuple(values)
                if not all(isinstance(v, str) and v for v in values):
                    raise InputError(f"synonyms[{key!r}] must contain non-empty strings")
                table[key.lower()] = values
        self.synonyms = MappingProxyType(table)
        self.char_ops = () if not char_ops else parse_ops(char_ops, "char_ops")
        self.char_candidates = check.positive_int("char_candidates", char_candidates)
        self.allow_delete = check.flag("allow_delete", allow_delete)
        if not self.synonyms and not self.char_ops and not allow_delete:
            raise InputError(
                "WordAttack has nothing to try: give synonyms, char_ops or allow_delete"
            )

    def params(self) -> dict[str, object]:
        out = super().params()
        out["synonyms"] = f"<{len(self.synonyms)} entries>"
        return out

    def _candidates(
        self, state: _State, j: int, rng: np.random.Generator
    ) -> list[tuple[list[str], int]]:
        word = state.parts[j]
        words: dict[str, int] = {}
        for syn in self.synonyms.get(word.lower(), ()):
            new = _match_case(word, syn)
            if new != word:
                words.setdefault(new, edit_distance(word, new))
        for op in self.char_ops:
            for new, cost in CHAR_OPS[op](word, rng, self.char_candidates):
                words.setdefault(new, cost)
        out = []
        for new, cost in words.items():
            parts = list(state.parts)
            parts[j] = new
            out.append((parts, cost))
        if self.allow_delete:
            out.append(delete_word(state.parts, j))
        if self.max_char_edits is not None:
            left = self.max_char_edits - state.cost
            out = [c for c in out if c[1] <= left]
        return out

    def _attack_one(self, oracle: _Oracle, state: _State, rng: np.random.Generator) -> None:
        order = self._rank_words(oracle, state)
        word_limit = self.word_limit(len(order))
        for j in order:
            if state.success or oracle.remaining <= 0 or len(state.touched) >= word_limit:
                return
            self._try(oracle, state, self._candidates(state, j, rng), j)


__all__ = ["SYNONYMS", "WordAttack"]
