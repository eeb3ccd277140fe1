"""Find poisoned rows in a training set.

- Spectral signatures (Tran, Li, Madry 2018, "Spectral Signatures in Backdoor Attacks",
  NeurIPS): per class, centre the penultimate representations, take the top right singular
  vector ``v``; the outlier score of row ``i`` is ``<r_i - mean, v>^2``; remove the
  ``factor * rate * n_c`` highest-scoring rows of each class (``factor`` = 1.5 in the paper,
  ``rate`` an upper bound on the poisoned share *of a class*).
- Activation clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava
  2019, "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", SafeAI):
  per class, reduce the representations to ~10 dimensions (ICA in the paper; PCA here by
  default, ICA optional), split them with 2-means; a class is poisoned when its smaller cluster
  holds at most ``max_share`` of it and the split is clear (silhouette at least
  ``min_silhouette``); its smaller cluster is the suspect set.
- Label noise, confident-learning style (Northcutt, Jiang, Chuang 2021, "Confident Learning",
  JAIR): out-of-fold class probabilities from a cross-validated logistic regression; a row is
  suspect when the probability of its given label is below that class's average
  self-confidence and some other class's probability reaches that class's threshold.
- Near-duplicates: pairs of rows closer than ``tol`` (root-mean-square difference per value,
  in units of the input range); those with different labels are suspect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advguard.errors import InputError


@dataclass
class ScanResult:
    """Per-row ``scores`` (higher = more suspicious) and the ``flagged`` rows of one method."""

    method: str
    scores: np.ndarray
    flagged: np.ndarray  # bool per row
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.flagged)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_flagged": int(self.flagged.sum()),
            "params": self.params,
            "per_class": {str(k): v for k, v in self.per_class.items()},
        }


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) == 0:
        raise InputError(f"need (N, D) features and N labels, got {f.shape} and {y.shape}")
    if y.dtype.kind not in "iu":
        raise InputError("labels must be integers")
    if not np.isfinite(f).all():
        raise InputError("features contain NaN or Inf")
    return f, y.astype(np.int64)


def spectral_signatures(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    rate: float,
    factor: float = 1.5,
    classes: list[int] | None = None,
) -> ScanResult:
    """Tran et al. 2018 (module docstring). ``classes`` limits removal to those classes."""
    f, y = _check(features, labels)
    if not 0 < rate < 1 or factor <= 0:
        raise InputError(f"rate must lie in (0, 1) and factor be > 0, got {rate}, {factor}")
    scores = np.zeros(len(y))
    flagged = np.zeros(len(y), dtype=bool)
    per_class: dict[int, dict[str, Any]] = {}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        r = f[idx] - f[idx].mean(axis=0)
        _, s, vt = np.linalg.svd(r, full_matrices=False)
        sc = (r @ vt[0]) ** 2
        scores[idx] = sc / (np.median(sc) + 1e-12)  # comparable across classes
        k = min(len(idx), math.ceil(factor * rate * len(idx)))
        if classes is None or int(c) in classes:
            flagged[idx[np.argsort(-sc, kind="stable")[:k]]] = True
        per_class[int(c)] = {"n": len(idx), "removed": k, "top_singular_value": float(s[0])}
    return ScanResult(
        "spectral-signatures", scores, flagged, per_class,
        {"rate": rate, "factor": factor, "classes": classes},
    )  # fmt: skip


def activation_clustering(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    x: np.ndarray | None = None,
    dims: int = 10,
    reduce: str = "pca",
    max_share: float = 0.45,
    min_silhouette: float = 0.15,
    max_fit_rows: int = 5000,
    seed: int = 0,
) -> ScanResult:
    """Chen et al. 2019 (module docstring). Row score: its silhouette value when it lies in a
    flagged class's smaller cluster, else 0.

    With the inputs ``x`` the class decision is the paper's *exclusionary reclassification*:
    a logistic regression on the raw inputs is fitted without the smaller cluster (at most
    ``max_fit_rows`` rows) and then classifies it; the cluster is poisoned when more of its rows
    go to one other class than stay in their own (their raw content belongs elsewhere: relabelled
    rows). Without ``x`` the decision is the size and silhouette rule alone, which flags natural
    sub-styles of clean classes far more often."""
    from sklearn.metrics import silhouette_samples

    f, y = _check(features, labels)
    xf = None
    if x is not None:
        xf = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if len(xf) != len(y) or not np.isfinite(xf).all():
            raise InputError("x must hold one finite input per label")
    if reduce not in ("pca", "ica"):
        raise InputError(f"reduce must be 'pca' or 'ica', got {reduce!r}")
    scores = np.zeros(len(y))
    flagged = np.zeros(len(y), dtype=bool)
    per_class: dict[int, dict[str, Any]] = {}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 4:
            continue
        z, lab = _two_clusters(f[idx], dims, reduce, seed)
        sizes = np.bincount(lab, minlength=2)
        if sizes.min() == 0:
            continue
        small = int(np.argmin(sizes))
        share = float(sizes[small] / len(idx))
        sil = silhouette_samples(z, lab)
        sil_mean = float(sil.mean())
        in_small = lab == small
        info: dict[str, Any] = {}
        if x is None:
            poisoned = share <= max_share and sil_mean >= min_silhouette
        elif share <= max_share and xf is not None:
            own, other, other_class = _reclassify(xf, y, idx[in_small], int(c), max_fit_rows, seed)
            poisoned = other > own
            info = {"reclassified_own": own, "reclassified_other": other,
                    "reclassified_to": other_class}  # fmt: skip
        else:
            poisoned = False
        if poisoned:
            flagged[idx[in_small]] = True
            scores[idx[in_small]] = np.maximum(sil[in_small], 1e-6)
        per_class[int(c)] = {
            "n": len(idx),
            "smaller_cluster_share": share,
            "silhouette": sil_mean,
            "poisoned": poisoned,
            **info,
        }
    return ScanResult(
        "activation-clustering", scores, flagged, per_class,
        {"dims": dims, "reduce": reduce, "max_share": max_share,
         "min_silhouette": min_silhouette, "seed": seed},
    )  # fmt: skip


def _two_clusters(fc: np.ndarray, dims: int, reduce: str, seed: int) -> tuple[Any, np.ndarray]:
    """One class's features reduced (PCA or ICA) to ``dims`` and split by 2-means."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA

    d = max(1, min(dims, fc.shape[1], len(fc) - 1))
    if reduce == "ica":
        z = FastICA(n_components=d, random_state=seed, max_iter=500).fit_transform(fc)
    else:
        z = PCA(n_components=d, random_state=seed).fit_transform(fc)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
    return z, km.labels_


def _reclassify(
    x: np.ndarray, y: np.ndarray, suspect: np.ndarray, c: int, max_rows: int, seed: int
) -> tuple[int, int, int | None]:
    """Exclusionary reclassification (Chen et al. 2019): fit on everything but ``suspect``,
    classify ``suspect``; return (rows kept in class ``c``, rows of the most common other
    class, that class)."""
    from sklearn.linear_model import LogisticRegression

    rest = np.setdiff1d(np.arange(len(y)), suspect)
    rng = np.random.default_rng(seed)
    if len(rest) > max_rows:
        rest = np.sort(rng.choice(rest, size=max_rows, replace=False))
    if len(np.unique(y[rest])) < 2:
        return len(suspect), 0, None
    clf = LogisticRegression(max_iter=300).fit(x[rest], y[rest])
    pred = clf.predict(x[suspect])
    own = int((pred == c).sum())
    others = pred[pred != c]
    if len(others) == 0:
        return own, 0, None
    vals, counts = np.unique(others, return_counts=True)
    j = int(np.argmax(counts))
    return own, int(counts[j]), int(vals[j])


def label_noise(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> ScanResult:
    """Confident-learning check (module docstring). Row score: 1 - p(given label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y = _check(features, labels)
    classes, counts = np.unique(y, return_counts=True)
    k = int(min(folds, counts.min()))
    if k < 2 or len(classes) < 2:
        raise InputError("label-noise check needs at least 2 classes with 2 rows each")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, f, y, cv=cv, method="predict_proba")
    col = {int(c): i for i, c in enumerate(classes)}
    given = proba[np.arange(len(y)), [col[int(v)] for v in y]]
    thr = np.array([proba[y == c, col[int(c)]].mean() for c in classes])
    above = proba >= thr[None, :]
    above[np.arange(len(y)), [col[int(v)] for v in y]] = False
    flagged = (given < thr[[col[int(v)] for v in y]]) & above.any(axis=1)
    per_class = {int(c): {"self_confidence": float(thr[i])} for i, c in enumerate(classes)}
    return ScanResult("label-noise", 1.0 - given, flagged, per_class, {"folds": k, "seed": seed})


def near_duplicates(
    x: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float], tol: float = 0.01
) -> tuple[ScanResult, list[dict[str, Any]]]:
    """Pairs closer than ``tol`` (RMS per value / input range). Rows whose near-duplicate has
    another label are flagged; returns the result and the list of pairs."""
    from sklearn.neighbors import NearestNeighbors

    xf = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    f, y = _check(xf, labels)
    if tol < 0:
        raise InputError(f"tol must be >= 0, got {tol}")
    radius = tol * (bounds[1] - bounds[0]) * math.sqrt(f.shape[1])
    nn_ = NearestNeighbors(radius=radius).fit(f)
    dist, ind = nn_.radius_neighbors(f, return_distance=True, sort_results=True)
    pairs: list[dict[str, Any]] = []
    flagged = np.zeros(len(y), dtype=bool)
    scores = np.zeros(len(y))
    for i in range(len(y)):
        for d, j in zip(dist[i], ind[i], strict=True):
            if j <= i:
                continue
            same = bool(y[i] == y[j])
            pairs.append({"a": i, "b": int(j), "distance": float(d), "same_label": same})
            if not same:
                flagged[[i, j]] = True
                scores[[i, j]] = 1.0
    res = ScanResult(
        "near-duplicates", scores, flagged, {},
        {"tol": tol, "n_pairs": len(pairs),
         "n_conflicting_pairs": sum(not p["same_label"] for p in pairs)},
    )  # fmt: skip
    return res, pairs


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Precision, recall and false-positive rate of ``flagged`` rows against the true
    poisoned rows (both bool per row), with Clopper-Pearson intervals."""
    from advguard.stats import proportion

    f = np.asarray(flagged, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if f.shape != t.shape:
        raise InputError(f"flagged and truth must have the same length, got {f.shape}, {t.shape}")
    tp = int((f & t).sum())
    return {
        "precision": proportion(tp, int(f.sum())).model_dump(),
        "recall": proportion(tp, int(t.sum())).model_dump(),
        "false_positive_rate": proportion(int((f & ~t).sum()), int((~t).sum())).model_dump(),
        "true_positives": tp,
        "n_flagged": int(f.sum()),
        "n_poisoned": int(t.sum()),
    }


METHODS = ("activation-clustering", "spectral-signatures", "label-noise", "near-duplicates")


def scan_training_set(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    bounds: tuple[float, float],
    methods: tuple[str, ...] | list[str] = METHODS,
    remove: tuple[str, ...] | list[str] = ("activation-clustering",),
    rate: float = 0.05,
    truth: np.ndarray | None = None,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the chosen ``methods`` on a training set with ``model``'s penultimate features.

    Returns ``{"methods": {name: summary}, "scores": {name: array}, "flagged": {name: bool
    array}, "removed": bool array}`` where ``removed`` is the union of the ``remove`` methods'
    flags, plus precision/recall/FPR per method and for ``removed`` when ``truth`` (bool per
    row, e.g. from a poisoning manifest) is given.
    """
    from advguard.defenses.backdoor.features import penultimate_features

    unknown = [m for m in (*methods, *remove) if m not in METHODS]
    if unknown:
        raise InputError(f"unknown scan method(s) {unknown}; use {', '.join(METHODS)}")
    missing = [m for m in remove if m not in methods]
    if missing:
        raise InputError(f"cannot remove by {missing}: not among the methods run")
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y).astype(np.int64)
    if truth is not None and len(truth) != len(ya):
        raise InputError(f"the manifest describes {len(truth)} rows but the data has {len(ya)}")
    feats = penultimate_features(model, xa) if set(methods) - {"near-duplicates"} else None
    results: dict[str, ScanResult] = {}
    extra: dict[str, Any] = {}
    for i, m in enumerate(methods):
        if m == "activation-clustering":
            assert feats is not None
            results[m] = activation_clustering(feats, ya, x=xa, seed=seed)
        elif m == "spectral-signatures":
            assert feats is not None
            results[m] = spectral_signatures(feats, ya, rate=rate)
        elif m == "label-noise":
            assert feats is not None
            results[m] = label_noise(feats, ya, seed=seed)
        else:
            results[m], pairs = near_duplicates(xa, ya, bounds=bounds)
            extra["near_duplicate_pairs"] = pairs[:1000]
        if progress is not None:
            progress("scan", i + 1, len(methods))
    removed = np.zeros(len(ya), dtype=bool)
    for m in remove:
        removed |= results[m].flagged
    out: dict[str, Any] = {
        "methods": {k: r.summary() for k, r in results.items()},
        "scores": {k: r.scores for k, r in results.items()},
        "flagged": {k: r.flagged for k, r in results.items()},
        "removed": removed,
        "remove_methods": list(remove),
        **extra,
    }
    if truth is not None:
        t = np.asarray(truth, dtype=bool)
        for k, r in results.items():
            out["methods"][k]["against_manifest"] = precision_recall(r.flagged, t)
        out["removed_against_manifest"] = precision_recall(removed, t)
    return out
