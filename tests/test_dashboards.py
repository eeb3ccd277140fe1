"""The Grafana dashboards: structure, every PromQL query against the one list of exported
names (advguard.observe.names), promtool syntax, the guard's /metrics spelling and the export
command."""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from advguard.cli import app as cli_app
from advguard.guard.app import create_app
from advguard.guard.auth import create_key
from advguard.observe import grafana, names
from advguard.observe.promql import references, variable_query_references
from advguard.observe.slo import compile_rules, load_slo_file
from guard_helpers import make_guard

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")

#: Contract names the guard does not export yet (none: every name is exported).
PENDING_GUARD_METRICS: set[str] = set()


def all_dashboards() -> dict[str, dict[str, Any]]:
    return {n: grafana.load_dashboard(n) for n in grafana.DASHBOARDS}


def dashboard_names() -> set[str]:
    """Every metric name the dashboards' queries use."""
    out: set[str] = set()
    for doc in all_dashboards().values():
        for q in grafana.queries(doc):
            refs = variable_query_references(q.expr) if q.variable else references(q.expr)
            out |= refs.metrics
    return out


# -- the packaged dashboards ------------------------------------------------------------------


def test_packaged_dashboards_are_valid_and_name_only_exported_metrics() -> None:
    assert grafana.check_all() == {n: [] for n in grafana.DASHBOARDS}
    used = dashboard_names()
    allowed = (
        names.series_names(names.GUARD_METRICS)
        | names.series_names(names.OFFLINE_METRICS)
        | names.series_names(names.PROMETHEUS_METRICS)
    )
    rules = {n for n in used if names.is_recording_rule(n)}
    assert used <= allowed | rules, sorted(used - allowed - rules)
    # the dashboards cover the contract: every guard metric appears in some query
    guard_used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(names.GUARD_METRICS) <= guard_used, set(names.GUARD_METRICS) - guard_used


def test_each_dashboard_shows_what_its_audience_needs() -> None:
    docs = all_dashboards()

    def text(name: str) -> str:
        return "\n".join(q.expr for q in grafana.queries(docs[name]))

    ex, oc, db = text("advguard-executive"), text("advguard-oncall"), text("advguard-debug")
    assert "AdvguardSLO(Fast|Slow)Burn" in ex and "advguard_guard_incidents_open" in ex
    assert "slo:[a-z0-9_]+:robust_accuracy" in ex and "advguard_eval_verdict_passed" in ex
    for window in ("5m", "1h", "6h"):
        assert f'slo:[a-z0-9_]+:error_ratio_rate{window}"' in oc
    for metric in ("detector_flags", "client_queries", "stateful_alerts", "routed_requests"):
        assert f"advguard_guard_{metric}_total" in oc
    assert 'client=~"$client"' in oc
    for metric in ("detector_score_bucket", "top1_confidence_bucket", "drift_input_psi"):
        assert f"advguard_guard_{metric}" in db
    variables = {v["name"] for v in docs["advguard-oncall"]["templating"]["list"]}
    assert {"datasource", "model", "client"} <= variables


def test_dashboard_regexes_match_the_rules_the_slo_compiler_writes() -> None:
    spec = load_slo_file(ROOT / "docs" / "ops" / "slo.yaml")
    records = [
        r["record"] for g in compile_rules(spec)["groups"] for r in g["rules"] if "record" in r
    ]
    assert records and all(names.is_recording_rule(r) for r in records)
    regexes = {
        rx
        for doc in all_dashboards().values()
        for q in grafana.queries(doc)
        if not q.variable
        for _, rx in references(q.expr).name_matchers
    }
    assert len(regexes) == 5  # 5m, 1h, 6h, 3d error ratios and robust accuracy
    for rx in regexes:
        hits = [r for r in records if re.fullmatch(rx, r)]
        suffix = rx.rsplit(":", 1)[1]
        assert hits and all(h.endswith(suffix) for h in hits), rx


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """Each panel query, Grafana variables replaced by values, as a recording rule that
    ``promtool check rules`` parses."""
    rules = []
    for doc in all_dashboards().values():
        for q in grafana.queries(doc):
            if q.variable:
                continue
            expr = q.expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
            expr = re.sub(r"\$[a-z_]+", ".*", expr)
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
    assert len(rules) > 30


# -- the checker catches broken dashboards ------------------------------------------------------


def _break(doc: dict[str, Any], how: str) -> None:
    p0, p1 = doc["panels"][0], doc["panels"][1]
    if how == "duplicate id":
        p1["id"] = p0["id"]
    elif how == "overlap":
        p1["gridPos"] = dict(p0["gridPos"])
    elif how == "outside grid":
        p0["gridPos"]["x"] = 20
    elif how == "datasource":
        p0["datasource"] = {"type": "prometheus", "uid": "prod"}
    elif how == "target datasource":
        p0["targets"][0]["datasource"] = None
    elif how == "schema":
        doc["schemaVersion"] = 16
    elif how == "no model variable":
        doc["templating"]["list"] = [v for v in doc["templating"]["list"] if v["name"] != "model"]
    elif how == "undefined variable":
        p0["targets"][0]["expr"] += ' or advguard_guard_requests_total{x="$nope"}'


BROKEN = {
    "duplicate id": "unique integer",
    "overlap": "overlap",
    "outside grid": "outside the 24-column grid",
    "datasource": "datasource must be",
    "target datasource": "datasource must be",
    "schema": "schemaVersion",
    "no model variable": "'model' is missing",
    "undefined variable": "undefined variables ['nope']",
}


@pytest.mark.parametrize("how", BROKEN)
def test_structural_problems_are_reported(how: str) -> None:
    doc = copy.deepcopy(grafana.load_dashboard("advguard-oncall"))
    _break(doc, how)
    problems = grafana.check_dashboard(doc)
    assert any(BROKEN[how] in p for p in problems), problems


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("rate(advguard_guard_request_total[5m])", "unknown metric advguard_guard_request_total"),
        ("rate(advguard_guard_requests[5m])", "unknown metric advguard_guard_requests"),
        ("advguard_guard_request_latency_seconds", "unknown metric"),  # a histogram's base name
        ("raet(advguard_guard_requests_total[5m])", "unknown PromQL function raet"),
        ('{__name__=~"advguard_.+"}', "not a recording-rule pattern"),
        ('{__name__=~"slo:.+"}', "not a recording-rule pattern"),
        ('{__name__!="x"}', "not a recording-rule pattern"),
        ('{__name__="advguard_guard_decision_total"}', "unknown metric"),
        ('sum(advguard_guard_requests_total{model="a}', "unterminated string"),
    ],
)
def test_misspelled_names_are_reported(expr: str, needle: str) -> None:
    doc = copy.deepcopy(grafana.load_dashboard("advguard-debug"))
    doc["panels"][0]["targets"][0]["expr"] = expr
    problems = grafana.check_names(doc)
    assert any(needle in p for p in problems), problems


# -- the PromQL reader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metrics", "functions"),
    [
        (
            'sum by (model, detector) (rate(a_total{model=~"$model"}[$__rate_interval]))\n'
            "/ on (model) group_left\nsum by (model) (rate(b_total[5m]))",
            {"a_total", "b_total"},
            {"sum", "rate"},
        ),
        ("sum(rate(x[5m])) by (job) # rate(commented_out[5m])\n", {"x"}, {"sum", "rate"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}, {"label_replace"}),
        ("histogram_quantile(0.9, rate(h_bucket[5m:30s] offset 1h))", {"h_bucket"}, None),
        ("a > bool 1e-3 and b unless c or d", {"a", "b", "c", "d"}, set()),
        ("time() - ts @ end()", {"ts"}, {"time", "end"}),
        ('count_values without (instance) ("v", m) > Inf', {"m"}, {"count_values"}),
        ('topk(3, {__name__="n1", job="by"}) + rate(rate_total[1m])', {"n1", "rate_total"}, None),
        ('x{a="}", b=~"{\\"}"} * 0x1F', {"x"}, set()),
        ('{"utf8.name", job="j"}', {"utf8.name"}, set()),
        ("sum without(le)(m:recorded:rate5m)", {"m:recorded:rate5m"}, {"sum"}),
    ],
)
def test_promql_reader_names_metrics_not_functions_labels_or_keywords(
    expr: str, metrics: set[str], functions: set[str] | None
) -> None:
    refs = references(expr)
    assert refs.metrics == metrics
    if functions is not None:
        assert refs.functions == functions


def test_variable_queries() -> None:
    r = variable_query_references('label_values(m_total{model=~"$model"}, client)')
    assert r.metrics == {"m_total"}
    assert variable_query_references("query_result(topk(5, x))").metrics == {"x"}
    assert variable_query_references("metrics(slo:.+)").name_matchers == [("=~", "slo:.+")]


# -- the names list against what exists ---------------------------------------------------------


def test_offline_names_are_the_gauges_the_offline_module_defines() -> None:
    tree = ast.parse((ROOT / "src" / "advguard" / "observe" / "offline.py").read_text())
    gauges = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "Gauge"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert gauges == set(names.OFFLINE_METRICS)


def _exported(text: str) -> dict[str, str]:
    """Series names a query can use -> type, from a /metrics text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created") and fam.type == "gauge":
            continue  # prometheus-client's creation time of a counter or histogram
        if fam.type == "counter":
            out[f"{fam.name}_total"] = "counter"
        else:
            out[fam.name] = fam.type
    return out


def test_the_guards_metrics_are_spelled_as_the_contract(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    guard = make_guard(tmp_path, module)
    key = create_key(guard.store, "c", ["predict"]).key
    try:
        with TestClient(create_app(guard)) as client:
            h = {"Authorization": f"Bearer {key}"}
            assert (
                client.post(
                    "/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers=h
                ).status_code
                == 200
            )
            assert (
                client.post("/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}).status_code
                == 401
            )
            text = client.get("/metrics").text
    finally:
        guard.close()
    exported = {n: t for n, t in _exported(text).items() if n.startswith("advguard_guard_")}
    # everything the guard exports is in the contract, with the contract's type
    assert {n: names.GUARD_METRICS.get(n) for n in exported} == exported
    missing = set(names.GUARD_METRICS) - set(exported)
    assert missing <= PENDING_GUARD_METRICS, sorted(missing - PENDING_GUARD_METRICS)
    # the guard exports the six metrics that existed before the contract
    assert len(exported) >= 6


# -- the export command ------------------------------------------------------------------------


def test_export_writes_dashboards_and_provisioning(tmp_path: Path) -> None:
    out = tmp_path / "grafana"
    r = CliRunner().invoke(
        cli_app,
        [
            "dashboards", "export", "--out", str(out), "--json",
            "--prometheus-url", "http://prom.internal:9090",
            "--dashboards-path", "/dash/advguard",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    files = sorted(str(Path(f).relative_to(out)) for f in json.loads(r.stdout)["files"])
    assert files == sorted(
        [f"dashboards/{n}.json" for n in grafana.DASHBOARDS]
        + ["provisioning/dashboards/advguard.yaml", "provisioning/datasources/advguard.yaml"]
    )
    for n in grafana.DASHBOARDS:
        assert json.loads((out / "dashboards" / f"{n}.json").read_text()) == grafana.load_dashboard(
            n
        )
    ds = yaml.safe_load((out / "provisioning/datasources/advguard.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prom.internal:9090"
    assert ds["datasources"][0]["uid"] == grafana.DATASOURCE_UID
    prov = yaml.safe_load((out / "provisioning/dashboards/advguard.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/dash/advguard"
    default = grafana.load_dashboard("advguard-oncall")["templating"]["list"][0]
    assert default["current"]["value"] == grafana.DATASOURCE_UID
    bad = CliRunner().invoke(
        cli_app, ["dashboards", "export", "--out", str(out), "--dashboards-path", "rel/path"]
    )
    assert bad.exit_code == 2 and "absolute path" in bad.stderr


def _expr(dashboard: str, title: str, ref: str = "A") -> str:
    """A panel's query with Grafana's variables replaced as Grafana would for 'All'."""
    panel = next(p for p in grafana.load_dashboard(dashboard)["panels"] if p["title"] == title)
    expr = next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    return re.sub(r"\$[a-z_]+", ".*", expr)


def _case(title: str, dashboard: str, value: float, labels: str = "{}") -> dict[str, Any]:
    return {
        "expr": _expr(dashboard, title),
        "eval_time": "70m",
        "exp_samples": [{"labels": labels, "value": value}],
    }


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_queries_compute_the_right_numbers_in_promtool(tmp_path: Path) -> None:
    """Key panels evaluated by promtool over known series: flag and reject rates, client
    shares, SLO compliance and the share of models meeting their robustness SLOs."""
    d = "advguard_guard_decisions_total"
    m1 = 'model="m1",version="v1"'
    series = [
        (f'{d}{{{m1},action="allow"}}', "0+85x80"),
        (f'{d}{{{m1},action="review"}}', "0+10x80"),
        (f'{d}{{{m1},action="reject"}}', "0+5x80"),
        (f'advguard_guard_detector_flags_total{{{m1},detector="squeeze"}}', "0+10x80"),
        ('advguard_guard_client_queries_total{model="m1",client="aaa"}', "0+30x80"),
        ('advguard_guard_client_queries_total{model="m1",client="bbb"}', "0+10x80"),
        ('slo:flags:error_ratio_rate3d{slo="flags",model="m1"}', "0.01x80"),
        ('slo:rejects:error_ratio_rate3d{slo="rejects",model="m1"}', "0.001x80"),
        ('slo:robust_a:robust_accuracy{slo="robust_a",model="m1"}', "0.7x80"),
        ('slo:robust_b:robust_accuracy{slo="robust_b",model="m2"}', "0.4x80"),
        ('advguard_eval_verdict_passed{model="m1",threat_model="t1"}', "1x80"),
        ('advguard_eval_verdict_passed{model="m1",threat_model="t2"}', "0x80"),
        ('advguard_eval_verdict_passed{model="m2",threat_model="t1"}', "1x80"),
    ]
    alerts = [
        (
            'ALERTS{alertname="AdvguardSLOFastBurn",alertstate="firing",slo="flags",'
            'model="m1",severity="page"}',
            "1x80",
        ),
        (
            'ALERTS{alertname="AdvguardRobustAccuracyBelowTarget",alertstate="firing",'
            'slo="robust_b",model="m2",severity="ticket"}',
            "1x80",
        ),
    ]
    oc, ex = "advguard-oncall", "advguard-executive"
    checks = [
        _case("Flag rate by model and detector", oc, 0.1, '{model="m1",detector="squeeze"}'),
        _case("Reject and block rate by model", oc, 0.05, '{model="m1",action="reject"}'),
        _case("SLO compliance", ex, 0.5),
        _case("Models meeting their robustness SLOs", ex, 0.5),
        _case("Models whose last evaluation passed", ex, 0.5),
        {
            "expr": _expr(oc, "Client share of queries (range)"),
            "eval_time": "70m",
            "exp_samples": [
                {"labels": '{model="m1",client="aaa"}', "value": 0.75},
                {"labels": '{model="m1",client="bbb"}', "value": 0.25},
            ],
        },
    ]
    quiet = [
        _case("SLO compliance", ex, 1.0),
        _case("Models meeting their robustness SLOs", ex, 1.0),
    ]

    def group(with_series: list[tuple[str, str]], tests: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in with_series],
            "promql_expr_test": tests,
        }

    doc = {"rule_files": [], "tests": [group(series + alerts, checks), group(series, quiet)]}
    path = tmp_path / "dashboard-tests.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
