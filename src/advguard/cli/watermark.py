"""``advguard watermark embed|verify``: backdoor-style ownership watermarks (Adi et al. 2018)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advguard.cli._common import (
    BoundsOpt,
    Commands,
    DataOpt,
    DeviceOpt,
    FactoryOpt,
    InputShapeOpt,
    JsonOpt,
    ModelOpt,
    NumClassesOpt,
    TorchScriptOpt,
    cli_device,
    console,
    model_options,
    print_json,
)

commands = Commands("watermark", "Embed and verify ownership watermarks (trigger sets).")


@commands.command("embed")
def embed(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("advguard-watermark"),
    arch: Annotated[str, typer.Option(help="Architecture: mlp or small_cnn")] = "mlp",
    kind: Annotated[str, typer.Option(help="Trigger inputs: noise or pattern")] = "noise",
    triggers: Annotated[int, typer.Option(min=10, max=100_000, help="Trigger-set size")] = 100,
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Training epochs")] = 60,
    lr: Annotated[float, typer.Option(min=0, help="Adam learning rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed (the key is derived from it)")] = 0,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Train a watermarked model on --data; write the model and the secret key."""
    import numpy as np
    import torch

    from advguard.atomic import atomic_write_text
    from advguard.data import load_dataset
    from advguard.defenses.watermark import embed_watermark, make_trigger_set, verify_watermark
    from advguard.errors import InputError
    from advguard.models import TorchClassifier
    from advguard.models.io import save_torch
    from advguard.models.zoo import mlp, small_cnn

    if arch not in ("mlp", "small_cnn"):
        raise InputError(f"--arch must be mlp or small_cnn, got {arch!r}")
    if kind not in ("noise", "pattern"):
        raise InputError(f"--kind must be noise or pattern, got {kind!r}")
    dev = cli_device(device)
    ds = load_dataset(data)
    shape = tuple(int(d) for d in ds.x.shape[1:])
    key = make_trigger_set(triggers, shape, ds.num_classes, kind=kind, bounds=ds.bounds,  # type: ignore[arg-type]
                           seed=seed + 1)  # fmt: skip
    torch.manual_seed(seed)
    module = (mlp if arch == "mlp" else small_cnn)(shape, ds.num_classes)
    with console.status("Training the watermarked model"):
        embed_watermark(module, np.asarray(ds.x), np.asarray(ds.y), key, epochs=epochs, lr=lr,
                        seed=seed, device=dev)  # fmt: skip
    model = TorchClassifier(module, input_shape=shape, num_classes=ds.num_classes,
                            bounds=ds.bounds)  # fmt: skip
    weights = save_torch(
        model, out / "model.safetensors", factory=f"advguard.models.zoo:{arch}",
        factory_kwargs={"input_shape": list(shape), "num_classes": ds.num_classes},
    )  # fmt: skip
    key_path = key.save(out / "watermark.npz")
    v = verify_watermark(model, key)
    summary = {
        "schema_version": "1.0",
        "model": str(weights),
        "key": str(key_path),
        "trigger_kind": kind,
        "triggers": triggers,
        "train_accuracy": model.accuracy(ds.x, ds.y),
        "self_check": v.to_dict(),
    }
    atomic_write_text(out / "watermark.json", json.dumps(summary, indent=2))
    if json_out:
        print_json(summary)
        return
    console.print(
        f"Watermarked model: [bold]{weights}[/]; key (keep it secret): [bold]{key_path}[/]; "
        f"trigger accuracy {v.trigger_accuracy:.1%} (p = {v.p_value:.2g})"
    )


@commands.command("verify")
def verify(
    model: ModelOpt,
    key: Annotated[str, typer.Option(help="The watermark key (watermark.npz)")],
    alpha: Annotated[float, typer.Option(min=1e-12, max=0.5, help="Significance level")] = 0.01,
    factory: FactoryOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    bounds: BoundsOpt = None,
    torchscript: TorchScriptOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Test a suspect model for the watermark; exit 1 when it is not verified."""
    from advguard.defenses.watermark import TriggerSet, verify_watermark
    from advguard.models.io import CLI_OPTION_NAMES, load_model, option_names

    mkw = model_options(factory, input_shape, num_classes, bounds, torchscript, device)
    k = TriggerSet.load(key)
    with option_names(CLI_OPTION_NAMES):
        m = load_model(model, **mkw)
    v = verify_watermark(m, k, alpha=alpha)
    if json_out:
        print_json(v.to_dict())
    else:
        verdict = "[bold green]VERIFIED[/]" if v.verified else "[bold red]NOT VERIFIED[/]"
        console.print(
            f"{verdict}: {v.matches}/{v.n} trigger answers match (chance {v.chance:.1%}), "
            f"one-sided binomial p = {v.p_value:.3g} (alpha {alpha:g})"
        )
    if not v.verified:
        raise typer.Exit(1)
