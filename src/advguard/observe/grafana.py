"""Grafana dashboards for the guard and the offline jobs, shipped as package data
(``advguard/observe/dashboards``): an executive, an on-call and a debug dashboard, plus
provisioning files for the dashboards and a Prometheus datasource.

:func:`check_dashboard` checks a dashboard's structure (schema version, unique panel ids,
grid positions, the datasource variable on every panel and query, the template variables
the queries use) and :func:`check_names` that every PromQL query names only metrics of
:mod:`advguard.observe.names`. :func:`export` writes the bundle Grafana reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from advguard.errors import InputError
from advguard.observe.names import is_known, is_rule_regex
from advguard.observe.promql import AGGREGATORS, FUNCTIONS, references, variable_query_references

#: Dashboard file stems, in the order the docs list them.
DASHBOARDS: tuple[str, ...] = ("advguard-executive", "advguard-oncall", "advguard-debug")
DATASOURCE_UID = "advguard-prometheus"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
MIN_SCHEMA_VERSION = 36  # Grafana 9: datasource references by uid
GRID_COLUMNS = 24
#: Variables every dashboard defines; the on-call dashboard also needs ``client``.
REQUIRED_VARIABLES: dict[str, tuple[str, ...]] = {
    "advguard-executive": ("datasource", "model"),
    "advguard-oncall": ("datasource", "model", "client"),
    "advguard-debug": ("datasource", "model"),
}
DEFAULT_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/advguard"
DEFAULT_PROMETHEUS_URL = "http://prometheus:9090"
_VAR_USE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _data_dir() -> Any:
    return resources.files("advguard.observe").joinpath("dashboards")


def load_dashboard(name: str) -> dict[str, Any]:
    """One packaged dashboard (``advguard-oncall``, ...) as parsed JSON."""
    if name not in DASHBOARDS:
        raise InputError(f"unknown dashboard {name!r}; one of {', '.join(DASHBOARDS)}")
    doc = json.loads(_data_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise InputError(f"{name}.json is not a JSON object")
    return doc


def load_provisioning(kind: str) -> dict[str, Any]:
    """The packaged provisioning file ``datasources`` or ``dashboards`` (parsed YAML)."""
    if kind not in ("datasources", "dashboards"):
        raise InputError(f"no provisioning file {kind!r}")
    text = _data_dir().joinpath("provisioning", f"{kind}.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
        raise InputError(f"provisioning/{kind}.yaml is not a Grafana provisioning file")
    return doc


@dataclass(frozen=True)
class Query:
    """One PromQL text of a dashboard: a panel target or a variable query."""

    where: str
    expr: str
    variable: bool = False


def queries(doc: dict[str, Any]) -> list[Query]:
    """Every panel target's ``expr`` and every query variable's query."""
    out: list[Query] = []
    for p in doc.get("panels", []):
        for tg in p.get("targets", []):
            out.append(
                Query(f"panel {p.get('id')} ({p.get('title')}) {tg.get('refId')}", tg["expr"])
            )
    for v in doc.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            text = q.get("query") if isinstance(q, dict) else q
            out.append(Query(f"variable {v.get('name')}", str(text), variable=True))
    return out


def _check_panel(p: Any, seen: set[int], problems: list[str]) -> None:
    if not isinstance(p, dict):
        problems.append("a panel is not an object")
        return
    pid, title = p.get("id"), p.get("title")
    where = f"panel {pid} ({title})"
    if not isinstance(pid, int) or isinstance(pid, bool) or pid in seen:
        problems.append(f"{where}: id must be a unique integer")
    else:
        seen.add(pid)
    if not isinstance(title, str) or not title:
        problems.append(f"{where}: no title")
    g = p.get("gridPos")
    keys = ("x", "y", "w", "h")
    if not isinstance(g, dict) or not all(
        isinstance(g.get(k), int) and not isinstance(g.get(k), bool) for k in keys
    ):
        problems.append(f"{where}: gridPos needs integers x, y, w, h")
    elif g["x"] < 0 or g["y"] < 0 or g["w"] < 1 or g["h"] < 1 or g["x"] + g["w"] > GRID_COLUMNS:
        problems.append(f"{where}: gridPos {g} is outside the {GRID_COLUMNS}-column grid")
    if p.get("type") in ("text", "row"):
        return
    if p.get("datasource") != DATASOURCE_REF:
        problems.append(f"{where}: datasource must be {DATASOURCE_REF}")
    targets = p.get("targets")
    if not isinstance(targets, list) or not targets:
        problems.append(f"{where}: no targets")
        return
    ref_ids = [t.get("refId") for t in targets if isinstance(t, dict)]
    if len(ref_ids) != len(targets) or len(set(ref_ids)) != len(ref_ids):
        problems.append(f"{where}: targets need unique refIds")
    for t in targets:
        if not isinstance(t, dict) or not isinstance(t.get("expr"), str) or not t["expr"].strip():
            problems.append(f"{where}: a target has no PromQL expr")
        elif t.get("datasource") != DATASOURCE_REF:
            problems.append(f"{where} {t.get('refId')}: datasource must be {DATASOURCE_REF}")


def _overlaps(panels: list[Any]) -> list[str]:
    boxes = []
    for p in panels:
        g = p.get("gridPos") if isinstance(p, dict) else None
        if isinstance(g, dict) and all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")):
            boxes.append((p.get("id"), g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]:
                out.append(f"panels {a[0]} and {b[0]} overlap")
    return out


def _check_variables(doc: dict[str, Any], problems: list[str]) -> None:
    tl = doc.get("templating")
    variables = tl.get("list") if isinstance(tl, dict) else None
    if not isinstance(variables, list):
        problems.append("templating.list is missing")
        return
    names = [v.get("name") for v in variables if isinstance(v, dict)]
    if len(set(names)) != len(names):
        problems.append("template variables must have unique names")
    by_name = {v["name"]: v for v in variables if isinstance(v, dict) and "name" in v}
    ds = by_name.get("datasource")
    if ds is None or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("variable 'datasource' must be a Prometheus datasource variable")
    for name in REQUIRED_VARIABLES.get(str(doc.get("uid")), ("datasource", "model")):
        if name not in by_name:
            problems.append(f"variable {name!r} is missing")
        elif name != "datasource" and by_name[name].get("datasource") != DATASOURCE_REF:
            problems.append(f"variable {name!r}: datasource must be {DATASOURCE_REF}")
    used: set[str] = set()
    texts = [q.expr for q in queries(doc)]
    texts += [str(p.get("options", {}).get("content", "")) for p in doc.get("panels", [])]
    for text in texts:
        for m in _VAR_USE.finditer(text):
            used.add(m.group(1) or m.group(2))
    undefined = sorted(u for u in used if not u.startswith("__") and u not in by_name)
    if undefined:
        problems.append(f"queries use undefined variables {undefined}")


def check_dashboard(doc: Any) -> list[str]:
    """Structural problems of a Grafana dashboard (empty list: none)."""
    if not isinstance(doc, dict):
        return ["a dashboard is a JSON object"]
    problems: list[str] = []
    sv = doc.get("schemaVersion")
    if not isinstance(sv, int) or isinstance(sv, bool) or sv < MIN_SCHEMA_VERSION:
        problems.append(f"schemaVersion must be an integer >= {MIN_SCHEMA_VERSION}")
    for key in ("uid", "title"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            problems.append(f"{key} is missing")
    if isinstance(doc.get("uid"), str) and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", doc["uid"]):
        problems.append("uid must be 1-40 letters, digits, '-' or '_'")
    panels = doc.get("panels")
    if not isinstance(panels, list) or not panels:
        return [*problems, "panels is missing or empty"]
    seen: set[int] = set()
    for p in panels:
        _check_panel(p, seen, problems)
    problems += _overlaps(panels)
    _check_variables(doc, problems)
    return problems


def check_names(doc: dict[str, Any]) -> list[str]:
    """Queries that name an unknown metric or function, or a ``__name__`` regex that could
    match more than recording rules."""
    problems: list[str] = []
    for q in queries(doc):
        try:
            refs = variable_query_references(q.expr) if q.variable else references(q.expr)
        except InputError as e:
            problems.append(f"{q.where}: {e}")
            continue
        for m in sorted(refs.metrics):
            if not is_known(m):
                problems.append(f"{q.where}: unknown metric {m}")
        for f in sorted(refs.functions - FUNCTIONS - AGGREGATORS):
            problems.append(f"{q.where}: unknown PromQL function {f}")
        for op, regex in refs.name_matchers:
            if op != "=~" or not is_rule_regex(regex):
                problems.append(f"{q.where}: __name__{op}{regex!r} is not a recording-rule pattern")
    return problems


def check_all() -> dict[str, list[str]]:
    """Problems of every packaged dashboard, by name (empty lists when all is well)."""
    out = {}
    for name in DASHBOARDS:
        doc = load_dashboard(name)
        out[name] = check_dashboard(doc) + check_names(doc)
        if doc.get("uid") != name:
            out[name].append(f"uid {doc.get('uid')!r} differs from the file name {name}")
    return out


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--prometheus-url must be an http(s) URL, got {url[:100]!r}")
    if parts.username or parts.password:
        raise InputError("--prometheus-url: put credentials in Grafana, not in the URL")
    if any(c.isspace() for c in url) or len(url) > 500:
        raise InputError("--prometheus-url: no spaces, at most 500 characters")
    return url


def _check_path(path: str) -> str:
    if not path.startswith("/") or any(c.isspace() or c in "\"'$`\\" for c in path):
        raise InputError(
            f"--dashboards-path must be an absolute path inside Grafana without spaces or "
            f"quotes, got {path[:100]!r}"
        )
    return path


def export(
    out_dir: str | Path,
    *,
    prometheus_url: str = DEFAULT_PROMETHEUS_URL,
    dashboards_path: str = DEFAULT_DASHBOARDS_PATH,
) -> list[Path]:
    """Write ``dashboards/*.json`` and ``provisioning/{dashboards,datasources}/advguard.yaml``
    under ``out_dir`` (atomically, file by file). ``dashboards_path`` is where Grafana sees the
    dashboards directory; ``prometheus_url`` the Prometheus Grafana queries."""
    from advguard.atomic import atomic_write_text

    _check_url(prometheus_url)
    _check_path(dashboards_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a directory")
    bad = {k: v for k, v in check_all().items() if v}
    if bad:  # a broken installation, not bad input
        raise RuntimeError(f"packaged dashboards are invalid: {bad}")
    ds = load_provisioning("datasources")
    ds["datasources"][0]["url"] = prometheus_url
    prov = load_provisioning("dashboards")
    prov["providers"][0]["options"]["path"] = dashboards_path
    header = "# Generated by `advguard dashboards export`.\n"
    written = [
        atomic_write_text(
            out / "dashboards" / f"{name}.json", json.dumps(load_dashboard(name), indent=2) + "\n"
        )
        for name in DASHBOARDS
    ]
    for kind, doc in (("datasources", ds), ("dashboards", prov)):
        text = header + yaml.safe_dump(doc, sort_keys=False)
        written.append(atomic_write_text(out / "provisioning" / kind / "advguard.yaml", text))
    return written


__all__ = [
    "DASHBOARDS",
    "DATASOURCE_REF",
    "DATASOURCE_UID",
    "Query",
    "check_all",
    "check_dashboard",
    "check_names",
    "export",
    "load_dashboard",
    "load_provisioning",
    "queries",
]
