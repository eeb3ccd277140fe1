"""Game day: a local guard under attack, measured.

:func:`run_gameday` starts a guard on an ephemeral 127.0.0.1 port (temporary SQLite store,
one API key per client) with the two stateful detectors of :mod:`advguard.guard.stateful`
(the k-NN detector of Chen, Carlini & Wagner 2020, calibrated on benign traffic held out
from the replay, and PRADA, Juuti et al. 2019), both with the action ``block``. Then, at the
same time and over HTTP (:class:`~advguard.models.http_model.HttpClassifier`):

* benign clients replay held-out samples in random order and realistic batch sizes;
* one evasion attacker per attack (Square, HopSkipJump) attacks images one after another;
* an extraction attacker runs Jacobian-based dataset augmentation (Papernot et al. 2017).

It measures, per attacker, the queries and seconds to *detection* (the first stateful flag,
logged on the server) and to *mitigation* (the first ``403 client-blocked`` the attacker gets,
checked to persist), and the benign clients' flags and errors, and judges them against the
acceptance thresholds of the guard (evasion detected and blocked before 500 queries,
extraction before 2000, benign clients flagged < 1%, no benign errors).

:func:`demo_setup` trains the built-in demo (a small CNN on scikit-learn's digits).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advguard import _validate as check
from advguard.errors import InputError
from advguard.guard.drill import (
    AttackerRun,
    BenignRun,
    Clock,
    DetectionLog,
    LocalGuardServer,
    Progress,
    client,
    confirm_block,
    earliest,
    record_refusal,
    replay_benign,
)
from advguard.models.base import Classifier

SCHEMA_VERSION = "1.0"
EVASION_ATTACKS: tuple[str, ...] = ("square", "hopskipjump")
MODEL_NAME = "model"


@dataclass(frozen=True)
class GamedayConfig:
    """What the drill runs and the thresholds it is judged by (all validated)."""

    benign_clients: int = 20
    #: Rows each benign client replays (None: the whole replay set).
    benign_queries: int | None = None
    benign_batch: tuple[int, int] = (1, 32)
    attacks: tuple[str, ...] = EVASION_ATTACKS
    #: Images each evasion attacker attacks, one after another, with one key.
    attack_images: int = 10
    attack_queries: int = 1000
    square_epsilon: float = 0.1
    extraction: bool = True
    extraction_budget: int = 5000
    extraction_seeds: int = 20
    extraction_epochs: int = 10
    #: Acceptance thresholds (queries): the guard issue's targets.
    evasion_within: int = 500
    extraction_within: int = 2000
    max_benign_flag_rate: float = 0.01
    knn_k: int = 50
    knn_window: int = 1000
    knn_fpr: float = 0.001
    prada_delta: float = 0.95
    prada_min_queries: int = 100
    seed: int = 0

    def validated(self) -> GamedayConfig:
        check.integer("benign_clients", self.benign_clients, low=0, high=1000)
        if self.benign_queries is not None:
            check.samples("benign_queries", self.benign_queries)
        lo, hi = self.benign_batch
        check.integer("benign_batch", lo, low=1, high=256)
        check.integer("benign_batch", hi, low=lo, high=256)
        for a in self.attacks:
            check.choice("attack", a, EVASION_ATTACKS)
        check.integer("attack_images", self.attack_images, low=1, high=10_000)
        check.queries("attack_queries", self.attack_queries)
        check.number("square_epsilon", self.square_epsilon, low=0.0, high=1.0, low_open=True)
        check.flag("extraction", self.extraction)
        check.queries("extraction_budget", self.extraction_budget)
        check.integer("extraction_seeds", self.extraction_seeds, low=1, high=10_000)
        check.steps("extraction_epochs", self.extraction_epochs)
        check.queries("evasion_within", self.evasion_within)
        check.queries("extraction_within", self.extraction_within)
        check.fraction("max_benign_flag_rate", self.max_benign_flag_rate)
        check.integer("knn_k", self.knn_k, low=1, high=self.knn_window)
        check.integer("knn_window", self.knn_window, low=1, high=100_000)
        check.number("knn_fpr", self.knn_fpr, low=1e-9, high=0.5)
        check.number("prada_delta", self.prada_delta, low=0.0, high=1.0, low_open=True)
        check.integer("prada_min_queries", self.prada_min_queries, low=3, high=5000)
        check.integer("seed", self.seed, low=0)
        if not self.attacks and not self.extraction:
            raise InputError("a game day needs at least one attack or the extraction")
        return self


@dataclass
class GamedayData:
    """The protected model and its traffic: ``calibration_x`` is benign traffic held out from
    the replay (it sets the k-NN threshold); benign clients replay ``replay_x`` and the
    evasion attackers attack its first images; the extraction attacker starts from
    ``seeds_x`` (natural samples the attacker owns)."""

    model: Classifier
    calibration_x: np.ndarray
    replay_x: np.ndarray
    replay_y: np.ndarray
    seeds_x: np.ndarray
    name: str = "model"


def split_dataset(
    model: Classifier, x: np.ndarray, y: np.ndarray, *, seed: int = 0, name: str = "model"
) -> GamedayData:
    """Shuffle ``(x, y)`` with ``seed``: 70% calibration traffic, 30% replay; attacker seeds
    are two calibration samples per class (the first ones, as far as there are)."""
    if len(x) < 20 or len(x) != len(y):
        raise InputError(f"need at least 20 labelled samples for a game day, got {len(x)}")
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = np.asarray(x, dtype=np.float32)[perm], np.asarray(y).astype(np.int64)[perm]
    cut = round(0.7 * len(x))
    return GamedayData(model, x[:cut], x[cut:], y[cut:], seed_set(x[:cut], y[:cut], 2), name)


def seed_set(x: np.ndarray, y: np.ndarray, per_class: int) -> np.ndarray:
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return np.asarray(x[np.sort(idx)])


def demo_setup(*, seed: int = 0, epochs: int = 10, progress: Progress | None = None) -> GamedayData:
    """The built-in demo: a small CNN trained on 1400 of scikit-learn's digits (shuffled with
    ``seed``); those 1400 images are the calibration traffic, the other 397 the replay."""
    import torch

    from advguard.data import load_dataset
    from advguard.models import TorchClassifier
    from advguard.models.fit import fit
    from advguard.models.zoo import small_cnn

    d = load_dataset("digits")
    perm = np.random.default_rng(seed).permutation(len(d.x))
    x, y = d.x[perm].astype(np.float32), d.y[perm].astype(np.int64)
    torch.manual_seed(seed)

    def on_epoch(epoch: int, total: int, _loss: float) -> None:
        if progress is not None:
            progress("train", epoch, total)

    module = fit(
        small_cnn((1, 8, 8), 10), x[:1400], y[:1400], epochs=epochs, seed=seed, progress=on_epoch
    )
    model = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    return GamedayData(
        model, x[:1400], x[1400:], y[1400:], seed_set(x[:1400], y[:1400], 2), "digits-cnn"
    )


# -- the guard ---------------------------------------------------------------------------------
@dataclass
class Detectors:
    logs: list[DetectionLog]
    info: dict[str, Any]


def build_detectors(data: GamedayData, cfg: GamedayConfig, clock: Clock) -> Detectors:
    """k-NN calibrated on ``data.calibration_x`` at ``cfg.knn_fpr`` per query; PRADA with the
    model's predictions; each wrapped in a :class:`DetectionLog`."""
    from advguard.guard.stateful import KNNStatefulDetector, PRADADetector

    knn = KNNStatefulDetector(k=cfg.knn_k, window=cfg.knn_window)
    knn.calibrate(data.calibration_x, fpr=cfg.knn_fpr, seed=cfg.seed)
    prada = PRADADetector(
        delta=cfg.prada_delta, min_queries=cfg.prada_min_queries, predict=data.model.predict
    )
    info = {"knn": {**knn.params(), "calibration": knn.calibration}, "prada": prada.params()}
    return Detectors([DetectionLog("knn", knn, clock), DetectionLog("prada", prada, clock)], info)


def build_guard(data: GamedayData, detectors: Detectors, db_path: Path) -> Any:
    """A guard serving ``data.model`` with both stateful detectors set to block; limits high
    enough that only the detectors stop anyone."""
    from advguard.guard.config import GuardConfig
    from advguard.guard.pipeline import Guard, StatefulSlot
    from advguard.guard.serving import ServedModel
    from advguard.guard.storage import GuardStore

    cfg = GuardConfig.model_validate(
        {
            "limits": {"rate": 100_000.0, "burst": 100_000, "budget": None},
            "edge": {"max_batch": 1024, "max_body_bytes": 64 * 1024 * 1024},
        }
    )
    store = GuardStore(f"sqlite:///{db_path}", table_prefix=cfg.storage.table_prefix)
    served = ServedModel(MODEL_NAME, f"gameday:{data.name}", data.model)
    slots = [StatefulSlot(log.name, log, "block") for log in detectors.logs]
    return Guard(cfg, store=store, model=served, stateful=slots)


# -- the clients ---------------------------------------------------------------------------------
def run_evasion(
    name: str, url: str, key: Any, data: GamedayData, cfg: GamedayConfig, clock: Clock,
    progress: Progress | None,
) -> AttackerRun:  # fmt: skip
    """Attack the first ``cfg.attack_images`` replay images one at a time until blocked."""
    from advguard.attacks import HopSkipJump, SquareAttack

    model = client(url, key.key, data.model)
    run = AttackerRun(name, "evasion", key.record.key_id, clock())
    attack: Any
    if name == "square":
        attack = SquareAttack(norm="linf", max_queries=cfg.attack_queries, seed=cfg.seed)
        eps: float | None = cfg.square_epsilon
    else:
        attack = HopSkipJump(norm="l2", max_queries=cfg.attack_queries, seed=cfg.seed)
        eps = None
    n = min(cfg.attack_images, len(data.replay_x))
    successes = tried = 0
    if progress is not None:
        progress(f"attack:{name}", 0, n)
    try:
        for i in range(n):
            tried = i + 1
            res = attack(model, data.replay_x[i : i + 1], data.replay_y[i : i + 1], epsilon=eps)
            successes += int(res.success.sum())
            if progress is not None:
                progress(f"attack:{name}", i + 1, n)
        run.queries_answered, run.requests = model.samples_answered, model.requests_sent
    except Exception as exc:  # the guard's refusal (or a failure) ends the attack
        record_refusal(run, model, exc, clock)
        if run.blocked:
            run.block_persists = confirm_block(model, data.replay_x)
    run.details = {"images_attacked": tried, "evasions_before_stop": successes}
    return run


def run_extraction(
    url: str, key: Any, data: GamedayData, cfg: GamedayConfig, clock: Clock,
    progress: Progress | None,
) -> AttackerRun:  # fmt: skip
    """Jacobian-based dataset augmentation (label mode) through the guard until blocked."""
    from advguard.attacks.extraction import jacobian_augmentation

    model = client(url, key.key, data.model)
    run = AttackerRun("jacobian-extraction", "extraction", key.record.key_id, clock())

    def on_queries(_stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress("attack:extraction", done, total)

    try:
        jacobian_augmentation(
            model, data.seeds_x[: cfg.extraction_seeds], budget=cfg.extraction_budget,
            mode="labels", epochs=cfg.extraction_epochs, max_rounds=10, seed=cfg.seed,
            progress=on_queries,
        )  # fmt: skip
        run.queries_answered, run.requests = model.samples_answered, model.requests_sent
    except Exception as exc:
        record_refusal(run, model, exc, clock)
        if run.blocked:
            run.block_persists = confirm_block(model, data.replay_x)
    return run


def run_benign(
    url: str, keys: list[Any], data: GamedayData, cfg: GamedayConfig, progress: Progress | None
) -> tuple[list[BenignRun], list[threading.Thread]]:
    """One thread per benign client, started; each replays its own random order."""
    rows = len(data.replay_x) if cfg.benign_queries is None else cfg.benign_queries
    x = data.replay_x[: min(rows, len(data.replay_x))]
    total = len(x) * len(keys)
    done = [0]
    lock = threading.Lock()

    def on_rows(n: int) -> None:
        with lock:
            done[0] += n
            if progress is not None:
                progress("benign", done[0], total)

    runs, threads = [], []
    for i, key in enumerate(keys):
        run = BenignRun(key.record.key_id)
        rng = np.random.default_rng([cfg.seed, 1000 + i])
        model = client(url, key.key, data.model)
        t = threading.Thread(
            target=replay_benign, args=(model, x, run, rng, cfg.benign_batch, on_rows), daemon=True
        )
        runs.append(run)
        threads.append(t)
    for t in threads:
        t.start()
    return runs, threads


# -- the report ------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GamedayReport:
    schema_version: str
    setup: dict[str, Any]
    attackers: list[dict[str, Any]]
    benign: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "attackers": self.attackers,
            "benign": self.benign,
            "setup": self.setup,
        }


def attacker_row(run: AttackerRun, logs: list[DetectionLog], store: Any) -> dict[str, Any]:
    flag = earliest(logs, run.key_id)
    blocked_in_store = store.get_block(run.key_id) is not None
    return {
        "name": run.name,
        "kind": run.kind,
        "client": run.key_id,
        "detected": flag is not None,
        "detector": flag.detector if flag else None,
        "queries_to_detect": flag.query if flag else None,
        "seconds_to_detect": round(flag.at - run.started, 6) if flag else None,
        "mitigated": run.blocked and blocked_in_store,
        "queries_answered_before_block": run.queries_answered if run.blocked else None,
        "seconds_to_mitigate": (
            round(run.blocked_at - run.started, 6) if run.blocked_at is not None else None
        ),
        "block_persists": run.block_persists,
        "queries_answered": run.queries_answered,
        "requests": run.requests,
        "stopped": run.stopped,
        "error": run.error,
        **run.details,
    }


def benign_summary(runs: list[BenignRun], logs: list[DetectionLog], store: Any) -> dict[str, Any]:
    flagged = [r.key_id for r in runs if earliest(logs, r.key_id) is not None]
    blocked = [r.key_id for r in runs if store.get_block(r.key_id) is not None]
    requests = sum(r.requests for r in runs)
    errors = sum(r.errors for r in runs)
    statuses: dict[str, int] = {}
    for r in runs:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "clients": len(runs),
        "rows_answered": sum(r.rows for r in runs),
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "error_statuses": statuses,
        "flagged_clients": len(flagged),
        "flag_rate": len(flagged) / len(runs) if runs else 0.0,
        "blocked_clients": len(blocked),
        "clients_with_errors": sum(1 for r in runs if r.errors),
    }


def judge(report: GamedayReport, cfg: GamedayConfig) -> None:
    """The acceptance checks (the guard issue's thresholds)."""
    for a in report.attackers:
        limit = cfg.evasion_within if a["kind"] == "evasion" else cfg.extraction_within
        q = a["queries_to_detect"]
        report.checks.append(
            Check(
                f"{a['name']}: detected before {limit} queries",
                q is not None and q < limit,
                f"first flag at query {q} ({a['detector']})" if q else "never flagged",
            )
        )
        m = a["queries_answered_before_block"]
        report.checks.append(
            Check(
                f"{a['name']}: blocked before {limit} queries",
                bool(a["mitigated"]) and m is not None and m < limit and bool(a["block_persists"]),
                f"403 client-blocked after {m} answered queries"
                + ("" if a["block_persists"] else " (the block did not hold)")
                if a["mitigated"]
                else f"not blocked ({a['stopped']}, {a['queries_answered']} queries answered)",
            )
        )
    b = report.benign
    if b["clients"]:
        report.checks.append(
            Check(
                f"benign clients flagged below {cfg.max_benign_flag_rate:.0%}",
                b["flag_rate"] < cfg.max_benign_flag_rate or b["flagged_clients"] == 0,
                f"{b['flagged_clients']} of {b['clients']} clients flagged",
            )
        )
        report.checks.append(
            Check(
                "benign clients unaffected (no refused request)",
                b["errors"] == 0,
                f"{b['errors']} of {b['requests']} requests refused {b['error_statuses']}",
            )
        )


# -- the drill -------------------------------------------------------------------------------------
def run_gameday(
    data: GamedayData,
    cfg: GamedayConfig | None = None,
    *,
    clock: Clock = time.monotonic,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
) -> GamedayReport:
    """Run the drill (see the module docstring) and return the judged report."""
    from advguard.guard.app import CatchAll, create_app
    from advguard.guard.auth import create_key

    cfg = (cfg or GamedayConfig()).validated()
    if progress is not None:
        progress("calibration", 0, 1)
    detectors = build_detectors(data, cfg, clock)
    if progress is not None:
        progress("calibration", 1, 1)
    with tempfile.TemporaryDirectory(prefix="advguard-gameday-", dir=workdir) as tmp:
        guard = build_guard(data, detectors, Path(tmp) / "guard.db")
        try:
            keys = {
                n: create_key(guard.store, n)
                for n in [*cfg.attacks, *(["extraction"] if cfg.extraction else [])]
            }
            benign_keys = [
                create_key(guard.store, f"benign-{i}") for i in range(cfg.benign_clients)
            ]
            with LocalGuardServer(CatchAll(create_app(guard))) as server:
                url = f"{server.url}/v1/models/{MODEL_NAME}/predict"
                runs = _run_clients(url, keys, benign_keys, data, cfg, clock, progress)
            report = _report(runs, detectors, guard, data, cfg)
        finally:
            guard.close()
    judge(report, cfg)
    return report


def _run_clients(
    url: str, keys: dict[str, Any], benign_keys: list[Any], data: GamedayData,
    cfg: GamedayConfig, clock: Clock, progress: Progress | None,
) -> tuple[list[AttackerRun], list[BenignRun]]:  # fmt: skip
    """Benign load and every attacker at the same time; returns when all are done."""
    benign, threads = run_benign(url, benign_keys, data, cfg, progress)
    attackers: list[AttackerRun] = []
    lock = threading.Lock()

    def attack(name: str) -> None:
        if name == "extraction":
            run = run_extraction(url, keys[name], data, cfg, clock, progress)
        else:
            run = run_evasion(name, url, keys[name], data, cfg, clock, progress)
        with lock:
            attackers.append(run)

    workers = [threading.Thread(target=attack, args=(n,), daemon=True) for n in keys]
    for t in workers:
        t.start()
    for t in [*workers, *threads]:
        t.join()
    order = list(keys)
    attackers.sort(key=lambda r: order.index("extraction" if r.kind == "extraction" else r.name))
    return attackers, benign


def _report(
    runs: tuple[list[AttackerRun], list[BenignRun]], detectors: Detectors, guard: Any,
    data: GamedayData, cfg: GamedayConfig,
) -> GamedayReport:  # fmt: skip
    attackers, benign = runs
    setup = {
        "model": data.name,
        "input_shape": list(data.model.input_shape),
        "num_classes": int(data.model.num_classes),
        "calibration_samples": len(data.calibration_x),
        "replay_samples": len(data.replay_x),
        "detectors": detectors.info,
        "action": "block",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
    return GamedayReport(
        SCHEMA_VERSION,
        setup,
        [attacker_row(r, detectors.logs, guard.store) for r in attackers],
        benign_summary(benign, detectors.logs, guard.store),
    )


def render_html(report: GamedayReport) -> str:
    """A small self-contained HTML page of the report (every value escaped)."""
    from html import escape

    def row(cells: list[Any], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    heads = ["attacker", "detected at query", "detector", "seconds to detect",
             "answered before block", "seconds to mitigate", "block holds"]  # fmt: skip
    rows = [
        row([a["name"], a["queries_to_detect"], a["detector"], a["seconds_to_detect"],
             a["queries_answered_before_block"], a["seconds_to_mitigate"], a["block_persists"]])
        for a in report.attackers
    ]  # fmt: skip
    checks = [row(["PASS" if c.passed else "FAIL", c.name, c.detail]) for c in report.checks]
    b = report.benign
    verdict = "PASSED" if report.passed else "FAILED"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>advguard game day</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;"
        "padding:4px 8px}table{border-collapse:collapse;margin-bottom:1em}</style></head><body>"
        f"<h1>advguard game day: {verdict}</h1><h2>Attackers</h2><table>{row(heads, 'th')}"
        + "".join(rows)
        + "</table><h2>Benign clients</h2><p>"
        + escape(
            f"{b['clients']} clients, {b['rows_answered']} rows answered in {b['requests']} "
            f"requests; {b['flagged_clients']} flagged, {b['errors']} refused requests"
        )
        + "</p><h2>Checks</h2><table>"
        + "".join(checks)
        + "</table></body></html>\n"
    )
