"""Whole jobs behind the CLI: load model and data from files, evaluate, write the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.errors import InputError
from advguard.evaluate.report import Report, load_report
from advguard.evaluate.runner import Progress, evaluate
from advguard.evaluate.threat_model import ThreatModel, load_threat_model


@dataclass
class JobResult:
    report: Report
    json_path: Path
    html_path: Path | None


def load_model_and_data(
    model_path: str | Path,
    data_spec: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    cli: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load the model (never running code the file names) and the data, then check the
    model's outputs on the first batch: NaN/Inf or wrongly shaped outputs stop the job here
    with an :class:`InputError`. ``cli=True`` makes loader errors name CLI options."""
    from advguard.data import load_dataset
    from advguard.models.checks import check_model_outputs
    from advguard.models.io import CLI_OPTION_NAMES, file_sha256, load_model, option_names
    from advguard.models.text_io import is_text_model_file

    data = load_dataset(data_spec, **(data_kwargs or {}))
    if is_text_model_file(model_path) or data.modality == "text":
        model = load_text_classifier(model_path, data)
    else:
        with option_names(CLI_OPTION_NAMES) if cli else nullcontext():
            model = load_model(model_path, **(model_kwargs or {}))
        check_model_outputs(model, data.x)
    info = {
        "path": str(model_path),
        "sha256": file_sha256(model_path) if Path(model_path).is_file() else None,
    }
    return model, data, info


def load_text_classifier(model_path: str | Path, data: Any) -> Any:
    """A :class:`~advguard.attacks.text.TextClassifier` from a ``*.textmodel.json`` file,
    checked against text ``data`` (modality and class count)."""
    from advguard.attacks.text import TextClassifier
    from advguard.models.text_io import TEXT_MODEL_SUFFIX, is_text_model_file, load_text_model

    if not is_text_model_file(model_path):
        raise InputError(
            f"{data.name} is text data; give a text model file (*{TEXT_MODEL_SUFFIX}, see "
            "advguard.models.text_io.save_text_model), got {str(model_path)!r}"
        )
    if data.modality != "text":
        raise InputError(
            f"{model_path} is a text model but {data.name} is {data.modality} data; "
            "give a text data set (e.g. spamham)"
        )
    pipeline, info = load_text_model(model_path)
    if info["num_classes"] != data.num_classes:
        raise InputError(
            f"the text model has {info['num_classes']} classes, the data {data.num_classes}"
        )
    return TextClassifier(pipeline, class_names=info["class_names"] or data.class_names)


def data_info(data: Any) -> dict[str, Any]:
    return {
        "name": data.name,
        "source": data.source,
        "sha256": data.sha256(),
        "modality": data.modality,
        "class_names": data.class_names,
    }


def run_evaluation(
    model: Any,
    data: Any,
    threat_model: ThreatModel | str | Path,
    out_dir: str | Path,
    *,
    model_info: dict[str, Any] | None = None,
    baseline: str | Path | Report | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    html: bool = True,
    backend: Any = None,
    work: Any = None,
) -> JobResult:
    """Evaluate ``model`` on a :class:`advguard.data.Dataset`; write report.json (+ .html).

    Checkpoints (per batch, or per shard with a Ray backend) go to ``out_dir/.checkpoint``;
    ``resume=True`` continues from them, with either backend.
    ``backend``/``work``: run the suite on workers (see :func:`advguard.evaluate.evaluate`).
    """
    tm = threat_model if isinstance(threat_model, ThreatModel) else load_threat_model(threat_model)
    base = load_report(baseline) if isinstance(baseline, (str, Path)) else baseline
    out = Path(out_dir)
    if tm.is_text or getattr(data, "modality", None) == "text":
        if backend is not None:
            raise InputError("text evaluations run locally only; drop --backend")
        report = _text_report(model, data, tm, model_info, base, progress, resume)
        return write_outputs(report, out, html)
    if tuple(data.input_shape) != tuple(model.input_shape):
        raise InputError(
            f"data samples have shape {tuple(data.input_shape)} but the model expects "
            f"{tuple(model.input_shape)}"
        )
    report = evaluate(
        model,
        data.x,
        data.y,
        tm,
        model_info=model_info,
        data_info=data_info(data),
        feature_names=data.feature_names if data.modality == "tabular" else None,
        baseline=base,
        progress=progress,
        checkpoint_dir=out / ".checkpoint",  # the same for both backends: resume across them
        resume=resume,
        backend=backend,
        work=work,
    )
    return write_outputs(report, out, html)


def _text_report(
    model: Any,
    data: Any,
    tm: ThreatModel,
    model_info: dict[str, Any] | None,
    baseline: Report | None,
    progress: Progress | None,
    resume: bool,
) -> Report:
    from advguard.evaluate.text_runner import evaluate_text

    if not tm.is_text:
        raise InputError(
            f"{data.name} is text data but threat model {tm.name!r} has norm {tm.norm}; use a "
            "text threat model (norm: edits), e.g. the text-standard preset"
        )
    if getattr(data, "modality", None) != "text":
        raise InputError(
            f"threat model {tm.name!r} is a text threat model but {data.name} is "
            f"{data.modality} data; give a text data set (e.g. spamham)"
        )
    if resume:
        raise InputError("text evaluations are not checkpointed; run again without --resume")
    return evaluate_text(
        model,
        data.texts,
        data.y,
        tm,
        model_info=model_info,
        data_info=data_info(data),
        baseline=baseline,
        progress=progress,
    )


def write_outputs(report: Report, out: Path, html: bool) -> JobResult:
    """Write ``report.json`` (and ``report.html`` when ``html``) to ``out``."""
    json_path = report.write(out)
    html_path = None
    if html:
        from advguard.evaluate.html import write_html

        html_path = write_html(report, out)
    return JobResult(report, json_path, html_path)


QUICKSTART_SAMPLES = 150
"""Test images the quickstart evaluates under its default threat model (of the 397 held out)."""
QUICKSTART_EPSILONS = (0.1, 0.2, 0.3)
"""The quickstart's epsilon grid under its default threat model (``linf-standard`` has 0.05 too).

Cost is about (samples still robust at an epsilon) x (5,000 Square queries + 9 x 100 APGD-T
steps) per epsilon, so the grid and the sample count set the quickstart's run time; the
attacks, their steps and queries, and the sanity checks are the preset's."""


def quickstart_threat_model(
    spec: str = "linf-standard",
    *,
    samples: int | None = None,
    epsilons: Sequence[float] | None = None,
    full: bool = False,
) -> ThreatModel:
    """The threat model :func:`run_quickstart` evaluates under.

    The default preset ``linf-standard`` is run on :data:`QUICKSTART_SAMPLES` samples at
    :data:`QUICKSTART_EPSILONS` (same attacks, steps, queries and sanity checks) unless
    ``full``; any other preset or file runs as it is. ``samples``/``epsilons`` override both.
    """
    tm = load_threat_model(spec)
    if spec == "linf-standard" and not full:
        tm = tm.with_overrides(samples=QUICKSTART_SAMPLES, epsilons=list(QUICKSTART_EPSILONS))
    if samples is not None or epsilons is not None:
        tm = tm.with_overrides(
            samples=samples, epsilons=None if epsilons is None else list(epsilons)
        )
    return tm


def run_quickstart(
    out_dir: str | Path = "advguard-report",
    *,
    threat_model: str = "linf-standard",
    epochs: int = 15,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    samples: int | None = None,
    epsilons: Sequence[float] | None = None,
    full: bool = False,
) -> JobResult:
    """Train a small CNN on built-in digits, evaluate it under ``threat_model``, write a report
    (training and evaluation on ``device``).

    See :func:`quickstart_threat_model` for what runs (``samples``, ``epsilons``, ``full``).
    """
    tm = quickstart_threat_model(threat_model, samples=samples, epsilons=epsilons, full=full)
    from advguard.data import load_builtin
    from advguard.models import TorchClassifier
    from advguard.models.fit import fit
    from advguard.models.io import file_sha256, save_torch
    from advguard.models.zoo import small_cnn

    report_progress = progress or (lambda stage, done, total: None)
    torch.manual_seed(seed)
    data = load_builtin("digits")
    train, test = data.split(test_size=397, seed=seed)
    t0 = time.perf_counter()
    module = fit(
        small_cnn((1, 8, 8), 10),
        train.x,
        train.y,
        epochs=epochs,
        seed=seed,
        device=device,
        progress=lambda e, n, loss: report_progress("train", e, n),
    )
    train_s = time.perf_counter() - t0
    model = TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10, bounds=(0.0, 1.0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = save_torch(
        model,
        out / "model.safetensors",
        factory="advguard.models.zoo:small_cnn",
        factory_kwargs={"input_shape": [1, 8, 8], "num_classes": 10},
        input_shape=(1, 8, 8),
        num_classes=10,
        bounds=(0.0, 1.0),
    )
    np.savez_compressed(out / "test-data.npz", x=test.x, y=test.y)
    info = {
        "path": str(weights),
        "sha256": file_sha256(weights),
        "name": "digits small_cnn",
        "train_seconds": train_s,
        "trained_on": f"digits ({len(train)} images)",
    }
    return run_evaluation(model, test, tm, out, model_info=info, progress=progress)
