"""The guard's YAML configuration, validated with pydantic (strict, unknown keys refused).

Errors name the file, the line and the field at fault (``guard.yaml: invalid guard config:
line 7, field 'limits.rate': ...``). Relative paths in the file are read from the file's folder.
Nothing named in the file is imported, except an explicit model ``factory`` (the same rule as
the command line's ``--factory``: name only code you trust).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from advguard.errors import InputError
from advguard.evaluate.threat_model import parse_yaml_model

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Action = Literal["allow", "fallback", "review", "reject"]
#: How severe each action is: a request takes the most severe action of its rows.
SEVERITY: dict[str, int] = {"allow": 0, "fallback": 1, "review": 2, "reject": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RegistrySource(_Strict):
    """A model taken from the registry: the version in ``stage`` of ``model_name``."""

    model_name: str = Field(pattern=NAME_RE)
    stage: Literal["production", "canary", "candidate"] = "production"
    root: str | None = None
    db_url: str | None = None


class ModelSpec(_Strict):
    """A served model: a file (``path``) or a registry version (``registry``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(default="model", pattern=NAME_RE)
    path: str | None = None
    factory: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    input_shape: list[int] | None = None
    num_classes: int | None = Field(default=None, ge=2)
    bounds: list[float] | None = None
    #: Where a torch model runs: cpu (default), cuda, cuda:N, mps or auto (CUDA when present);
    #: full precision, deterministic cuDNN. ONNX/skops/text models always run on the CPU.
    device: str | None = Field(default=None, pattern=r"^(cpu|cuda(:[0-9]{1,2})?|mps|auto)$")
    registry: RegistrySource | None = None
    #: A feature schema (YAML, see docs/tabular.md) makes this a tabular model: requests send
    #: records keyed by feature name, checked against the schema's domain.
    schema_path: str | None = Field(default=None, alias="schema")

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d <= 0 for d in v) or len(v) > 6):
            raise ValueError("input_shape must be 1 to 6 positive integers")
        return v

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not v[0] < v[1]):
            raise ValueError("bounds must be [low, high] with low < high")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.path is not None and self.registry is not None:
            raise ValueError("give either path or registry, not both")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)


class StorageConfig(_Strict):
    #: SQLAlchemy URL; default ``sqlite:///<config folder>/guard.db``.
    database_url: str | None = None
    table_prefix: str = Field(default="guard_", pattern=r"^[a-z][a-z0-9_]{0,30}$")


class AuthConfig(_Strict):
    #: Environment variable holding the server pepper (keys are stored as HMAC-SHA256 with
    #: it); without a pepper keys are stored as SHA-256.
    pepper_env: str = Field(default="ADVGUARD_GUARD_PEPPER", pattern=r"^[A-Z_][A-Z0-9_]*$")
    pepper_file: str | None = None
    #: Seconds a client's key, block and throttle (and a model's isolation) read from the
    #: database serve later requests (advguard.guard.controlcache). A change made through this
    #: guard applies at once; one made elsewhere (CLI, another replica) within this time.
    #: 0 reads the database on every request.
    cache_ttl_s: float = Field(default=1.0, ge=0.0, le=1.0)


class LimitsConfig(_Strict):
    #: Sustained requests per second per key; ``burst`` requests may come at once.
    rate: float = Field(default=10.0, gt=0, le=1e6)
    burst: int = Field(default=20, ge=1, le=10**7)
    #: Input rows per key per ``budget_period`` (None: no budget).
    budget: int | None = Field(default=10_000, ge=1)
    budget_period: Literal["minute", "hour", "day"] = "day"
    #: ``redis://host:port/db`` shares the limits between guard instances; default memory.
    redis_url: str | None = None
    key_prefix: str = Field(default="advguard-guard", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    #: When the rate-limit store does not answer: refuse with 503 (false, the default) or let
    #: requests through without rate limit and budget (true; logged). See guard/failsafe.py.
    fail_open: bool = False


class EdgeConfig(_Strict):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=64, le=1 << 30)
    #: Seconds allowed to receive the whole request body.
    read_timeout_s: float = Field(default=10.0, gt=0, le=600)
    max_json_depth: int = Field(default=12, ge=2, le=64)
    max_batch: int = Field(default=256, ge=1, le=100_000)
    #: Inputs outside the model's bounds: refuse (422) or clip into them.
    out_of_bounds: Literal["reject", "clip"] = "reject"
    #: Longest text (characters) a text model accepts per input.
    max_text_chars: int = Field(default=10_000, ge=1, le=10_000_000)
    #: Requests whose body has at most this many bytes are parsed, validated, decided and
    #: answered on the event loop, without the thread-pool hop (for small models the hop
    #: costs more than the work), as long as the model's inline runs take at most
    #: ``inline_max_ms`` on average (advguard.guard.inline: a slower model's requests take
    #: the pool, with a probe on the loop now and then). A decision record that must be
    #: committed before the answer (forensic, or ``plain_records: before-answer``) is
    #: committed in the thread pool. With ``batching`` only the admission (parse,
    #: validation, budget) runs on the loop; never with Redis limits (their I/O does not
    #: run on the loop). 0: every request takes the hop.
    inline_max_body_bytes: int = Field(default=65536, ge=0, le=1 << 20)
    #: Bound on the moving average of a model's inline run (milliseconds of event loop
    #: blocked per request); over it, the model's requests take the thread pool. 0: no
    #: request runs inline. The default, 5 ms, is 20x under asyncio's own slow-callback
    #: threshold (100 ms) and tells a model of tens of milliseconds from a small one even on
    #: a slow or loaded host (the benchmark's CNN ran 1.6 ms inline on a host twice slower
    #: than usual; probes taken while the pool's threads hold the GIL read higher).
    inline_max_ms: float = Field(default=5.0, ge=0, le=1000)


class SanitizeConfig(_Strict):
    #: Bit-depth reduction of every input (feature squeezing, Xu et al. 2018); None: off.
    quantize_bits: int | None = Field(default=None, ge=1, le=16)
    #: Text models: undo Unicode tricks (NFKC, confusables, invisible characters) before the
    #: detectors and the model see the text (advguard.defenses.transforms.TextNormalizer).
    text_normalize: bool = True


class Band(_Strict):
    """Score band of a detector: a score above ``min`` (default: the detector's calibrated
    threshold) takes ``action``; the highest band a score passes wins."""

    min: float | None = None
    action: Action = "reject"


class DetectorConfig(_Strict):
    name: str = Field(pattern=NAME_RE)
    path: str
    bands: list[Band] = Field(default_factory=lambda: [Band()])


class StatefulConfig(_Strict):
    name: str = Field(pattern=NAME_RE)
    #: What happens when the detector flags a client: block it (403 from then on), reject the
    #: request (422) or answer from the fallback and queue for review.
    action: Literal["block", "reject", "review", "fallback"] = "block"
    #: Passed unchanged to ``advguard.guard.stateful.build_stateful`` (which validates it).
    spec: dict[str, Any] = Field(default_factory=dict)


class OutputConfig(_Strict):
    """Output hardening (the default for keys that set none)."""

    mode: Literal["probabilities", "top_k", "label"] = "probabilities"
    top_k: int = Field(default=1, ge=1, le=1000)
    #: Round probabilities to this many decimals (None: full precision).
    decimals: int | None = Field(default=None, ge=0, le=8)


class ForensicsConfig(_Strict):
    #: ``encrypted``: store the payload encrypted with Fernet; ``hash-only``: only its SHA-256.
    mode: Literal["encrypted", "hash-only"] = "hash-only"
    key_env: str = Field(default="ADVGUARD_GUARD_FERNET_KEY", pattern=r"^[A-Z_][A-Z0-9_]*$")
    key_file: str | None = None
    #: Share of allowed, unflagged requests kept as forensic records too.
    sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    retention_days: int = Field(default=30, ge=1, le=36_500)
    #: Record a decision row (no payload) for every request, so ``/v1/decisions/{id}`` works.
    record_all_decisions: bool = True
    #: When the rows of ``record_all_decisions`` that are not forensic (allowed, unflagged,
    #: unsampled requests) are committed: ``background`` (default) by a writer thread in
    #: group commits, usually within milliseconds of the answer (a bounded queue: when it is
    #: full requests wait; a kill -9 loses at most the queued rows); ``before-answer`` like
    #: forensic records. Forensic records are always committed before the answer leaves.
    plain_records: Literal["background", "before-answer"] = "background"
    #: How long the background writer waits after the first queued row so that the rows of
    #: the next milliseconds share its commit (at most one commit per linger; each commit
    #: costs the guard about 0.2 ms of CPU with SQLite, a row about 0.02 ms). A kill -9 loses
    #: at most the rows of the last linger. ``GET /v1/decisions/{id}`` flushes this process's
    #: writer first and waits up to two lingers for another replica's.
    plain_records_linger_ms: float = Field(default=20.0, ge=0.0, le=1000.0)
    #: When a decision record cannot be written: refuse with 503 (false, the default) or send
    #: the answer without its record (true; logged). See guard/failsafe.py.
    fail_open: bool = False


class DriftConfig(_Strict):
    """Drift signals against a reference profile (``advguard guard profile``); off without
    ``profile``."""

    profile: str | None = None
    #: Rows in the sliding window the signals are computed over.
    window: int = Field(default=1000, ge=10, le=1_000_000)
    #: Rows the window needs before the gauges leave NaN.
    min_rows: int = Field(default=100, ge=1, le=1_000_000)


class TelemetryConfig(_Strict):
    """Traces (OpenTelemetry; also switched on by the standard OTEL_* variables) and the
    bound on per-client metric labels."""

    tracing: bool = False
    #: Clients with their own label in advguard_guard_client_queries_total (the rest: other).
    top_clients: int = Field(default=20, ge=1, le=1000)


class RollbackConfig(_Strict):
    """When the canary is rolled back (its weight set to 0): over the last ``window_requests``
    canary requests (and, with ``window_s``, only those of the last ``window_s`` seconds),
    once at least ``min_requests`` were seen, a flag rate above ``max_flag_rate``, a flag rate
    above ``max_flag_ratio`` x production's over its own window, or an error rate above
    ``max_error_rate`` breaches the canary's SLO."""

    enabled: bool = True
    window_requests: int = Field(default=200, ge=1, le=1_000_000)
    window_s: float | None = Field(default=None, gt=0, le=7 * 86400)
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    max_flag_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_flag_ratio: float | None = Field(default=None, gt=0.0, le=1000.0)
    max_error_rate: float | None = Field(default=0.05, ge=0.0, le=1.0)


class RolloutConfig(_Strict):
    """A canary next to the production model (``model:``): ``weight`` of the traffic goes to it
    (``mode: canary``: it answers) or is mirrored to it (``mode: shadow``: production answers,
    the canary's answer is only compared)."""

    canary: ModelSpec | None = None
    weight: float = Field(default=0.0, ge=0.0, le=1.0)
    mode: Literal["canary", "shadow"] = "canary"
    #: Route by a hash of the API key id (a client always sees the same version).
    sticky: bool = False
    #: Seed of the per-request draw (None: fresh randomness).
    seed: int | None = None
    #: The canary's own detectors; None: the ``detectors:`` loaded for the canary model.
    detectors: list[DetectorConfig] | None = None
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    #: Shadow requests waiting to run at most; more are dropped (and counted).
    shadow_queue: int = Field(default=64, ge=1, le=100_000)
    #: Seconds between checks of the registry stages the production model and the canary come
    #: from; a new version there is hot-swapped in (None: only on ``POST .../reload``).
    poll_interval_s: float | None = Field(default=None, ge=0.01, le=86400)


class BatchingConfig(_Strict):
    """Micro-batching (opt-in): concurrent requests' validated inputs are scored and answered
    in one model call of at most ``max_batch`` rows, started at the latest ``max_wait_ms``
    after the oldest waiting request arrived. Decisions, budgets and records stay per
    request."""

    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=2.0, ge=0, le=60_000)


class GuardConfig(_Strict):
    version: Literal[1] = 1
    model: ModelSpec | None = None
    fallback: ModelSpec | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    sanitize: SanitizeConfig = Field(default_factory=SanitizeConfig)
    detectors: list[DetectorConfig] = Field(default_factory=list)
    stateful: list[StatefulConfig] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)
    forensics: ForensicsConfig = Field(default_factory=ForensicsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    batching: BatchingConfig | None = None
    #: Folder relative paths are read from (the config file's folder); not a YAML key.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def set_base_dir(self, path: Path) -> None:
        """Read relative paths from ``path`` (the config file's folder)."""
        self._base_dir = Path(path)

    @model_validator(mode="after")
    def _fallback_needed(self) -> GuardConfig:
        names = [d.name for d in self.detectors] + [s.name for s in self.stateful]
        if len(set(names)) != len(names):
            raise ValueError("detector and stateful detector names must be unique")
        needs = any(b.action in ("fallback", "review") for d in self.detectors for b in d.bands)
        needs |= any(s.action in ("fallback", "review") for s in self.stateful)
        if needs and self.fallback is None:
            raise ValueError("an action 'fallback' or 'review' needs a 'fallback' model")
        return self

    @overload
    def resolve(self, path: str) -> Path: ...
    @overload
    def resolve(self, path: None) -> None: ...
    def resolve(self, path: str | None) -> Path | None:
        """``path`` read relative to the config file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.base_dir / 'guard.db').resolve()}"


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> GuardConfig:
    """Validate guard YAML ``text``; an error is one line naming the line and the field."""
    try:
        cfg = parse_yaml_model(text, source, GuardConfig, "guard config", empty={})
    except InputError as e:
        # one line: "<source>: invalid guard config: line 3, field 'x': ...; line 5, ..."
        msg = str(e)
        if ": not valid YAML:" in msg:  # keep the parser's first line and its position
            mark = re.search(r"line (\d+), column (\d+)", msg)
            head = msg.split("\n", 1)[0].rstrip(":")
            where = f" (line {mark.group(1)}, column {mark.group(2)})" if mark else ""
            raise InputError(head + where) from None
        raise InputError(re.sub(r"\n\s*", "; ", msg).replace("config; ", "config: ")) from None
    cfg.set_base_dir(base_dir if base_dir is not None else Path.cwd())
    return cfg


def load_config(path: str | Path | None) -> GuardConfig:
    """Read a guard YAML file (None: all defaults, relative to the current folder)."""
    if path is None:
        return GuardConfig()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"guard config {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    return parse_config(text, str(p), p.resolve().parent)
