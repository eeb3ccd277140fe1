"""A data-only file format for text classifiers: ``*.textmodel.json``.

A scikit-learn pipeline ``TfidfVectorizer`` (or ``CountVectorizer``) followed by
``LogisticRegression`` is saved as one JSON document holding only data: the vectorizer's
options (from a fixed allow-list), its vocabulary in column order, the IDF weights and the
classifier's coefficients. Loading rebuilds the same pipeline from those numbers; nothing in
the file is imported, called or unpickled, and every field is checked (type, size, range)
before use, so a model file from anywhere is safe to open::

    save_text_model(pipeline, "spam.textmodel.json", class_names=["ham", "spam"])
    pipeline, info = load_text_model("spam.textmodel.json")

The rebuilt pipeline gives the same probabilities as the saved one (bit for bit on the same
scikit-learn version). Labels are the columns of ``predict_proba``: the classifier must have
been fitted on labels ``0 .. K-1``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from advguard.atomic import atomic_write_text
from advguard.errors import InputError

TEXT_MODEL_FORMAT = "advguard.text-model"
TEXT_MODEL_VERSION = 1
TEXT_MODEL_SUFFIX = ".textmodel.json"
#: Largest model file read (bytes).
MAX_TEXT_MODEL_BYTES = 256 * 1024 * 1024
MAX_VOCABULARY = 2_000_000
MAX_TERM_CHARS = 1_000
DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"

# Vectorizer options kept in the file, with their allowed values (a callable checks a value).
_ALLOWED: dict[str, Any] = {
    "analyzer": ("word", "char", "char_wb"),
    "lowercase": (True, False),
    "binary": (True, False),
    "strip_accents": (None, "ascii", "unicode"),
    "ngram_range": lambda v: (
        isinstance(v, list | tuple)
        and len(v) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 10 for i in v)
        and v[0] <= v[1]
    ),
    "norm": (None, "l1", "l2"),
    "use_idf": (True, False),
    "smooth_idf": (True, False),
    "sublinear_tf": (True, False),
}
_TFIDF_ONLY = ("norm", "use_idf", "smooth_idf", "sublinear_tf")


def is_text_model_file(path: str | Path) -> bool:
    """True for a ``*.textmodel.json`` file name."""
    return str(path).lower().endswith(TEXT_MODEL_SUFFIX)


def save_text_model(
    pipeline: Any, path: str | Path, *, class_names: list[str] | None = None
) -> Path:
    """Write a fitted ``[Tfidf|Count]Vectorizer -> LogisticRegression`` pipeline as JSON."""
    return atomic_write_text(Path(path), json.dumps(_document(pipeline, class_names)))


def text_model_digest(pipeline: Any) -> str | None:
    """``text-model-sha256:<hex>`` over what :func:`save_text_model` stores of ``pipeline``
    (vectorizer options, vocabulary, IDF weights, coefficients; not the class names): the same
    for a pipeline and its saved and reloaded copy. None for a pipeline that cannot be saved."""
    try:
        doc = _document(pipeline, None)
    except InputError:
        return None
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return "text-model-sha256:" + hashlib.sha256(blob).hexdigest()


def _document(pipeline: Any, class_names: list[str] | None) -> dict[str, Any]:
    """The JSON document of a fitted pipeline (see :func:`save_text_model`)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) != 2:
        raise InputError("save_text_model needs a 2-step pipeline: vectorizer, LogisticRegression")
    vec, clf = steps[0][1], steps[1][1]
    if not isinstance(vec, CountVectorizer):  # TfidfVectorizer is a CountVectorizer
        raise InputError(f"unsupported vectorizer {type(vec).__name__}; use TfidfVectorizer")
    if not isinstance(clf, LogisticRegression):
        raise InputError(f"unsupported classifier {type(clf).__name__}; use LogisticRegression")
    p = vec.get_params()
    for key in ("tokenizer", "preprocessor"):
        if p.get(key) is not None:
            raise InputError(f"a custom {key} is code and cannot be saved as data")
    if p.get("token_pattern") != DEFAULT_TOKEN_PATTERN:
        raise InputError("only the default token_pattern can be saved")
    if p.get("stop_words") is not None:
        raise InputError("stop_words are not supported; fit without them")
    tfidf = isinstance(vec, TfidfVectorizer)
    params = {k: p[k] for k in _ALLOWED if tfidf or k not in _TFIDF_ONLY}
    params["ngram_range"] = list(params["ngram_range"])
    vocab = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
    classes = np.asarray(clf.classes_)
    k = len(classes)
    if not (np.issubdtype(classes.dtype, np.integer) and (classes == np.arange(k)).all()):
        raise InputError(f"the classifier must be fitted on labels 0..K-1, got {classes.tolist()}")
    if class_names is not None and len(class_names) != k:
        raise InputError(f"{len(class_names)} class_names for {k} classes")
    return {
        "format": TEXT_MODEL_FORMAT,
        "version": TEXT_MODEL_VERSION,
        "num_classes": k,
        "class_names": [str(c) for c in class_names] if class_names is not None else None,
        "vectorizer": {
            "type": "tfidf" if tfidf else "count",
            "params": params,
            "vocabulary": vocab,
            "idf": vec.idf_.tolist() if tfidf and vec.use_idf else None,
        },
        "classifier": {
            "type": "logistic-regression",
            "coef": np.asarray(clf.coef_, dtype=np.float64).tolist(),
            "intercept": np.asarray(clf.intercept_, dtype=np.float64).tolist(),
        },
    }


def _floats(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of numbers") from None
    if arr.shape != shape:
        raise InputError(f"{what} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} holds NaN or Inf")
    return arr


def load_text_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the pipeline saved by :func:`save_text_model`; returns ``(pipeline, info)``.

    ``info`` holds ``num_classes``, ``class_names`` and a short description. Raises
    :class:`InputError` naming the field for any malformed or oversized file.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    p = Path(path)
    doc = _read_text_model_json(p)
    where = f"{p}: "
    if not isinstance(doc, dict) or doc.get("format") != TEXT_MODEL_FORMAT:
        raise InputError(f"{where}not an advguard text model (format {TEXT_MODEL_FORMAT!r})")
    if doc.get("version") != TEXT_MODEL_VERSION:
        raise InputError(f"{where}text model version {doc.get('version')!r} is not readable")
    k = doc.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 10_000:
        raise InputError(f"{where}num_classes must be an integer >= 2, got {k!r}")
    names = doc.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != k
        or not all(isinstance(n, str) and len(n) <= 200 for n in names)
    ):
        raise InputError(f"{where}class_names must be {k} short strings")
    vdoc, cdoc = doc.get("vectorizer"), doc.get("classifier")
    if not isinstance(vdoc, dict) or vdoc.get("type") not in ("tfidf", "count"):
        raise InputError(f"{where}vectorizer.type must be 'tfidf' or 'count'")
    if not isinstance(cdoc, dict) or cdoc.get("type") != "logistic-regression":
        raise InputError(f"{where}classifier.type must be 'logistic-regression'")
    tfidf = vdoc["type"] == "tfidf"
    params = _vectorizer_params(vdoc, tfidf, where)
    vocab = _vocabulary(vdoc, where)
    n_feat = len(vocab)
    rows = 1 if k == 2 else k
    coef = _floats(cdoc.get("coef"), (rows, n_feat), f"{where}classifier.coef")
    intercept = _floats(cdoc.get("intercept"), (rows,), f"{where}classifier.intercept")
    vec = _vectorizer(vdoc, tfidf, params, vocab, where)
    clf = LogisticRegression()
    clf.classes_ = np.arange(k)
    clf.coef_ = coef
    clf.intercept_ = intercept
    clf.n_features_in_ = n_feat
    pipeline = Pipeline([("vectorizer", vec), ("classifier", clf)])
    info = {
        "num_classes": k,
        "class_names": names,
        "description": (
            f"{'TF-IDF' if tfidf else 'count'} {params['analyzer']} "
            f"{tuple(params['ngram_range'])}-grams ({n_feat} terms) + logistic regression"
        ),
    }
    return pipeline, info


def _read_text_model_json(p: Path) -> Any:
    """The parsed JSON of a text model file (size-limited)."""
    if not p.is_file():
        raise InputError(f"text model {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > MAX_TEXT_MODEL_BYTES:
        raise InputError(f"{p}: {size} bytes, more than the {MAX_TEXT_MODEL_BYTES} allowed")
    try:
        return json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{p}: not a valid JSON text model ({e})") from None


def _vectorizer_params(vdoc: dict[str, Any], tfidf: bool, where: str) -> dict[str, Any]:
    """The vectorizer's parameters: exactly the allowed keys, each with a supported value."""
    params = vdoc.get("params")
    if not isinstance(params, dict):
        raise InputError(f"{where}vectorizer.params must be a mapping")
    expected = [k2 for k2 in _ALLOWED if tfidf or k2 not in _TFIDF_ONLY]
    if sorted(params) != sorted(expected):
        raise InputError(f"{where}vectorizer.params must have exactly: {', '.join(expected)}")
    for key, value in params.items():
        rule = _ALLOWED[key]
        ok = (
            rule(value)
            if callable(rule)
            else any(type(value) is type(r) and value == r for r in rule)
        )
        if not ok:
            raise InputError(f"{where}vectorizer.params.{key} has an unsupported value {value!r}")
    return params


def _vocabulary(vdoc: dict[str, Any], where: str) -> list[str]:
    vocab = vdoc.get("vocabulary")
    if not isinstance(vocab, list) or not 1 <= len(vocab) <= MAX_VOCABULARY:
        raise InputError(f"{where}vectorizer.vocabulary must be a list of 1..{MAX_VOCABULARY}")
    if not all(isinstance(t, str) and 0 < len(t) <= MAX_TERM_CHARS for t in vocab):
        raise InputError(f"{where}vectorizer.vocabulary must hold non-empty short strings")
    if len(set(vocab)) != len(vocab):
        raise InputError(f"{where}vectorizer.vocabulary has repeated terms")
    return vocab


def _vectorizer(
    vdoc: dict[str, Any], tfidf: bool, params: dict[str, Any], vocab: list[str], where: str
) -> Any:
    """The fitted TF-IDF or count vectorizer over the stored vocabulary (and idf)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    n_feat = len(vocab)
    kw = dict(params)
    kw["ngram_range"] = tuple(kw["ngram_range"])
    cls = TfidfVectorizer if tfidf else CountVectorizer
    vec = cls(vocabulary={t: i for i, t in enumerate(vocab)}, **kw)
    if tfidf and params["use_idf"]:
        idf = _floats(vdoc.get("idf"), (n_feat,), f"{where}vectorizer.idf")
        if (idf <= 0).any():
            raise InputError(f"{where}vectorizer.idf must be positive")
        vec.idf_ = idf
    elif vdoc.get("idf") is not None:
        raise InputError(f"{where}vectorizer.idf must be null without use_idf")
    return vec


__all__ = [
    "TEXT_MODEL_FORMAT",
    "TEXT_MODEL_SUFFIX",
    "is_text_model_file",
    "load_text_model",
    "save_text_model",
    "text_model_digest",
]
