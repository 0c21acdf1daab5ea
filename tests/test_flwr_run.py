"""``flwr run .``, the way every Flower user runs an app, end to end.

The test runs Flower's own CLI on this repository with no federation named, so ``flwr`` starts
its managed local SuperLink (simulation runtime, 2 simulated SuperNodes by default), exactly as a
user's first ``flwr run .`` does, with three things of its own:

- a private ``FLWR_HOME`` and free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
  ``FLWR_LOCAL_CONTROL_API_PORT``), so it never meets a user's or another test's SuperLink;
- ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, Flower's documented switch for an
  environment that already holds the app's dependencies (otherwise the SuperLink would ``uv
  sync`` torch into a fresh environment for every run);
- ``--federation-config num-supernodes=3``: the ServerApp must take the federation's size (3)
  instead of pyproject's ``num-clients = 10``.

A run that fails inside (a data file that does not exist) must end ``finished:failed`` with the
reason. (The sizing rule itself, ``fl_sim.server_app.federation_size``, also has a fast test on
the in-process grid.) Every Flower process the local SuperLink started is stopped by PID at the end, and none
may be left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from experiments.stopping import terminate
from fl_sim.client_app import app as client_app
from fl_sim.engine import InProcessGrid
from fl_sim.server_app import federation_size

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300  # seconds for one `flwr run . --stream`; a 1-round run takes 60-90 s on 2 loaded cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFlower:
    """``flwr`` with a private FLWR_HOME and local SuperLink ports; ``processes()`` finds every
    process of that SuperLink (it is detached from ``flwr``, so not a child of this test)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONPATH")}
        env.update(
            FLWR_HOME=str(home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.port),
            FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr starts flower-superlink by name
        )
        self.env = env

    def run(self, *args: str) -> tuple[int, str, list[tuple[float, str]]]:
        """``flwr run . --stream ARGS``: exit code, output, and each line with its second."""
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", "--stream", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[tuple[float, str]] = []
        t0 = time.monotonic()

        def read() -> None:
            for line in proc.stdout:
                lines.append((round(time.monotonic() - t0, 1), line.rstrip()))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"flwr run did not end within {RUN_TIMEOUT}s: {_tail(lines)}")
        reader.join(timeout=10)
        return code, "\n".join(text for _, text in lines), lines

    def status(self, run_id: str) -> dict:
        res = subprocess.run(
            [str(BIN / "flwr"), "ls", "--run-id", run_id, "--format", "json"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(res.stdout[res.stdout.index("{") :])["runs"][0]

    def processes(self) -> list[psutil.Process]:
        """The local SuperLink (by its port), the SuperExec and app processes it started (they
        name its address), and their descendants."""
        marks = (f"127.0.0.1:{self.port}", str(self.home))
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if ("flower-" in cmd or "flwr" in cmd) and any(m in cmd for m in marks):
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _tail(lines: list[tuple[float, str]], n: int = 25) -> str:
    return "\n".join(f"{t:6.1f}s {text}" for t, text in lines[-n:])


def _run_id(output: str) -> str:
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output[-3000:]
    return found.group(1)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_federation_size_is_the_count_of_connected_nodes_once_it_holds():
    """The rule the ServerApp sizes an unsized run by, on a real grid with 3 nodes."""
    with InProcessGrid(client_app, 3) as grid:
        start = time.monotonic()
        assert federation_size(grid, timeout=5.0, settle=0.5) == 3
        assert 0.5 <= time.monotonic() - start < 5.0  # it waited for the count to hold, not for the timeout


@pytest.mark.slow
def test_flwr_run_dot_completes_on_the_local_superlink_and_sizes_the_federation(tmp_path):
    flower = LocalFlower(tmp_path / "flwr-home")
    out = tmp_path / "run"
    try:
        code, output, lines = flower.run(
            "--federation-config",
            "num-supernodes=3",
            "--run-config",
            f'num-server-rounds=1 samples-per-client=8 out-dir="{out}"',
        )
        assert code == 0, _tail(lines)
        status = flower.status(_run_id(output))
        assert status["status"] == "finished:completed", (status, _tail(lines))
        errors = [text for _, text in lines if "ERROR" in text or "Traceback" in text]
        assert not errors, errors
        # the ServerApp took the federation's size, not pyproject's num-clients = 10
        assert json.loads((out / "config.json").read_text())["num-clients"] == 3
        rounds = _rows(out / "rounds.csv")
        assert [r["round"] for r in rounds] == ["0", "1"]
        assert rounds[1]["aggregated"] == "3" and rounds[1]["dropped"] == "0"
        assert "Installing application dependencies" not in output  # Flower's uv sync did not run

        # a failure inside the run: Flower's CLI still exits 0 (it only submits and streams), and
        # the run's status is where the failure shows, with the ServerApp's reason
        missing = tmp_path / "absent.npz"
        code, output, lines = flower.run("--run-config", f'dataset="npz:{missing}" num-server-rounds=1')
        assert code == 0, _tail(lines)
        status = flower.status(_run_id(output))
        assert status["status"] == "finished:failed", (status, _tail(lines))
        assert str(missing) in status["status-details"], status
    finally:
        started = flower.processes()
        names = [_cmdline(p) for p in started]
        terminate(started, grace=5.0)
    assert any("flower-superlink" in cmd for cmd in names), f"no local SuperLink found: {names}"
    deadline = time.monotonic() + 10
    while (left := flower.processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Flower processes left behind: {[p.pid for p in left]}"
