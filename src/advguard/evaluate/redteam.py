"""Red-team a live HTTP prediction endpoint with black-box attacks.

:func:`run_redteam` wraps the endpoint in an :class:`~advguard.models.http_model.HttpClassifier`
and runs :func:`advguard.evaluate.job.run_evaluation` on it, so the report, the per-batch
checkpoints (``out_dir/.checkpoint``) and ``resume`` work exactly as for local models.

Two things differ from a local evaluation:

* the threat model must be black-box (or transfer): the endpoint gives no gradients, and a
  white-box attack in the suite is refused before any request is sent;
* a hard query budget. When it runs out the run still writes ``report.json`` /
  ``report.html`` with every batch finished so far (a failing ``query-budget`` check says
  what is missing, so the report is marked untrustworthy); ``resume=True`` with a larger
  budget continues from the checkpoint without re-querying finished batches.

Text data (``modality == "text"``, e.g. ``spamham``) with a text threat model (``norm:
edits``, e.g. ``text-standard``) goes to the text evaluation
(:mod:`advguard.evaluate.text_runner`) through an
:class:`~advguard.models.http_model.HttpTextClassifier`, which sends the texts as JSON
strings. Text evaluations are not checkpointed: when the budget runs out, nothing is
reported (:class:`QueryBudgetExceeded`) and ``resume`` is refused.

The report names the endpoint without credentials or query-string values and never
contains the API key.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advguard.errors import InputError
from advguard.evaluate.job import JobResult, data_info, run_evaluation
from advguard.evaluate.report import Report, SanityCheck
from advguard.evaluate.runner import Evaluator, Progress, Records, RunState, select_samples
from advguard.evaluate.threat_model import ThreatModel, load_threat_model
from advguard.models.http_model import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HttpClassifier,
    HttpOutput,
    HttpTextClassifier,
    QueryBudgetExceeded,
)

BLACK_BOX_KNOWLEDGE = ("black-box", "transfer")
_EXPLICIT = frozenset(
    {
        "input_shape", "num_classes", "bounds", "output", "input_field", "output_field",
        "flatten", "api_key", "api_key_header", "api_key_prefix", "batch_size", "timeout",
        "retries", "query_budget", "max_response_bytes",
    }
)  # fmt: skip


def check_black_box(tm: ThreatModel) -> None:
    """Raise :class:`InputError` unless ``tm`` only needs model queries (no gradients)."""
    from advguard.attacks.registry import ATTACKS

    black = sorted(n for n, a in ATTACKS.items() if a.knowledge != "white-box")
    hint = (
        f"black-box attacks: {', '.join(black)}"
        if black
        else "no black-box attack is registered in this advguard version"
    )
    if tm.knowledge not in BLACK_BOX_KNOWLEDGE:
        raise InputError(
            f"threat model {tm.name!r} declares knowledge: {tm.knowledge}, but an HTTP endpoint "
            "only answers queries (no gradients). Use a threat model with knowledge: black-box "
            f"and black-box attacks ({hint})."
        )
    white = [s.attack for s in tm.attacks if ATTACKS[s.attack].knowledge == "white-box"]
    if white:
        raise InputError(
            f"threat model {tm.name!r} lists white-box attacks ({', '.join(white)}) that need "
            f"gradients an HTTP endpoint does not give; remove them ({hint})."
        )


def run_redteam(
    url: str,
    data: Any,
    threat_model: ThreatModel | str | Path,
    out_dir: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    api_key: str | None = None,
    api_key_header: str = "Authorization",
    api_key_prefix: str | None = None,
    query_budget: int | None = None,
    input_field: str = "inputs",
    output_field: str | None = None,
    output: HttpOutput = "probabilities",
    flatten: bool = False,
    batch_size: int = 64,
    timeout: float = 30.0,
    retries: int = 3,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    client_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    html: bool = True,
) -> JobResult:
    """Attack the classifier behind ``url`` under a black-box ``threat_model``; write a report.

    ``data`` is a :class:`advguard.data.Dataset` or a dataset spec (``"digits"``, a path...);
    ``input_shape``, ``num_classes`` and ``bounds`` default to the data set's.
    ``query_budget`` caps the samples the endpoint answers in this call (a resumed run gets
    a fresh budget; finished batches are not queried again). ``batch_size`` is the most
    samples per HTTP request (the threat model's ``batch_size`` is the evaluation batch).
    ``timeout`` is the total deadline of one HTTP request (connect, headers and body) and
    the longest a single read may wait; ``max_response_bytes`` caps one response body.
    ``client_options`` go to :class:`HttpClassifier` (``headers``, ``extra_fields``,
    ``backoff``, ``max_retry_after``, ``seed``, ``ssl_context``, ``proxies``...).

    Raises :class:`InputError` for a white-box threat model (before any request) and
    :class:`QueryBudgetExceeded` when the budget runs out before the first batch finished
    (nothing to report). Endpoint failures raise
    :class:`~advguard.models.http_model.EndpointError`; finished batches stay in the
    checkpoint, so ``resume=True`` continues.
    """
    tm = threat_model if isinstance(threat_model, ThreatModel) else load_threat_model(threat_model)
    check_black_box(tm)
    extra = dict(client_options or {})
    clash = sorted(set(extra) & _EXPLICIT)
    if clash:
        raise InputError(f"client_options repeats argument(s) of run_redteam: {', '.join(clash)}")
    if isinstance(data, str | Path):
        from advguard.data import load_dataset

        data = load_dataset(str(data))
    common: dict[str, Any] = dict(
        output=output,
        input_field=input_field,
        output_field=output_field,
        api_key=api_key,
        api_key_header=api_key_header,
        api_key_prefix=api_key_prefix,
        batch_size=batch_size,
        timeout=timeout,
        retries=retries,
        max_response_bytes=max_response_bytes,
        query_budget=query_budget,
        **extra,
    )
    model = _endpoint_model(url, tm, data, common, input_shape, num_classes, bounds, flatten)
    return redteam_model(model, data, tm, out_dir, progress=progress, resume=resume, html=html)


def _endpoint_model(
    url: str,
    tm: ThreatModel,
    data: Any,
    common: dict[str, Any],
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    bounds: tuple[float, float] | None,
    flatten: bool,
) -> HttpClassifier | HttpTextClassifier:
    """The client for the endpoint: text (strings) or numeric, as the data and threat model say."""
    if _check_text(tm, data):
        numeric = [
            name
            for name, val in (
                ("input_shape", input_shape),
                ("bounds", bounds),
                ("flatten", flatten),
            )
            if val not in (None, False)
        ]
        if numeric:
            raise InputError(
                f"{', '.join(numeric)} describe numeric inputs; {data.name} is text data and "
                "a text endpoint is sent strings"
            )
        k = num_classes if num_classes is not None else data.num_classes
        return HttpTextClassifier(
            url,
            num_classes=k,
            class_names=data.class_names if k == data.num_classes else None,
            **common,
        )
    return HttpClassifier(
        url,
        input_shape=tuple(input_shape) if input_shape is not None else data.input_shape,
        num_classes=num_classes if num_classes is not None else data.num_classes,
        bounds=tuple(bounds) if bounds is not None else tuple(data.bounds),  # type: ignore[arg-type]
        flatten=flatten,
        **common,
    )


def _check_text(tm: ThreatModel, data: Any) -> bool:
    """Whether this is a text red-team; raise :class:`InputError` if data and threat model
    disagree (before any request)."""
    text_data = getattr(data, "modality", None) == "text"
    if tm.is_text and not text_data:
        raise InputError(
            f"threat model {tm.name!r} is a text threat model (norm: edits) but "
            f"{getattr(data, 'name', 'the data')} is {getattr(data, 'modality', 'numeric')} data; "
            "give a text data set (e.g. spamham) or a numeric threat model"
        )
    if text_data and not tm.is_text:
        raise InputError(
            f"{data.name} is text data but threat model {tm.name!r} has norm {tm.norm}; use a "
            "text threat model (norm: edits), e.g. the text-standard preset"
        )
    return text_data


def redteam_model(
    model: HttpClassifier | HttpTextClassifier,
    data: Any,
    threat_model: ThreatModel,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    resume: bool = False,
    html: bool = True,
) -> JobResult:
    """:func:`run_redteam` for an already built :class:`HttpClassifier` (numeric data) or
    :class:`HttpTextClassifier` (text data, text threat model)."""
    tm = threat_model
    check_black_box(tm)
    text = _check_text(tm, data)
    if text != isinstance(model, HttpTextClassifier):
        raise InputError(
            f"{type(model).__name__} cannot be red-teamed on "
            f"{getattr(data, 'modality', 'numeric')} data; use "
            f"{'HttpTextClassifier' if text else 'HttpClassifier'}"
        )
    out = Path(out_dir)
    ckpt = out / ".checkpoint"
    info: dict[str, Any] = {"name": f"HTTP endpoint {model.endpoint}", **model.describe()}
    t0 = time.perf_counter()
    exhausted: QueryBudgetExceeded | None = None
    try:
        res = run_evaluation(
            model, data, tm, out, model_info=info, progress=progress, resume=resume, html=False
        )
        report = res.report
    except QueryBudgetExceeded as exc:
        if isinstance(model, HttpTextClassifier):
            raise QueryBudgetExceeded(
                exc.budget,
                exc.used,
                exc.requested,
                f"query budget of {exc.budget} texts ran out during the text evaluation "
                f"({exc.used} answered, the next request needs {exc.requested} more); text "
                "evaluations are not checkpointed, so nothing is reported: raise the query "
                "budget, or lower the threat model's samples or the attacks' max_queries",
            ) from exc
        exhausted = exc
        report = _partial_report(model, data, tm, ckpt, info, exc, time.perf_counter() - t0)
    report.model["queries"] = model.usage()
    report.model["query_budget_exhausted"] = exhausted is not None
    json_path = report.write(out)
    html_path = None
    if html:
        from advguard.evaluate.html import write_html

        html_path = write_html(report, out)
    return JobResult(report, json_path, html_path)


def _partial_report(
    model: HttpClassifier,
    data: Any,
    tm: ThreatModel,
    ckpt: Path,
    info: dict[str, Any],
    exc: QueryBudgetExceeded,
    seconds: float,
) -> Report:
    """Build the report from the batches checkpointed before the budget ran out.

    Uses the runner's own checkpoint reader and report builder, so the numbers are exactly
    what a finished run would report on those samples.
    """
    ev = Evaluator(
        model,
        data.x,
        data.y,
        tm,
        model_info=info,
        data_info=data_info(data),
        feature_names=data.feature_names if data.modality == "tabular" else None,
        checkpoint_dir=ckpt,
        resume=True,
    )
    idx = select_samples(len(data.x), tm.samples, tm.seed)
    state = ev.new_state(idx)
    batches = [
        np.arange(i, min(i + tm.batch_size, len(idx))) for i in range(0, len(idx), tm.batch_size)
    ]
    done = ev.load_checkpoint(state, idx)  # mask of the finished sample positions
    if not done.any():
        raise QueryBudgetExceeded(
            exc.budget,
            exc.used,
            exc.requested,
            f"query budget of {exc.budget} samples ran out before the first batch of "
            f"{len(batches[0])} samples was evaluated, so there is nothing to report; raise "
            "the query budget, or lower the threat model's samples, batch_size or attack "
            "query limits",
        ) from exc
    keep = np.flatnonzero(done)
    n_done = sum(bool(done[b].all()) for b in batches)
    sub = Records(**{k: v[keep] for k, v in state.records.as_dict().items()})
    part = RunState(
        state.epsilons,
        state.attacks,
        sub,
        stats=state.stats,
        order=state.order,
        examples=state.examples,
    )
    n_req = len(idx)
    check = _budget_check(exc, n_done, len(batches), len(keep), n_req)
    first_robust = [int(sub.robust_at(e).sum()) for e in range(len(state.epsilons))]
    report = ev.build_report(
        part,
        idx[keep],
        [check],
        first_robust,
        timing={
            "suite_seconds": seconds,
            "sanity_and_escalation_seconds": 0.0,
            "total_seconds": seconds,
        },
    )
    report.data["n_requested"] = n_req
    return report


def _budget_check(
    exc: QueryBudgetExceeded, n_done_batches: int, n_batches: int, n_done: int, n_req: int
) -> SanityCheck:
    """The failed ``query-budget`` check: where the budget ran out and what was evaluated."""
    details = {
        "query_budget": exc.budget,
        "samples_answered": exc.used,
        "next_request_samples": exc.requested,
        "batches_done": n_done_batches,
        "batches_total": n_batches,
        "samples_evaluated": n_done,
        "samples_requested": n_req,
    }
    if n_done_batches == n_batches:
        explanation = (
            f"The query budget of {exc.budget} samples ran out during the sanity checks, after "
            f"the attack suite had finished on all {n_req} samples. The sanity checks, which "
            "catch false robustness (e.g. an attack that fails at an unbounded epsilon), did "
            "not run, so the robust accuracy may be overstated."
        )
    else:
        explanation = (
            f"The query budget of {exc.budget} samples ran out in batch {n_done_batches + 1} of "
            f"{n_batches}: only {n_done} of the {n_req} requested samples were evaluated "
            "(the first batches in data-set order, which need not be a representative "
            "subset) and the sanity checks did not run."
        )
    return SanityCheck(
        id="query-budget",
        title="Evaluation finished within the query budget",
        status="fail",
        explanation=explanation,
        suggestion=(
            "Re-run with resume and a larger query budget: finished batches are kept in the "
            "checkpoint and not queried again."
        ),
        details=details,
    )
