"""The Ray backend: shards on worker processes merge into the local report; a killed worker's
shards are retried. Skipped without the ``ray`` extra (``pip install 'advguard[ray]'``)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import numpy as np
import pytest
import torch

from advguard.errors import InputError, MissingDependencyError
from advguard.evaluate import distributed
from advguard.evaluate.distributed import RayBackend, WorkSpec, shard_from_wire, shard_to_wire
from advguard.evaluate.job import load_model_and_data
from advguard.evaluate.report import report_fields
from advguard.evaluate.runner import Evaluator, evaluate
from advguard.evaluate.threat_model import ThreatModel
from model_files import digits_cnn_file, tiny_job


def _numbers(report) -> dict[str, Any]:
    return _numbers_of(json.loads(report.model_dump_json()))


def _numbers_of(doc: Any) -> dict[str, Any]:
    """A report document as flat path -> value, without timings and the environment."""
    return report_fields(doc)


@pytest.fixture(scope="module")
def job(digits_module, digits_split, tmp_path_factory):
    """Model file, data file and threat model; shards of 6 samples = batches of 6."""
    _, _, x_te, y_te = digits_split
    d = tmp_path_factory.mktemp("ray")
    path = digits_cnn_file(digits_module, d / "model.safetensors")
    np.savez(d / "data.npz", x=x_te[:120], y=y_te[:120])
    tm = ThreatModel.model_validate(
        dict(
            name="ray",
            norm="linf",
            epsilons=[0.03, 0.1],
            samples=24,
            seed=1,
            batch_size=6,
            attacks=[{"attack": "pgd", "steps": 3}, {"attack": "square", "max_queries": 30}],
            sanity_checks=False,  # they run on the driver (test_sharding covers the merge)
        )
    )
    spec = WorkSpec.of(str(path), str(d / "data.npz"), tm)
    m, data, _ = load_model_and_data(spec.model, spec.data)
    local = Evaluator(m, data.x, data.y, tm).run()
    return spec, tm, local


def test_wire_format_round_trip_and_checks(job):
    spec, tm, _ = job
    m, data, _ = load_model_and_data(spec.model, spec.data)
    ev = Evaluator(m, data.x, data.y, tm)
    shard = ev.run_shard(ev.samples()[:6])
    back = shard_from_wire(shard_to_wire(shard))
    for k, v in shard.records.as_dict().items():
        assert np.array_equal(getattr(back.records, k), v, equal_nan=True)
    assert back.stats == shard.stats and back.examples == shard.examples
    bad = shard_to_wire(shard)
    bad["records"]["fooled_eps"] = bad["records"]["fooled_eps"][:2]
    with pytest.raises(InputError, match="malformed"):
        shard_from_wire(bad)
    with pytest.raises(InputError, match="malformed"):
        shard_from_wire({"positions": [0]})


def test_backend_options_are_checked():
    with pytest.raises(InputError):
        RayBackend(workers=0)
    with pytest.raises(InputError):
        RayBackend("http://x:1")
    with pytest.raises(InputError):
        RayBackend(shards=0)


def test_without_ray_the_backend_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependencyError, match=r"advguard\[ray\]"):
        distributed.import_ray()


def test_attack_results_from_workers_are_checked_at_the_edge():
    x = torch.rand(3, 1, 2, 2)
    good = {
        "x_adv": x.numpy().copy(),
        "raw": x.numpy().copy(),
        "success": np.array([True, False, True]),
        "attacked": np.ones(3, dtype=bool),
        "queries": np.array([1, 2, 3]),
    }
    got = distributed.attack_result_from_wire(good, x)
    assert torch.equal(got["x_adv"], x) and got["success"].tolist() == [True, False, True]
    nan = good["x_adv"].copy()
    nan[0, 0, 0, 0] = np.nan
    for bad in (
        {**good, "x_adv": nan},
        {**good, "raw": good["raw"][:2]},
        {**good, "success": np.array([1, 0, 1])},
        {**good, "queries": np.array([1, -2, 3])},
        {k: v for k, v in good.items() if k != "attacked"},
        "not a dict",
    ):
        with pytest.raises(InputError, match="malformed attack result"):
            distributed.attack_result_from_wire(bad, x)


class FlakyRay:
    """A stand-in for the ray module whose ``init`` fails ``failures`` times with what a Ray
    client gets when the head cannot start its server (a relayed traceback)."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionAbortedError) -> None:
        self.failures, self.error = failures, error
        self.inits: list[dict[str, Any]] = []
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            raise self.error(
                "Initialization failure from server:\nTraceback (most recent call last):\n"
                '  File "proxier.py", line 765, in Datapath\n'
                "psutil.NoSuchProcess: process no longer exists (pid=4242)"
            )

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_ray_client_start_failure_is_retried(monkeypatch):
    fake, waits = FlakyRay(failures=2), []
    monkeypatch.setattr(distributed, "import_ray", lambda: fake)
    got = distributed.connect_ray("ray://127.0.0.1:1", num_cpus=2, sleep=waits.append)
    assert got is fake
    assert [k["address"] for k in fake.inits] == ["ray://127.0.0.1:1"] * 3
    assert waits == [1.0, 2.0] and fake.shutdowns == 2


def test_ray_start_failures_are_one_line_with_ray_last_words(monkeypatch):
    fake = FlakyRay(failures=3)
    monkeypatch.setattr(distributed, "import_ray", lambda: fake)
    with pytest.raises(InputError) as e:
        distributed.connect_ray("ray://127.0.0.1:1", num_cpus=2, sleep=lambda s: None)
    msg = str(e.value)
    assert len(fake.inits) == 3 and "\n" not in msg
    assert "NoSuchProcess: process no longer exists (pid=4242)" in msg
    assert msg.startswith("cannot start or reach ray://127.0.0.1:1 (ConnectionAbortedError")
    # a local instance or a refused connection is not retried
    for address, error in ((None, ConnectionAbortedError), ("ray://h:1", ConnectionRefusedError)):
        fake = FlakyRay(failures=1, error=error)
        monkeypatch.setattr(distributed, "import_ray", lambda f=fake: f)
        with pytest.raises(InputError, match="cannot start or reach"):
            distributed.connect_ray(address, num_cpus=1, sleep=lambda s: None)
        assert len(fake.inits) == 1


ray = pytest.importorskip("ray", reason="the Ray backend tests need the 'ray' extra")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_report_equals_local_despite_killed_workers(job, ray_session):
    spec, tm, local = job
    m, data, _ = load_model_and_data(spec.model, spec.data)

    # the same report as the local run, even though both workers are killed right after
    # the shards are submitted: Ray restarts them (each reloads the model from its file)
    # and their unfinished shards run again
    killer = RayBackend(workers=2, shards=4)
    killed: list[int] = []

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage == "shards" and done == 0 and not killed:  # all shards submitted
            for pid in killer.worker_pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    again = evaluate(m, data.x, data.y, tm, backend=killer, work=spec, progress=on_progress)
    assert killed and len(killer.shard_pids) == 4
    assert set(killer.shard_pids) - set(killed)  # some shards ran on restarted workers
    assert _numbers(again) == _numbers(local)


def test_cli_evaluate_backend_ray(tmp_path, ray_session):
    from typer.testing import CliRunner

    from advguard.cli import app

    model, _ = tiny_job(tmp_path)
    (tmp_path / "tm.yaml").write_text(
        "name: t\nnorm: linf\nepsilons: [0.1, 0.3]\nsamples: 20\nbatch_size: 5\n"
        "attacks: [{attack: pgd, steps: 3}]\nsanity_checks: false\n"
    )
    args = [
        "evaluate",
        "-m",
        str(model),
        "-d",
        str(tmp_path / "d.npz"),
        "-t",
        str(tmp_path / "tm.yaml"),
    ]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    remote = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "1"]
    )
    assert local.exit_code in (0, 1) and remote.exit_code == local.exit_code, remote.output
    a = json.loads((tmp_path / "local" / "report.json").read_text())
    b = json.loads((tmp_path / "ray" / "report.json").read_text())
    # robust accuracies, per-attack counts, perturbations: all but timings
    results_a = {k: v for k, v in _numbers_of(a).items() if k.startswith(".results")}
    assert results_a == {k: v for k, v in _numbers_of(b).items() if k.startswith(".results")}
    assert a["results"][0]["robust_accuracy"]["n"] == 20


def test_sanity_checks_and_escalations_run_on_the_workers(job, ray_session):
    """Once the shards are merged, the idle workers run the attack calls of the sanity checks
    and escalations, half the rows each; the report is still the local run's."""
    spec, tm, _ = job
    # PGD with one step (of 0.1) is far from converged: doubling it fools more,
    # so the convergence check escalates (re-runs every survivor with twice the steps)
    attacks = [{"attack": "pgd", "steps": 1, "step_size": 0.1}, tm.attacks[1]]
    tm = ThreatModel.model_validate(
        {**tm.model_dump(), "attacks": attacks, "sanity_checks": True, "sanity_samples": 16}
    )
    spec = WorkSpec.of(spec.model, spec.data, tm)
    m, data, _ = load_model_and_data(spec.model, spec.data)
    local = Evaluator(m, data.x, data.y, tm).run()
    backend = RayBackend(workers=2, shards=2)
    remote = evaluate(m, data.x, data.y, tm, backend=backend, work=spec)
    assert backend.pool is not None and backend.pool.calls >= 7
    assert _numbers(remote) == _numbers(local)
    doc = json.loads(remote.model_dump_json())
    assert {c["id"] for c in doc["sanity_checks"]} >= {"monotonic", "large-epsilon", "convergence"}
    assert [c["id"] for c in doc["sanity_checks"] if c.get("escalation")]  # one escalated
