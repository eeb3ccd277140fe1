"""Running the guard under uvicorn (``advguard guard serve``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from advguard.errors import InputError
from advguard.guard.config import GuardConfig

#: Environment variable through which ``serve`` hands the validated config to its workers.
CONFIG_ENV = "ADVGUARD_GUARD_RESOLVED_CONFIG"


def dump_config(cfg: GuardConfig) -> str:
    return json.dumps({"config": cfg.model_dump(mode="json"), "base_dir": str(cfg.base_dir)})


def load_config_json(text: str) -> GuardConfig:
    data = json.loads(text)
    cfg = GuardConfig.model_validate(data["config"])
    cfg.set_base_dir(Path(data["base_dir"]))
    return cfg


def build_asgi(cfg: GuardConfig) -> Any:
    """The ASGI app for ``cfg`` (models loaded, database opened), behind the catch-all."""
    from advguard.guard.app import CatchAll, create_app
    from advguard.guard.pipeline import Guard

    return CatchAll(create_app(Guard.from_config(cfg)))


def app_from_env() -> Any:
    """uvicorn factory for worker processes (``--workers N``)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set")
    return build_asgi(load_config_json(text))


def check_workers(cfg: GuardConfig) -> None:
    if cfg.server.workers > 1 and not cfg.limits.redis_url:
        raise InputError(
            "workers > 1 need limits.redis_url (--redis-url): in-memory limits are per process, "
            "so each worker would grant the full rate and budget"
        )


def serve(cfg: GuardConfig, *, log_level: str = "info") -> None:
    """Serve ``cfg`` on ``cfg.server.host:port`` until interrupted."""
    import uvicorn

    check_workers(cfg)
    if cfg.server.workers == 1:
        app = build_asgi(cfg)  # load now: configuration errors surface before binding
        uvicorn.run(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            log_level=log_level,
            access_log=False,
            server_header=False,
        )
        return
    build_asgi(cfg)  # fail fast in the parent too
    os.environ[CONFIG_ENV] = dump_config(cfg)
    uvicorn.run(
        "advguard.guard.server:app_from_env",
        factory=True,
        host=cfg.server.host,
        port=cfg.server.port,
        workers=cfg.server.workers,
        log_level=log_level,
        access_log=False,
        server_header=False,
    )
