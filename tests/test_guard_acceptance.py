"""Acceptance of the stateful detection, end to end through a real guard server.

A guard on an ephemeral 127.0.0.1 port (uvicorn thread, temporary SQLite store, one API key
per client) serves the digits CNN with the k-NN detector (Chen et al. 2020, calibrated on the
1400 training images: benign traffic held out from the replay, never the attack) and PRADA
(Juuti et al. 2019), both set to block. Over HTTP with advguard's HttpClassifier, at the same
time: Square (Linf 0.1) and HopSkipJump attack test images one after another, Jacobian-based
extraction (``jacobian_augmentation``, label mode) steals the model, and 20 benign clients
replay all 397 test images each in their own random order in requests of 1-32 rows.

The targets (the guard issue): both evasion attacks detected and blocked (403
client-blocked) before 500 queries, the extraction before 2000, and fewer than 1% of benign
clients flagged. Measured numbers are in docs/guard-stateful.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from advguard.guard.drill import DetectionLog, earliest
from advguard.guard.gameday import GamedayConfig, GamedayData, run_gameday, seed_set
from advguard.models import HttpClassifier
from advguard.models.http_model import EndpointResponseError
from guard_helpers import TickClock


@pytest.fixture(scope="module")
def report(digits_split, digits_module):
    from advguard.models import TorchClassifier

    x_tr, y_tr, x_te, y_te = digits_split
    model = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    data = GamedayData(model, x_tr, x_te, y_te, seed_set(x_tr, y_tr, 2), "digits-cnn")
    return run_gameday(data, GamedayConfig(attack_images=5), clock=TickClock())


def _attacker(report, name):
    (row,) = [a for a in report.attackers if a["name"] == name]
    return row


@pytest.mark.parametrize("name", ["square", "hopskipjump"])
def test_evasion_attacks_are_detected_and_blocked_before_500_queries(report, name):
    a = _attacker(report, name)
    assert a["detected"] and a["detector"] == "knn"
    # the k-NN score exists from query k + 1 = 51 on; measured: detected at 51
    assert a["queries_to_detect"] == 51
    assert a["mitigated"] and a["stopped"] == "blocked" and a["block_persists"]
    assert a["queries_answered_before_block"] < a["queries_to_detect"] < 500
    # detection is logged on the server before the attacker reads its 403
    assert 0 < a["seconds_to_detect"] < a["seconds_to_mitigate"]


def test_extraction_is_detected_and_blocked_before_2000_queries(report):
    a = _attacker(report, "jacobian-extraction")
    assert a["detected"] and a["mitigated"] and a["block_persists"]
    assert a["detector"] == "prada"  # measured: query 110 (rounds of 20, 20, 40, 80 queries)
    assert a["queries_to_detect"] < 2000
    assert a["queries_answered_before_block"] < a["queries_to_detect"]
    assert 0 < a["seconds_to_detect"] < a["seconds_to_mitigate"]


def test_benign_clients_trip_no_detector(report):
    b = report.benign
    assert b["clients"] == 20 and b["rows_answered"] == 20 * 397
    assert b["flagged_clients"] == 0 and b["flag_rate"] < 0.01
    assert b["blocked_clients"] == 0 and b["errors"] == 0
    assert report.passed, [c for c in report.checks if not c.passed]
    assert "agk_" not in json.dumps(report.to_dict())  # key ids only, never an API key
    cal = report.setup["detectors"]["knn"]["calibration"]
    assert cal["n_scored"] == 1400 - 50 and cal["fpr_target"] == 0.001


def test_detection_log_keeps_the_first_flag():
    class Flags:
        def __init__(self) -> None:
            self.n = 0

        def observe(self, client_id, x):
            from advguard.guard.stateful import StatefulVerdict

            self.n += len(x)
            return StatefulVerdict(self.n >= 3, "f", 0.5, 1.0, self.n, int(self.n >= 3), 3)

    clock = TickClock()
    log = DetectionLog("f", Flags(), clock)
    log.observe("c", np.zeros((2, 1)))
    assert log.first("c") is None and earliest([log], "c") is None
    log.observe("c", np.zeros((2, 1)))
    log.observe("c", np.zeros((2, 1)))
    f = log.first("c")
    assert f is not None and f.query == 3 and f.queries_seen == 4 and f.at == 0.0
    assert earliest([log], "c") == f


def test_http_classifier_reads_label_only_answers(tmp_path, digits_split, digits_module):
    """The guard's label-only output hardening answers only ``labels``; HttpClassifier with
    ``output="labels"`` turns them into one-hot rows (what a label-only extraction gets)."""
    from advguard.guard.app import create_app
    from advguard.guard.auth import create_key
    from guard_helpers import ServerThread, make_guard

    _, _, x_te, _ = digits_split
    guard = make_guard(tmp_path, digits_module, cfg={"output": {"mode": "label"}})
    key = create_key(guard.store, "label-client").key
    with ServerThread(create_app(guard)) as srv:
        url = f"{srv.url}/v1/models/digits/predict"
        kw = dict(input_shape=(1, 8, 8), num_classes=10, api_key=key, retries=0, proxies={})
        labels = HttpClassifier(url, output="labels", **kw).query_scores(x_te[:7])
        with pytest.raises(EndpointResponseError, match="no field 'probabilities'"):
            HttpClassifier(url, **kw).query_scores(x_te[:2])
    guard.close()
    expected = guard.model.classifier.predict(x_te[:7])
    assert labels.shape == (7, 10) and (labels.sum(1) == 1).all()
    assert labels.argmax(1).tolist() == expected.tolist()


def test_the_guard_budget_stops_knockoff_extraction(tmp_path, digits_split, digits_module):
    """Knockoff Nets through the guard with a budget of 300 rows: the attacker's 5000-query
    plan ends with 429 budget-exhausted, having been answered at most 300 rows."""
    from advguard.attacks.extraction import knockoff
    from advguard.guard.app import create_app
    from advguard.guard.auth import create_key
    from advguard.models.http_model import EndpointError
    from guard_helpers import ServerThread, make_guard

    x_tr, _, _, _ = digits_split
    limits = {"budget": 300, "rate": 1000.0, "burst": 1000}
    guard = make_guard(tmp_path, digits_module, cfg={"limits": limits})
    key = create_key(guard.store, "thief").key
    with ServerThread(create_app(guard)) as srv:
        http = HttpClassifier(
            f"{srv.url}/v1/models/digits/predict", input_shape=(1, 8, 8), num_classes=10,
            api_key=key, retries=0, proxies={},
        )  # fmt: skip
        with pytest.raises(EndpointError, match="budget-exhausted") as err:
            knockoff(http, x_tr, budget=5000, n_checkpoints=3, epochs=1, query_batch=100)
    guard.close()
    assert err.value.status == 429
    assert http.samples_answered == 300  # three requests of 100 rows, the fourth refused
