"""Running the guard under uvicorn (``advguard guard serve``)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from advguard.errors import InputError
from advguard.guard.config import GuardConfig

#: Environment variable through which ``serve`` hands the validated config to its workers.
CONFIG_ENV = "ADVGUARD_GUARD_RESOLVED_CONFIG"
#: prometheus_client's multiprocess directory (advguard.guard.metrics.MULTIPROC_ENV).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


Message = MutableMapping[str, Any]


class MarkDeadOnShutdown:
    """ASGI wrapper of a worker in multiprocess mode: when the worker's lifespan ends, its
    live-gauge files are dropped from the merge (prometheus_client's ``mark_process_dead``)."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_marking(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                from prometheus_client.multiprocess import mark_process_dead

                mark_process_dead(os.getpid(), self.path)  # type: ignore[no-untyped-call]
            await send(message)

        await self.app(scope, receive, send_marking)


def app_from_env() -> Any:
    """uvicorn factory for worker processes (``--workers N``)."""
    from advguard.guard.metrics import multiprocess_dir

    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set")
    app = build_asgi(load_config_json(text))
    path = multiprocess_dir()
    return app if path is None else MarkDeadOnShutdown(app, path)


def prepare_metrics_dir() -> tuple[str, bool]:
    """The directory the workers write their metrics to, emptied, and whether ``serve`` made
    it (then it is removed after the run): ``PROMETHEUS_MULTIPROC_DIR`` when the operator set
    it (created 0700 when missing; refused when others may write to it), else a fresh private
    (0700) temporary directory. The files of a previous run are wiped so they do not add up."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return tempfile.mkdtemp(prefix="advguard-metrics-"), True
    os.makedirs(given, mode=0o700, exist_ok=True)
    st = os.stat(given)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        raise InputError(f"{MULTIPROC_ENV}={given}: not a directory only its owner may write to")
    for f in glob.glob(os.path.join(given, "*.db")):
        os.remove(f)
    return given, False


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
    # set before the workers start: they import prometheus_client with it (multiprocess mode)
    path, owned = prepare_metrics_dir()
    os.environ[MULTIPROC_ENV] = path
    try:
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
    finally:
        if owned:
            shutil.rmtree(path, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
