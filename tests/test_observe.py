"""Observability: SLO YAML -> Prometheus rules (checked and unit-tested with the real promtool),
Alertmanager config (amtool), and offline metrics (text file, Pushgateway push, promtool lint)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from advguard.cli import app
from advguard.defenses.certify.report import CertificationReport, CertifiedPoint
from advguard.errors import InputError
from advguard.evaluate.report import Report
from advguard.evaluate.runner import evaluate
from advguard.evaluate.threat_model import ThreatModel
from advguard.models import TorchClassifier
from advguard.observe import offline
from advguard.observe.slo import (
    ALERTMANAGER_FILE,
    BURN_ALERTS,
    RULES_FILE,
    compile_alertmanager,
    compile_rules,
    load_slo_file,
    parse_slo_file,
    write_compiled,
)
from advguard.registry.gate import Check, GateResult
from advguard.stats import proportion

DOC_SLO = Path(__file__).resolve().parents[1] / "docs" / "ops" / "slo.yaml"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)
runner = CliRunner()


def base_spec(*slos: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "alerting": {"runbook_base_url": "https://runbooks.example.com/advguard"},
        "slos": list(slos),
        **top,
    }


FLAG = {
    "name": "flags",
    "kind": "detector_flag_rate",
    "model": "digits-cnn",
    "client": "acme",
    "objective": 0.99,
}


# -- validation -------------------------------------------------------------------------------


def test_docs_example_compiles_and_passes_promtool_and_amtool(tmp_path: Path) -> None:
    spec = load_slo_file(DOC_SLO)
    kinds = {s.kind for s in spec.slos}
    assert kinds == {
        "detector_flag_rate",
        "rejected_share",
        "error_rate",
        "latency",
        "robust_accuracy",
    }
    paths = write_compiled(spec, tmp_path / "rules")
    assert [p.name for p in paths] == [RULES_FILE, ALERTMANAGER_FILE]
    rules = yaml.safe_load(paths[0].read_text())
    records = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    assert "slo:digits_flag_rate:error_ratio_rate5m" in records
    assert {r.rsplit("rate", 1)[1] for r in records if ":error_ratio_" in r} == {
        "5m",
        "30m",
        "1h",
        "6h",
        "3d",
    }
    if PROMTOOL:
        out = subprocess.run(
            [PROMTOOL, "check", "rules", str(paths[0])], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS: 32 rules found" in out.stdout
    if AMTOOL:
        out = subprocess.run(
            [AMTOOL, "check-config", str(paths[1])], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_burn_rate_table_is_the_workbooks_for_30_days() -> None:
    assert [(b.severity, b.long, b.short, b.factor(30 * 86400)) for b in BURN_ALERTS] == [
        ("page", "1h", "5m", 14.4),
        ("page", "6h", "30m", 6.0),
        ("ticket", "3d", "6h", 1.0),
    ]
    rules = compile_rules(parse_slo_file(base_spec(FLAG)))
    alerts = {r["alert"]: r for r in rules["groups"][0]["rules"] if "alert" in r}
    page = alerts["AdvguardSLOFastBurn"]
    assert (
        "slo:flags:error_ratio_rate1h > 0.144 and slo:flags:error_ratio_rate5m > 0.144"
        in (page["expr"])
    )
    assert (
        "slo:flags:error_ratio_rate6h > 0.06 and slo:flags:error_ratio_rate30m > 0.06"
        in (page["expr"])
    )
    assert page["labels"] == {
        "severity": "page",
        "slo": "flags",
        "model": "digits-cnn",
        "client": "acme",
    }
    assert page["annotations"]["runbook_url"] == (
        "https://runbooks.example.com/advguard/flags/{{ $labels.model }}"
    )
    ticket = alerts["AdvguardSLOSlowBurn"]
    assert ticket["expr"] == (
        "(slo:flags:error_ratio_rate3d > 0.01 and slo:flags:error_ratio_rate6h > 0.01)"
    )
    # a 28-day period scales the factors (same budget shares)
    rules = compile_rules(parse_slo_file(base_spec({**FLAG, "period": "28d"})))
    page = next(r for r in rules["groups"][0]["rules"] if r.get("alert") == "AdvguardSLOFastBurn")
    assert "> 0.1344 and" in page["expr"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"objectiv": 0.99}, "slos.0.detector_flag_rate.objectiv: Extra inputs are not permitted"),
        ({"objective": 1.5}, "slos.0.detector_flag_rate.objective"),
        ({"objective": 0.9}, "the page could never fire"),
        ({"name": "Bad-Name"}, "slos.0.detector_flag_rate.name"),
        ({"model": 'x"} or vector(1)'}, "slos.0.detector_flag_rate.model"),
        ({"model": "{{ $value }}"}, "slos.0.detector_flag_rate.model"),
        ({"period": "2d"}, "shorter than the 3d ticket window"),
        ({"kind": "nonsense"}, "slos.0: Input tag 'nonsense' found"),
    ],
)
def test_invalid_slo_files_give_one_line_errors(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError) as e:
        parse_slo_file(base_spec({**FLAG, **change}), "slo.yaml")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("slo.yaml: ")


def test_latency_threshold_must_be_a_bucket_bound() -> None:
    lat = {"name": "lat", "kind": "latency", "objective": 0.99, "threshold_seconds": 0.3}
    with pytest.raises(InputError) as e:
        parse_slo_file(base_spec(lat), "slo.yaml")
    msg = str(e.value)
    assert "slos[0].threshold_seconds: 0.3 is not a bucket bound" in msg
    assert "0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10" in msg
    assert "\n" not in msg
    spec = parse_slo_file(base_spec({**lat, "threshold_seconds": 1}))
    expr = compile_rules(spec)["groups"][0]["rules"][0]["expr"]
    assert 'advguard_guard_request_latency_seconds_bucket{le="1.0"}[5m]' in expr  # client format


def test_duplicate_names_and_bad_maintenance_are_refused() -> None:
    with pytest.raises(InputError, match="duplicate names"):
        parse_slo_file(base_spec(FLAG, FLAG))
    for window, needle in [
        ({"name": "w"}, "give weekdays, times or both"),
        ({"name": "w", "weekdays": ["funday"]}, "maintenance.0.weekdays.0"),
        ({"name": "w", "times": [{"start": "03:00", "end": "02:00"}]}, "must be after start"),
        ({"name": "w", "weekdays": ["monday"], "location": "Mars/Base"}, "unknown time zone"),
    ]:
        with pytest.raises(InputError, match="maintenance") as e:
            parse_slo_file(base_spec(FLAG, maintenance=[window]))
        assert needle in str(e.value)


def test_alertmanager_routes_group_by_model_and_mute_maintenance() -> None:
    spec = parse_slo_file(
        base_spec(
            FLAG,
            maintenance=[
                {"name": "retrain", "times": [{"start": "02:00", "end": "03:00"}], "models": ["a"]},
                {"name": "freeze", "weekdays": ["saturday", "sunday"]},
            ],
        )
    )
    am = compile_alertmanager(spec)
    sub = am["route"]["routes"][0]
    assert sub["matchers"] == ['alertname=~"Advguard.+"']
    assert sub["group_by"] == ["model", "client"]
    page_routes = [r for r in sub["routes"] if 'severity="page"' in r["matchers"]]
    # model "a" gets both windows; every other model only the global one
    assert page_routes[0]["matchers"] == ['severity="page"', 'model=~"a"']
    assert page_routes[0]["mute_time_intervals"] == ["freeze", "retrain"]
    assert page_routes[1]["mute_time_intervals"] == ["freeze"]
    assert page_routes[1]["receiver"] == "advguard-page"
    assert am["time_intervals"][0] == {
        "name": "retrain",
        "time_intervals": [
            {"times": [{"start_time": "02:00", "end_time": "03:00"}], "location": "UTC"}
        ],
    }
    assert am["inhibit_rules"][0]["equal"] == ["slo", "model"]


def test_cli_check_and_compile(tmp_path: Path) -> None:
    res = runner.invoke(app, ["slo", "check", str(DOC_SLO), "--json"])
    assert res.exit_code == 0, res.output
    assert '"valid": true' in res.output
    res = runner.invoke(app, ["slo", "compile", str(DOC_SLO), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / RULES_FILE).is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_spec({**FLAG, "threshold": 1})))
    res = runner.invoke(app, ["slo", "check", str(bad)])
    assert res.exit_code == 2
    assert "threshold: Extra inputs are not permitted" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    bad.write_text("slos: [unclosed")
    res = runner.invoke(app, ["slo", "compile", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "line" in res.output
    assert not (tmp_path / "x").exists()


# -- promtool test rules ----------------------------------------------------------------------


def counter(*segments: tuple[float, int]) -> str:
    """promtool series text for a counter at 1m steps: (increase per minute, minutes)."""
    parts, last = ["0"], 0.0
    for inc, n in segments:
        parts.append(f"{last + inc:g}+{inc:g}x{n - 1}")
        last += inc * n
    return " ".join(parts)


def expected(rule: dict[str, Any], model: str, value: str = "") -> dict[str, Any]:
    """What promtool should report for ``rule`` firing for ``model`` (templates expanded)."""
    ann = {
        k: v.replace("{{ $labels.model }}", model).replace(
            "{{ $value | humanizePercentage }}", value
        )
        for k, v in rule["annotations"].items()
    }
    return {"exp_labels": {**rule["labels"], "model": model}, "exp_annotations": ann}


@needs_promtool
def test_promtool_alerts_fire_on_attack_and_slow_burn_not_on_normal_traffic(
    tmp_path: Path,
) -> None:
    spec = parse_slo_file(
        base_spec(
            FLAG,
            {"name": "errors", "kind": "error_rate", "objective": 0.999},
            {"name": "lat", "kind": "latency", "objective": 0.99, "threshold_seconds": 0.25},
            {
                "name": "robust",
                "kind": "robust_accuracy",
                "model": "digits-cnn",
                "threat_model": "digits-linf",
                "epsilon": 0.1,
                "target": 0.6,
                "for": "5m",
                "max_age": "2h",
            },
        )
    )
    rules = compile_rules(spec)
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules))
    by = {(g["name"], r["alert"]): r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    page = by[("advguard-slo-flags", "AdvguardSLOFastBurn")]
    ticket = by[("advguard-slo-flags", "AdvguardSLOSlowBurn")]
    m = 'model="digits-cnn",version="v1"'
    decisions = f'advguard_guard_decisions_total{{{m},action="allow"}}'
    flags = f'advguard_guard_detector_flags_total{{{m},detector="squeeze"}}'

    def none(t: str, *names: str) -> list[dict[str, Any]]:
        return [{"eval_time": t, "alertname": n, "exp_alerts": []} for n in names]

    burn = ("AdvguardSLOFastBurn", "AdvguardSLOSlowBurn")
    tests = [
        {  # normal traffic: 0.1% of decisions flagged for 6 hours -> silence
            "interval": "1m",
            "input_series": [
                {"series": decisions, "values": counter((1000, 360))},
                {"series": flags, "values": counter((1, 360))},
            ],
            "alert_rule_test": none("1h", *burn) + none("5h50m", *burn),
        },
        {  # attack: 3h normal, 1h at 30% flagged, then normal again
            "interval": "1m",
            "input_series": [
                {"series": decisions, "values": counter((1000, 360))},
                {"series": flags, "values": counter((1, 180), (300, 60), (1, 120))},
            ],
            "alert_rule_test": [
                *none("2h50m", *burn),
                {
                    "eval_time": "3h45m",
                    "alertname": "AdvguardSLOFastBurn",
                    "exp_alerts": [expected(page, "digits-cnn")],
                },
                {  # the 3d window is short yet: the ticket fires too (Alertmanager inhibits it)
                    "eval_time": "3h45m",
                    "alertname": "AdvguardSLOSlowBurn",
                    "exp_alerts": [expected(ticket, "digits-cnn")],
                },
                # 45 minutes after the attack the short windows are clean: the page resolves
                *none("4h45m", "AdvguardSLOFastBurn"),
            ],
        },
        {  # slow burn: 2% flagged (2x budget) for 3 hours -> ticket, no page
            "interval": "1m",
            "input_series": [
                {"series": decisions, "values": counter((1000, 180))},
                {"series": flags, "values": counter((20, 180))},
            ],
            "alert_rule_test": [
                *none("2h50m", "AdvguardSLOFastBurn"),
                {
                    "eval_time": "2h50m",
                    "alertname": "AdvguardSLOSlowBurn",
                    "exp_alerts": [expected(ticket, "digits-cnn")],
                },
            ],
        },
        {  # every model: 5% of one model's requests are 5xx, 20% slower than 0.25s
            "interval": "1m",
            "input_series": [
                {
                    "series": 'advguard_guard_requests_total{model="m2",version="1",'
                    'endpoint="/predict",status="200"}',
                    "values": counter((950, 120)),
                },
                {
                    "series": 'advguard_guard_requests_total{model="m2",version="1",'
                    'endpoint="/predict",status="500"}',
                    "values": counter((50, 120)),
                },
                {
                    "series": 'advguard_guard_request_latency_seconds_bucket{model="m2",'
                    'endpoint="/predict",le="0.25"}',
                    "values": counter((800, 120)),
                },
                {
                    "series": 'advguard_guard_request_latency_seconds_count{model="m2",'
                    'endpoint="/predict"}',
                    "values": counter((1000, 120)),
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "1h30m",
                    "alertname": "AdvguardSLOFastBurn",
                    "exp_alerts": [
                        expected(by[("advguard-slo-errors", "AdvguardSLOFastBurn")], "m2"),
                        expected(by[("advguard-slo-lat", "AdvguardSLOFastBurn")], "m2"),
                    ],
                }
            ],
            "promql_expr_test": [
                {
                    "expr": "round(slo:errors:error_ratio_rate1h, 0.0001)",
                    "eval_time": "1h30m",
                    "exp_samples": [{"labels": '{model="m2",slo="errors"}', "value": 0.05}],
                },
                {
                    "expr": "round(slo:lat:error_ratio_rate30m, 0.0001)",
                    "eval_time": "1h30m",
                    "exp_samples": [{"labels": '{model="m2",slo="lat"}', "value": 0.2}],
                },
            ],
        },
        {  # nightly evaluation: robust accuracy 0.5 < 0.6 -> ticket after 5m; stale after 2h
            "interval": "1m",
            "input_series": [
                {
                    "series": 'advguard_eval_robust_accuracy{model="digits-cnn",'
                    'threat_model="digits-linf",epsilon="0.1"}',
                    "values": "0.5x200",
                },
                {
                    "series": 'advguard_eval_trustworthy{model="digits-cnn",'
                    'threat_model="digits-linf"}',
                    "values": "1x200",
                },
                {
                    "series": 'advguard_eval_timestamp_seconds{model="digits-cnn",'
                    'threat_model="digits-linf"}',
                    "values": "0x200",
                },
            ],
            "alert_rule_test": [
                *none("3m", "AdvguardRobustAccuracyBelowTarget"),
                {
                    "eval_time": "10m",
                    "alertname": "AdvguardRobustAccuracyBelowTarget",
                    "exp_alerts": [
                        expected(
                            by[("advguard-slo-robust", "AdvguardRobustAccuracyBelowTarget")],
                            "digits-cnn",
                            "50%",
                        )
                    ],
                },
                *none("10m", "AdvguardEvaluationStale", "AdvguardEvaluationUntrustworthy"),
                {
                    "eval_time": "2h30m",
                    "alertname": "AdvguardEvaluationStale",
                    "exp_alerts": [
                        expected(
                            by[("advguard-slo-robust", "AdvguardEvaluationStale")], "digits-cnn"
                        )
                    ],
                },
            ],
        },
    ]
    test_file = tmp_path / "test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    out = subprocess.run(
        [PROMTOOL, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout

    # the test is not vacuous: with a lax objective the attack no longer pages
    lax = compile_rules(parse_slo_file(base_spec({**FLAG, "objective": 0.95})))
    rule_file.write_text(yaml.safe_dump(lax))
    test_file.write_text(
        yaml.safe_dump({"rule_files": [rule_file.name], "tests": [tests[1]]}, sort_keys=False)
    )
    out = subprocess.run(
        [PROMTOOL, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "AdvguardSLOFastBurn" in out.stdout + out.stderr


# -- offline metrics --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_report(digits_split, digits_module) -> Report:
    """A real (small) evaluation of the digits CNN: FGSM at two epsilons on 60 samples."""
    _, _, x_te, y_te = digits_split
    model = TorchClassifier(digits_module, input_shape=(1, 8, 8), num_classes=10)
    tm = ThreatModel.model_validate(
        dict(
            name="digits-linf",
            norm="linf",
            epsilons=[0.05, 0.1],
            samples=60,
            seed=0,
            batch_size=60,
            attacks=[{"attack": "pgd", "steps": 5}],
            sanity_samples=20,
        )
    )
    return evaluate(model, x_te, y_te, tm, model_info={"name": "digits-cnn"})


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cert_report() -> CertificationReport:
    return CertificationReport(
        created="2026-12-01T00:00:00+00:00",
        advguard_version="0",
        method="smoothing",
        norm="l2",
        sigma=0.25,
        seed=0,
        n_samples=50,
        clean_accuracy=proportion(45, 50),
        results=[
            CertifiedPoint(radius=0.0, certified_accuracy=proportion(40, 50)),
            CertifiedPoint(radius=0.5, certified_accuracy=proportion(21, 50)),
        ],
        timing={},
        model={"name": "digits-cnn"},
        data={},
        environment={},
        guarantee="g",
    )


def test_offline_metrics_textfile_matches_the_report(tmp_path: Path, small_report: Report) -> None:
    gate = GateResult(
        status="fail",
        policy="policy.yaml",
        report="digits-cnn",
        checks=[Check(name="slo", expected="x", actual="y", status="fail")],
    )
    reg, model = offline.build_registry(small_report, gate=gate, certification=cert_report())
    assert model == "digits-cnn"
    path = offline.write_textfile(reg, tmp_path / "m" / "metrics.prom")
    got = samples_of(path.read_text())
    run = (("model", "digits-cnn"), ("threat_model", "digits-linf"))
    for r in small_report.results:
        key = tuple(sorted((*run, ("epsilon", repr(r.epsilon)))))
        assert got[("advguard_eval_robust_accuracy", key)] == r.robust_accuracy.value
        assert got[("advguard_eval_robust_accuracy_ci_low", key)] == r.robust_accuracy.ci_low
        assert got[("advguard_eval_fooling_rate", key)] == r.fooling_rate.value
    assert got[("advguard_eval_clean_accuracy", run)] == small_report.clean_accuracy.value
    assert got[("advguard_eval_trustworthy", run)] == float(small_report.trustworthy)
    assert got[("advguard_eval_samples", run)] == 60
    from datetime import datetime

    created = datetime.fromisoformat(small_report.created).timestamp()
    assert got[("advguard_eval_timestamp_seconds", run)] == created
    g = (("model", "digits-cnn"), ("policy", "policy.yaml"))
    assert got[("advguard_gate_passed", g)] == 0
    assert got[("advguard_gate_failed_checks", g)] == 1
    c = (("method", "smoothing"), ("model", "digits-cnn"), ("norm", "l2"))
    assert got[("advguard_certified_accuracy", tuple(sorted((*c, ("radius", "0.5")))))] == 0.42
    assert not list(tmp_path.joinpath("m").glob("*.tmp*"))  # atomic: no leftovers
    if PROMTOOL:
        lint = subprocess.run(
            [PROMTOOL, "check", "metrics"],
            input=path.read_text(),
            capture_output=True,
            text=True,
        )
        assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_export_metrics_cli_writes_and_pushes(tmp_path: Path, small_report: Report) -> None:
    report_json = small_report.write(tmp_path / "run")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        out = tmp_path / "metrics.prom"
        res = runner.invoke(
            app,
            [
                *("slo", "export-metrics", str(report_json), "--out", str(out)),
                *("--pushgateway", url, "--job", "nightly", "--json"),
            ],
        )
        assert res.exit_code == 0, res.output
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(_Recorder.seen) == 1
    method, path, body = _Recorder.seen[0]
    assert (method, path) == ("PUT", "/metrics/job/nightly/model/digits-cnn")
    pushed = samples_of(body.decode())
    assert pushed == samples_of(out.read_text())
    eps = small_report.results[1]
    key = (("epsilon", "0.1"), ("model", "digits-cnn"), ("threat_model", "digits-linf"))
    assert pushed[("advguard_eval_robust_accuracy", key)] == eps.robust_accuracy.value

    # bad input: one line, exit 2
    for args, needle in [
        ([str(report_json)], "give --out FILE, --pushgateway URL or both"),
        ([str(report_json), "--pushgateway", "ftp://x"], "must be an http(s) URL"),
        ([str(report_json), "--pushgateway", url], "push to"),  # server is gone
        ([str(report_json), "--out", str(out), "--model", "bad name"], "not a usable label"),
        ([str(tmp_path / "nope.json"), "--out", str(out)], "does not exist"),
    ]:
        res = runner.invoke(app, ["slo", "export-metrics", *args])
        assert res.exit_code == 2, (args, res.output)
        flat = " ".join(res.output.split())  # undo rich's wrapping
        assert needle in flat and "Traceback" not in flat


def test_untrustworthy_report_exports_zero(small_report: Report) -> None:
    data = small_report.model_dump(mode="json")
    data["trustworthy"] = False
    rep = Report.model_validate(data)
    reg, _ = offline.build_registry(rep)
    assert (
        reg.get_sample_value(
            "advguard_eval_trustworthy", {"model": "digits-cnn", "threat_model": "digits-linf"}
        )
        == 0.0
    )
    data["model"] = {"name": "digits small_cnn", "path": "runs/q/digits_cnn.safetensors"}
    _, model = offline.build_registry(Report.model_validate(data))
    assert model == "digits_cnn"  # the name has a space: the file's stem is used
    with pytest.raises(InputError, match="pass --model"):
        data["model"] = {"name": "a b"}
        offline.build_registry(Report.model_validate(data))


def test_export_metrics_cli_gate_and_certification_only(tmp_path: Path) -> None:
    gate = GateResult(status="pass", policy="policy.yaml", report="r", checks=[])
    (tmp_path / "gate.json").write_text(gate.model_dump_json())
    (tmp_path / "certify.json").write_text(cert_report().model_dump_json())
    out = tmp_path / "m.prom"
    res = runner.invoke(
        app,
        [
            *("slo", "export-metrics", "--gate", str(tmp_path / "gate.json")),
            *("--certification", str(tmp_path / "certify.json"), "--out", str(out)),
        ],
    )
    assert res.exit_code == 0, res.output
    got = samples_of(out.read_text())
    assert got[("advguard_gate_passed", (("model", "digits-cnn"), ("policy", "policy.yaml")))] == 1
    key = (("method", "smoothing"), ("model", "digits-cnn"), ("norm", "l2"), ("radius", "0.0"))
    assert got[("advguard_certified_accuracy", key)] == 0.8
    (tmp_path / "gate.json").write_text('{"checks": "no"}')
    res = runner.invoke(
        app, ["slo", "export-metrics", "--gate", str(tmp_path / "gate.json"), "--out", str(out)]
    )
    assert res.exit_code == 2 and "gate result does not match" in " ".join(res.output.split())
