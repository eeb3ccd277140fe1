"""advguard guard: serve a model behind the runtime guard; manage keys, blocks, reviews and
forensic records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import (
    Commands,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    cli_device,
    console,
    guard_config,
    guard_store,
    model_options,
    parse_bounds,
    parse_shape,
    print_json,
)
from advguard.errors import InputError

commands = Commands("guard", "Runtime guard: serve a model behind auth, limits and detectors.")
keys = Commands("guard keys", "API keys (shown once, stored hashed).")
blocks = Commands("guard blocks", "Blocked clients (by key id).")
review = Commands("guard review", "Requests queued for human review.")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Guard YAML (see docs/guard.md)")
]
DbUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Guard database (default sqlite next to the config; or postgresql+psycopg://...)",
    ),
]
GuardDeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Where the torch model runs: cpu, cuda, cuda:N, mps or auto (default: the "
        "config's model.device, else cpu)",
    ),
]


_config = guard_config
_store = guard_store


def _pepper(cfg: Any) -> bytes | None:
    from advguard.guard.auth import load_pepper

    return load_pepper(cfg.auth.pepper_env, cfg.resolve(cfg.auth.pepper_file))


@commands.command("serve")
def guard_serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (>1 needs Redis)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model file")] = None,
    factory: Annotated[
        str | None, typer.Option(help="module:callable for torch weights (trusted code)")
    ] = None,
    input_shape: Annotated[str | None, typer.Option(help="e.g. 1,8,8")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Number of classes")] = None,
    bounds: Annotated[str | None, typer.Option(help="LOW,HIGH of the raw inputs")] = None,
    device: GuardDeviceOpt = None,
    name: Annotated[str | None, typer.Option(help="Model name in the URL")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Serve this registry model (with --stage)")
    ] = None,
    stage: Annotated[str, typer.Option(help="Registry stage")] = "production",
    registry_root: Annotated[Path | None, typer.Option(help="Registry root")] = None,
    db_url: Annotated[str | None, typer.Option(help="Registry database URL")] = None,
    database_url: DbUrlOpt = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for shared rate limits (redis://host:port/db)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the configured model behind the guard until interrupted."""
    from advguard.guard.server import check_workers, serve
    from advguard.guard.serving import with_overrides

    cfg = _config(config, database_url)
    shape = parse_shape(input_shape)
    bnds = parse_bounds(bounds)
    if device is not None:
        cli_device(device)
    registry = None
    if model_name is not None:
        if model is not None:
            raise InputError("give --model FILE or --model-name NAME, not both")
        registry = {
            "model_name": model_name,
            "stage": stage,
            "root": str(registry_root) if registry_root else None,
            "db_url": db_url,
        }
    given = (model, factory, shape, num_classes, bnds, device, name, registry)
    if any(v is not None for v in given):
        cfg.model = with_overrides(
            cfg.model,
            path=str(Path(model).resolve()) if model else None,
            factory=factory,
            input_shape=list(shape) if shape else None,
            num_classes=num_classes,
            bounds=list(bnds) if bnds else None,
            device=device,
            name=name,
            registry=registry,
        )
    if host is not None:
        cfg.server.host = host
    if port is not None:
        cfg.server.port = port
    if workers is not None:
        cfg.server.workers = workers
    if redis_url is not None:
        cfg.limits.redis_url = redis_url
    check_workers(cfg)
    if as_json:
        print_json(
            {"host": cfg.server.host, "port": cfg.server.port, "workers": cfg.server.workers}
        )
    else:
        console.print(
            f"guard on http://{cfg.server.host}:{cfg.server.port} "
            f"({cfg.server.workers} worker(s)); Ctrl-C stops it"
        )
    serve(cfg)


@commands.command("check")
def guard_check(
    config: Annotated[Path, typer.Argument(help="Guard YAML")], as_json: JsonOpt = False
) -> None:
    """Validate a guard YAML file (exit 2 with the line and field at fault)."""
    cfg = _config(config)
    if as_json:
        print_json({"ok": True, "config": cfg.model_dump(mode="json")})
    else:
        console.print(f"{config}: valid guard config")


@commands.command("profile")
def guard_profile(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Profile JSON to write")] = Path("profile.json"),
    factory: Annotated[str | None, typer.Option(help="module:callable for torch weights")] = None,
    bins: Annotated[int, typer.Option(min=2, max=32, help="Quantile bins per feature")] = 10,
    samples: Annotated[
        int | None, typer.Option(min=1, help="Use only this many rows (seeded)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the row sample")] = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Compute the drift reference profile of a model on reference data (for 'drift:')."""
    import numpy as np

    from advguard.evaluate.job import load_model_and_data
    from advguard.guard.drift import build_profile, save_profile

    mkw = model_options(factory, None, None, None, False, device)
    m, d, info = load_model_and_data(model, data, model_kwargs=mkw)
    x = np.asarray(d.x)
    if samples is not None and samples < len(x):
        x = x[np.sort(np.random.default_rng(seed).permutation(len(x))[:samples])]
    profile = build_profile(m, x, bins=bins, model_digest=info.get("sha256"))
    save_profile(profile, out)
    summary = {
        "out": str(out),
        "rows": profile.n_reference,
        "features": len(profile.features),
        "confidence_mean": round(profile.confidence_mean, 6),
        "confidence_std": round(profile.confidence_std, 6),
        "model_digest": profile.model_digest,
    }
    if as_json:
        print_json(summary)
    else:
        console.print(f"profile of {summary['rows']} rows, {summary['features']} features -> {out}")


@commands.command("forensic-key")
def guard_forensic_key(
    out: Annotated[Path, typer.Option(help="File for the new Fernet key (mode 0600)")],
    as_json: JsonOpt = False,
) -> None:
    """Create a Fernet key for encrypted forensic payloads (never printed)."""
    from advguard.guard.forensics import new_fernet_key

    path = new_fernet_key(out)
    if as_json:
        print_json({"key_file": str(path)})
    else:
        console.print(f"forensic key written to {path} (keep it secret; set forensics.key_file)")


@commands.command("purge")
def guard_purge(
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    days: Annotated[
        int | None, typer.Option(help="Keep this many days (default forensics.retention_days)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete decisions and forensic payloads older than the retention period."""
    from advguard.guard.forensics import purge

    with _store(config, database_url) as (cfg, store):
        n = purge(store, days if days is not None else cfg.forensics.retention_days)
    if as_json:
        print_json({"deleted": n})
    else:
        console.print(f"deleted {n} record(s)")


@commands.command("export")
def guard_export(
    out: Annotated[Path, typer.Option(help="Output .npz")],
    since: Annotated[str | None, typer.Option(help="7d, 12h, 30m or an ISO date")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's records")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write flagged/reviewed/sampled records (decrypted payloads + metadata) to an .npz."""
    from advguard.guard.forensics import export_npz, load_fernet, parse_since

    with _store(config, database_url) as (cfg, store):
        fernet = None
        if cfg.forensics.mode == "encrypted":
            fernet = load_fernet(cfg.forensics.key_env, cfg.resolve(cfg.forensics.key_file))
        res = export_npz(store, out, since=parse_since(since), fernet=fernet, model=model)
    if as_json:
        print_json(res)
    else:
        console.print(f"wrote {res['records']} record(s), {res['rows']} input row(s) to {out}")


# -- keys -------------------------------------------------------------------------------
@keys.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="predict and/or admin (repeatable)")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="Output hardening: probabilities, top_k or label")
    ] = None,
    top_k: Annotated[int, typer.Option(help="k for --output top_k")] = 1,
    decimals: Annotated[int | None, typer.Option(help="Round probabilities")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; it is shown once and stored only as a hash."""
    from pydantic import ValidationError

    from advguard.guard.auth import create_key
    from advguard.guard.storage import OutputPolicy

    policy = None
    if output is not None or decimals is not None:
        try:
            policy = OutputPolicy.model_validate(
                {"mode": output or "probabilities", "top_k": top_k, "decimals": decimals}
            )
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(f"--{err['loc'][0]}: {err['msg']}") from None
    with _store(config, database_url) as (cfg, store):
        created = create_key(store, name, scope or ["predict"], pepper=_pepper(cfg), output=policy)
    if as_json:
        print_json(created.to_dict())
        return
    console.print(f"key id [bold]{created.record.key_id}[/] ({', '.join(created.record.scopes)})")
    console.print(f"API key (shown once, store it now): {created.key}", highlight=False)


@keys.command("list")
def keys_list(
    config: ConfigOpt = None, database_url: DbUrlOpt = None, as_json: JsonOpt = False
) -> None:
    """List keys (ids, names, scopes; never the keys)."""
    with _store(config, database_url) as (_, store):
        recs = [k.public() for k in store.list_keys()]
    if as_json:
        print_json(recs)
        return
    t = Table(title="API keys")
    for col in ("key id", "name", "scopes", "output", "created", "revoked"):
        t.add_column(col)
    for r in recs:
        out = r["output"]["mode"] if r["output"] else "-"
        t.add_row(
            r["key_id"],
            r["name"],
            ",".join(r["scopes"]),
            out,
            r["created_at"][:19],
            (r["revoked_at"] or "-")[:19],
        )
    console.print(t)


@keys.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id")],
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key (requests with it get 401 from then on)."""
    with _store(config, database_url) as (_, store):
        ok = store.revoke_key(key_id)
    if not ok:
        raise InputError(f"no active key with id {key_id!r}")
    if as_json:
        print_json({"key_id": key_id, "revoked": True})
    else:
        console.print(f"revoked {key_id}")


@keys.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="Key id")],
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a key by a new one (same name, scopes, output policy); the old one is revoked."""
    from advguard.guard.auth import rotate_key

    with _store(config, database_url) as (cfg, store):
        created = rotate_key(store, key_id, pepper=_pepper(cfg))
    if as_json:
        print_json({**created.to_dict(), "replaces": key_id})
        return
    console.print(f"revoked {key_id}; new key id [bold]{created.record.key_id}[/]")
    console.print(f"API key (shown once, store it now): {created.key}", highlight=False)


# -- blocks -----------------------------------------------------------------------------
@blocks.command("add")
def blocks_add(
    client_id: Annotated[str, typer.Argument(help="Key id of the client")],
    reason: Annotated[str, typer.Option(help="Why")] = "blocked by an operator",
    ttl: Annotated[int | None, typer.Option(help="Seconds until the block ends")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Block a client (403 until removed or the TTL ends)."""
    from advguard.guard.pipeline import block_client

    with _store(config, database_url) as (_, store):
        rec = block_client(store, client_id, reason, ttl)
    if as_json:
        print_json(rec.public())
    else:
        console.print(f"blocked {client_id}")


@blocks.command("list")
def blocks_list(
    config: ConfigOpt = None, database_url: DbUrlOpt = None, as_json: JsonOpt = False
) -> None:
    """List active blocks."""
    with _store(config, database_url) as (_, store):
        recs = [b.public() for b in store.list_blocks()]
    if as_json:
        print_json(recs)
        return
    t = Table(title="Blocked clients")
    for col in ("client id", "reason", "since", "until"):
        t.add_column(col)
    for r in recs:
        t.add_row(r["client_id"], r["reason"], r["created_at"][:19], (r["expires_at"] or "-")[:19])
    console.print(t)


@blocks.command("remove")
def blocks_remove(
    client_id: Annotated[str, typer.Argument(help="Key id of the client")],
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Lift a block."""
    with _store(config, database_url) as (_, store):
        ok = store.remove_block(client_id)
    if not ok:
        raise InputError(f"client {client_id!r} is not blocked")
    if as_json:
        print_json({"client_id": client_id, "removed": True})
    else:
        console.print(f"unblocked {client_id}")


# -- review -----------------------------------------------------------------------------
@review.command("list")
def review_list(
    status: Annotated[str, typer.Option(help="pending, approved or rejected")] = "pending",
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests answered from the fallback and queued for a human."""
    from advguard.guard.storage import REVIEW_STATES

    if status not in REVIEW_STATES:
        raise InputError(f"--status must be one of {', '.join(REVIEW_STATES)}")
    with _store(config, database_url) as (_, store):
        recs = [r.public() for r in store.iter_decisions(review_status=status)]
    if as_json:
        print_json(recs)
        return
    t = Table(title=f"Review queue ({status})")
    for col in ("decision", "time", "client", "model", "rows", "reasons"):
        t.add_column(col)
    for r in recs:
        t.add_row(
            r["id"],
            r["ts"][:19],
            r["key_id"],
            f"{r['model']} {r['version']}",
            str(r["n_rows"]),
            "; ".join(r["reasons"])[:80],
        )
    console.print(t)


def _review_set(
    decision_id: str,
    status: str,
    note: str | None,
    config: Path | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    with _store(config, database_url) as (_, store):
        ok = store.set_review(decision_id, status, note)
    if not ok:
        raise InputError(f"no pending review with decision id {decision_id!r}")
    if as_json:
        print_json({"id": decision_id, "review_status": status})
    else:
        console.print(f"{decision_id}: {status}")


@review.command("approve")
def review_approve(
    decision_id: Annotated[str, typer.Argument(help="Decision id")],
    note: Annotated[str | None, typer.Option(help="Reviewer's note")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mark a queued request as benign."""
    _review_set(decision_id, "approved", note, config, database_url, as_json)


@review.command("reject")
def review_reject(
    decision_id: Annotated[str, typer.Argument(help="Decision id")],
    note: Annotated[str | None, typer.Option(help="Reviewer's note")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mark a queued request as an attack."""
    _review_set(decision_id, "rejected", note, config, database_url, as_json)
