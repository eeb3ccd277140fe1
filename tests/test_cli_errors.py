"""Every command, fed hostile or broken input, answers with one line on stderr and exit 2.

Exit 1 is reserved for "a check failed" (SLO, gate, verification, untrustworthy); a traceback
is never acceptable. One table of cases, each building its input files in ``tmp_path``.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from advguard.cli import app
from advguard.models import TorchClassifier
from advguard.models.io import save_torch
from advguard.models.zoo import mlp

Builder = Callable[[Path], list[str]]


def _model(tmp: Path) -> Path:
    torch.manual_seed(0)
    clf = TorchClassifier(mlp((4,), 3, hidden=(8,)), input_shape=(4,), num_classes=3)
    return save_torch(
        clf,
        tmp / "m.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs={"input_shape": [4], "num_classes": 3, "hidden": [8]},
    )


def _data(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp / "d.npz"
    np.savez(p, x=rng.random((40, 4), dtype=np.float32), y=rng.integers(0, 3, 40))
    return p


def _tm(tmp: Path) -> Path:
    p = tmp / "tm.yaml"
    p.write_text(
        "name: t\nnorm: linf\nepsilons: [0.1]\nsamples: 20\nbatch_size: 10\n"
        "attacks: [{attack: fgsm}]\nsanity_checks: false\n"
    )
    return p


def _eval_args(tmp: Path, out: Path | None = None) -> list[str]:
    out = out or tmp / "out"
    m, d, t = _model(tmp), _data(tmp), _tm(tmp)
    return ["evaluate", "-m", str(m), "-d", str(d), "-t", str(t), "--out", str(out)]


def _a_file(tmp: Path) -> Path:
    f = tmp / "a-file"
    f.write_text("not a directory")
    return f


# ----------------------------------------------------------------------------- inputs
def huge_npz(tmp: Path) -> list[str]:
    """An .npz whose x.npy header claims a 2**40-element array (the file is tiny)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 4), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    import zipfile

    p = tmp / "huge.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", npy)
        z.writestr("y.npy", npy)
    args = _eval_args(tmp)
    args[args.index("-d") + 1] = str(p)
    return args


def bad_input_shape_meta(tmp: Path) -> list[str]:
    """Real weights whose advguard.input_shape metadata is not a list of integers."""
    src = _model(tmp)
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta["advguard.input_shape"] = '["a"]'
    p = tmp / "bad-meta.safetensors"
    save_file(load_file(str(src)), str(p), metadata=meta)
    args = _eval_args(tmp)
    args[args.index("-m") + 1] = str(p)
    return args


def factory_path(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--factory", "../../etc:passwd"]


def eps_1e308(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--epsilons", "1e308"]


def eps_nan(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--epsilons", "nan"]


def eps_zero(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--epsilons", "0"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def gate_nested_report(tmp: Path) -> list[str]:
    r = tmp / "nested.json"
    r.write_text(_nested(100_000))
    pol = tmp / "p.yaml"
    pol.write_text("{}\n")
    return ["gate", "--report", str(r), "--policy", str(pol)]


def gate_nested_policy(tmp: Path) -> list[str]:
    pol = tmp / "p.yaml"
    pol.write_text("a: " + _nested(50_000) + "\n")
    r = tmp / "r.json"
    r.write_text("{}")
    return ["gate", "--report", str(r), "--policy", str(pol)]


def gate_nan_report(tmp: Path) -> list[str]:
    r = tmp / "nan.json"
    r.write_text('{"kind": "advguard.robustness-report", "schema_version": "1.0", "x": NaN}')
    pol = tmp / "p.yaml"
    pol.write_text("{}\n")
    return ["gate", "--report", str(r), "--policy", str(pol)]


def compare_nested(tmp: Path) -> list[str]:
    r = tmp / "nested.json"
    r.write_text('{"a":' * 5000 + "1" + "}" * 5000)
    return ["report", "compare", str(r), str(r)]


def corrupt_checkpoint_state(tmp: Path) -> list[str]:
    args = _eval_args(tmp)
    ck = tmp / "out" / ".checkpoint"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"run_key": ' + _nested(10_000))
    return [*args, "--resume"]


def corrupt_checkpoint_batch(tmp: Path) -> list[str]:
    args = _eval_args(tmp)
    first = CliRunner().invoke(app, args)  # a real run leaves a real checkpoint
    assert first.exit_code in (0, 1), first.output
    ck = tmp / "out" / ".checkpoint"
    batch = sorted(ck.glob("unit-*.npz"))[0]
    batch.write_bytes(b"PK\x03\x04 truncated")
    return [*args, "--resume"]


def registry_corrupt_db(tmp: Path) -> list[str]:
    root = tmp / "reg"
    root.mkdir()
    (root / "registry.db").write_bytes(b"this is not an SQLite database" * 100)
    return ["registry", "list", "--root", str(root)]


def registry_unknown_revision(tmp: Path) -> list[str]:
    root = tmp / "reg"
    root.mkdir()
    con = sqlite3.connect(root / "registry.db")
    con.execute("create table alembic_version (version_num varchar(32) primary key)")
    con.execute("insert into alembic_version values ('ffffffffffff')")
    con.commit()
    con.close()
    return ["registry", "list", "--root", str(root)]


def registry_huge_version(tmp: Path) -> list[str]:
    root = tmp / "reg"
    pushed = CliRunner().invoke(
        app, ["registry", "push", "m", "--model", str(_model(tmp)), "--root", str(root)]
    )
    assert pushed.exit_code == 0, pushed.output
    return ["registry", "show", f"m:{2**64}", "--root", str(root)]


def registry_root_is_file(tmp: Path) -> list[str]:
    return ["registry", "list", "--root", str(_a_file(tmp))]


def out_file_evaluate(tmp: Path) -> list[str]:
    return _eval_args(tmp, out=_a_file(tmp))


def out_under_file_evaluate(tmp: Path) -> list[str]:
    return _eval_args(tmp, out=_a_file(tmp) / "sub")


def out_file_attack(tmp: Path) -> list[str]:
    m, d = _model(tmp), _data(tmp)
    return ["attack", "-m", str(m), "-d", str(d), "--out", str(_a_file(tmp) / "adv.npz")]


def out_dir_attack(tmp: Path) -> list[str]:
    m, d = _model(tmp), _data(tmp)
    return ["attack", "-m", str(m), "-d", str(d), "--out", str(tmp)]


def out_file_certify(tmp: Path) -> list[str]:
    m, d = _model(tmp), _data(tmp)
    return ["certify", "-m", str(m), "-d", str(d), "--out", str(_a_file(tmp))]


def out_file_redteam(tmp: Path) -> list[str]:
    return [
        "redteam",
        "--url",
        "http://127.0.0.1:9/predict",
        "-d",
        str(_data(tmp)),
        "-t",
        str(_tm(tmp)),
        "--out",
        str(_a_file(tmp)),
    ]


def out_file_train(tmp: Path) -> list[str]:
    return [
        "train",
        "--defense",
        "pgd-at",
        "-m",
        "advguard.models.zoo:mlp",
        "-d",
        str(_data(tmp)),
        "--out",
        str(_a_file(tmp)),
    ]


def out_file_quickstart(tmp: Path) -> list[str]:
    return ["quickstart", "--out", str(_a_file(tmp))]


def quickstart_bad_epsilons(tmp: Path) -> list[str]:
    return ["quickstart", "--out", str(tmp / "q"), "--epsilons", "0.1,abc"]


def quickstart_negative_epsilon(tmp: Path) -> list[str]:
    return ["quickstart", "--out", str(tmp / "q"), "--epsilons", "-0.1"]


def dashboards_bad_url(tmp: Path) -> list[str]:
    return ["dashboards", "export", "--out", str(tmp / "d"), "--prometheus-url", "file:///x"]


def dashboards_out_is_file(tmp: Path) -> list[str]:
    return ["dashboards", "export", "--out", str(_a_file(tmp))]


def loss_drift_not_a_manifest(tmp: Path) -> list[str]:
    p = tmp / "manifest.json"
    p.write_text('{"schema": "something-else", "epochs": []}')
    return ["data", "loss-drift", str(p), str(p)]


def goal_data_missing(tmp: Path) -> list[str]:
    tm = tmp / "goals.yaml"
    tm.write_text(
        "name: g\nepsilons: [0.1]\nattacks: [{attack: fgsm}]\n"
        "goals: [{kind: poisoning, params: {train_data: missing.npz}}]\n"
    )
    m, d = _model(tmp), _data(tmp)
    return ["evaluate", "-m", str(m), "-d", str(d), "-t", str(tm), "--out", str(tmp / "o")]


def guard_profile_too_few_rows(tmp: Path) -> list[str]:
    # 40 reference rows cannot fill 10 quantile bins per feature
    return ["guard", "profile", "-m", str(_model(tmp)), "-d", str(_data(tmp)), "--out",
            str(tmp / "p.json")]  # fmt: skip


def guard_rollout_bad_url(tmp: Path) -> list[str]:
    return ["guard", "rollout", "status", "digits", "--url", "ftp://127.0.0.1:1"]


def gameday_bad_batch(tmp: Path) -> list[str]:
    return ["gameday", "--benign-batch", "5,2"]


def gameday_unknown_attack(tmp: Path) -> list[str]:
    return ["gameday", "--attacks", "square,pgd"]


def gameday_out_is_a_directory(tmp: Path) -> list[str]:
    return ["gameday", "--out", str(tmp)]


def backend_unknown(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--backend", "spark"]


def address_without_ray(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--address", "auto"]


def ray_resume_corrupt_checkpoint(tmp: Path) -> list[str]:
    return [*corrupt_checkpoint_state(tmp), "--backend", "ray"]


def ray_bad_address(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--backend", "ray", "--address", "http://h:1"]


def unknown_device(tmp: Path) -> list[str]:
    return [*_eval_args(tmp), "--device", "tpu"]


CASES: dict[str, Builder] = {
    "data loss-drift: not a training manifest": loss_drift_not_a_manifest,
    "evaluate: a goal's training data is missing": goal_data_missing,
    "evaluate --backend spark": backend_unknown,
    "evaluate --address without --backend ray": address_without_ray,
    "evaluate --backend ray --resume: corrupt state.json": ray_resume_corrupt_checkpoint,
    "evaluate --backend ray --address http://": ray_bad_address,
    "npz header claims a huge shape": huge_npz,
    "malformed input_shape metadata": bad_input_shape_meta,
    "--factory ../../etc:passwd": factory_path,
    "epsilon 1e308": eps_1e308,
    "epsilon nan": eps_nan,
    "epsilon 0": eps_zero,
    "gate: deeply nested report JSON": gate_nested_report,
    "gate: deeply nested policy YAML": gate_nested_policy,
    "gate: NaN in report JSON": gate_nan_report,
    "report compare: deeply nested JSON": compare_nested,
    "evaluate --resume: corrupt state.json": corrupt_checkpoint_state,
    "evaluate --resume: corrupt batch file": corrupt_checkpoint_batch,
    "registry: corrupt database": registry_corrupt_db,
    "registry: unknown database revision": registry_unknown_revision,
    "registry: version above 2**63": registry_huge_version,
    "registry: --root is a file": registry_root_is_file,
    "evaluate --out is a file": out_file_evaluate,
    "evaluate --out under a file": out_under_file_evaluate,
    "attack --out under a file": out_file_attack,
    "attack --out is a directory": out_dir_attack,
    "certify --out is a file": out_file_certify,
    "redteam --out is a file": out_file_redteam,
    "train --out is a file": out_file_train,
    "quickstart --out is a file": out_file_quickstart,
    "quickstart --epsilons not numbers": quickstart_bad_epsilons,
    "quickstart --epsilons negative": quickstart_negative_epsilon,
    "dashboards export --prometheus-url file://": dashboards_bad_url,
    "dashboards export --out is a file": dashboards_out_is_file,
    "guard profile: too few reference rows": guard_profile_too_few_rows,
    "guard rollout: --url not http(s)": guard_rollout_bad_url,
    "gameday --benign-batch 5,2": gameday_bad_batch,
    "gameday --attacks square,pgd": gameday_unknown_attack,
    "gameday --out is a directory": gameday_out_is_a_directory,
    "evaluate --device tpu": unknown_device,
}


@pytest.mark.parametrize("builder", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_exit_2(builder: Builder, tmp_path: Path) -> None:
    args = builder(tmp_path)
    r = CliRunner().invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{type(r.exception).__name__}: {r.exception}"
    )
    assert "Traceback" not in r.output
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_backend_ray_without_ray_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the 'ray' extra were not installed
    r = CliRunner().invoke(app, [*_eval_args(tmp_path), "--backend", "ray"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "advguard[ray]" in lines[0], r.stderr
