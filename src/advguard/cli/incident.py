"""advguard incident: open, follow and close incidents, take actions (block-client,
throttle-client, isolate, rollback, preserve) and triage the preserved inputs; advguard
runbook: a Markdown runbook per model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import Commands, JsonOpt, console, guard_config, guard_store, print_json
from advguard.errors import InputError

commands = Commands("incident", "Incident response: a record of what was done, and the actions.")
runbook = Commands("runbook", "Runbooks generated from the threat model, SLOs and guard policy.")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Guard YAML (see docs/guard.md)")
]
DbUrlOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="Guard database (default sqlite next to the config)"),
]
WhoOpt = Annotated[
    str | None, typer.Option("--who", help="Operator name recorded in the log (default $USER)")
]
IncidentArg = Annotated[str, typer.Argument(help="Incident id (16 hex digits)")]
ClientArg = Annotated[str, typer.Argument(help="Client key id (16 hex digits)")]


_config = guard_config
_store = guard_store


def _who(who: str | None) -> str:
    from advguard.guard.incident import check_who

    return check_who(who or os.environ.get("USER"))


def _show_action(rec: Any, as_json: bool) -> None:
    if as_json:
        print_json(rec.public())
    else:
        console.print(
            f"incident {rec.incident_id} #{rec.seq}: {rec.action} {rec.target or ''}".rstrip(),
            highlight=False,
        )


# -- incidents ---------------------------------------------------------------------------------
@commands.command("open")
def incident_open(
    title: Annotated[str, typer.Argument(help="What is happening")],
    severity: Annotated[str, typer.Option(help="sev1 (worst) to sev4")] = "sev2",
    model: Annotated[str | None, typer.Option(help="Model concerned")] = None,
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open an incident; prints its id."""
    from advguard.guard.incident import open_incident

    with _store(config, database_url) as (_, store):
        inc = open_incident(store, title, who=_who(who), severity=severity, model=model)
    if as_json:
        print_json(inc.public())
    else:
        console.print(f"opened incident [bold]{inc.id}[/] ({inc.severity}): {inc.title}")


@commands.command("status")
def incident_status(
    incident_id: IncidentArg,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The incident and its action log."""
    from advguard.guard.incident import incident_status as status

    with _store(config, database_url) as (_, store):
        res = status(store, incident_id)
    if as_json:
        print_json(res)
        return
    inc = res["incident"]
    console.print(
        f"incident {inc['id']} [{inc['status']}] {inc['severity']}: {inc['title']} "
        f"(opened {inc['opened_at'][:19]} by {inc['opened_by']})",
        highlight=False,
    )
    t = Table(title="Actions")
    for col in ("#", "time", "who", "action", "target", "details"):
        t.add_column(col)
    for a in res["actions"]:
        details = ", ".join(f"{k}={v}" for k, v in a["details"].items() if v is not None)
        t.add_row(
            str(a["seq"]), a["ts"][:19], a["who"], a["action"], a["target"] or "-", details[:80]
        )
    console.print(t)


@commands.command("list")
def incident_list(
    status: Annotated[str | None, typer.Option(help="open or closed")] = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Incidents, oldest first."""
    from advguard.guard.incident import list_incidents

    with _store(config, database_url) as (_, store):
        recs = [i.public() for i in list_incidents(store, status)]
    if as_json:
        print_json(recs)
        return
    t = Table(title="Incidents")
    for col in ("id", "status", "severity", "model", "opened", "title"):
        t.add_column(col)
    for r in recs:
        t.add_row(
            r["id"], r["status"], r["severity"], r["model"] or "-", r["opened_at"][:19], r["title"]
        )
    console.print(t)


@commands.command("close")
def incident_close(
    incident_id: IncidentArg,
    summary: Annotated[str, typer.Option(help="What happened and what was done")],
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close an incident with a summary."""
    from advguard.guard.incident import close_incident

    with _store(config, database_url) as (_, store):
        inc = close_incident(store, incident_id, who=_who(who), summary=summary)
    if as_json:
        print_json(inc.public())
    else:
        console.print(f"closed incident {inc.id}")


@commands.command("note")
def incident_note(
    incident_id: IncidentArg,
    text: Annotated[str, typer.Argument(help="What was seen, decided or handed over")],
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a note to the incident's log."""
    from advguard.guard.incident import add_note

    with _store(config, database_url) as (_, store):
        rec = add_note(store, incident_id, who=_who(who), text=text)
    _show_action(rec, as_json)


# -- actions -------------------------------------------------------------------------------------
@commands.command("block-client")
def incident_block(
    incident_id: IncidentArg,
    client_id: ClientArg,
    reason: Annotated[str, typer.Option(help="Why")] = "blocked during an incident",
    ttl: Annotated[int | None, typer.Option(help="Seconds until the block ends")] = None,
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Block a client (403 from its next request on)."""
    from advguard.guard.incident import block_client

    with _store(config, database_url) as (_, store):
        rec = block_client(
            store, incident_id, who=_who(who), client_id=client_id, reason=reason, ttl_s=ttl
        )
    _show_action(rec, as_json)


@commands.command("throttle-client")
def incident_throttle(
    incident_id: IncidentArg,
    client_id: ClientArg,
    rate: Annotated[float | None, typer.Option(help="Requests per second")] = None,
    burst: Annotated[int | None, typer.Option(help="Requests at once")] = None,
    ttl: Annotated[int | None, typer.Option(help="Seconds until the throttle ends")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Lift the throttle")] = False,
    reason: Annotated[str, typer.Option(help="Why")] = "throttled during an incident",
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a client a reduced request rate (the guard applies it from the next request)."""
    from advguard.guard.incident import throttle_client

    with _store(config, database_url) as (_, store):
        rec = throttle_client(
            store,
            incident_id,
            who=_who(who),
            client_id=client_id,
            rate=rate,
            burst=burst,
            ttl_s=ttl,
            reason=reason,
            clear=clear,
        )
    _show_action(rec, as_json)


@commands.command("isolate")
def incident_isolate(
    incident_id: IncidentArg,
    model: Annotated[str, typer.Argument(help="Served model name")],
    mode: Annotated[str, typer.Option(help="fallback, reject, or off (lift)")] = "fallback",
    reason: Annotated[str, typer.Option(help="Why")] = "isolated during an incident",
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Route all of a model's traffic to the fallback, or reject it."""
    from advguard.guard.incident import isolate_model

    with _store(config, database_url) as (cfg, store):
        has_fallback = cfg.fallback is not None if config is not None else None
        rec = isolate_model(
            store,
            incident_id,
            who=_who(who),
            model=model,
            mode=mode,
            reason=reason,
            has_fallback=has_fallback,
        )
    _show_action(rec, as_json)


@commands.command("rollback")
def incident_rollback(
    incident_id: IncidentArg,
    name: Annotated[str, typer.Argument(help="Registry model name")],
    registry_root: Annotated[Path | None, typer.Option(help="Registry root")] = None,
    registry_db: Annotated[str | None, typer.Option(help="Registry database URL")] = None,
    guard_url: Annotated[
        str | None, typer.Option(help="Guard to hot-swap, e.g. http://127.0.0.1:8080")
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="ADVGUARD_GUARD_ADMIN_KEY", help="Admin key (env var preferred)"),
    ] = None,
    served_name: Annotated[
        str | None,
        typer.Option(help="Model name in the guard's URLs (default: from the config, else NAME)"),
    ] = None,
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Registry production back to the previous version, then reload the guard."""
    from advguard.guard.incident import request_reload, rollback
    from advguard.registry.store import Registry

    if guard_url is not None and not admin_key:
        raise InputError("--guard-url needs --admin-key (or $ADVGUARD_GUARD_ADMIN_KEY)")
    operator = _who(who)

    def reload(model: str) -> dict[str, Any]:
        assert guard_url is not None and admin_key is not None
        return request_reload(guard_url, admin_key, model)

    with (
        _store(config, database_url) as (cfg, store),
        Registry(registry_root, db_url=registry_db, actor=operator) as reg,
    ):
        rec = rollback(
            store,
            incident_id,
            who=operator,
            registry=reg,
            name=name,
            reload=reload if guard_url else None,
            served_name=served_name or _served_name(cfg, name),
        )
    if as_json:
        print_json(rec.public())
        return
    d = rec.details
    served = served_name or _served_name(cfg, name)
    console.print(f"rolled back {name}: version {d['from_version']} -> {d['to_version']}")
    if not d["reloaded"]:
        console.print(
            f"[yellow]the guard must be reloaded[/]: POST /v1/admin/models/{served}/reload "
            "(or give --guard-url and --admin-key)"
        )


def _served_name(cfg: Any, registry_name: str) -> str:
    """The guard's URL name of a registry model: the config's model name when it serves that
    registry model, else the registry name."""
    spec = cfg.model
    if spec is not None and spec.registry is not None and spec.registry.model_name == registry_name:
        return str(spec.name)
    return registry_name


@commands.command("preserve")
def incident_preserve(
    incident_id: IncidentArg,
    since: Annotated[str, typer.Option(help="7d, 12h, 30m or an ISO date/time")],
    until: Annotated[str | None, typer.Option(help="End of the window (default now)")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client (key id)")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model")] = None,
    hold_days: Annotated[
        int | None, typer.Option(help="Hold this many days (default: until released)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Export folder (manifest.json + records + inputs)")
    ] = None,
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold a window's forensic records against purges; export them with SHA-256s."""
    from advguard.guard.forensics import load_fernet, parse_since
    from advguard.guard.incident import preserve

    start = parse_since(since)
    assert start is not None
    end = parse_since(until)
    with _store(config, database_url) as (cfg, store):
        fernet = None
        if out is not None and cfg.forensics.mode == "encrypted":
            fernet = load_fernet(cfg.forensics.key_env, cfg.resolve(cfg.forensics.key_file))
        rec = preserve(
            store,
            incident_id,
            who=_who(who),
            since=start,
            until=end,
            client_id=client,
            model=model,
            hold_days=hold_days,
            out=out,
            fernet=fernet,
        )
    if as_json:
        print_json(rec.public())
        return
    d = rec.details
    console.print(f"held {d['held']} record(s) for incident {incident_id}")
    if "export" in d:
        e = d["export"]
        console.print(f"exported {e['records']} record(s), {e['rows']} input row(s) to {e['out']}")


@commands.command("triage")
def incident_triage(
    reference: Annotated[
        str, typer.Option(help="Benign reference data: digits, a .npz, a .csv ... (as --data)")
    ],
    evidence: Annotated[
        Path | None, typer.Option(help="An export folder of `incident preserve --out`")
    ] = None,
    incident: Annotated[
        str | None,
        typer.Option(
            "--incident", help="Log the verdict here; without --evidence, preserve --since first"
        ),
    ] = None,
    since: Annotated[str | None, typer.Option(help="With --incident: 7d, 12h, 30m or ISO")] = None,
    client: Annotated[str | None, typer.Option(help="With --incident: one client")] = None,
    surrogate: Annotated[
        Path | None, typer.Option(help="Surrogate model file (default: trained on answers)")
    ] = None,
    reference_samples: Annotated[int, typer.Option(help="Reference samples used")] = 500,
    epochs: Annotated[int, typer.Option(help="Epochs of the trained surrogate")] = 30,
    out: Annotated[Path, typer.Option(help="Folder for triage.json and triage.html")] = Path(
        "triage"
    ),
    who: WhoOpt = None,
    config: ConfigOpt = None,
    database_url: DbUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attack or drift? Replay preserved inputs against model, fallback and a surrogate."""
    from advguard import _validate as check
    from advguard.guard.preserve import load_folder

    if evidence is None and incident is None:
        raise InputError("give --evidence DIR, or --incident ID --since WHEN")
    if evidence is None and since is None:
        raise InputError("--incident without --evidence needs --since (the window to preserve)")
    if evidence is not None and (since is not None or client is not None):
        raise InputError("--since and --client choose what to preserve; not with --evidence")
    n_ref = check.integer("--reference-samples", reference_samples, low=20, high=100_000)
    cfg = _config(config, database_url)
    if incident is not None:  # before any work: the verdict must be loggable
        _require_open(cfg, incident)
    if evidence is None:
        assert incident is not None and since is not None
        evidence = _preserve_for_triage(cfg, incident, since, client, out, _who(who))
    assert evidence is not None
    x, _ = load_folder(evidence)
    res = _run_triage(cfg, x, reference, n_ref, surrogate, epochs)
    from advguard.guard.triage import write_report

    paths = write_report(res, out, title=f"Incident triage: {evidence}")
    if incident is not None:
        _log_triage(cfg, incident, _who(who), res, paths)
    if as_json:
        print_json({**res.to_dict(), "report": [str(p) for p in paths]})
        return
    colour = {"attack": "red", "drift": "yellow"}.get(res.verdict, "grey50")
    console.print(f"verdict: [bold {colour}]{res.verdict.upper()}[/] ({res.n_inputs} inputs)")
    for r in res.reasons:
        console.print(f"  - {r}", highlight=False)
    console.print(f"report: {paths[1]}")


def _preserve_for_triage(
    cfg: Any, incident: str, since: str, client: str | None, out: Path, who: str
) -> Path:
    from advguard.guard.forensics import load_fernet, parse_since
    from advguard.guard.incident import preserve
    from advguard.guard.storage import GuardStore

    start = parse_since(since)
    assert start is not None
    folder = Path(out) / "evidence"
    fernet = None
    if cfg.forensics.mode == "encrypted":
        fernet = load_fernet(cfg.forensics.key_env, cfg.resolve(cfg.forensics.key_file))
    store = GuardStore(cfg.database_url, table_prefix=cfg.storage.table_prefix)
    try:
        preserve(store, incident, who=who, since=start, client_id=client, out=folder, fernet=fernet)
    finally:
        store.close()
    return folder


def _run_triage(
    cfg: Any, x: Any, reference: str, n_ref: int, surrogate: Path | None, epochs: int
) -> Any:
    from advguard.data import load_dataset
    from advguard.guard.pipeline import build_detectors
    from advguard.guard.serving import load_served_model
    from advguard.guard.triage import train_surrogate, triage

    if cfg.model is None:
        raise InputError("the guard config names no model ('model:'); give --config")
    served = load_served_model(cfg.model, cfg)
    fallback = load_served_model(cfg.fallback, cfg) if cfg.fallback is not None else None
    data = load_dataset(reference)
    ref_x, ref_y = data.x[:n_ref], data.y[:n_ref]
    model = served.classifier
    if surrogate is not None:
        from advguard.models.io import load_model

        sur = load_model(surrogate)
    else:
        sur = train_surrogate(model, ref_x, epochs=epochs)
    return triage(
        x,
        model=model,
        surrogate=sur,
        reference=ref_x,
        reference_labels=ref_y,
        fallback=fallback.classifier if fallback is not None else None,
        detectors=[(s.name, s.detector) for s in build_detectors(cfg, served)],
    )


def _require_open(cfg: Any, incident: str) -> None:
    from advguard.guard.incident import IncidentClosed, get_incident
    from advguard.guard.storage import GuardStore

    store = GuardStore(cfg.database_url, table_prefix=cfg.storage.table_prefix)
    try:
        if get_incident(store, incident).status != "open":
            raise IncidentClosed(f"incident {incident} is closed; open a new one")
    finally:
        store.close()


def _log_triage(cfg: Any, incident: str, who: str, res: Any, paths: list[Path]) -> None:
    from advguard.guard.incident import append_action
    from advguard.guard.storage import GuardStore

    store = GuardStore(cfg.database_url, table_prefix=cfg.storage.table_prefix)
    try:
        append_action(
            store,
            incident,
            who,
            "triage",
            None,
            {"verdict": res.verdict, "reasons": res.reasons, "report": str(paths[1])},
        )
    finally:
        store.close()


# -- runbooks ------------------------------------------------------------------------------------
@runbook.command("generate")
def runbook_generate(
    model: Annotated[str, typer.Option("--model", help="Served model name (as in the URL)")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Guard YAML")],
    slo: Annotated[Path | None, typer.Option(help="SLO YAML (advguard slo compile)")] = None,
    threat_model: Annotated[
        str | None, typer.Option(help="Threat model: preset name or YAML file")
    ] = None,
    guard_url: Annotated[str, typer.Option(help="Guard URL used in the commands")] = (
        "http://127.0.0.1:8080"
    ),
    out: Annotated[Path, typer.Option(help="Folder; publish it at runbook_base_url")] = Path(
        "runbooks"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Write Markdown runbooks from the threat model, SLOs and guard policy."""
    from advguard.evaluate.threat_model import load_threat_model
    from advguard.observe.runbook import write_runbooks
    from advguard.observe.slo import load_slo_file

    cfg = _config(config, None)
    policy = _policy(cfg, model, str(config), guard_url)
    tm = load_threat_model(threat_model) if threat_model else None
    spec = load_slo_file(slo) if slo else None
    paths = write_runbooks(policy, out, threat_model=tm, slos=spec)
    if as_json:
        print_json({"model": model, "runbooks": [str(p) for p in paths]})
    else:
        for p in paths:
            console.print(f"wrote {p}")


def _policy(cfg: Any, model: str, config: str, guard_url: str) -> Any:
    from advguard.observe.runbook import GuardPolicy

    if cfg.model is not None and cfg.model.name != model:
        raise InputError(f"the guard config serves {cfg.model.name!r}, not {model!r}")
    return GuardPolicy(
        model=model,
        config_path=config,
        fallback=cfg.fallback is not None,
        registry_model=cfg.model.registry.model_name if cfg.model and cfg.model.registry else None,
        detectors=[(d.name, [b.action for b in d.bands]) for d in cfg.detectors],
        stateful=[(s.name, s.action) for s in cfg.stateful],
        rate=cfg.limits.rate,
        burst=cfg.limits.burst,
        budget=cfg.limits.budget,
        budget_period=cfg.limits.budget_period,
        forensics_mode=cfg.forensics.mode,
        retention_days=cfg.forensics.retention_days,
        guard_url=guard_url,
    )
