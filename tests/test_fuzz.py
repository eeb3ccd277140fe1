"""Fuzz the readers of untrusted files with mutated inputs (hypothesis, derandomized).

Library level: a loader either returns or raises an :class:`AdvguardError` subclass; nothing
else (no ``KeyError``, ``RecursionError``, ``MemoryError``...). CLI level (fewer examples):
``advguard gate`` exits 0, 1 or 2 with no traceback. Each test has a fixed ``max_examples``
and ``derandomize=True`` so CI runs the same inputs every time; the module takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from advguard.cli import app
from advguard.errors import AdvguardError
from advguard.evaluate.report import load_report, parse_report
from advguard.evaluate.runner import evaluate
from advguard.evaluate.threat_model import ThreatModel, parse_threat_model
from advguard.models import TorchClassifier
from advguard.models.zoo import mlp
from advguard.registry.policy import load_policy, parse_policy

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=15)


@pytest.fixture(scope="module")
def report_json() -> dict[str, Any]:
    """A real (small) report: an MLP on random 4-feature data, FGSM + sanity checks + SLOs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((60, 4), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    model = TorchClassifier(mlp((4,), 2, hidden=(8,)), input_shape=(4,), num_classes=2)
    tm = ThreatModel.model_validate(
        dict(
            name="fuzz",
            norm="linf",
            epsilons=[0.05, 0.2],
            samples=40,
            batch_size=40,
            attacks=[{"attack": "fgsm"}],
            sanity_samples=8,
            slos=["clean_accuracy >= 0.1", "robust_accuracy >= 0.1 at eps 0.05"],
        )
    )
    return evaluate(model, x, y, tm).model_dump(mode="json")


# ----------------------------------------------------------------------------- mutations
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: Any, seed: Any) -> Any:
    """``seed`` with 1-3 values (at any depth) replaced, deleted or numerically nudged."""
    doc = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "nudge"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif (
            op == "nudge"
            and isinstance(parent[key], int | float)
            and not isinstance(parent[key], bool)
        ):
            parent[key] = parent[key] + draw(st.sampled_from([-1, 1, 0.5, 1e-3, 1e300]))
        else:
            parent[key] = draw(_json)
    return doc


@st.composite
def mutated_bytes(draw: Any, seed: bytes) -> bytes:
    """``seed`` with a few bytes flipped, inserted or removed, or truncated."""
    b = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and b:
            del b[pos : pos + draw(st.integers(1, 8))]
        else:
            del b[pos:]
    return bytes(b)


def _only_advguard_errors(fn: Any, *args: Any) -> None:
    with contextlib.suppress(AdvguardError):
        fn(*args)


# ----------------------------------------------------------------------------- library level
def test_report_loader_json_mutations(report_json, tmp_path_factory):
    load_report(_write(tmp_path_factory.mktemp("r"), report_json))  # the seed is valid

    @FUZZ
    @given(doc=mutated_json(report_json))
    def run(doc: Any) -> None:
        _only_advguard_errors(parse_report, doc)

    run()


def test_report_loader_byte_mutations(report_json, tmp_path_factory):
    d = tmp_path_factory.mktemp("rb")
    seed = json.dumps(report_json).encode()

    @FUZZ
    @given(data=mutated_bytes(seed))
    def run(data: bytes) -> None:
        p = d / "report.json"
        p.write_bytes(data)
        _only_advguard_errors(load_report, p)

    run()


POLICY = (
    "name: release\nslo_mode: confidence\nreport_slos: true\nslos:\n"
    "  - robust_accuracy >= 0.6 at eps 0.1\n  - clean_accuracy >= 0.9\nmin_samples: 100\n"
    "max_robust_accuracy_drop: 1.0\nmax_clean_accuracy_drop: 0.5\nrequire_baseline: false\n"
)
THREAT_MODEL = (
    "name: t\nnorm: linf\nepsilons: [0.05, 0.1]\nsamples: 100\nbatch_size: 50\n"
    "attacks:\n  - attack: pgd\n    steps: 10\nslos: ['robust_accuracy >= 0.5 at eps 0.1']\n"
)


def test_policy_loader_mutations(tmp_path_factory):
    d = tmp_path_factory.mktemp("p")
    parse_policy(POLICY)

    @FUZZ
    @given(data=mutated_bytes(POLICY.encode()))
    def run(data: bytes) -> None:
        p = d / "policy.yaml"
        p.write_bytes(data)
        _only_advguard_errors(load_policy, p)

    run()


def test_threat_model_loader_mutations():
    parse_threat_model(THREAT_MODEL)

    @FUZZ
    @given(data=mutated_bytes(THREAT_MODEL.encode()))
    def run(data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        _only_advguard_errors(parse_threat_model, text)

    run()


def _npz_seed() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((6, 4), dtype=np.float32), y=np.arange(6) % 2)
    return buf.getvalue()


def _npz_member_mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Mutate the .npy members inside the zip (headers included), keeping the zip valid."""

    @st.composite
    def strat(draw: Any) -> bytes:
        with zipfile.ZipFile(io.BytesIO(seed)) as z:
            members = {n: z.read(n) for n in z.namelist()}
        name = draw(st.sampled_from(sorted(members)))
        members[name] = draw(mutated_bytes(members[name][:160]) | mutated_bytes(members[name]))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        return out.getvalue()

    return strat()


def test_npz_loader_mutations(tmp_path_factory):
    from advguard.data.loaders import load_npz

    d = tmp_path_factory.mktemp("n")
    seed = _npz_seed()

    @FUZZ
    @given(data=mutated_bytes(seed) | _npz_member_mutations(seed))
    def run(data: bytes) -> None:
        p = d / "d.npz"
        p.write_bytes(data)
        _only_advguard_errors(load_npz, p)

    run()


def test_safetensors_metadata_mutations(tmp_path_factory):
    from advguard.models.io import read_safetensors_metadata, save_torch

    d = tmp_path_factory.mktemp("s")
    clf = TorchClassifier(mlp((4,), 3, hidden=(4,)), input_shape=(4,), num_classes=3)
    src = save_torch(
        clf,
        d / "seed.safetensors",
        factory="advguard.models.zoo:mlp",
        factory_kwargs={"input_shape": [4], "num_classes": 3, "hidden": [4]},
    )
    seed = src.read_bytes()
    n = int.from_bytes(seed[:8], "little")
    header = seed[: 8 + n]  # mutate where the metadata lives

    @FUZZ
    @given(data=mutated_bytes(header))
    def run(data: bytes) -> None:
        p = d / "m.safetensors"
        p.write_bytes(data + seed[8 + n :])
        _only_advguard_errors(read_safetensors_metadata, p)

    run()


def test_registry_reader_mutations(tmp_path_factory):
    from advguard.registry.store import Registry

    d = tmp_path_factory.mktemp("g")
    seed_root = d / "seed"
    with Registry(seed_root) as reg:
        reg.list_models()
    seed = (seed_root / "registry.db").read_bytes()
    i = iter(range(10**6))

    @FEW
    @given(data=mutated_bytes(seed))
    def run(data: bytes) -> None:
        root = d / f"r{next(i)}"
        root.mkdir()
        (root / "registry.db").write_bytes(data)

        def read() -> None:
            with Registry(root) as reg:
                reg.list_models()

        _only_advguard_errors(read)

    run()


# ----------------------------------------------------------------------------- CLI level
def test_gate_cli_on_mutated_reports(report_json, tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    pol = d / "p.yaml"
    pol.write_text(POLICY)
    runner = CliRunner()

    @FEW
    @given(doc=mutated_json(report_json), as_bytes=st.booleans())
    def run(doc: Any, as_bytes: bool) -> None:
        p = d / "report.json"
        text = json.dumps(doc)
        p.write_bytes(text.encode()[: len(text) // 2] if as_bytes else text.encode())
        r = runner.invoke(app, ["gate", "--report", str(p), "--policy", str(pol)])
        assert r.exit_code in (0, 1, 2), r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert "Traceback" not in r.output

    run()


def _write(d: Path, doc: Any) -> Path:
    p = d / "report.json"
    p.write_text(json.dumps(doc))
    return p
