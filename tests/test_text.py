"""Text attacks (CharAttack, WordAttack), the text normalizer defense and the spam/ham set."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from advguard.attacks.text import (
    HOMOGLYPHS,
    ZERO_WIDTH,
    CharAttack,
    TextAttackResult,
    TextClassifier,
    WordAttack,
    edit_distance,
)
from advguard.data.spamham import load_spamham
from advguard.defenses.transforms.text import NormalizedTextClassifier, TextNormalizer
from advguard.errors import InputError

BUDGET = 8  # character edits per text
QUERIES = 100  # model queries per text


@pytest.fixture(scope="module")
def split():
    texts, y, _ = load_spamham()
    return train_test_split(texts, y, test_size=0.3, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def pipeline(split):
    tr, _, ytr, _ = split
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    return make_pipeline(vec, LogisticRegression(C=10.0, max_iter=1000)).fit(tr, ytr)


@pytest.fixture()
def model(pipeline) -> TextClassifier:
    return TextClassifier(pipeline, class_names=["ham", "spam"])


@pytest.fixture(scope="module")
def spam_eval(pipeline, split) -> list[str]:
    """Held-out spam messages the model gets right."""
    _, te, _, yte = split
    pred = pipeline.predict(te)
    return [t for t, y, p in zip(te, yte, pred, strict=True) if y == 1 and p == 1]


@pytest.fixture(scope="module")
def char_result(pipeline, spam_eval) -> tuple[TextAttackResult, int]:
    m = TextClassifier(pipeline)
    attack = CharAttack(
        ops=("homoglyph", "zero_width"), max_char_edits=BUDGET, max_queries=QUERIES, seed=0
    )
    res = attack(m, spam_eval, np.ones(len(spam_eval), dtype=np.int64))
    return res, m.queries.forward


def _undo(text: str) -> str:
    inverse = {g: c for c, gs in HOMOGLYPHS.items() for g in gs}
    return "".join(inverse.get(ch, ch) for ch in text if ch not in ZERO_WIDTH)


# -- data ------------------------------------------------------------------------------


def test_spamham_loads_balanced_and_unique():
    texts, y, names = load_spamham()
    assert names == ["ham", "spam"]
    assert len(texts) >= 300 and len(texts) == len(y)
    assert y.dtype == np.int64 and set(np.unique(y)) == {0, 1}
    assert 0.4 <= y.mean() <= 0.6
    assert all(isinstance(t, str) and t.strip() and "\t" not in t for t in texts)
    normalised = {" ".join(t.lower().split()) for t in texts}
    assert len(normalised) == len(texts), "duplicate messages"
    assert np.mean([len(t) for t in texts]) < 160  # short SMS-like messages


def test_pipeline_has_good_held_out_accuracy(model, split):
    _, te, _, yte = split
    assert model.accuracy(te, yte) >= 0.9
    assert model.num_classes == 2 and model.class_names == ["ham", "spam"]
    p = model.predict_proba(te[:5])
    assert p.shape == (5, 2) and np.allclose(p.sum(1), 1.0)
    assert model.queries.forward == len(te) + 5


# -- CharAttack --------------------------------------------------------------------------


def test_char_attack_evades_spam_within_budgets(char_result, spam_eval, pipeline):
    res, total_queries = char_result
    assert len(spam_eval) >= 30
    assert res.attacked.all()
    assert res.evasion_rate >= 0.6, res.summary()
    # budgets hold on every text, measured independently on the whole strings too
    assert (res.char_edits <= BUDGET).all()
    assert all(
        edit_distance(a, b) <= BUDGET for a, b in zip(res.original, res.adversarial, strict=True)
    )
    assert (res.queries <= QUERIES).all() and res.queries.sum() == total_queries
    # only the requested operations were used: undoing them gives the original back
    assert all(_undo(a) == o for a, o in zip(res.adversarial, res.original, strict=True))
    # the success mask is what the model says about the returned texts
    pred = pipeline.predict(res.adversarial)
    assert np.array_equal(res.success, pred != 1)
    assert np.array_equal(res.predictions, pred)
    ok = res.success
    assert (res.char_edits[ok] >= 1).all() and (res.word_edits[ok] >= 1).all()
    assert (res.word_edits <= res.char_edits).all()


def test_char_attack_all_ops_and_word_share(model, spam_eval):
    ops = ("homoglyph", "zero_width", "typo", "leet", "spacing")
    texts = spam_eval[:12]
    attack = CharAttack(ops=ops, max_char_edits=None, max_word_share=0.25, max_queries=60)
    res = attack(model, texts, np.ones(len(texts), dtype=np.int64))
    n_words = np.array([len([w for w in t.split() if any(c.isalnum() for c in w)]) for t in texts])
    assert (res.word_edits <= np.maximum(1, (0.25 * n_words).astype(int) + 1)).all()
    assert (res.queries <= 60).all()
    assert res.evasion_rate > 0.3


def test_char_attack_is_deterministic_and_order_independent(model, spam_eval):
    texts = spam_eval[:10]
    y = np.ones(len(texts), dtype=np.int64)
    attack = CharAttack(ops=("homoglyph", "zero_width", "typo"), seed=3)
    a = attack(model, texts, y)
    b = attack(model, texts, y)
    assert a.adversarial == b.adversarial and np.array_equal(a.queries, b.queries)
    rev = attack(model, texts[::-1], y)
    assert rev.adversarial[::-1] == a.adversarial
    other = CharAttack(ops=("homoglyph", "zero_width", "typo"), seed=4)(model, texts, y)
    assert other.adversarial != a.adversarial


def test_char_attack_tight_query_budget_and_skips(model, split):
    _, te, _, yte = split
    texts = te[:20]
    y = np.asarray(yte[:20])
    wrong = 1 - model.predict(texts)  # every text is "already misclassified" under these labels
    skipped = CharAttack(max_queries=5)(model, texts, wrong)
    assert not skipped.attacked.any() and skipped.success.all()
    assert skipped.adversarial == texts and (skipped.queries == 1).all()
    assert skipped.evasion_rate == 0.0
    tight = CharAttack(max_queries=5)(model, texts, y)
    assert (tight.queries <= 5).all()


def test_targeted_attack_on_a_callable_model():
    # three-class keyword model: 0 = neutral, 1 = spam words, 2 = "urgent" words
    def keyword_model(texts):
        out = []
        for t in texts:
            w = t.lower().split()
            s = np.array(
                [
                    1.0,
                    2.0 * sum(x in ("free", "prize") for x in w),
                    1.5 * sum(x in ("urgent", "now") for x in w),
                ]
            )
            e = np.exp(s - s.max())
            out.append(e / e.sum())
        return np.array(out)

    m = TextClassifier(keyword_model, num_classes=3)
    texts = ["free prize now", "claim your free prize now"]
    y = m.predict(texts)
    assert (y == 1).all()
    calls = []
    res = CharAttack(max_char_edits=4)(
        m, texts, y, targets=np.array([2, 2]), progress=lambda i, n: calls.append((i, n))
    )
    assert res.success.all() and (m.predict(res.adversarial) == 2).all()
    assert calls == [(1, 2), (2, 2)]
    with pytest.raises(InputError, match="differ"):
        CharAttack()(m, texts, y, targets=y)


# -- WordAttack ------------------------------------------------------------------------


def test_word_attack_evades_some(model, spam_eval, pipeline):
    y = np.ones(len(spam_eval), dtype=np.int64)
    res = WordAttack(max_words=3, max_queries=QUERIES, seed=0)(model, spam_eval, y)
    assert res.evasion_rate >= 0.15, res.summary()
    assert (res.word_edits <= 3).all() and (res.queries <= QUERIES).all()
    assert np.array_equal(res.success, pipeline.predict(res.adversarial) != 1)
    # no synonyms, no char variants: deletion only is still an attack
    only_del = WordAttack(max_words=2, char_ops=(), synonyms=None)(model, spam_eval[:10], y[:10])
    assert (only_del.word_edits <= 2).all()


# -- the normalizer defense --------------------------------------------------------------


def test_normalizer_restores_accuracy_under_char_attack(pipeline, split):
    _, te, _, yte = split
    raw = TextClassifier(pipeline)
    clean_acc = raw.accuracy(te, yte)
    attack = CharAttack(ops=("homoglyph", "zero_width"), max_char_edits=BUDGET, max_queries=QUERIES)
    res = attack(raw, te, yte)
    attacked_acc = raw.accuracy(res.adversarial, yte)
    defended = NormalizedTextClassifier(TextClassifier(pipeline))
    assert attacked_acc <= clean_acc - 0.3
    assert defended.accuracy(te, yte) >= clean_acc - 0.01
    assert defended.accuracy(res.adversarial, yte) >= clean_acc - 0.01
    assert defended.queries.forward == 2 * len(te)
    assert defended.model.queries.forward == 2 * len(te)


def test_homoglyph_attack_on_the_defended_model_fails(pipeline, spam_eval):
    defended = NormalizedTextClassifier(pipeline)
    y = np.ones(len(spam_eval), dtype=np.int64)
    texts = spam_eval[:15]
    res = CharAttack(ops=("homoglyph", "zero_width"), max_queries=QUERIES)(defended, texts, y[:15])
    assert res.evasion_rate == 0.0
    assert (res.queries <= QUERIES).all()


def test_normalizer_folds_confusables_and_invisibles():
    n = TextNormalizer()
    for latin, glyphs in HOMOGLYPHS.items():
        for g in glyphs:
            assert n.normalize(g) == latin, (latin, g)
    for zw in (*ZERO_WIDTH, "\u00ad", "\u202e", "\ufe0f"):
        assert n.normalize(f"fr{zw}ee") == "free"
    assert n.normalize("\uff37\uff29\uff2e  big\u3000now") == "WIN big now"  # fullwidth
    assert n.normalize("\U0001d41f\U0001d42b\U0001d41e\U0001d41e") == "free"  # math bold
    assert n.normalize("  a \t b\n") == "a b"
    assert TextNormalizer(collapse_whitespace=False).normalize("a  b") == "a  b"
    leet = TextNormalizer(leet=True, lowercase=True)
    assert leet.normalize("FR33 c4$h n0w! call 0800 123") == "free cash now! call 0800 123"
    assert TextNormalizer().normalize("fr33") == "fr33"
    assert n(["\u0430", "b"]) == ["a", "b"] and n("\u0430") == "a"
    clean = "Hi mum, can you call me back? £20 is fine."
    assert n.normalize(clean) == clean


# -- input validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ("a single string", "single string"),
        (b"bytes", "bytes"),
        (None, "None"),
        (42, "int"),
        ([None], r"texts\[0\] is None"),
        (["ok", b"raw"], r"texts\[1\] is bytes"),
        (["ok", 3.5], r"texts\[1\] is a float"),
        (np.array([["a"]]), "1-D"),
    ],
)
def test_non_string_inputs_raise_input_error(model, bad, msg):
    with pytest.raises(InputError, match=msg):
        model.predict_proba(bad)
    with pytest.raises(InputError):
        NormalizedTextClassifier(model).predict(bad)
    with pytest.raises(InputError):
        CharAttack()(model, bad, [1])


def test_bad_models_labels_and_parameters(model, pipeline):
    with pytest.raises(InputError, match="num_classes"):
        TextClassifier(lambda texts: np.ones((len(texts), 2)) / 2)
    with pytest.raises(InputError):
        TextClassifier(None)
    with pytest.raises(InputError, match="fitted"):
        TextClassifier(make_pipeline(TfidfVectorizer(), LogisticRegression()))
    logits = TextClassifier(lambda texts: np.full((len(texts), 2), 3.0), num_classes=2)
    with pytest.raises(InputError, match="probabilities"):
        logits.predict_proba(["x"])
    shape = TextClassifier(lambda texts: np.ones(len(texts)), num_classes=2)
    with pytest.raises(InputError, match="shape"):
        shape.predict_proba(["x"])
    with pytest.raises(InputError, match="length"):
        CharAttack()(model, ["a", "b"], [1])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        CharAttack()(model, ["a"], [2])
    with pytest.raises(InputError, match="integer"):
        CharAttack()(model, ["a"], [0.5])
    with pytest.raises(InputError, match="unknown ops"):
        CharAttack(ops=("homoglyph", "emoji"))
    with pytest.raises(InputError, match="budget"):
        CharAttack(max_char_edits=None)
    with pytest.raises(InputError):
        CharAttack(max_queries=1)
    with pytest.raises(InputError):
        CharAttack(max_word_share=1.5)
    with pytest.raises(InputError):
        WordAttack(max_words=None)
    with pytest.raises(InputError):
        WordAttack(synonyms={"free": "gratis"})
    with pytest.raises(InputError):
        TextNormalizer().normalize(None)
    with pytest.raises(InputError):
        TextNormalizer(leet="yes")
    # an adapter passes through as_text_classifier untouched; raw pipelines get wrapped
    res = CharAttack()(pipeline, ["free prize"], [1])
    assert isinstance(res, TextAttackResult)
