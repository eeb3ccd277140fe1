"""HttpClassifier against a live local server, and run_redteam end to end."""

from __future__ import annotations

import email.utils
import json
import socket
import time
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from advguard.attacks.base import Attack
from advguard.attacks.registry import ATTACKS, RegisteredAttack
from advguard.data.dataset import Dataset
from advguard.errors import AdvguardError, InputError
from advguard.evaluate.redteam import redteam_model, run_redteam
from advguard.evaluate.threat_model import parse_threat_model
from advguard.models import SklearnClassifier
from advguard.models.http_model import (
    EndpointError,
    EndpointResponseError,
    HttpClassifier,
    QueryBudgetExceeded,
    parse_retry_after,
    redact_url,
)
from http_server import ModelServer

KEY = "sk-test-5f2b9c0e7d1a"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def lr(digits) -> LogisticRegression:
    x_tr, y_tr, _, _ = digits
    return LogisticRegression(max_iter=300).fit(x_tr.reshape(len(x_tr), -1), y_tr)


@pytest.fixture()
def server(lr):
    with ModelServer(lr.predict_proba) as srv:
        yield srv


def client(url: str, **kw: Any) -> HttpClassifier:
    opts: dict[str, Any] = {
        "input_shape": (1, 8, 8),
        "num_classes": 10,
        "proxies": {},
        "backoff": 0.01,
        "seed": 0,
    }
    opts.update(kw)
    return HttpClassifier(url, **opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- predictions ------------------------------------------------------------------------
def test_predictions_equal_local_model(server, lr, digits):
    _, _, x, y = digits
    remote = client(server.url, batch_size=100)
    local = SklearnClassifier(lr, input_shape=(1, 8, 8))
    np.testing.assert_array_equal(remote.predict_logits(x), local.predict_logits(x))
    assert remote.queries.forward == len(x) == server.samples
    assert server.requests == remote.requests_sent == -(-len(x) // 100)
    assert remote.queries.gradient == 0
    assert remote.logits(torch.zeros(0, 1, 8, 8)).shape == (0, 10)
    assert server.requests == 4  # empty batch: no request
    np.testing.assert_array_equal(remote.predict(x), local.predict(x))
    assert remote.accuracy(x, y) > 0.85


def test_logits_output_and_custom_fields(lr, digits):
    _, _, x, _ = digits
    srv = ModelServer(lr.decision_function, input_field="instances", output_field="scores")
    with srv:
        remote = client(
            srv.url, output="logits", input_field="instances", output_field="scores", flatten=True
        )
        z = remote.predict_logits(x[:50])
    ref = lr.decision_function(x[:50].reshape(50, -1).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(z, ref)


# -- API key ---------------------------------------------------------------------------
def test_api_key_sent_and_required(lr, digits):
    _, _, x, _ = digits
    with ModelServer(lr.predict_proba, api_key=KEY) as srv:
        with pytest.raises(EndpointError, match=r"HTTP 401.*API key") as ei:
            client(srv.url).predict(x[:4])
        assert ei.value.status == 401
        assert srv.requests == 1  # 401 is not retried
        ok = client(srv.url, api_key=KEY)
        assert len(ok.predict(x[:4])) == 4
        assert srv.headers_seen[-1]["authorization"] == f"Bearer {KEY}"
        assert KEY not in repr(ok) and KEY not in json.dumps(ok.describe())
        assert ok.describe()["authenticated"] is True

        # a server that echoes the key in its error body: the key is redacted
        srv.echo_key_in_errors = True
        with pytest.raises(EndpointError) as ei:
            client(srv.url, api_key=KEY + "x").predict(x[:4])
        assert KEY not in str(ei.value) and "***" in str(ei.value)

    with ModelServer(
        lr.predict_proba, api_key=KEY, api_key_header="X-API-Key", api_key_prefix=""
    ) as srv:
        remote = client(srv.url, api_key=KEY, api_key_header="X-API-Key")
        assert len(remote.predict(x[:3])) == 3
        assert srv.headers_seen[-1]["x-api-key"] == KEY


# -- retries (against a fake clock: no wall-clock bounds) ----------------------------------
class FakeClock:
    """Monotonic clock that moves only when slept on, or by ``tick`` per reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_429_retry_after_seconds_is_honoured(server, digits):
    _, _, x, _ = digits
    server.fail_429, server.retry_after = 2, "0.2"
    clock = FakeClock()
    remote = client(server.url, retries=3, backoff=5.0, clock=clock, sleep=clock.sleep)
    assert len(remote.predict(x[:8])) == 8
    assert clock.sleeps == [0.2, 0.2]  # Retry-After, not the (far longer) backoff
    assert server.requests == 3 and remote.retries_done == 2
    assert remote.usage()["seconds_waited"] == pytest.approx(0.4)
    assert remote.queries.forward == 8  # 429s answer nothing


def test_429_retry_after_http_date_is_capped(server, digits):
    _, _, x, _ = digits
    server.fail_429 = 1
    server.retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    clock = FakeClock()
    remote = client(server.url, max_retry_after=0.25, backoff=5.0, sleep=clock.sleep)
    remote.predict(x[:2])
    assert clock.sleeps == [0.25]
    assert remote.seconds_waited == pytest.approx(0.25)


def test_429_without_retry_after_backs_off(server, digits):
    _, _, x, _ = digits
    server.fail_429, server.retry_after = 3, None
    clock = FakeClock()
    remote = client(server.url, retries=3, backoff=1.0, max_backoff=3.0, sleep=clock.sleep)
    remote.predict(x[:2])
    d = [1.0, 2.0, 3.0]  # backoff * 2**k, capped at max_backoff
    assert len(clock.sleeps) == 3
    assert all(k / 2 <= w <= k for w, k in zip(clock.sleeps, d, strict=True)), clock.sleeps


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_500_retried_then_success_with_deterministic_backoff(server, digits):
    _, _, x, _ = digits
    waits: list[list[float]] = []
    for _ in range(2):
        server.fail_500 = 2
        seen: list[float] = []
        remote = client(server.url, retries=3, backoff=0.04, seed=123, sleep=seen.append)
        assert len(remote.predict(x[:5])) == 5
        waits.append(seen)
    assert waits[0] == waits[1] and len(waits[0]) == 2  # same seed, same jitter
    assert 0.02 <= waits[0][0] <= 0.04 and 0.04 <= waits[0][1] <= 0.08  # exponential
    assert server.requests == 6


def test_retries_exhausted_gives_status_and_body(server, digits):
    _, _, x, _ = digits
    server.fail_500 = 10
    clock = FakeClock()
    remote = client(server.url, retries=2, sleep=clock.sleep)
    with pytest.raises(EndpointError, match=r"still failing after 3 attempt\(s\): HTTP 500") as ei:
        remote.predict(x[:5])
    assert "internal error" in str(ei.value) and server.url in str(ei.value)
    assert ei.value.status == 500
    assert server.requests == 3 and remote.queries.forward == 0
    assert len(clock.sleeps) == 2  # a wait between attempts, none after the last


def test_unreachable_endpoint_names_url(digits):
    _, _, x, _ = digits
    url = f"http://127.0.0.1:{free_port()}/predict"
    clock = FakeClock()
    remote = client(url, retries=2, timeout=2.0, clock=clock, sleep=clock.sleep)
    with pytest.raises(EndpointError, match=r"could not reach .* after 3 attempt\(s\)") as ei:
        remote.predict(x[:3])
    assert url in str(ei.value) and "refused" in str(ei.value).lower()
    assert isinstance(ei.value, AdvguardError)
    assert len(clock.sleeps) == 2 and remote.requests_sent == 3


def test_slow_endpoint_times_out(server, digits):
    _, _, x, _ = digits
    server.delay = 0.5
    remote = client(server.url, timeout=0.15, retries=1, sleep=FakeClock().sleep)
    with pytest.raises(EndpointError, match=r"no complete response within 0.15 s"):
        remote.predict(x[:3])
    assert server.requests == 2  # a time-out is retried


# -- hostile responses: size, drip, depth --------------------------------------------------
MIB = 1024 * 1024


def test_streamed_huge_body_stops_at_the_cap(server, digits):
    _, _, x, _ = digits
    server.stream_bytes = 1024 * MIB  # 1 GiB, no Content-Length
    remote = client(server.url, max_response_bytes=MIB, retries=0)
    with pytest.raises(EndpointResponseError, match=r"more than 1048576 bytes.*stopped reading"):
        remote.predict(x[:3])
    server.closing.set()  # end the writer if the kernel buffers still take bytes
    # the client stopped after ~1 MiB: the rest are the loopback socket buffers (a few MiB)
    assert MIB < server.bytes_sent < 32 * MIB, server.bytes_sent
    assert remote.queries.forward == 0 and server.requests == 1  # not retried


def test_declared_huge_body_is_not_read(server, digits):
    _, _, x, _ = digits
    server.stream_bytes, server.declare_length = 1024 * MIB, True
    remote = client(server.url, max_response_bytes=MIB)
    with pytest.raises(EndpointResponseError, match=r"announced a 1073741824-byte response"):
        remote.predict(x[:3])
    server.closing.set()
    assert server.bytes_sent < 32 * MIB and server.requests == 1


def test_cut_short_body_is_retried(server, digits):
    _, _, x, _ = digits
    server.short_body = 1  # the first answer stops halfway through its Content-Length
    clock = FakeClock()
    remote = client(server.url, retries=2, sleep=clock.sleep)
    assert len(remote.predict(x[:4])) == 4
    assert server.requests == 2 and len(clock.sleeps) == 1
    server.short_body = 5
    with pytest.raises(EndpointError, match=r"after 3 attempt\(s\).*IncompleteRead"):
        client(server.url, retries=2, sleep=clock.sleep).predict(x[:4])


def test_default_cap_is_16_mib_and_validated():
    assert client("http://127.0.0.1:1/p").max_response_bytes == 16 * MIB
    assert client("http://127.0.0.1:1/p").describe()["max_response_bytes"] == 16 * MIB
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="max_response_bytes"):
            client("http://127.0.0.1:1/p", max_response_bytes=bad)
    with pytest.raises(InputError, match="deadline"):
        client("http://127.0.0.1:1/p", deadline=0)
    m = client("http://127.0.0.1:1/p", timeout=7)
    assert m.deadline == 7.0 and m.describe()["deadline"] == 7.0  # default: the timeout


@pytest.mark.parametrize("where", ["body", "headers"])
def test_slow_drip_hits_the_deadline(server, digits, where):
    _, _, x, _ = digits
    server.drip, server.drip_where = 0.02, where  # one byte per 20 ms: each read succeeds
    # every clock reading is one (fake) second later: the client sends, then gets a few reads
    clock = FakeClock(tick=1.0)
    remote = client(
        server.url, timeout=5.0, deadline=8.0, retries=1, clock=clock, sleep=clock.sleep
    )
    with pytest.raises(EndpointError, match=r"no complete response within 8 s") as ei:
        remote.predict(x[:3])
    assert "\n" not in str(ei.value)
    server.closing.set()
    assert server.requests == 2  # an overrun is a time-out: retried, then given up
    assert server.bytes_sent < 20  # 2000 body bytes would take 40 s without the deadline


def test_deeply_nested_json_is_refused(server, digits):
    _, _, x, _ = digits
    server.nested = 100_000  # json.loads would hit the recursion limit
    remote = client(server.url)
    with pytest.raises(EndpointResponseError, match=r"nested 100001 levels deep.*limit of 32"):
        remote.predict(x[:3])
    server.nested = 40
    with pytest.raises(EndpointResponseError, match=r"nested 41 levels"):
        client(server.url).predict(x[:3])
    with pytest.raises(EndpointResponseError, match=r"has 1 row"):  # parsed under a raised limit
        client(server.url, max_json_depth=64).predict(x[:3])
    assert server.requests == 3  # not retried


def test_too_many_values_for_the_batch(server, digits):
    _, _, x, _ = digits
    server.extra_values = 200_000  # 3 inputs x 10 classes expected
    remote = client(server.url)
    with pytest.raises(EndpointResponseError, match=r"about 2000\d\d values, over the 1156"):
        remote.predict(x[:3])
    server.extra_values = 50  # a few ignored extra fields are fine
    assert len(client(server.url).predict(x[:3])) == 3
    server.extra_values = 200_000  # an endpoint with big extra fields: raise the limit
    assert len(client(server.url, max_json_values=300_000).predict(x[:3])) == 3


def test_json_structure_ignores_strings():
    from advguard.models.http_model import json_structure

    assert json_structure(b'{"probabilities": [[0.1, 0.9], [0.5, 0.5]]}') == (3, 8)
    assert json_structure(b'{"note": "[[[[{{ \\" ]]", "p": [1]}') == (2, 4)
    assert json_structure(b"[" * 50 + b"]" * 50)[0] == 50


def test_client_errors_not_retried(server, digits):
    _, _, x, _ = digits
    remote = client(server.url, input_field="instances", retries=3)
    with pytest.raises(EndpointError, match=r"HTTP 400.*input field 'instances'"):
        remote.predict(x[:3])
    assert server.requests == 1


# -- malformed answers --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "pattern"),
    [
        ("malformed", r"did not answer valid JSON.*not json"),
        ("missing_field", r"no field 'probabilities' \(fields: 'result'\)"),
        ("wrong_classes", r"9 scores per input but num_classes is 10"),
        ("wrong_rows", r"has 4 row\(s\).*for 5 input\(s\)"),
        ("nan", r"NaN/Inf/null"),
        ("negative", r"negative probabilities.*output='logits'"),
    ],
)
def test_malformed_responses_are_clear_errors(server, digits, knob, pattern):
    _, _, x, _ = digits
    setattr(server, knob, True)
    remote = client(server.url)
    with pytest.raises(EndpointResponseError, match=pattern):
        remote.predict(x[:5])
    assert remote.queries.forward == 0
    assert server.requests == 1  # contract errors are not retried


def test_probabilities_that_do_not_sum_to_one(lr, digits):
    _, _, x, _ = digits
    with (
        ModelServer(lambda z: lr.predict_proba(z) * 2) as srv,
        pytest.raises(EndpointResponseError, match=r"sum to 1.*sums to 2"),
    ):
        client(srv.url).predict(x[:3])


# -- budget -------------------------------------------------------------------------------
def test_query_budget_is_hard(server, digits):
    _, _, x, _ = digits
    xt = torch.as_tensor(x)
    remote = client(server.url, query_budget=50, batch_size=16)
    remote.logits(xt[:30])
    remote.logits(xt[30:50])
    assert remote.queries.forward == remote.samples_answered == server.samples == 50
    assert remote.remaining_budget == 0
    n_req = server.requests
    with pytest.raises(QueryBudgetExceeded, match=r"50 of 50 samples already answered"):
        remote.logits(xt[50:51])
    assert server.requests == n_req  # raised before sending

    # a call that does not fit is refused as a whole, nothing sent
    remote2 = client(server.url, query_budget=40, batch_size=16)
    with pytest.raises(QueryBudgetExceeded):
        remote2.logits(xt[:41])
    assert server.requests == n_req and remote2.queries.forward == 0
    assert isinstance(QueryBudgetExceeded(1, 1, 1), AdvguardError)


# -- configuration ------------------------------------------------------------------------
def test_url_and_option_validation():
    for bad in ("ftp://example.com/x", "file:///etc/passwd", "example.com/predict", ""):
        with pytest.raises(InputError):
            client(bad)
    with pytest.raises(InputError, match="credentials in the URL"):
        client("https://user:pw@example.com/predict")
    with pytest.raises(InputError, match="output must be"):
        client("http://127.0.0.1:1/p", output="scores")
    with pytest.raises(InputError, match="retries"):
        client("http://127.0.0.1:1/p", retries=-1)
    with pytest.raises(InputError, match="query_budget"):
        client("http://127.0.0.1:1/p", query_budget=-5)
    assert (
        redact_url("https://api.example.com:8443/v1/predict?key=abc&model=m#frag")
        == "https://api.example.com:8443/v1/predict?key=%2A%2A%2A&model=%2A%2A%2A"
    )
    m = client("https://api.example.com/v1/predict?api_key=abc123")
    assert "abc123" not in repr(m) and "abc123" not in json.dumps(m.describe())


# -- red-team -------------------------------------------------------------------------------
class _NoiseAttack(Attack):
    """Test-only black-box attack: random sign corners of the linf ball, first hit wins."""

    name = "noise-test"
    norms = ("linf",)
    needs_gradients = False
    supports_targeted = False

    def __init__(self, *, norm: str = "linf", seed: int = 0, tries: int = 4) -> None:
        super().__init__(norm=norm, seed=seed)
        self.tries = tries

    def _run(self, model, x, y, epsilon, targets, rng):
        out = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool)
        lo, hi = model.bounds
        for k in range(self.tries):
            if not todo.any():
                break
            i = todo.nonzero().squeeze(1)
            sign = rng.subset(i).sign(("try", k), x.shape[1:])
            cand = (x[i] + epsilon * sign).clamp(lo, hi)
            hit = model.logits(cand).argmax(1) != y[i]
            out[i[hit]] = cand[hit]
            todo[i[hit]] = False
        return out


@pytest.fixture()
def noise_attack(monkeypatch):
    monkeypatch.setitem(
        ATTACKS,
        "noise-test",
        RegisteredAttack(
            "noise-test",
            _NoiseAttack,
            ("linf",),
            "black-box",
            ("AML.T0015", "AML.T0043.001"),
            "test-only random sign noise",
        ),
    )


BB_TM = """
name: http-test
knowledge: black-box
norm: linf
epsilons: [0.1, 0.3]
samples: 40
batch_size: 10
sanity_samples: 8
attacks:
  - attack: {attack}
slos:
  - robust_accuracy >= 0.5 at eps 0.1
"""


@pytest.fixture()
def digits_data(digits) -> Dataset:
    _, _, x, y = digits
    return Dataset(x=x, y=y, bounds=(0.0, 1.0), num_classes=10, name="digits-test")


def test_redteam_refuses_white_box_threat_model(lr, digits_data, tmp_path):
    with ModelServer(lr.predict_proba) as srv:
        with pytest.raises(InputError, match=r"knowledge: white-box.*no gradients"):
            run_redteam(srv.url, digits_data, "quick", tmp_path)
        tm = parse_threat_model(BB_TM.format(attack="pgd"))
        with pytest.raises(InputError, match=r"white-box attacks \(pgd\)"):
            run_redteam(srv.url, digits_data, tm, tmp_path)
        assert srv.requests == 0


def test_redteam_end_to_end_with_budget_and_resume(lr, digits_data, tmp_path, noise_attack):
    tm = parse_threat_model(BB_TM.format(attack="noise-test"))
    url_with_secret = "?tenant=acme-secret-tenant"
    with ModelServer(
        lr.predict_proba, api_key=KEY, api_key_header="X-API-Key", api_key_prefix=""
    ) as srv:
        kw = {
            "api_key": KEY,
            "api_key_header": "X-API-Key",
            "client_options": {"proxies": {}, "seed": 0},
        }
        # 1) a budget that runs out after the first batch: a partial report is still written
        url = srv.url
        out = tmp_path / "run"
        res = run_redteam(srv.url + url_with_secret, digits_data, tm, out, query_budget=150, **kw)
        rep = res.report
        assert res.json_path.exists() and res.html_path is not None and res.html_path.exists()
        budget = next(c for c in rep.sanity_checks if c.id == "query-budget")
        assert budget.status == "fail" and not rep.trustworthy
        assert rep.verdict.status == "untrustworthy"
        assert rep.data["n_requested"] == 40
        assert rep.data["n_evaluated"] == budget.details["samples_evaluated"]
        assert 10 <= rep.data["n_evaluated"] < 40 and rep.data["n_evaluated"] % 10 == 0
        assert rep.model["query_budget_exhausted"] is True
        assert rep.model["queries"]["samples_answered"] == srv.samples <= 150
        first_samples = srv.samples

        # 2) resume with more budget: finished batches are not queried again
        res2 = run_redteam(
            srv.url + url_with_secret,
            digits_data,
            tm,
            out,
            query_budget=100_000,
            resume=True,
            html=False,
            **kw,
        )
        rep2 = res2.report
        assert rep2.data["n_evaluated"] == 40 and rep2.model["query_budget_exhausted"] is False
        assert [c.id for c in rep2.sanity_checks if c.status == "fail"] == []
        resumed_samples = srv.samples - first_samples
        assert rep2.model["queries"]["samples_answered"] == resumed_samples

        # 3) the same run from scratch gives the same numbers as the resumed one
        res3 = run_redteam(srv.url, digits_data, tm, tmp_path / "fresh", **kw)
        rep3 = res3.report
        assert resumed_samples < srv.samples - first_samples - resumed_samples
    for r2, r3 in zip(rep2.results, rep3.results, strict=True):
        assert r2.robust_accuracy.value == r3.robust_accuracy.value
    assert rep3.clean_accuracy.value > 0.85
    assert rep3.results[-1].robust_accuracy.value < rep3.results[0].robust_accuracy.value
    assert rep3.model["adapter"] == "HttpClassifier" and rep3.model["white_box"] is False
    assert rep3.model["api_key_header"] == "X-API-Key" and rep3.model["authenticated"] is True
    assert rep3.suite[0].knowledge == "black-box"
    assert {f.atlas_technique for f in rep3.findings} >= {"AML.T0043.001"}

    # the key and the query-string secret appear in no output file
    for d in (tmp_path / "run", tmp_path / "fresh"):
        for name in ("report.json", "report.html"):
            text = (d / name).read_text()
            assert KEY not in text and "acme-secret-tenant" not in text
    endpoint = json.loads((tmp_path / "run" / "report.json").read_text())["model"]["endpoint"]
    assert endpoint == url + "?tenant=%2A%2A%2A"


def test_redteam_budget_runs_out_in_sanity_checks(lr, digits_data, tmp_path, noise_attack):
    tm = parse_threat_model(BB_TM.format(attack="noise-test"))
    with ModelServer(lr.predict_proba) as srv:
        # measure what the attack suite costs: samples answered when the sanity stage starts
        model = client(srv.url, input_shape=(1, 8, 8))
        at_stage: dict[str, int] = {}
        full = redteam_model(
            model,
            digits_data,
            tm,
            tmp_path / "full",
            html=False,
            progress=lambda stage, done, total: at_stage.setdefault(stage, model.samples_answered),
        ).report
        suite_cost = at_stage["sanity"]
        assert 0 < suite_cost < model.samples_answered

        res = run_redteam(
            srv.url,
            digits_data,
            tm,
            tmp_path / "cut",
            query_budget=suite_cost + 3,
            html=False,
            client_options={"proxies": {}, "seed": 0},
        )
    rep = res.report
    check = next(c for c in rep.sanity_checks if c.id == "query-budget")
    assert check.status == "fail" and "during the sanity checks" in check.explanation
    assert rep.data["n_evaluated"] == 40 and rep.verdict.status == "untrustworthy"
    assert rep.model["queries"]["samples_answered"] <= suite_cost + 3
    # the suite numbers are those of the complete run before its sanity checks
    for a, b in zip(rep.results, full.results, strict=True):
        assert a.robust_accuracy.value >= b.robust_accuracy.value
        suite_rows = [r for r in b.per_attack if r.stage == "suite"]
        assert a.robust_accuracy.value == suite_rows[-1].robust_accuracy_after.value


def test_redteam_budget_too_small_for_one_batch(lr, digits_data, tmp_path, noise_attack):
    tm = parse_threat_model(BB_TM.format(attack="noise-test"))
    with ModelServer(lr.predict_proba) as srv:
        with pytest.raises(QueryBudgetExceeded, match="before the first batch"):
            run_redteam(
                srv.url,
                digits_data,
                tm,
                tmp_path,
                query_budget=5,
                client_options={"proxies": {}},
            )
        assert srv.requests == 0
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(
    "square" not in ATTACKS, reason="the 'square' black-box attack is not registered yet"
)
def test_redteam_with_square(lr, digits_data, tmp_path):
    tm = parse_threat_model(
        """
name: http-square
knowledge: black-box
norm: linf
epsilons: [0.3]
samples: 10
batch_size: 5
sanity_samples: 8
attacks:
  - attack: square
    max_queries: 200
"""
    )
    with ModelServer(lr.predict_proba, api_key=KEY) as srv:
        res = run_redteam(
            srv.url,
            digits_data,
            tm,
            tmp_path,
            api_key=KEY,
            query_budget=20_000,
            client_options={"proxies": {}},
        )
        assert res.report.model["queries"]["samples_answered"] == srv.samples
    assert res.json_path.exists() and res.html_path is not None and res.html_path.exists()
    assert KEY not in res.json_path.read_text() and KEY not in res.html_path.read_text()
    assert res.report.data["n_evaluated"] >= 5
    assert res.report.results[0].robust_accuracy.value < 0.5  # LR on digits at linf 0.3


def test_cli_redteam_max_response_bytes(server, tmp_path):
    from typer.testing import CliRunner

    from advguard.cli import app

    tm = tmp_path / "bb.yaml"
    tm.write_text(BB_TM.format(attack="square"))
    server.stream_bytes = 64 * MIB
    args = ["redteam", "--url", server.url, "--data", "digits", "--threat-model", str(tm)]
    args += ["--out", str(tmp_path / "out"), "--retries", "0", "--max-response-bytes", "65536"]
    res = CliRunner().invoke(app, args)
    server.closing.set()
    assert res.exit_code == 2, res.output
    assert "more than 65536 bytes" in res.output and "Traceback" not in res.output
    assert server.bytes_sent < 32 * MIB and server.requests == 1


def _self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert path, key path)."""
    pytest.importorskip("cryptography", reason="cryptography (extra 'sign') makes the test cert")
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_https_private_ca_cap_and_deadline(lr, digits, tmp_path):
    import ssl

    _, _, x, _ = digits
    cert, key = _self_signed(tmp_path)
    with ModelServer(lr.predict_proba) as srv:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        srv._httpd.socket = server_ctx.wrap_socket(srv._httpd.socket, server_side=True)
        url = srv.url.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=cert)
        assert len(client(url, ssl_context=trusted).predict(x[:4])) == 4
        with pytest.raises(EndpointError, match=r"TLS error.*CERTIFICATE_VERIFY_FAILED"):
            client(url, retries=0).predict(x[:4])  # certificates are verified by default
        srv.stream_bytes = 64 * MIB
        with pytest.raises(EndpointResponseError, match="more than 65536 bytes"):
            client(url, ssl_context=trusted, max_response_bytes=65536).predict(x[:4])
        srv.closing.set()
        assert srv.bytes_sent < 32 * MIB
        srv.closing.clear()
        srv.stream_bytes, srv.drip = 0, 0.02
        clock = FakeClock(tick=1.0)
        remote = client(url, ssl_context=trusted, timeout=5.0, deadline=8.0, retries=0, clock=clock)
        with pytest.raises(EndpointError, match="no complete response within 8 s"):
            remote.predict(x[:4])
        srv.closing.set()
