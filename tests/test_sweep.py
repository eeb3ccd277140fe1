"""advguard sweep: the spec, the trials, the Pareto front, the HTML report, the local backend
end to end on the example spec (sklearn digits), resume, and Ray Tune giving the local
backend's numbers (skipped without the ``ray`` extra)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from advguard.cli import app
from advguard.defenses.sweep import (
    SWEEP_SCHEMA,
    SweepSpec,
    load_sweep_spec,
    pareto_front,
    parse_sweep_spec,
    run_sweep,
    sweep_html,
)
from advguard.defenses.sweep import runner as sweep_runner
from advguard.defenses.sweep.runner import build_document
from advguard.defenses.sweep.trial import weights_sha256
from advguard.errors import InputError
from advguard.models.io import file_sha256

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep-trades-digits.yaml"

SPEC = """
defense: trades
data: digits
train: {epochs: 1}
search:
  beta: [1.0, 6.0]
  lr: {loguniform: [0.0001, 0.01]}
  mix: {uniform: [0.0, 0.5]}
  optimizer: {choice: [adam, sgd]}
num_samples: 3
threat_model: quick
seed: 7
"""


# -- the Pareto front -------------------------------------------------------------------
def test_pareto_front_by_hand() -> None:
    pts = [(0.9, 0.1), (0.8, 0.5), (0.7, 0.4), (0.6, 0.6), (0.8, 0.5), (0.5, 0.6), (0.9, 0.05)]
    # (0.7, 0.4) is beaten by (0.8, 0.5); (0.5, 0.6) by (0.6, 0.6); (0.9, 0.05) by (0.9, 0.1);
    # the two equal points (0.8, 0.5) dominate neither each other: both are on the front
    assert pareto_front(pts) == [0, 1, 3, 4]
    assert pareto_front([]) == []
    assert pareto_front([(0.3, 0.3)]) == [0]
    assert pareto_front([(0.1, 0.9), (0.9, 0.1), (0.5, 0.5), (0.4, 0.4)]) == [0, 1, 2]


# -- the spec and its trials ------------------------------------------------------------
def test_trials_cross_the_grid_with_seeded_draws() -> None:
    spec = parse_sweep_spec(SPEC)
    tm = spec.threat()
    trials = spec.trials(tm)
    assert len(trials) == 2 * 3  # grid beta x num_samples draws
    assert [t["id"] for t in trials] == [f"t{i:03d}" for i in range(6)]
    assert [t["params"]["beta"] for t in trials] == [1.0, 6.0] * 3
    for t in trials:
        assert 1e-4 <= t["params"]["lr"] <= 1e-2 and 0.0 <= t["params"]["mix"] <= 0.5
        assert t["params"]["optimizer"] in ("adam", "sgd")
        assert t["config"]["train"] == {"epochs": 1, **t["params"]}
        assert t["config"]["arch"] == "advguard.models.zoo:small_cnn"
    # one draw per sample, shared by the grid points of that sample
    assert trials[0]["params"]["lr"] == trials[1]["params"]["lr"] != trials[2]["params"]["lr"]
    assert len({t["key"] for t in trials}) == 6
    again = parse_sweep_spec(SPEC).trials(tm)
    assert [t["key"] for t in again] == [t["key"] for t in trials]  # same seed, same trials
    other = parse_sweep_spec(SPEC.replace("seed: 7", "seed: 8")).trials(tm)
    assert other[0]["params"]["lr"] != trials[0]["params"]["lr"]
    assert spec.headline(tm) == 0.3  # default: the largest epsilon of quick


def test_the_docs_spec_is_valid() -> None:
    """The annotated spec in docs/scale.md parses and gives the trials it says."""
    doc = (EXAMPLE.parents[1] / "docs" / "scale.md").read_text()
    text = doc.split("**The spec**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_sweep_spec(text, "docs/scale.md")
    tm = spec.threat()
    assert len(spec.trials(tm)) == 4 * 3 and spec.headline(tm) == 0.1 and tm.samples == 200


BAD_SPECS = {
    "no defense": ("data: digits", "defense"),
    "unknown defense": ("defense: magic\ndata: digits", "defense"),
    "unknown key": ("defense: trades\ndata: digits\nepochz: 3", "epochz"),
    "arch is not a zoo factory": ("defense: trades\ndata: digits\narch: os:system", "zoo"),
    "unknown training argument": ("defense: trades\ndata: digits\ntrain: {betta: 1}", "betta"),
    "seed is not searchable": ("defense: trades\ndata: digits\nsearch: {seed: [1, 2]}", "seed"),
    "fixed and searched": (
        "defense: trades\ndata: digits\ntrain: {beta: 1}\nsearch: {beta: [1, 2]}",
        "both fixed",
    ),
    "loguniform from 0": (
        "defense: trades\ndata: digits\nsearch: {lr: {loguniform: [0, 1]}}",
        "0 < low",
    ),
    "uniform upside down": (
        "defense: trades\ndata: digits\nsearch: {lr: {uniform: [2, 1]}}",
        "low < high",
    ),
    "unknown device": ("defense: trades\ndata: digits\ndevice: tpu", "device must be"),
    "cuda without a GPU": ("defense: trades\ndata: digits\ndevice: cuda", "resources.gpu"),
    "empty grid": ("defense: trades\ndata: digits\nsearch: {beta: []}", "search"),
    "not a mapping": ("- defense: trades", "mapping"),
    "not YAML": ("defense: [trades", "YAML"),
}


@pytest.mark.parametrize("text,words", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_is_a_one_line_error(text: str, words: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_sweep_spec(text, "spec.yaml")
    msg = str(exc.value)
    assert words in msg and "\n" not in msg and msg.startswith("spec.yaml"), msg


def test_threat_model_and_headline_errors() -> None:
    spec = parse_sweep_spec("defense: trades\ndata: digits\nheadline_epsilon: 0.2")
    with pytest.raises(InputError, match=r"headline_epsilon 0\.2 is not one of"):
        spec.headline(spec.threat())
    inline = parse_sweep_spec("defense: trades\ndata: digits\nthreat_model: {epsilons: [0.1]}")
    with pytest.raises(InputError, match=r"threat_model: .*attacks"):
        inline.threat()


def test_cli_bad_spec_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("defense: trades\ndata: digits\nsearch: {beta: {loguniform: [-1, 1]}}\n")
    r = CliRunner().invoke(app, ["sweep", "run", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "loguniform" in lines[0]


def test_cli_without_ray_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the 'ray' extra were not installed
    r = CliRunner().invoke(app, ["sweep", "run", str(EXAMPLE), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'advguard[ray]'" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


# -- the HTML report --------------------------------------------------------------------
def _fake(tid: str, clean: float, robust: float, **params: Any) -> dict[str, Any]:
    return {
        "id": tid, "key": tid * 8, "params": params, "status": "ok", "error": None,
        "clean_accuracy": clean,
        "robust_accuracy": [{"epsilon": 0.1, "value": robust, "n": 100}],
        "robust_headline": robust, "train_time_s": 1.0, "eval_time_s": 0.5,
        "model": {"path": f"trials/{tid}/model.safetensors", "sha256": "ab" * 32},
    }  # fmt: skip


def test_html_escapes_every_string_and_marks_the_front() -> None:
    evil = '<script>alert("x")</script>'
    spec = parse_sweep_spec(
        f"name: '{evil}'\ndefense: trades\ndata: digits\nthreat_model: "
        "{name: '<b>tm</b>', epsilons: [0.1], attacks: [{attack: pgd}]}"
    )
    tm = spec.threat()
    records = [
        _fake("t000", 0.9, 0.2, note=evil),
        _fake("t001", 0.7, 0.6, note="a&b"),
        _fake("t002", 0.6, 0.5, note="c"),
        {"id": "t003", "key": "k" * 64, "params": {"note": "d"}, "status": "error",
         "error": "ValueError: <img src=x onerror=alert(1)>"},
    ]  # fmt: skip
    doc = build_document(spec, 0.1, tm.model_dump(mode="json"), records, "local")
    assert doc["pareto_front"] == ["t000", "t001"]
    assert [t["pareto"] for t in doc["trials"]] == [True, True, False, False]
    page = sweep_html(doc)
    assert "<script" not in page and "<img" not in page and "<b>tm" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "a&amp;b" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert page.count('class="p on"') == 2 and page.count('class="p"') == 1  # t003 not plotted
    assert "<polyline" in page


# -- the local backend end to end -------------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The example spec (4 TRADES trials on digits) through the CLI, local backend, plus a
    fifth trial whose learning rate is invalid (a failure recorded, not fatal)."""
    d = tmp_path_factory.mktemp("sweep")
    text = EXAMPLE.read_text().replace("  epsilon: [0.1]", "  epsilon: [0.1]\n  lr: [0.002]")
    assert "lr: [0.002]" in text
    spec = d / "spec.yaml"
    spec.write_text(text)
    spec_bad = d / "spec-bad.yaml"
    spec_bad.write_text(
        text.replace("lr: [0.002]", "lr: [0.002, -1.0]").replace("  lr: 0.002\n", "")
    )
    spec.write_text(text.replace("  lr: 0.002\n", ""))
    out = d / "out"
    r = CliRunner().invoke(
        app, ["sweep", "run", str(spec_bad), "--out", str(out), "--backend", "local", "--json"]
    )
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_local_sweep_end_to_end(local_sweep: tuple[Path, dict[str, Any]]) -> None:
    out, doc = local_sweep
    assert doc == json.loads((out / "sweep.json").read_text())
    assert doc["schema"] == SWEEP_SCHEMA and doc["backend"] == "local"
    assert doc["headline_epsilon"] == 0.1 and doc["threat_model"]["epsilons"] == [0.05, 0.1]
    trials = doc["trials"]
    assert len(trials) == 8
    bad = [t for t in trials if t["params"]["lr"] < 0]
    good = [t for t in trials if t["params"]["lr"] > 0]
    assert len(bad) == 4 and all(t["status"] == "error" for t in bad)
    assert all("lr" in t["error"] and "\n" not in t["error"] for t in bad)
    assert all(t["status"] == "ok" for t in good)
    for t in good:
        model = out / t["model"]["path"]
        assert file_sha256(model) == t["model"]["sha256"]
        assert weights_sha256(model) == t["model"]["weights_sha256"]
        report = json.loads((out / t["report"]).read_text())
        assert report["clean_accuracy"]["value"] == t["clean_accuracy"]
        assert report["model"]["sha256"] == t["model"]["sha256"]
        manifest = json.loads((model.parent / "manifest.json").read_text())
        assert manifest["method"] == "trades" and manifest["config"]["beta"] == t["params"]["beta"]
        assert t["n_evaluated"] == 120  # the held-out split (10% of 1797 = 180), 120 samples
        assert t["clean_accuracy"] > 0.7  # 2 epochs of TRADES on digits learn something
        rob = {r["epsilon"]: r["value"] for r in t["robust_accuracy"]}
        assert t["robust_headline"] == rob[0.1] <= rob[0.05] <= t["clean_accuracy"]
    pts = [(t["clean_accuracy"], t["robust_headline"]) for t in good]
    want = [good[i]["id"] for i in pareto_front(pts)]
    assert doc["pareto_front"] == want and want
    assert {t["id"] for t in trials if t["pareto"]} == set(want)
    # the parameters matter: the four trained models differ
    assert len({t["model"]["weights_sha256"] for t in good}) == 4
    page = (out / "sweep.html").read_text()
    assert all(t["id"] in page for t in trials) and "<svg" in page


def test_resume_runs_only_what_did_not_finish(
    local_sweep: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, before = local_sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    spec = load_sweep_spec(src.parent / "spec-bad.yaml")
    with pytest.raises(InputError, match=r"sweep\.json exists"):
        run_sweep(spec, out, backend="local")
    calls: list[dict[str, Any]] = []

    def fake(config: dict[str, Any], trial_dir: Any, clock: Any = None) -> dict[str, Any]:
        calls.append(config)
        return {"status": "error", "error": "still failing"}

    monkeypatch.setattr(sweep_runner, "run_trial", fake)
    res = run_sweep(spec, out, backend="local", resume=True)
    assert res.ran == 4 and sorted(c["train"]["lr"] for c in calls) == [-1.0] * 4
    kept = {t["key"]: t for t in res.document["trials"] if t["status"] == "ok"}
    assert kept == {t["key"]: t for t in before["trials"] if t["status"] == "ok"}
    # the good spec alone: everything is already done
    calls.clear()
    res = run_sweep(load_sweep_spec(src.parent / "spec.yaml"), out, backend="local", resume=True)
    assert res.ran == 0 and not calls and len(res.document["trials"]) == 4
    # a trial whose model file disappeared is run again, and so is a tampered record
    (out / res.document["trials"][0]["model"]["path"]).unlink()
    doc = json.loads((out / "sweep.json").read_text())
    doc["trials"][1]["train_time_s"] = "<b>fast</b>"
    (out / "sweep.json").write_text(json.dumps(doc))
    res = run_sweep(load_sweep_spec(src.parent / "spec.yaml"), out, backend="local", resume=True)
    assert res.ran == 2 and len(calls) == 2
    assert [t["status"] for t in res.document["trials"]] == ["error", "error", "ok", "ok"]


# -- Ray Tune ---------------------------------------------------------------------------
def test_ray_tune_gives_the_local_numbers(
    local_sweep: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("ray.tune", reason="the Ray Tune backend needs the 'ray' extra")
    import ray

    ray_was_up = ray.is_initialized()
    src, local = local_sweep
    spec = load_sweep_spec(src.parent / "spec.yaml")
    # two of the example's trials (beta 1 and 6), two at a time on Ray Tune
    spec = SweepSpec.model_validate(
        {**spec.model_dump(), "search": {**spec.model_dump()["search"], "beta": [1.0, 6.0]}}
    )
    done: list[int] = []
    lock = threading.Lock()  # the driver's callback may hold what cannot be pickled (a bar)

    def on_trial(n: int, total: int, rec: Any) -> None:
        with lock:
            done.append(n)

    res = run_sweep(spec, tmp_path / "ray", backend="ray", max_concurrent=2, on_trial=on_trial)
    assert done == [0, 1, 2] and res.ran == 2 and res.document["backend"] == "ray"
    assert ray.is_initialized() == ray_was_up  # a Ray it started is shut down again
    by_key = {t["key"]: t for t in local["trials"]}
    for t in res.document["trials"]:
        assert t["status"] == "ok", t.get("error")
        twin = by_key[t["key"]]  # the same trial (same parameters and seed) run locally
        assert twin["params"] == t["params"]
        # bit-identical weights (one torch thread, the same seed) and numbers (the evaluation
        # draws per sample). The files' sha256 may differ: safetensors writes the metadata
        # in a hash-map order that changes from process to process.
        assert t["model"]["weights_sha256"] == twin["model"]["weights_sha256"]
        assert t["clean_accuracy"] == twin["clean_accuracy"]
        assert t["robust_accuracy"] == twin["robust_accuracy"]


def test_a_malformed_trial_result_is_recorded_as_an_error() -> None:
    good = _fake("t000", 0.9, 0.5)
    good["model"]["weights_sha256"] = "cd" * 32
    assert sweep_runner.result_from_wire(json.dumps(good)) == good
    for broken in (
        {**good, "clean_accuracy": "0.9"},
        {**good, "train_time_s": float("nan")},
        {**good, "robust_accuracy": [{"epsilon": "x", "value": 0.1}]},
        {**good, "model": {"path": "m"}},
        {"status": "error"},
        ["not", "a", "dict"],
    ):
        r = sweep_runner.result_from_wire(json.dumps(broken))
        assert r["status"] == "error" and "malformed" in r["error"], broken
    assert sweep_runner.result_from_wire("{not json")["status"] == "error"
