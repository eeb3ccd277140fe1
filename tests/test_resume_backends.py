"""--resume across backends: a run interrupted on the local or the Ray backend continues on
either one from its checkpoint; finished samples are not attacked again and the merged report
equals an uninterrupted local run (every number but timings). The Ray cases skip without the
``ray`` extra."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from advguard.errors import InputError
from advguard.evaluate.distributed import WorkSpec
from advguard.evaluate.job import load_model_and_data
from advguard.evaluate.report import report_fields
from advguard.evaluate.runner import Evaluator, evaluate
from advguard.evaluate.threat_model import ThreatModel
from model_files import digits_cnn_file


class Stop(Exception):
    """Raised from a progress callback: the run is interrupted there."""


def numbers(report: Any) -> dict[str, Any]:
    """A report as flat path -> value, without timings and the environment."""
    return report_fields(report)


def stop_after(stage: str, n: int):
    def on_progress(s: str, done: int, total: int) -> None:
        if s == stage and done >= n:
            raise Stop

    return on_progress


@pytest.fixture(scope="module")
def job(digits_module, digits_split, tmp_path_factory):
    """Model and data files, a threat model with 4 batches of 6, the uninterrupted local run."""
    _, _, x_te, y_te = digits_split
    d = tmp_path_factory.mktemp("resume")
    path = digits_cnn_file(digits_module, d / "model.safetensors")
    np.savez(d / "data.npz", x=x_te[:120], y=y_te[:120])
    tm = ThreatModel.model_validate(
        dict(
            name="resume",
            norm="linf",
            epsilons=[0.03, 0.1],
            samples=24,
            seed=1,
            batch_size=6,
            attacks=[{"attack": "pgd", "steps": 3}, {"attack": "square", "max_queries": 30}],
            sanity_checks=True,  # they run once, on the merged results, after a resume too
        )
    )
    spec = WorkSpec.of(str(path), str(d / "data.npz"), tm)
    m, data, info = load_model_and_data(spec.model, spec.data)
    local = Evaluator(m, data.x, data.y, tm, model_info=info).run()
    return spec, tm, local


def fresh(job):
    spec = job[0]
    m, data, info = load_model_and_data(spec.model, spec.data)
    return m, data, {"model_info": info}


def attacked_positions(monkeypatch) -> list[int]:
    """Record the sample positions the local runner attacks in the suite."""
    seen: list[int] = []
    orig = Evaluator._run_batch

    def spy(self, state, pos, stage):
        if stage == "suite":
            seen.extend(int(p) for p in pos)
        return orig(self, state, pos, stage)

    monkeypatch.setattr(Evaluator, "_run_batch", spy)
    return seen


def finished_positions(ck: Path) -> set[int]:
    meta = json.loads((ck / "state.json").read_text())
    out: set[int] = set()
    for u in meta["units"]:
        with np.load(ck / f"unit-{u:07d}.npz") as z:
            out |= {int(p) for p in z["pos"]}
    return out


def test_local_run_interrupted_resumes_locally(job, tmp_path, monkeypatch):
    _, tm, local = job
    ck = tmp_path / "ck"
    m, data, kw = fresh(job)
    with pytest.raises(Stop):
        evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, progress=stop_after("suite", 2), **kw)
    assert finished_positions(ck) == set(range(12))  # two batches of 6
    seen = attacked_positions(monkeypatch)
    m, data, kw = fresh(job)
    again = evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, resume=True, **kw)
    assert sorted(seen) == list(range(12, 24))  # only the unfinished batches
    assert numbers(again) == numbers(local)


def test_plan_shards_groups_whole_batches(job):
    m, data, kw = fresh(job)
    ev = Evaluator(m, data.x, data.y, job[1], **kw)
    idx = ev.samples()
    parts = ev.plan_shards(2)
    assert [len(p) for p in parts] == [12, 12] and np.array_equal(np.concatenate(parts), idx)
    done = np.zeros(24, dtype=bool)
    done[6:12] = done[13] = True  # batch 1 finished, one sample of batch 2
    parts = ev.plan_shards(8, done)  # at most one unit per unfinished batch
    assert [list(p) for p in parts] == [
        list(idx[0:6]),
        list(idx[[12, *range(14, 18)]]),
        list(idx[18:24]),
    ]
    # fewer unfinished batches than workers: split across batch boundaries
    assert [len(p) for p in ev.plan_shards(4, done, at_least=4)] == [5, 4, 4, 4]
    assert ev.plan_shards(3, np.ones(24, dtype=bool)) == []
    with pytest.raises(InputError):
        ev.plan_shards(0)


def test_unit_listed_but_missing_is_a_corrupt_checkpoint(job, tmp_path):
    _, tm, _ = job
    ck = tmp_path / "ck"
    m, data, kw = fresh(job)
    with pytest.raises(Stop):
        evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, progress=stop_after("suite", 2), **kw)
    (ck / "unit-0000006.npz").unlink()
    m, data, kw = fresh(job)
    with pytest.raises(InputError, match=r"corrupt.*unit-0000006\.npz"):
        evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, resume=True, **kw)


ray = pytest.importorskip("ray", reason="the Ray resume tests need the 'ray' extra")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def interrupted_ray(job, ray_session, tmp_path_factory):
    """A Ray run (4 shards of one batch, 2 workers) stopped after 2 shards arrived."""
    from advguard.evaluate.distributed import RayBackend

    spec, tm, _ = job
    ck = tmp_path_factory.mktemp("ray-ck") / "ck"
    m, data, kw = fresh(job)
    backend = RayBackend(workers=2, shards=4)
    with pytest.raises(Stop):
        evaluate(
            m, data.x, data.y, tm, backend=backend, work=spec, checkpoint_dir=ck,
            progress=stop_after("shards", 2), **kw,
        )  # fmt: skip
    done = finished_positions(ck)
    assert len(done) == 12 and len(backend.shard_pids) == 2
    return ck, done


def test_ray_run_interrupted_resumes_locally(job, interrupted_ray, tmp_path, monkeypatch):
    _, tm, local = job
    ck = tmp_path / "ck"
    shutil.copytree(interrupted_ray[0], ck)
    seen = attacked_positions(monkeypatch)
    m, data, kw = fresh(job)
    again = evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, resume=True, **kw)
    assert sorted(seen) == sorted(set(range(24)) - interrupted_ray[1])
    assert numbers(again) == numbers(local)


def test_ray_run_interrupted_resumes_on_ray(job, interrupted_ray, tmp_path):
    from advguard.evaluate.distributed import RayBackend

    spec, tm, local = job
    ck = tmp_path / "ck"
    shutil.copytree(interrupted_ray[0], ck)
    m, data, kw = fresh(job)
    backend = RayBackend(workers=2, shards=4)
    ev = Evaluator(m, data.x, data.y, tm, checkpoint_dir=ck, resume=True, **kw)
    again = backend.run(ev, spec)
    idx = ev.samples()
    sent = set(np.concatenate(backend.submitted).tolist())
    assert sent == set(idx[sorted(set(range(24)) - interrupted_ray[1])].tolist())
    assert numbers(again) == numbers(local)
    assert finished_positions(ck) == set(range(24))


def test_local_run_interrupted_resumes_on_ray(job, ray_session, tmp_path):
    from advguard.evaluate.distributed import RayBackend

    spec, tm, local = job
    ck = tmp_path / "ck"
    m, data, kw = fresh(job)
    with pytest.raises(Stop):
        evaluate(m, data.x, data.y, tm, checkpoint_dir=ck, progress=stop_after("suite", 1), **kw)
    m, data, kw = fresh(job)
    backend = RayBackend(workers=2, shards=8)
    again = evaluate(
        m, data.x, data.y, tm, backend=backend, work=spec, checkpoint_dir=ck, resume=True, **kw
    )
    # batches 1-3 left, one shard each (shards never split a batch while there are enough)
    assert [len(p) for p in backend.submitted] == [6, 6, 6]
    assert numbers(again) == numbers(local)
