"""advguard guard rollout: canary status, weight and mode, rollback and hot reload of a running
guard, through its admin API (``/v1/admin/models/{name}/...``)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.table import Table

from advguard.cli._common import Commands, JsonOpt, console, print_json
from advguard.errors import InputError

rollout = Commands("guard rollout", "Canary rollout of a running guard (admin API).")

UrlOpt = Annotated[str, typer.Option("--url", help="Guard base URL, e.g. http://127.0.0.1:8080")]
KeyEnvOpt = Annotated[
    str,
    typer.Option("--key-env", help="Environment variable holding an admin-scope API key"),
]
NameArg = Annotated[str, typer.Argument(help="Model name the guard serves")]


def _call(url: str, key_env: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    from advguard.guard.rollout import admin_request

    key = os.environ.get(key_env)
    if not key:
        raise InputError(f"set {key_env} to an admin API key (advguard guard keys create)")
    return admin_request(url, key, "POST" if method == "POST" else "GET", path, body)


def _show(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(st)
        return
    t = Table(title=f"rollout of {st['model']} (generation {st['generation']})")
    for col in ("role", "version", "requests", "flag rate", "error rate"):
        t.add_column(col)
    for role in ("production", "canary"):
        v = st.get(role)
        if v:
            w = v["window"]
            t.add_row(
                role,
                v["version"],
                str(w["requests"]),
                f"{w['flag_rate']:.3f}",
                f"{w['error_rate']:.3f}",
            )
    console.print(t)
    agree = st["shadow"]["agreement_rate"]
    console.print(
        f"weight {st['weight']}  mode {st['mode']}  sticky {st['sticky']}  "
        f"rolled back: {st['rolled_back'] or 'no'}  shadow agreement: "
        f"{'-' if agree is None else f'{agree:.3f}'}"
    )


@rollout.command("status")
def rollout_status(
    name: NameArg,
    url: UrlOpt,
    key_env: KeyEnvOpt = "ADVGUARD_GUARD_ADMIN_KEY",
    as_json: JsonOpt = False,
) -> None:
    """Show the versions served, the canary weight and mode, windows and shadow agreement."""
    _show(_call(url, key_env, "GET", f"/v1/admin/models/{name}/rollout"), as_json)


@rollout.command("set")
def rollout_set(
    name: NameArg,
    url: UrlOpt,
    weight: Annotated[float | None, typer.Option(help="Canary share of traffic, 0..1")] = None,
    mode: Annotated[str | None, typer.Option(help="canary or shadow")] = None,
    sticky: Annotated[bool | None, typer.Option("--sticky/--no-sticky")] = None,
    reset: Annotated[bool, typer.Option(help="Clear the rollback window and state")] = False,
    key_env: KeyEnvOpt = "ADVGUARD_GUARD_ADMIN_KEY",
    as_json: JsonOpt = False,
) -> None:
    """Set the canary's weight, mode or stickiness."""
    body: dict[str, Any] = {"reset": reset}
    if weight is not None:
        body["weight"] = weight
    if mode is not None:
        body["mode"] = mode
    if sticky is not None:
        body["sticky"] = sticky
    _show(_call(url, key_env, "POST", f"/v1/admin/models/{name}/rollout", body), as_json)


@rollout.command("rollback")
def rollout_rollback(
    name: NameArg,
    url: UrlOpt,
    key_env: KeyEnvOpt = "ADVGUARD_GUARD_ADMIN_KEY",
    as_json: JsonOpt = False,
) -> None:
    """Send all traffic to production now (canary weight 0)."""
    body = {"rollback": True}
    _show(_call(url, key_env, "POST", f"/v1/admin/models/{name}/rollout", body), as_json)


@rollout.command("reload")
def rollout_reload(
    name: NameArg,
    url: UrlOpt,
    canary: Annotated[bool, typer.Option(help="Reload the canary, not production")] = False,
    key_env: KeyEnvOpt = "ADVGUARD_GUARD_ADMIN_KEY",
    as_json: JsonOpt = False,
) -> None:
    """Re-read a model from its configured source (e.g. after registry promote), hot swap."""
    body = {"target": "canary" if canary else "production"}
    out = _call(url, key_env, "POST", f"/v1/admin/models/{name}/reload", body)
    if as_json:
        print_json(out)
        return
    console.print(
        f"{out['target']} of {out['model']}: {out['previous_version']} -> {out['version']} "
        f"(generation {out['generation']})"
    )
