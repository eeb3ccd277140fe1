"""advguard registry: push, pull, verify, promote and audit model versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import (
    Commands,
    JsonOpt,
    console,
    print_json,
)
from advguard.errors import InputError

commands = Commands(
    "registry", "Model registry: push, pull, verify, promote and audit model versions."
)


RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root", help="Registry root (default $ADVGUARD_REGISTRY or ~/.advguard/registry)"
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db-url", help="Database URL (default sqlite in the root; or postgresql+psycopg://)"
    ),
]


def _registry(root: Path | None, db_url: str | None) -> Any:
    from advguard.registry.store import Registry

    return Registry(root, db_url=db_url)


@commands.command("keygen")
def registry_keygen(
    out: Annotated[Path, typer.Option(help="Directory for private.pem and public.pem")],
    curve: Annotated[str, typer.Option(help="P-256 or P-384")] = "P-256",
    as_json: JsonOpt = False,
) -> None:
    """Create a signing key pair (private key file mode 0600)."""
    from advguard.registry.signing import generate_keypair

    private, public = generate_keypair(out, curve=curve)
    if as_json:
        print_json({"private_key": str(private), "public_key": str(public)})
    else:
        console.print(f"private key: {private} (keep secret)\npublic key:  {public}")


@commands.command("push")
def registry_push(
    name: Annotated[str, typer.Argument(help="Model name")],
    model: Annotated[Path, typer.Option("--model", help="Model file (safetensors, onnx, ...)")],
    factory: Annotated[
        str | None, typer.Option(help="module:callable building the torch model")
    ] = None,
    report: Annotated[
        list[Path] | None, typer.Option("--report", help="report.json to attach (repeatable)")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Private key: sign the model")] = None,
    data_hash: Annotated[
        str | None, typer.Option(help="sha256 of the training data (provenance)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Training config (YAML/JSON) recorded as provenance")
    ] = None,
    code_rev: Annotated[
        str | None, typer.Option(help="Code revision (default: git rev-parse HEAD)")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept plain tensor pickles after an opcode scan")
    ] = False,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan, store (and sign) a new model version; it starts in stage 'candidate'."""
    training_config = None
    if config is not None:
        import yaml

        if not config.is_file():
            raise FileNotFoundError(f"training config {config} does not exist")
        training_config = yaml.safe_load(config.read_text())
    with _registry(root, db_url) as reg:
        info = reg.push(
            name,
            model,
            factory=factory,
            reports=report or [],
            private_key=key,
            data_hash=data_hash,
            training_config=training_config,
            code_revision=code_rev,
            allow_pickle=allow_pickle,
        )
    if as_json:
        print_json(info.to_dict())
        return
    console.print(
        f"pushed [bold]{info.ref}[/] ({info.format}, sha256:{info.model_digest[:16]}..., "
        f"{'signed' if info.signature else 'unsigned'}, {len(info.reports)} report(s))"
    )
    for s in info.scan:
        for w in s["warnings"]:
            console.print(f"[yellow]warning:[/] {s['path']}: {w}")


@commands.command("list")
def registry_list(root: RootOpt = None, db_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List models, their latest and production versions."""
    with _registry(root, db_url) as reg:
        models = reg.list_models()
    if as_json:
        print_json(models)
        return
    table = Table(title="Registry models")
    for col in ("name", "versions", "latest", "production"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], str(m["versions"]), str(m["latest"]), str(m["production"] or "-"))
    console.print(table)


@commands.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@STAGE")],
    public_key: Annotated[
        Path | None, typer.Option(help="Verify the signature for the card")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a version's metadata as a Markdown model card (or JSON); refuses a version whose
    objects fail their hash or whose row disagrees with the audit log."""
    with _registry(root, db_url) as reg:
        info, card = reg.model_card(ref, public_key=public_key)
        if as_json:
            data = info.to_dict()
            data["history"] = [e.__dict__ for e in reg.history(info.name)]
            print_json(data)
            return
    console.print(card, markup=False, highlight=False)


@commands.command("pull")
def registry_pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@STAGE")],
    out: Annotated[Path, typer.Option(help="Output directory")],
    public_key: Annotated[
        Path | None, typer.Option(help="Verify the signature and report attestations")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a version's files out, verifying every hash (and the signature with a key)."""
    with _registry(root, db_url) as reg:
        res = reg.pull(ref, out, public_key=public_key)
    if as_json:
        print_json(
            {
                "ref": res.version.ref,
                "signature": res.signature,
                "files": [str(f) for f in res.files],
            }
        )
        return
    console.print(f"pulled [bold]{res.version.ref}[/] into {res.out} (signature: {res.signature})")


@commands.command("verify")
def registry_verify(
    ref: Annotated[str, typer.Argument(help="NAME (all versions), NAME:VERSION or NAME@STAGE")],
    public_key: Annotated[
        Path | None, typer.Option(help="Also verify signatures and attestations")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every stored object of the version(s); exit 1 if anything changed."""
    with _registry(root, db_url) as reg:
        res = reg.verify(ref, public_key=public_key)
    if as_json:
        print_json(res.to_dict())
    else:
        for version, status in res.signature.items():
            console.print(f"{version}: signature {status}")
        for p in res.problems:
            console.print(f"[bold red]FAIL:[/] {p}")
        if res.ok:
            console.print(f"[green]ok[/]: {res.checked} object(s) match their digests")
    if not res.ok:
        raise typer.Exit(1)


@commands.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[str, typer.Argument(help="Version number")],
    stage: Annotated[str, typer.Option(help="candidate, canary, production or archived")] = (
        "production"
    ),
    public_key: Annotated[
        Path | None,
        typer.Option(help="Public key: the signature must verify (required for production)"),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Gate policy YAML the reports must pass (default policy)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Override a refused promotion (needs --reason)")
    ] = False,
    reason: Annotated[
        str | None, typer.Option(help="Why the override is needed (recorded in the audit log)")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a version to a stage; the previous production version is archived.

    Production needs a verified signature, trustworthy reports bound to the model digest and
    a passed gate (exit 1 when refused); --force --reason overrides, recorded in the audit log.
    """
    from advguard.registry.promotion import PromotionRefusedError
    from advguard.registry.refs import check_version

    if not version.isascii() or not version.isdigit() or len(version) > 19:
        raise InputError(f"version {version!r} must be a positive integer below 2^63")
    number = check_version(int(version))
    gate_policy = None
    if policy is not None:
        from advguard.registry.policy import load_policy

        gate_policy = load_policy(policy)
    with _registry(root, db_url) as reg:
        try:
            info = reg.promote(
                name,
                number,
                stage,
                public_key=public_key,
                gate_policy=gate_policy,
                force=force,
                reason=reason,
            )
        except PromotionRefusedError as exc:
            if as_json:
                print_json(
                    {
                        "ref": exc.ref,
                        "stage": exc.stage,
                        "refused": True,
                        "failed": [c.to_dict() for c in exc.failed],
                    }
                )
            else:
                console.print(f"[bold red]refused:[/] {exc.ref} -> {exc.stage}", highlight=False)
                for c in exc.failed:
                    console.print(f"[red]fail:[/] {c.name}: {c.message}", highlight=False)
                console.print('override with --force --reason "..." (recorded in the audit log)')
            raise typer.Exit(1) from None
    if as_json:
        print_json(info.to_dict())
    else:
        console.print(f"{info.ref} is now [bold]{info.stage}[/]" + (" (forced)" if force else ""))


@commands.command("rollback")
def registry_rollback(
    name: Annotated[str, typer.Argument(help="Model name")],
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return the previous production version to production (current one is archived)."""
    with _registry(root, db_url) as reg:
        info = reg.rollback(name)
    if as_json:
        print_json(info.to_dict())
    else:
        console.print(f"rolled back: {info.ref} is [bold]production[/] again")


@commands.command("audit")
def registry_audit(
    verify: Annotated[
        bool, typer.Option("--verify", help="Recompute the hash chain; exit 1 if broken")
    ] = False,
    subject: Annotated[
        str | None, typer.Option(help="Only entries about this model (or NAME:VERSION)")
    ] = None,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the append-only audit log; --verify checks its hash chain."""
    with _registry(root, db_url) as reg:
        check = reg.verify_audit() if verify else None
        entries = reg.audit_log(subject=subject) if not verify else []
    if check is not None:
        if as_json:
            print_json(check.__dict__)
        elif check.ok:
            console.print(
                f"[green]audit chain ok[/]: {check.entries} entries, head {check.head}; "
                "registry state matches the log"
            )
        else:
            if check.broken_seq is not None:
                console.print(f"[bold red]audit chain broken[/] at {check.reason}")
            for p in check.state_problems:
                console.print(f"[bold red]state differs from the audit log:[/] {p}")
        if not check.ok:
            raise typer.Exit(1)
        return
    if as_json:
        print_json([e.__dict__ for e in entries])
        return
    table = Table(title="Registry audit log")
    for col in ("seq", "time", "actor", "action", "subject"):
        table.add_column(col)
    for e in entries:
        table.add_row(str(e.seq), e.ts, e.actor, e.action, e.subject)
    console.print(table)


@commands.command("gc")
def registry_gc(
    delete: Annotated[
        bool, typer.Option("--delete", help="Remove them (default: only list them, a dry run)")
    ] = False,
    grace_hours: Annotated[
        float,
        typer.Option(min=0, help="Leave files younger than this (a push may be writing them)"),
    ] = 1.0,
    root: RootOpt = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find objects no version references and partial files of interrupted pushes (dry run
    by default; --delete removes them and records it in the audit log)."""
    with _registry(root, db_url) as reg:
        res = reg.gc(delete=delete, grace_seconds=grace_hours * 3600)
    if as_json:
        print_json(res.to_dict())
        return
    table = Table(title="Registry garbage" + (" (dry run)" if res.dry_run else ""))
    for col in ("kind", "bytes", "age (h)", "path"):
        table.add_column(col)
    for item in res.removable:
        table.add_row(item.kind, str(item.size), f"{item.age_seconds / 3600:.1f}", item.path)
    console.print(table)
    total = sum(i.size for i in res.removable)
    if res.dry_run:
        console.print(
            f"{len(res.removable)} file(s), {total} bytes could be removed "
            f"({res.kept_recent} younger than the grace period kept); run with --delete"
        )
    else:
        console.print(f"removed {res.removed} file(s), freed {res.freed_bytes} bytes")
