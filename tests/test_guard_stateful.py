"""Stateful query detectors against advguard's own black-box attacks on the digits CNN.

Every query an attack makes goes through :class:`Observed`, an adapter that forwards each
batch to ``detector.observe(client_id, batch)`` before answering (what the guard does). The
k-NN detector (Chen et al. 2020) is calibrated on the 1400 training images replayed as one
stream; clients replay the 397 test images. Measured detection points are in
docs/guard-stateful.md.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from advguard.attacks import HopSkipJump, SquareAttack
from advguard.attacks.transfer import train_surrogate
from advguard.errors import InputError
from advguard.guard.stateful import (
    KNNStatefulDetector,
    PRADADetector,
    StatefulDetector,
    StatefulVerdict,
    build_stateful,
)
from advguard.models.base import ClassifierBase

K = 50


class Observed(ClassifierBase):
    """``inner`` with every query batch shown to a stateful detector as one client."""

    def __init__(self, inner, detector: StatefulDetector, client_id: str) -> None:
        super().__init__(
            num_classes=inner.num_classes, input_shape=inner.input_shape, bounds=inner.bounds
        )
        self.inner, self.detector, self.client_id = inner, detector, client_id
        self.queries = inner.queries
        self.verdict: StatefulVerdict | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.verdict = self.detector.observe(self.client_id, x.detach().cpu().numpy())
        return self.inner.logits(x)


@pytest.fixture(scope="module")
def knn(digits_split) -> KNNStatefulDetector:
    x_tr, _, _, _ = digits_split
    det = KNNStatefulDetector(k=K, window=1000)
    det.calibrate(x_tr, fpr=0.001)  # measured threshold 1.146 (benign test streams: >= 1.57)
    return det


@pytest.fixture(scope="module")
def prada(digits_module) -> PRADADetector:
    from advguard.models import TorchClassifier

    model = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    return PRADADetector(delta=0.95, min_queries=100, predict=model.predict)


def test_benign_clients_trip_no_detector(digits_split, knn, prada):
    """20 clients, each all 397 test images in its own random order, batches of 16."""
    _, _, x_te, _ = digits_split
    rng = np.random.default_rng(1)
    dists = []
    for c in range(20):
        order = rng.permutation(len(x_te))
        for det in (knn, prada):
            for i in range(0, len(order), 16):
                v = det.observe(f"benign-{c}", x_te[order[i : i + 16]])
            assert not v.flagged, (c, v)
            assert v.queries_seen == len(x_te)
        dists.append(knn.stream_scores(x_te[order])[K:].min())
    assert min(dists) > knn.threshold  # the margin: measured 1.57 vs 1.146


def _attack(attack, model, det, client, x, y, eps):
    spy = Observed(model, det, client)
    result = attack(spy, x, y, epsilon=eps)
    return spy.verdict, result


@pytest.mark.parametrize("image", [0, 1])
def test_square_attack_detected_before_500_queries(digits_split, digits_model, knn, image):
    _, _, x_te, y_te = digits_split
    v, _ = _attack(
        SquareAttack(norm="linf", max_queries=500, seed=image),
        digits_model, knn, f"square-{image}", x_te[image : image + 1], y_te[image : image + 1], 0.1,
    )  # fmt: skip
    assert v is not None and v.flagged
    assert v.first_detection is not None and v.first_detection < 500
    # the first query the detector can score (k previous ones needed): measured 51
    assert v.first_detection == K + 1


@pytest.mark.parametrize("image", [0, 1])
def test_hopskipjump_detected_before_500_queries(digits_split, digits_model, knn, image):
    _, _, x_te, y_te = digits_split
    v, _ = _attack(
        HopSkipJump(norm="l2", max_queries=500, seed=image),
        digits_model, knn, f"hsj-{image}", x_te[image : image + 1], y_te[image : image + 1], None,
    )  # fmt: skip
    assert v is not None and v.flagged and v.first_detection is not None
    assert v.first_detection < 500  # measured 51
    assert v.detections > 1  # the buffer is cleared after a detection and refills


def test_square_attack_faster_than_k_queries_is_missed(digits_split, digits_model, knn):
    """The limit of the method: Square at Linf 0.2 fools the CNN on test image 1 in 29
    queries, fewer than k = 50, before any k-NN score exists."""
    _, _, x_te, y_te = digits_split
    v, res = _attack(
        SquareAttack(norm="linf", max_queries=500),
        digits_model, knn, "square-fast", x_te[1:2], y_te[1:2], 0.2,
    )  # fmt: skip
    assert bool(res.success[0]) and v is not None and v.queries_seen <= K
    assert not v.flagged and v.score == float("inf")


def _jacobian_augmentation(spy, seeds, rounds, lam=0.1):
    """Papernot et al. 2017 substitute training: label seeds with the target, then each
    round add ``x + lam * sign(d surrogate_logit_y / dx)`` labelled by the target."""
    sur, _ = train_surrogate(seeds, target=spy, holdout=0.0, epochs=5, seed=0)
    xs, ys = seeds, spy.inner.predict(seeds)  # the labels train_surrogate paid for
    for _ in range(rounds):
        xt = torch.tensor(xs, requires_grad=True)
        with torch.enable_grad():
            z = sur.forward(xt)
            (g,) = torch.autograd.grad(z.gather(1, torch.tensor(ys)[:, None]).sum(), xt)
        new = np.clip(xs + lam * np.sign(g.numpy()), 0.0, 1.0).astype(np.float32)
        xs, ys = np.concatenate([xs, new]), np.concatenate([ys, spy.predict(new)])
        sur, _ = train_surrogate(
            xs, ys, bounds=(0.0, 1.0), num_classes=10, holdout=0.0, epochs=5, seed=0
        )
    return sur


def test_prada_detects_jacobian_extraction_before_2000_queries(digits_split, digits_model, prada):
    x_tr, y_tr, _, _ = digits_split
    seeds = x_tr[np.concatenate([np.where(y_tr == c)[0][:2] for c in range(10)])]
    spy = Observed(digits_model, prada, "extraction-jbda")
    _jacobian_augmentation(spy, seeds, rounds=3)  # 20 seeds, doubled 3 times: 160 queries
    v = spy.verdict
    assert v is not None and v.queries_seen == 160
    assert v.flagged and v.first_detection is not None
    assert v.first_detection < 2000  # measured 110


def test_prada_misses_natural_data_extraction(digits_split, digits_model, prada):
    """Documented limit: labelling 1000 distinct natural images (train_surrogate on public
    data) looks like benign traffic; PRADA's W stays above delta (measured 0.985)."""
    x_tr, _, _, _ = digits_split
    spy = Observed(digits_model, prada, "extraction-natural")
    train_surrogate(x_tr[:1000], target=spy, holdout=0.0, epochs=1)
    assert spy.verdict is not None and spy.verdict.queries_seen == 1000
    assert not spy.verdict.flagged


# --------------------------------------------------------------------------- state and memory
def test_window_bounds_memory_and_lru_evicts_clients(digits_split):
    _, _, x_te, _ = digits_split
    a, others = x_te[:1], x_te[1:4]
    for window, flagged in ((3, False), (5, True)):
        det = KNNStatefulDetector(k=1, window=window, threshold=0.5, max_clients=2)
        det.observe("c", a)
        det.observe("c", others)  # three far images push `a` out of a window of 3
        v = det.observe("c", a)
        assert v.flagged is flagged and v.queries_seen == 5
    det = KNNStatefulDetector(k=1, window=5, threshold=0.5, max_clients=2)
    det.observe("c1", a)
    det.observe("c2", x_te[5:6])
    det.observe("c1", x_te[6:7])  # c1 most recently seen; c3 evicts c2
    det.observe("c3", x_te[7:8])
    assert det.clients == 2
    assert det.observe("c1", a).flagged  # c1 still remembers its first query
    assert det.observe("c2", a).queries_seen == 1  # forgotten


def test_reset_and_sticky_flag(digits_split):
    _, _, x_te, _ = digits_split
    det = KNNStatefulDetector(k=2, window=10, threshold=0.5)
    v = det.observe("c", np.repeat(x_te[:1], 4, axis=0))
    assert v.flagged and v.first_detection == 3 and v.score == 0.0
    v = det.observe("c", x_te[10:11])
    assert v.flagged and v.queries_seen == 5  # sticky until reset
    det.reset("c")
    v = det.observe("c", x_te[10:11])
    assert not v.flagged and v.queries_seen == 1 and v.score == float("inf")
    assert json.loads(json.dumps(v.as_dict(), allow_nan=False))["score"] is None


def test_observe_is_thread_safe(digits_split):
    _, _, x_te, _ = digits_split
    for det in (KNNStatefulDetector(k=5, window=50, threshold=1e-6), PRADADetector()):
        errors: list[BaseException] = []

        def work(t: int, det=det, errors=errors) -> None:
            try:
                for i in range(40):
                    det.observe("shared", x_te[(t * 40 + i) % len(x_te)][None])
                    det.observe(f"own-{t}", x_te[i][None])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert det.observe("shared", x_te[:1]).queries_seen == 6 * 40 + 1
        assert all(det.observe(f"own-{t}", x_te[:1]).queries_seen == 41 for t in range(6))


def test_random_projection_and_encoder(digits_split):
    _, _, x_te, _ = digits_split
    det = KNNStatefulDetector(k=3, window=20, projection_dim=16, threshold=0.1)
    v = det.observe("c", np.repeat(x_te[:1], 5, axis=0))
    assert v.flagged and v.score == 0.0
    enc = KNNStatefulDetector(
        k=1, window=5, threshold=0.01, encoder=lambda x: x.reshape(len(x), -1).mean(1)
    )
    enc.observe("c", x_te[:1])
    expected = abs(float(x_te[0].mean()) - float(x_te[1].mean()))
    assert enc.observe("c", x_te[1:2]).score == pytest.approx(expected, rel=1e-5)


def test_prada_statistic():
    rng = np.random.default_rng(0)
    assert PRADADetector.shapiro_w(rng.normal(5, 1, 500)) > 0.99
    clusters = np.concatenate([rng.normal(0.8, 0.01, 250), rng.normal(6.0, 0.5, 250)])
    assert PRADADetector.shapiro_w(clusters) < 0.8


# --------------------------------------------------------------------------- validation
def test_build_stateful_from_spec():
    d = build_stateful({"kind": "knn", "k": 50, "window": 1000, "threshold": 1.2})
    assert isinstance(d, KNNStatefulDetector) and isinstance(d, StatefulDetector)
    assert d.params()["k"] == 50 and d.threshold == 1.2
    p = build_stateful({"kind": "prada", "delta": 0.95, "min_queries": 100})
    assert isinstance(p, PRADADetector) and p.delta == 0.95


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "advguard.guard.stateful:PRADADetector"}, "unknown stateful detector kind"),
        ({"k": 5}, "unknown stateful detector kind"),
        ({"kind": "knn", "encoder": "os:system"}, "unknown key"),
        ({"kind": "knn", "k": True}, "k must be an integer"),
        ({"kind": "knn", "k": 2000, "window": 1000}, "k must be an integer"),
        ({"kind": "knn", "window": 10**9}, "window must be an integer"),
        ({"kind": "knn", "threshold": float("nan")}, "threshold must be a finite"),
        ({"kind": "knn", "clear_on_detect": "yes"}, "clear_on_detect"),
        ({"kind": "prada", "delta": 1.5}, "delta must be"),
        ({"kind": "prada", "min_queries": 2}, "min_queries"),
        ({"kind": "prada", "max_distances": 10**6}, "max_distances"),
        ("knn", "must be a mapping"),
    ],
)
def test_build_stateful_refuses_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        build_stateful(spec)  # type: ignore[arg-type]


def test_observe_validates_inputs(digits_split):
    _, _, x_te, _ = digits_split
    det = KNNStatefulDetector(k=2, window=10)
    with pytest.raises(InputError, match="no threshold"):
        det.observe("c", x_te[:1])
    det.threshold = 0.5
    bad = x_te[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    for client, x, message in [
        ("", x_te[:1], "client_id"),
        ("x" * 300, x_te[:1], "client_id"),
        ("c", bad, "NaN or Inf"),
        ("c", np.zeros(3, dtype=np.float32), "numeric batch"),
        ("c", np.zeros((10_001, 1, 8, 8), dtype=np.float32), "at most"),
    ]:
        with pytest.raises(InputError, match=message):
            det.observe(client, x)
    det.observe("c", x_te[:1])
    with pytest.raises(InputError, match="must have shape"):
        det.observe("c", np.zeros((1, 64), dtype=np.float32))
    p = PRADADetector(predict=lambda x: np.zeros(len(x) + 1, dtype=np.int64))
    with pytest.raises(InputError, match="one integer label per query"):
        p.observe("c", x_te[:2])


def test_knn_calibration_rule(digits_split):
    x_tr, _, _, _ = digits_split
    det = KNNStatefulDetector(k=10, window=200)
    thr = det.calibrate(x_tr[:410], fpr=0.01)  # 400 scored queries: s_(4)
    s = np.sort(det.stream_scores(x_tr[np.random.default_rng(0).permutation(410)])[10:])
    assert thr == pytest.approx(s[3])
    with pytest.raises(InputError, match="needs at least"):
        det.calibrate(x_tr[:100], fpr=0.001)


def test_a_knn_detector_without_threshold_is_refused_when_the_guard_is_built():
    from advguard.guard.config import GuardConfig
    from advguard.guard.pipeline import build_stateful_detectors
    from advguard.guard.serving import ServedModel
    from advguard.models import TorchClassifier

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    clf = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    model = ServedModel("digits", "1", clf)
    cfg = GuardConfig.model_validate({"stateful": [{"name": "q", "spec": {"kind": "knn"}}]})
    with pytest.raises(InputError, match="needs a 'threshold'") as e:
        build_stateful_detectors(cfg, model)
    assert "\n" not in str(e.value)
    ok = GuardConfig.model_validate(
        {"stateful": [{"name": "q", "spec": {"kind": "knn", "threshold": 0.5}}]}
    )
    assert len(build_stateful_detectors(ok, model)) == 1
