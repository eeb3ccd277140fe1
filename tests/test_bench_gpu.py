"""benchmarks/bench_gpu.py: refuses to run without CUDA (exit 2, one line, nothing written);
``--cpu-smoke`` runs every workload with tiny sizes and writes rows with real numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal; this host has CUDA")
def test_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as ex:
        _bench().main(["--out", str(out)])
    assert ex.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not out.exists()


def test_refuses_a_cpu_device_outside_smoke_mode() -> None:
    with pytest.raises(SystemExit, match="benchmarks a CUDA GPU"):
        _bench().main(["--device", "cpu"])


def test_cpu_smoke_runs_every_workload(tmp_path: Path) -> None:
    pytest.importorskip("torchattacks", reason="torchattacks (benchmarks/setup_env.sh) missing")
    out = tmp_path / "smoke.json"
    assert _bench().main(["--cpu-smoke", "--models", "cifar-size", "--n-train", "64",
                          "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["environment"]["device"] == "cpu"
    got = {(r["workload"], r["impl"]) for r in res["rows"]}
    assert got == {("pgd", "plain"), ("pgd", "advguard"), ("pgd", "torchattacks"),
                   ("linf-standard", "advguard"), ("linf-standard", "torchattacks"),
                   ("adv-training", "advguard"), ("adv-training", "torchattacks")}  # fmt: skip
    for r in res["rows"]:
        assert r["seconds"] > 0
        if "max_linf" in r:
            assert r["max_linf"] <= r["eps"] + 1e-6
        acc = r.get("robust_accuracy", r.get("robust_accuracy_pgd20"))
        assert 0.0 <= acc <= 1.0
