"""Test doubles and helpers for the guard tests: detectors implementing the two pipeline
protocols, a uvicorn server in a thread on a free 127.0.0.1 port, and guard builders."""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn

from advguard.guard.config import GuardConfig
from advguard.guard.pipeline import DetectorSlot, Guard, StatefulSlot
from advguard.guard.serving import ServedModel
from advguard.guard.storage import GuardStore
from advguard.models import TorchClassifier


class MeanDetector:
    """Per-input detector double: the score is the mean pixel value."""

    threshold = 0.5

    def score(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).mean(1)


@dataclass
class Verdict:
    flagged: bool
    detector: str
    score: float
    threshold: float
    queries_seen: int


class CountingStateful:
    """Stateful detector double: flags a client once it has sent more than ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: dict[str, int] = defaultdict(int)

    def observe(self, client_id: str, x: np.ndarray) -> Verdict:
        self.seen[client_id] += len(x)
        n = self.seen[client_id]
        return Verdict(n > self.limit, "count", float(n), float(self.limit), n)


def fallback_model() -> ServedModel:
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return ServedModel(
        "fallback", "fallback:1", TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    )


def make_guard(
    tmp_path: Path,
    module: torch.nn.Module,
    *,
    cfg: dict[str, Any] | None = None,
    detectors: list[DetectorSlot] | None = None,
    stateful: list[StatefulSlot] | None = None,
    with_fallback: bool = False,
    db_url: str | None = None,
    **kw: Any,
) -> Guard:
    config = GuardConfig.model_validate(cfg or {})
    store = GuardStore(
        db_url or f"sqlite:///{tmp_path / 'guard.db'}", table_prefix=config.storage.table_prefix
    )
    model = ServedModel(
        "digits", "digits:1", TorchClassifier(module, input_shape=(1, 8, 8), num_classes=10)
    )
    return Guard(
        config,
        store=store,
        model=model,
        fallback=fallback_model() if with_fallback else None,
        detectors=detectors or [],
        stateful=stateful or [],
        **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            limit_concurrency=200,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.01)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
