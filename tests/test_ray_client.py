"""``--address ray://host:port``: a real Ray head node (started here on 127.0.0.1, stopped
after) runs a small evaluation for a CLI driver in another process (a Ray client); the report
equals the local run's. Skipped without the ``ray`` extra (``ray[client]``: ray and grpcio)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import advguard
from advguard.cli import app
from advguard.evaluate.report import report_fields
from model_files import tiny_job

pytest.importorskip("ray", reason="ray:// needs the 'ray' extra (pip install 'advguard[ray]')")
pytest.importorskip("grpc", reason="ray:// needs ray[client] (grpcio): pip install 'advguard[ray]'")
RAY = Path(sys.executable).with_name("ray")
if not RAY.is_file():
    pytest.skip(f"the ray command is not next to {sys.executable}", allow_module_level=True)

SRC = str(Path(advguard.__file__).resolve().parents[1])


def numbers(doc: Any) -> dict[str, Any]:
    """A report document as flat path -> value, without timings and the environment."""
    return report_fields(doc)


def server_logs(tmp: Path) -> str:
    """The head node's client server logs (for a failure message)."""
    logs = sorted(tmp.glob("session_*/logs/ray_client_server*.err"))
    return "".join(f"\n--- {p.name}:\n{p.read_text()[-1500:]}" for p in logs)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_env() -> dict[str, str]:
    """The environment of the head node and of the client driver: advguard importable from
    this tree, one thread, token authentication with a token of this test only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=os.environ.get("ADVGUARD_TEST_RAY_TOKEN") or secrets.token_hex(32),
        # the head starts one client server process per client and waits for it: give a
        # loaded machine more than the default 30 s
        RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="180",
    )
    return env


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray client server did not listen on port {port}")


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A Ray head node with a client server, in its own process group (stopped by group)."""
    gcs, client, dash, agent, agent_grpc, env_agent, metrics = free_ports(7)
    tmp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Unix socket paths
    env = ray_env()
    cmd = [
        str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
        "--include-dashboard=false", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--temp-dir={tmp}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(tmp) / "ray-start.log", "wb")  # noqa: SIM115 - closed after the node stops
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_port(client, proc, 120)
        yield f"ray://127.0.0.1:{client}", env, Path(tmp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # ray start --block stops the node's processes
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what did not stop in time
        proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_remote(
    args: list[str], address: str, env: dict[str, str], attempts: int = 3
) -> subprocess.CompletedProcess[str]:
    """``advguard evaluate ... --backend ray --address ADDRESS`` in a fresh process, again (up to
    ``attempts`` times) when one hangs: when a loaded head fails to start a client's server,
    Ray's client can hang while it tears the failed connection down (in
    ``LogstreamClient.close``, joining a log thread whose stream never ends), out of reach of
    advguard's own retry. A hung process is killed; a finished one is returned."""
    cmd = [sys.executable, "-c", "from advguard.cli import main; main()", *args]
    cmd += ["--backend", "ray", "--address", address, "--workers", "2"]
    for attempt in range(1, attempts + 1):
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def test_cli_evaluate_through_a_ray_client_address(head, tmp_path):
    address, env, tmp = head
    model, _ = tiny_job(tmp_path)
    (tmp_path / "tm.yaml").write_text(
        "name: t\nnorm: linf\nepsilons: [0.1, 0.3]\nsamples: 24\nbatch_size: 6\n"
        "attacks: [{attack: pgd, steps: 3}, {attack: fgsm}]\n"
    )
    args = ["evaluate", "-m", str(model), "-d", str(tmp_path / "d.npz")]
    args += ["-t", str(tmp_path / "tm.yaml")]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code in (0, 1), local.output
    remote = run_remote([*args, "--out", str(tmp_path / "ray")], address, env)
    assert remote.returncode == local.exit_code, remote.stdout + remote.stderr + server_logs(tmp)
    a = json.loads((tmp_path / "local" / "report.json").read_text())
    b = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert numbers(a) == numbers(b)  # every number but timings, sanity checks included
    assert a["results"][0]["robust_accuracy"]["n"] == 24
    # the workers ran on the head node, in its processes: the checkpoint lists 4 shards
    ck = json.loads((tmp_path / "ray" / ".checkpoint" / "state.json").read_text())
    assert len(ck["units"]) == 4
