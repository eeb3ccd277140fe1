"""Evasion attacks on text classifiers (black-box, score-guided).

>>> from advguard.attacks.text import CharAttack, TextClassifier, WordAttack
>>> model = TextClassifier(fitted_tfidf_pipeline)          # or a callable + num_classes
>>> result = CharAttack(ops=("homoglyph", "zero_width"), max_char_edits=8)(model, texts, y)
>>> result.evasion_rate, result.adversarial[0]
"""

from advguard.attacks.text.base import TextAttack, TextAttackResult, edit_distance
from advguard.attacks.text.char import CharAttack
from advguard.attacks.text.model import TextClassifier, TextModel, as_text_classifier, check_texts
from advguard.attacks.text.ops import CHAR_OPS, HOMOGLYPHS, LEET, ZERO_WIDTH
from advguard.attacks.text.word import SYNONYMS, WordAttack

__all__ = [
    "CHAR_OPS",
    "HOMOGLYPHS",
    "LEET",
    "SYNONYMS",
    "ZERO_WIDTH",
    "CharAttack",
    "TextAttack",
    "TextAttackResult",
    "TextClassifier",
    "TextModel",
    "WordAttack",
    "as_text_classifier",
    "check_texts",
    "edit_distance",
]
