"""Shared pieces of the command line: consoles, progress bars, option types, parsers, and the
``Commands`` table through which each command module declares its commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from advguard.errors import AdvguardError

console = Console()
err_console = Console(stderr=True)


@dataclass
class Commands:
    """The commands one module declares, attached by ``advguard.cli`` with the central error
    mapping. ``group=None`` puts them at the top level; otherwise under ``advguard GROUP``."""

    group: str | None = None
    help: str | None = None
    items: list[tuple[str | None, Callable[..., Any]]] = field(default_factory=list)

    def command(self, name: str | None = None) -> Callable[[Callable[..., Any]], Any]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.items.append((name, fn))
            return fn

        return register


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def print_json(obj: Any) -> None:
    import json

    console.print_json(json.dumps(obj, default=str))


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

STAGE_LABELS = {
    "train": "Training CNN on digits",
    "suite": "Attack suite (batches)",
    "shards": "Attack suite (Ray shards)",
    "sanity": "Sanity checks",
    "escalation": "Escalation (epsilons)",
    "selection": "Smoothing: selection (noise samples)",
    "estimation": "Smoothing: estimation (noise samples)",
    "ibp": "IBP (epsilons)",
}


def progress_callback(bar: Progress) -> Callable[[str, int, int], None]:
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(STAGE_LABELS.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return on_progress


def render_summary(report: Any, json_path: Path, html_path: Path | None) -> None:
    colour = {"pass": "green", "fail": "red", "untrustworthy": "dark_orange", "no-slo": "grey50"}
    v = report.verdict
    table = Table(
        title=f"Robustness under {report.threat_model['name']} "
        f"({report.threat_model['norm']}, {report.data['n_evaluated']} samples)"
    )
    table.add_column("epsilon", justify="right")
    table.add_column("robust accuracy [95% CI]", justify="right")
    table.add_column("fooling rate", justify="right")
    table.add_column("median perturbation", justify="right")
    table.add_column("before escalation", justify="right")
    norm = report.threat_model["norm"]
    key = norm if norm in ("linf", "l2", "l0", "edits") else "l2"
    for r in report.results:
        stat = r.perturbation.get(key)
        med = stat.median if stat is not None else None
        table.add_row(
            f"{r.epsilon:g}",
            str(r.robust_accuracy),
            f"{r.fooling_rate.value:.1%}" if r.fooling_rate.value is not None else "n/a",
            f"{med:.4g}" if med is not None else "-",
            f"{r.first_robust_accuracy.value:.1%}" if r.first_robust_accuracy else "-",
        )
    console.print(f"Clean accuracy: {report.clean_accuracy}")
    console.print(table)
    for c in report.sanity_checks:
        if c.status in ("warn", "fail"):
            style = "red" if c.status == "fail" else "yellow"
            console.print(f"[{style}]{c.status.upper()}[/] {c.title}: {c.explanation}")
            if c.escalation:
                console.print(f"      escalation: {c.escalation}")
    for s in v.slos:
        console.print(
            f"  SLO {s.slo}: {s.holds}" + (f" (value {s.value:.4g})" if s.value is not None else "")
        )
    console.print(f"Verdict: [bold {colour[v.status]}]{v.status.upper()}[/] - {v.summary}")
    console.print(
        f"Report: [bold]{json_path}[/]" + (f" and [bold]{html_path}[/]" if html_path else "")
    )


def parse_floats(text: str | None, option: str = "--epsilons") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdvguardError(f"{option} must be numbers separated by commas, got {text!r}") from None


def parse_kv(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise AdvguardError(f"expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model file: .onnx, .skops, .safetensors (advguard zoo metadata or --factory), "
        ".pt state dict (--factory, --input-shape, --num-classes) or TorchScript (--torchscript)",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Data: digits|breast_cancer|wine, a "
        ".npz, a .csv/.parquet (?target=COL) or an image folder",
    ),
]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").replace(" ", "").split(",") if t)
    except ValueError:
        raise AdvguardError(f"--input-shape must be integers like 1,28,28, got {text!r}") from None
    if not shape:
        raise AdvguardError(f"--input-shape must be integers like 1,28,28, got {text!r}")
    return shape


def parse_bounds(text: str | None) -> tuple[float, float] | None:
    vals = parse_floats(text, "--bounds")
    if vals is None:
        return None
    if len(vals) != 2:
        raise AdvguardError(f"--bounds must be two numbers LOW,HIGH, got {text!r}")
    return vals[0], vals[1]


# -- how to build a model from a file (evaluate, attack, certify) ---------------------------
FactoryOpt = Annotated[
    str | None,
    typer.Option(
        help="pkg.module:callable building the torch model for .safetensors/.pt weights "
        "(code you trust; a model file never chooses code to run)"
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(help="One input's shape, e.g. 1,28,28 (.pt state dicts and TorchScript)"),
]
NumClassesOpt = Annotated[
    int | None, typer.Option(min=2, help="Number of classes (.pt state dicts and TorchScript)")
]
BoundsOpt = Annotated[str | None, typer.Option(help="Input range LOW,HIGH (default 0,1)")]
TorchScriptOpt = Annotated[
    bool,
    typer.Option(
        help="Load a TorchScript .pt archive: its TorchScript code runs in torch's interpreter "
        "(no Python imports); only for archives you trust"
    ),
]


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where torch models run: cpu, cuda, cuda:N, mps or auto (CUDA when available). "
        "Full precision, deterministic cuDNN; ONNX/skops models always run on the CPU",
    ),
]


def cli_device(spec: str) -> Any:
    """The ``--device`` option checked (an unavailable GPU is a one-line error, exit 2) as a
    ``torch.device``; on CUDA, cuDNN is made deterministic and TF32 is turned off."""
    from advguard.models.devices import configure_determinism, resolve_device

    dev = resolve_device(spec)
    configure_determinism(dev)
    return dev


def model_options(
    factory: str | None,
    input_shape: str | None,
    num_classes: int | None,
    bounds: str | None,
    torchscript: bool,
    device: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``advguard.models.io.load_model`` from the model options
    (``device``, the ``--device`` option, is checked here, before anything is loaded)."""
    kw: dict[str, Any] = {
        "factory": factory,
        "input_shape": parse_shape(input_shape),
        "num_classes": num_classes,
        "bounds": parse_bounds(bounds),
    }
    out = {k: v for k, v in kw.items() if v is not None}
    if torchscript:
        out["torchscript"] = True
    if device is not None:
        cli_device(device)
        out["device"] = device
    return out


def check_out_dir(out: Path, option: str = "--out") -> Path:
    """Refuse an output directory that is an existing file (or lies under one) before any work."""
    p = Path(out)
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is" if parent == p else f"is under {parent}, which is"
                raise AdvguardError(f"{option} {str(p)!r} {what} a file, not a directory")
            break
    return p


def check_out_file(out: Path, option: str = "--out") -> Path:
    """Refuse an output file path that is a directory or lies under a file, before any work."""
    p = Path(out)
    if p.is_dir():
        raise AdvguardError(f"{option} {str(p)!r} is a directory; give a file name")
    check_out_dir(p.parent, option=f"{option}'s folder")
    return p


def guard_config(config: Path | None, database_url: str | None = None) -> Any:
    """The guard YAML (validated), with ``--database-url`` on top."""
    from advguard.guard.config import load_config

    cfg = load_config(config)
    if database_url:
        cfg.storage.database_url = database_url
    return cfg


@contextmanager
def guard_store(config: Path | None, database_url: str | None) -> Iterator[tuple[Any, Any]]:
    """The guard config and its store, closed however the command ends."""
    from advguard.guard.storage import GuardStore

    cfg = guard_config(config, database_url)
    store = GuardStore(cfg.database_url, table_prefix=cfg.storage.table_prefix)
    try:
        yield cfg, store
    finally:
        store.close()
