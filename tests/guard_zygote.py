"""Test helper process: import the guard once, then fork one ``advguard guard serve`` child per
line read from stdin (the line is the port), printing each child's pid. Lets a test start a
guard 20 times in a row without paying the import of torch each time; the children are real
guard processes that the test kills with SIGKILL."""

from __future__ import annotations

import os
import signal
import sys

from advguard.guard.config import load_config
from advguard.guard.pipeline import Guard  # noqa: F401  (import the heavy modules once)
from advguard.guard.server import serve


def main() -> None:
    cfg_path = sys.argv[1]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        port = int(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            cfg = load_config(cfg_path)
            cfg.server.port = port
            serve(cfg, log_level="warning")
            os._exit(0)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
