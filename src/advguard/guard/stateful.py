"""Stateful query detectors: flag clients whose *sequence* of queries looks like an attack.

Black-box attacks need many queries, and those queries are unlike benign traffic:

* Query-based evasion attacks (Square, HopSkipJump, boundary and gradient-estimation attacks)
  send many near-copies of one image. :class:`KNNStatefulDetector` implements the stateful
  detection of Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks"
  (ACM SPAI 2020, arXiv:1907.05587): per client, keep a buffer of recent queries (in an
  encoder's feature space; default the flattened input, optionally a fixed random
  projection); for each new query compute the mean L2 distance to its ``k`` nearest
  buffered queries and flag the client when it falls below a threshold calibrated on benign
  traffic. As in the paper, the buffer is cleared after a detection. The paper trains a
  contrastive similarity encoder; here an encoder is any callable the caller supplies (the
  input space itself by default, which is what the paper's "no encoder" baseline does).
* Model extraction sends synthetic queries (perturbations of a few seeds, Jacobian-based
  augmentation). :class:`PRADADetector` implements PRADA, Juuti, Szyller, Marchal & Asokan,
  "PRADA: Protecting Against DNN Model Stealing Attacks" (IEEE EuroS&P 2019,
  arXiv:1805.02628), Algorithm 1: per client and per predicted class ``c`` keep a growing
  set ``G_c``; for each query compute its minimum L2 distance ``d_min`` to ``G_c``, append
  it to the client's distance list ``D``, and add the query to ``G_c`` only when
  ``d_min > T_c`` where ``T_c = max(T_c, mean(D_c) - std(D_c))`` over the distances of the
  set's members; once ``|D| >= min_queries`` (paper: 100), drop the outliers of ``D``
  (farther than 3 standard deviations from the mean) and flag the client when the
  Shapiro-Wilk statistic ``W`` of the rest is below ``delta``. Benign queries give roughly
  normal ``d_min``; synthetic ones give a few tight clusters (small steps around seeds) and
  large jumps between them.

Text models: queries are strings, which have no input space to measure distances in. The
built-in :class:`TextNgramEncoder` (spec key ``features: text-ngrams``; the guard picks it for
a text model) maps each string to L2-normalised counts of its hashed character 2-4-grams
(``char_wb``, scikit-learn's ``HashingVectorizer``: deterministic, nothing fitted), a fixed
``feature_dim`` (default 1024) float vector. A word or character edit of a text moves it a
short way in this space; unrelated messages lie far apart (on the 343 spamham texts every
nearest neighbour is at distance >= 0.77 with 1024 dimensions), so word and character attacks,
which query many near-copies of one text, are what Chen et al.'s detector catches.

Both implement :class:`StatefulDetector`: ``observe(client_id, x)`` with a batch
``(n, *input_shape)`` in raw input space (for text features: a 1-D batch of ``str``; rows
processed in order) returns a
:class:`StatefulVerdict` reflecting the client's state after the batch; flags are sticky
until ``reset(client_id)``. State is bounded: at most ``window`` stored queries per client
and ``max_clients`` clients (least recently seen evicted). A lock makes ``observe`` and
``reset`` thread-safe; features and predictions are computed outside it.

Neither detector survives an attacker who knows it: spreading queries over many client ids
(Sybils), or interleaving benign queries, evades both (Chen et al. sec. 6; PRADA sec. VI
discusses evasion). Natural-data extraction (Knockoff-style queries of distinct natural
images) looks exactly like benign traffic and is not detected by PRADA (Orekondy et al.
2019). See docs/guard-stateful.md for measured detection points.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from advguard.errors import InputError

#: A feature map: a numeric batch (or, with ``takes_text``, a list of strings) -> ``(n, d)``.
Encoder = Callable[[Any], np.ndarray]
Predict = Callable[[np.ndarray], np.ndarray]

MAX_CLIENT_ID = 256
MAX_BATCH = 10_000
MAX_WINDOW = 100_000
MAX_CLIENTS = 10_000_000
MAX_FEATURES = 1 << 20
MAX_TEXT_CHARS = 1 << 20

#: ``features`` values a spec may name (a fixed allow-list; code is never named by a spec).
FEATURES = ("input", "text-ngrams")


@dataclass(frozen=True)
class StatefulVerdict:
    """A client's state after one observed batch.

    ``flagged``: the client has been detected at some query since its last reset (sticky).
    ``score`` / ``threshold``: the detector's statistic for this batch (the most suspicious
    value over its rows: mean k-NN distance, or Shapiro-Wilk ``W``) and the value it is
    compared to; a client is detected when ``score < threshold``. ``score`` is ``inf`` when
    the statistic could not be computed yet (fewer than ``k`` / ``min_queries`` queries).
    ``queries_seen``: queries of this client since its last reset (or eviction).
    ``first_detection``: 1-based index of the query at which the client was first detected.
    """

    flagged: bool
    detector: str
    score: float
    threshold: float
    queries_seen: int
    detections: int = 0
    first_detection: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``score`` is None while it cannot be computed (instead of ``inf``)."""
        return {
            "flagged": self.flagged,
            "detector": self.detector,
            "score": self.score if math.isfinite(self.score) else None,
            "threshold": self.threshold,
            "queries_seen": self.queries_seen,
            "detections": self.detections,
            "first_detection": self.first_detection,
        }


@runtime_checkable
class StatefulDetector(Protocol):
    """What the guard calls for every answered batch of one client."""

    name: str

    def observe(self, client_id: str, x: np.ndarray) -> StatefulVerdict: ...

    def reset(self, client_id: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= int(v) <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _check_float(name: str, v: object, lo: float, hi: float) -> float:
    if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool):
        raise InputError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not (math.isfinite(f) and lo <= f <= hi):
        raise InputError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")
    return f


def _check_client(client_id: object) -> str:
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID:
        raise InputError(f"client_id must be a non-empty string of at most {MAX_CLIENT_ID} chars")
    return client_id


class TextNgramEncoder:
    """Strings -> L2-normalised hashed character n-gram counts, ``(n, feature_dim)`` float32.

    scikit-learn's ``HashingVectorizer`` with ``analyzer="char_wb"`` (n-grams inside word
    boundaries, padded with a space), ``ngram_range=(2, 4)``, lower-cased, non-negative counts
    (``alternate_sign=False``) hashed (MurmurHash3, fixed seed) into ``feature_dim`` buckets,
    then L2-normalised: deterministic across processes, nothing to fit. The L2 distance of two
    rows is in ``[0, sqrt(2)]``; 0 for texts with the same n-grams (the empty text is the zero
    vector). ``takes_text`` tells :class:`KNNStatefulDetector` / :class:`PRADADetector` that
    queries are strings.
    """

    takes_text = True
    ngram_range = (2, 4)

    def __init__(self, feature_dim: int = 1024) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.feature_dim = _check_int("feature_dim", feature_dim, 16, 65_536)
        self._vec = HashingVectorizer(
            analyzer="char_wb",
            ngram_range=self.ngram_range,
            n_features=self.feature_dim,
            alternate_sign=False,
            norm="l2",
            lowercase=True,
            dtype=np.float32,
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._vec.transform(list(texts)).toarray(), dtype=np.float32)

    def __repr__(self) -> str:
        return f"TextNgramEncoder(feature_dim={self.feature_dim})"


def _text_items(x: Any) -> list[str]:
    """A batch of strings (list, tuple or 1-D str/object array) as a checked list."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1 or x.dtype.kind not in "OU":
            raise InputError(
                f"these features (text-ngrams) take a 1-D batch of strings, got an array of "
                f"shape {x.shape} and dtype {x.dtype}"
            )
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        raise InputError(
            f"these features (text-ngrams) take a batch of strings, got {type(x).__name__}"
        )
    if len(x) > MAX_BATCH:
        raise InputError(f"at most {MAX_BATCH} queries per batch, got {len(x)}")
    for i, t in enumerate(x):
        if not isinstance(t, str):
            raise InputError(f"queries[{i}] is a {type(t).__name__}; text features take strings")
        if len(t) > MAX_TEXT_CHARS:
            raise InputError(f"queries[{i}] has {len(t)} characters; at most {MAX_TEXT_CHARS}")
    return list(x)


class _Features:
    """Raw batch -> float32 feature rows: encoder (or flatten), then optional projection.

    With an encoder that ``takes_text`` (:class:`TextNgramEncoder`) the batch is a sequence of
    strings; otherwise a numeric array ``(n, *input_shape)``.
    """

    def __init__(self, encoder: Encoder | None, projection_dim: int | None, seed: int) -> None:
        if encoder is not None and not callable(encoder):
            raise InputError(f"encoder must be callable, got {type(encoder).__name__}")
        self.encoder = encoder
        self.text = bool(getattr(encoder, "takes_text", False))
        self.projection_dim = projection_dim
        self.seed = seed
        self.input_shape: tuple[int, ...] | None = None
        self.dim: int | None = None
        self._proj: np.ndarray | None = None
        self._lock = threading.Lock()

    def prepare(self, x: Any) -> Any:
        """The checked batch: a list of ``str`` (text features) or a float32 array."""
        if self.text:
            return _text_items(x)
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception:
                raise InputError("queries must be an array (n, *input_shape)") from None
        if x.dtype.kind in "OUS":
            raise InputError(
                "queries are strings but this detector's features are numeric (a text model's "
                "stateful detectors use features: text-ngrams)"
            )
        if x.ndim < 2 or x.dtype.kind not in "fiu":
            raise InputError(f"queries must be a numeric batch (n, ...), got shape {x.shape}")
        if len(x) > MAX_BATCH:
            raise InputError(f"at most {MAX_BATCH} queries per batch, got {len(x)}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InputError("queries contain NaN or Inf")
        with self._lock:
            if self.input_shape is None:
                self.input_shape = tuple(x.shape[1:])
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"queries must have shape (n, {', '.join(map(str, self.input_shape))}), got "
                f"{x.shape}"
            )
        return x

    def __call__(self, x: Any) -> np.ndarray:
        return self.encode(self.prepare(x))

    def encode(self, x: Any) -> np.ndarray:
        """Feature rows of a batch checked by :meth:`prepare`."""
        if self.encoder is not None:
            f = np.asarray(self.encoder(x), dtype=np.float32)
            if f.ndim < 1 or len(f) != len(x) or not np.isfinite(f).all():
                raise InputError("the encoder must return finite features, one row per query")
            f = f.reshape(len(x), -1)
        else:
            f = x.reshape(len(x), -1)
        if f.shape[1] > MAX_FEATURES:
            raise InputError(f"{f.shape[1]} features per query; at most {MAX_FEATURES}")
        if self.projection_dim is not None:
            with self._lock:
                if self._proj is None:
                    rng = np.random.default_rng(self.seed)
                    self._proj = rng.normal(
                        0.0, 1.0 / math.sqrt(self.projection_dim), (f.shape[1], self.projection_dim)
                    ).astype(np.float32)
            if self._proj.shape[0] != f.shape[1]:
                raise InputError("feature dimension changed between queries")
            f = f @ self._proj
        return np.ascontiguousarray(f, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """``features`` (``input``, ``text-ngrams`` or ``encoder``: code given by the caller)
        and, for text n-grams, ``feature_dim``."""
        if self.encoder is None:
            return {"features": "input"}
        if isinstance(self.encoder, TextNgramEncoder):
            return {"features": "text-ngrams", "feature_dim": self.encoder.feature_dim}
        return {"features": "encoder"}


class _Clients:
    """client id -> state, least recently used evicted beyond ``max_clients``."""

    def __init__(self, max_clients: int, make: Callable[[], Any]) -> None:
        self.max_clients = max_clients
        self.make = make
        self.states: OrderedDict[str, Any] = OrderedDict()

    def get(self, client_id: str) -> Any:
        st = self.states.get(client_id)
        if st is None:
            st = self.make()
            self.states[client_id] = st
            while len(self.states) > self.max_clients:
                self.states.popitem(last=False)
        else:
            self.states.move_to_end(client_id)
        return st

    def drop(self, client_id: str) -> None:
        self.states.pop(client_id, None)

    def __len__(self) -> int:
        return len(self.states)


# ---------------------------------------------------------------------------------------------
# Chen, Carlini & Wagner 2020: k-nearest-neighbour distance to the client's recent queries
# ---------------------------------------------------------------------------------------------
@dataclass
class _KNNState:
    buffer: np.ndarray | None = None  # (window, d) ring buffer
    filled: int = 0
    pos: int = 0
    seen: int = 0
    detections: int = 0
    first_detection: int | None = None


class _PerClientDetector:
    """What both stateful detectors share: per-client state under one lock, ``reset``, the
    number of tracked clients, and the verdict built from a client's state."""

    name: str
    _clients: _Clients
    _lock: threading.Lock
    _features: _Features

    @property
    def takes_text(self) -> bool:
        """Whether queries are strings (text features) rather than numeric arrays."""
        return self._features.text

    def reset(self, client_id: str) -> None:
        with self._lock:
            self._clients.drop(_check_client(client_id))

    @property
    def clients(self) -> int:
        return len(self._clients)

    def _verdict(self, st: Any, score: float, threshold: float) -> StatefulVerdict:
        return StatefulVerdict(
            flagged=st.detections > 0,
            detector=self.name,
            score=score,
            threshold=threshold,
            queries_seen=st.seen,
            detections=st.detections,
            first_detection=st.first_detection,
        )


class KNNStatefulDetector(_PerClientDetector):
    """Stateful k-NN detector (Chen, Carlini & Wagner 2020; see the module docstring).

    Parameters
    ----------
    k:
        Neighbours averaged (paper: 50 on CIFAR-10). No score before ``k`` buffered queries.
    window:
        Recent queries kept per client (the buffer; oldest overwritten).
    threshold:
        Flag when the mean k-NN distance is strictly below it; ``None`` until
        :meth:`calibrate` sets it (``observe`` refuses to run uncalibrated).
    encoder:
        Callable ``(n, *input_shape) float32 -> (n, d)``; default the flattened input. A
        :class:`TextNgramEncoder` (or any encoder with ``takes_text = True``) takes a batch
        of strings instead.
    projection_dim:
        Optional fixed Gaussian random projection (Johnson-Lindenstrauss) of the features to
        this many dimensions, drawn once from ``seed``; bounds memory for large inputs.
    max_clients:
        Clients tracked; the least recently seen is forgotten beyond this.
    clear_on_detect:
        Clear the client's buffer after each detection (as in the paper), so repeated
        detections count separate attack phases.
    """

    name = "knn"

    def __init__(
        self,
        *,
        k: int = 50,
        window: int = 1000,
        threshold: float | None = None,
        encoder: Encoder | None = None,
        projection_dim: int | None = None,
        max_clients: int = 10_000,
        clear_on_detect: bool = True,
        seed: int = 0,
    ) -> None:
        self.window = _check_int("window", window, 2, MAX_WINDOW)
        self.k = _check_int("k", k, 1, self.window)
        self.threshold = (
            None if threshold is None else _check_float("threshold", threshold, 0, 1e12)
        )
        if projection_dim is not None:
            projection_dim = _check_int("projection_dim", projection_dim, 1, 65_536)
        self.max_clients = _check_int("max_clients", max_clients, 1, MAX_CLIENTS)
        self.clear_on_detect = bool(clear_on_detect)
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        self._features = _Features(encoder, projection_dim, self.seed)
        self._clients = _Clients(self.max_clients, _KNNState)
        self._lock = threading.Lock()
        self.calibration: dict[str, Any] | None = None

    # -- scoring --------------------------------------------------------------------------
    def _knn_mean(self, buf: np.ndarray, f: np.ndarray) -> float:
        d = np.sqrt(np.maximum(((buf - f) ** 2).sum(1), 0.0))
        k = self.k
        return float(np.partition(d, k - 1)[:k].mean()) if len(d) > k else float(d.mean())

    def stream_scores(self, x: np.ndarray) -> np.ndarray:
        """Mean k-NN distances of queries ``x`` sent in this order by one fresh client,
        without detections clearing the buffer (``nan`` for the first ``k`` queries)."""
        f = self._features(x)
        out = np.full(len(f), np.nan)
        for i in range(len(f)):
            if i >= self.k:
                out[i] = self._knn_mean(f[max(0, i - self.window) : i], f[i])
        return out

    def calibrate(self, benign_x: np.ndarray, fpr: float = 0.001, *, seed: int = 0) -> float:
        """Set ``threshold`` from benign traffic and return it.

        ``benign_x`` (shuffled with ``seed``) is replayed as one client's stream; the
        threshold is the lower split-conformal order statistic of its k-NN scores,
        ``s_(j)`` with ``j = floor((n + 1) * fpr)``, so a benign query is flagged with
        probability at most ``fpr`` (per query: a benign client sending ``N`` queries is
        flagged with probability up to about ``N * fpr``; choose ``fpr`` accordingly).
        Needs ``n >= 1 / fpr - 1`` scored queries (``len(benign_x) - k``). Use benign data
        at least as dense as real clients' streams (a longer stream gives closer neighbours
        and a more conservative threshold). With text features ``benign_x`` is a list of
        strings, as the guard sees them (after ``sanitize.text_normalize``).
        """
        fpr = _check_float("fpr", fpr, 1e-9, 0.5)
        if self._features.text:  # a batch of strings, kept as str objects
            items = _text_items(benign_x)
            x = np.empty(len(items), dtype=object)
            x[:] = items
        else:
            x = np.asarray(benign_x)
            if x.ndim < 2:
                raise InputError("benign_x must be a batch (n, *input_shape)")
        order = np.random.default_rng(seed).permutation(len(x))
        s = self.stream_scores(x[order])
        s = np.sort(s[~np.isnan(s)])
        j = math.floor((len(s) + 1) * fpr + 1e-9)
        if j < 1:
            raise InputError(
                f"calibrating at fpr={fpr:g} needs at least {math.ceil(1 / fpr - 1)} scored "
                f"benign queries (k={self.k} fewer than the samples), got {len(s)}"
            )
        self.threshold = float(s[j - 1])
        self.calibration = {
            "fpr_target": fpr,
            "n_scored": len(s),
            "rule": "j = floor((n + 1) * fpr); flag mean k-NN distance < s_(j)",
            "benign_score_quantiles": {
                q: float(np.quantile(s, float(q))) for q in ("0.001", "0.01", "0.1", "0.5")
            },
        }
        return self.threshold

    # -- protocol -----------------------------------------------------------------------
    def observe(self, client_id: str, x: np.ndarray) -> StatefulVerdict:
        client_id = _check_client(client_id)
        if self.threshold is None:
            raise InputError("the k-NN detector has no threshold; call calibrate(benign_x) first")
        f = self._features(x)
        thr = self.threshold
        best = math.inf
        with self._lock:
            st: _KNNState = self._clients.get(client_id)
            if st.buffer is None or st.buffer.shape[1] != f.shape[1]:
                st.buffer = np.zeros((self.window, f.shape[1]), dtype=np.float32)
                st.filled = st.pos = 0
            for row in f:
                st.seen += 1
                if st.filled >= self.k:
                    s = self._knn_mean(st.buffer[: st.filled], row)
                    best = min(best, s)
                    if s < thr:
                        st.detections += 1
                        if st.first_detection is None:
                            st.first_detection = st.seen
                        if self.clear_on_detect:
                            st.filled = st.pos = 0
                st.buffer[st.pos] = row
                st.pos = (st.pos + 1) % self.window
                st.filled = min(st.filled + 1, self.window)
            return self._verdict(st, best, thr)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "knn",
            "k": self.k,
            "window": self.window,
            "threshold": self.threshold,
            **self._features.describe(),
            "projection_dim": self._features.projection_dim,
            "max_clients": self.max_clients,
            "clear_on_detect": self.clear_on_detect,
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------
# PRADA (Juuti et al. 2019): normality of minimum distances to per-class growing sets
# ---------------------------------------------------------------------------------------------
@dataclass
class _PRADAState:
    sets: dict[int, list[np.ndarray]] = field(default_factory=dict)  # G_c
    set_dists: dict[int, list[float]] = field(default_factory=dict)  # D_{G_c}
    thresholds: dict[int, float] = field(default_factory=dict)  # T_c
    stored: int = 0
    dists: deque[float] = field(default_factory=deque)  # D
    seen: int = 0
    detections: int = 0
    first_detection: int | None = None


class PRADADetector(_PerClientDetector):
    """PRADA model-extraction detector (Juuti et al. 2019, Algorithm 1; module docstring).

    Parameters
    ----------
    delta:
        Flag when the Shapiro-Wilk ``W`` of the minimum distances is below it. The paper
        tunes it per dataset in about 0.90-0.96; default 0.95 (see docs/guard-stateful.md
        for the benign ``W`` measured on digits).
    min_queries:
        Distances collected before the test runs (paper: 100).
    predict:
        Callable ``(n, *input_shape) -> (n,)`` labels, the protected model's predictions
        (the paper's per-class growing sets). ``None``: one set for all queries.
    window:
        Queries kept in a client's growing sets, all classes together; once full, the sets
        stop growing (the paper's grow without bound).
    max_distances:
        Most recent minimum distances tested (Shapiro-Wilk is accurate up to 5000).
    encoder:
        Optional feature map (default: the input itself, as in the paper); a
        :class:`TextNgramEncoder` for strings.
    """

    name = "prada"

    def __init__(
        self,
        *,
        delta: float = 0.95,
        min_queries: int = 100,
        predict: Predict | None = None,
        window: int = 5000,
        max_distances: int = 5000,
        encoder: Encoder | None = None,
        max_clients: int = 10_000,
    ) -> None:
        self.delta = _check_float("delta", delta, 0.0, 1.0)
        self.max_distances = _check_int("max_distances", max_distances, 3, 5000)
        self.min_queries = _check_int("min_queries", min_queries, 3, self.max_distances)
        if predict is not None and not callable(predict):
            raise InputError(f"predict must be callable, got {type(predict).__name__}")
        self.predict = predict
        self.window = _check_int("window", window, 1, MAX_WINDOW)
        self.max_clients = _check_int("max_clients", max_clients, 1, MAX_CLIENTS)
        self._features = _Features(encoder, None, 0)
        self._clients = _Clients(
            self.max_clients, lambda: _PRADAState(dists=deque(maxlen=self.max_distances))
        )
        self._lock = threading.Lock()

    def _labels(self, x: Any, n: int) -> np.ndarray:
        if self.predict is None:
            return np.zeros(n, dtype=np.int64)
        y = np.asarray(self.predict(x)).reshape(-1)
        if len(y) != n or y.dtype.kind not in "iu":
            raise InputError("predict must return one integer label per query")
        return y.astype(np.int64)

    @staticmethod
    def shapiro_w(dists: np.ndarray) -> float:
        """PRADA's statistic: Shapiro-Wilk ``W`` of ``dists`` without its outliers (values
        more than 3 standard deviations from the mean); 1.0 when all remaining are equal."""
        from scipy.stats import shapiro

        d = np.asarray(dists, dtype=np.float64)
        mu, sd = d.mean(), d.std()
        if sd > 0:
            d = d[np.abs(d - mu) <= 3 * sd]
        if len(d) < 3 or np.ptp(d) == 0:
            return 0.0 if np.ptp(np.asarray(dists)) > 0 else 1.0
        return float(shapiro(d).statistic)

    def observe(self, client_id: str, x: np.ndarray) -> StatefulVerdict:
        client_id = _check_client(client_id)
        batch = self._features.prepare(x)
        f = self._features.encode(batch)
        labels = self._labels(batch, len(f))
        best = math.inf
        with self._lock:
            st: _PRADAState = self._clients.get(client_id)
            for row, c in zip(f, labels, strict=True):
                st.seen += 1
                c = int(c)
                members = st.sets.get(c)
                if not members:
                    if st.stored < self.window:
                        st.sets[c] = [row]
                        st.set_dists[c] = []
                        st.thresholds[c] = 0.0
                        st.stored += 1
                    continue
                d_min = float(np.sqrt(((np.stack(members) - row) ** 2).sum(1)).min())
                st.dists.append(d_min)
                if d_min > st.thresholds[c] and st.stored < self.window:
                    members.append(row)
                    st.stored += 1
                    ds = st.set_dists[c]
                    ds.append(d_min)
                    st.thresholds[c] = max(st.thresholds[c], float(np.mean(ds) - np.std(ds)))
                if len(st.dists) >= self.min_queries:
                    w = self.shapiro_w(np.fromiter(st.dists, dtype=np.float64))
                    best = min(best, w)
                    if w < self.delta:
                        st.detections += 1
                        if st.first_detection is None:
                            st.first_detection = st.seen
            return self._verdict(st, best, self.delta)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "prada",
            **self._features.describe(),
            "delta": self.delta,
            "min_queries": self.min_queries,
            "window": self.window,
            "max_distances": self.max_distances,
            "max_clients": self.max_clients,
        }


# ---------------------------------------------------------------------------------------------
# construction from configuration
# ---------------------------------------------------------------------------------------------
_SPEC_KEYS: dict[str, set[str]] = {
    "knn": {
        "kind", "k", "window", "threshold", "projection_dim", "max_clients",
        "clear_on_detect", "seed", "features", "feature_dim",
    },
    "prada": {
        "kind", "delta", "min_queries", "window", "max_distances", "max_clients", "features",
        "feature_dim",
    },
}  # fmt: skip


def spec_features(spec: dict[str, Any]) -> str | None:
    """The spec's ``features`` (None when absent), checked against :data:`FEATURES`, with
    ``feature_dim`` allowed only for ``text-ngrams``."""
    feats = spec.get("features")
    if feats is not None and (not isinstance(feats, str) or feats not in FEATURES):
        raise InputError(
            f"unknown features {str(feats)[:40]!r} for a stateful detector; use one of "
            f"{', '.join(FEATURES)}"
        )
    if "feature_dim" in spec and feats != "text-ngrams":
        raise InputError("feature_dim applies to features: text-ngrams only")
    return feats


def build_stateful(
    spec: dict[str, Any], *, encoder: Encoder | None = None, predict: Predict | None = None
) -> StatefulDetector:
    """A stateful detector from configuration data (kind from the fixed allow-list).

    ``{"kind": "knn", "k": 50, "window": 1000, "threshold": 2.1}`` or
    ``{"kind": "prada", "delta": 0.95, "min_queries": 100}``; other keys are refused, every
    value is type- and range-checked. Code never comes from the spec: the optional
    ``encoder`` (k-NN and PRADA features) and ``predict`` (PRADA's per-class sets; the
    guard passes the protected model's ``predict``) are given by the caller. The spec may
    select built-in features from :data:`FEATURES`: ``features: input`` (the default: the
    input itself, or the caller's ``encoder``) or ``features: text-ngrams`` (a
    :class:`TextNgramEncoder` of ``feature_dim`` dimensions, default 1024, for text models;
    then no ``encoder`` may be given).
    """
    if not isinstance(spec, dict):
        raise InputError(f"a stateful detector spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _SPEC_KEYS:
        raise InputError(
            f"unknown stateful detector kind {str(kind)[:40]!r}; use one of {', '.join(_SPEC_KEYS)}"
        )
    extra = sorted(str(k)[:40] for k in set(spec) - _SPEC_KEYS[kind])
    if extra:
        raise InputError(f"unknown key(s) for a {kind} detector: {', '.join(extra)}")
    feats = spec_features(spec)
    args = {k: v for k, v in spec.items() if k not in ("kind", "features", "feature_dim")}
    if "clear_on_detect" in args and not isinstance(args["clear_on_detect"], bool):
        raise InputError("clear_on_detect must be true or false")
    if feats == "text-ngrams":
        if encoder is not None:
            raise InputError(
                "features: text-ngrams and an encoder given by code exclude each other"
            )
        encoder = TextNgramEncoder(spec.get("feature_dim", 1024))
    if kind == "knn":
        return KNNStatefulDetector(**args, encoder=encoder)
    return PRADADetector(**args, encoder=encoder, predict=predict)


__all__ = [
    "FEATURES",
    "KNNStatefulDetector",
    "PRADADetector",
    "StatefulDetector",
    "StatefulVerdict",
    "TextNgramEncoder",
    "build_stateful",
    "spec_features",
]
