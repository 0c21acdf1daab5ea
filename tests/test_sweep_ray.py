"""Sweeps on a Ray cluster (``--ray-address``): a local Ray head on 127.0.0.1 (its own temporary
folder and ports, every process it starts killed by pid at the end), the ``smoke`` preset run on
it gives the same cells.csv and results.csv as a local ``--jobs 1`` run (timing columns aside);
a run that fails on a node is a failed row with its reason, and Ctrl-C on the driver cancels the
run in flight (its process on the node ends) and keeps the finished one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from experiments.sweep.__main__ import main as sweep_main
from experiments.sweep.runner import run_sweep
from experiments.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
TIMING = ["seconds"]  # the columns that hold wall-clock time, in cells.csv and results.csv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def _runs_of(name: str) -> list[psutil.Process]:
    """The processes of a sweep run started by a Ray task (their --out names the run)."""
    out = []
    for p in psutil.process_iter():
        try:
            if any(f"fl-sweep-{name}-" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with 2 CPUs; yields its address. ``ray start`` runs in a session
    of its own, which the head's processes (and the workers they start) keep: at the end every
    process of that session is killed by pid (``ray stop`` would stop every Ray of this user)."""
    if not RAY.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    ports = {
        f"--{k}={_free_port()}"
        for k in (
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    start = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"]
        + ["--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats", *sorted(ports)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text, _ = start.communicate(timeout=120)
        assert start.returncode == 0, text[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        if start.poll() is None:
            start.kill()
        started = _session(start.pid)
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(started, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
        assert not alive, f"Ray's processes left: {alive}"


@pytest.fixture(scope="module")
def smoke_local(tmp_path_factory) -> Path:
    """The smoke preset run locally, one run at a time (the tests' in-process engine)."""
    out = tmp_path_factory.mktemp("smoke-local")
    assert run_sweep(load_spec("smoke"), out, jobs=1) == 0
    return out


def _sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smoke_on_a_ray_cluster_gives_the_local_cells_and_rows(ray_head, smoke_local, tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep(["smoke", "--ray-address", ray_head, "--out", str(out)])
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]

    local, remote = pd.read_csv(smoke_local / "cells.csv"), pd.read_csv(out / "cells.csv")
    assert list(local["status"]) == ["done", "done"]
    pd.testing.assert_frame_equal(local.drop(columns=TIMING), remote.drop(columns=TIMING))
    local, remote = pd.read_csv(smoke_local / "results.csv"), pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(local.drop(columns=TIMING), remote.drop(columns=TIMING))
    # and the smoke preset says what it claims: the server recovers the undefended digits, noise stops it
    med = remote.fillna({"defences": ""}).groupby(["defences", "observer"])["psnr"].median()
    assert med[("", "server")] > 60 and med[("noise:sigma=0.1", "server")] < 20 and med[("", "client")] < 20
    for run in remote["cell"].unique():  # each run's folder came back from the node, with its log
        name = pd.read_csv(out / "cells.csv").set_index("cell").loc[run, "attack_run"]
        assert (out / "runs" / name / "report.html").exists() and (out / "runs" / name / "results.csv").exists()
        assert (out / "runs" / f"{name}.log").read_text().startswith("# ran on Ray node ")
    assert "report.html" in os.listdir(out) and not _runs_of("attack-")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_failing_run_is_a_failed_row_and_ctrl_c_cancels_the_run_in_flight(ray_head, tmp_path):
    spec = tmp_path / "stop.toml"
    spec.write_text(
        'name = "stop"\n[attack]\nattack = "rgap"\nobservers = "server"\nnum-clients = 3\nattack-workers = 0\n'
        '[[grid]]\nfaulty-clients = ["0:error,1:error,2:error"]\nnum-server-rounds = [1]\n'  # fails: no reply
        "[[grid]]\nnum-server-rounds = [20000]\n"  # long enough to be interrupted (500 ended in 95 s)
    )
    failing, long = load_spec(str(spec)).cells()
    out = tmp_path / "sweep"
    proc = _sweep([str(spec), "--ray-address", ray_head, "--out", str(out)])
    try:
        deadline = time.monotonic() + 240
        while not ((out / "done" / f"{failing.attack_run}.json").exists() and _runs_of(long.attack_run)):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the failing run never ended, or the long one never started"
            time.sleep(0.3)
        on_node = _runs_of(long.attack_run)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # the driver's group only: the run is the head's
        text, _ = proc.communicate(timeout=120)
        # about 10 s alone; a cancel that does not land is forced after 10 s (cluster.FORCE_AFTER)
        assert proc.returncode == 130 and time.monotonic() - start < 60, text[-3000:]
        _, alive = psutil.wait_procs(on_node, timeout=10)
        assert not alive, f"the cancelled run is still running: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells["cell"]) == [failing.id]  # the finished cell is kept, the cancelled one left to resume
    row = cells.iloc[0]
    assert row["status"] == "failed" and "exit 1: " in row["reason"] and "no reply could be aggregated" in row["reason"]
    assert not (out / "done" / f"{long.attack_run}.json").exists()


def test_engine_ray_with_ray_address_is_one_line_and_exit_2(capsys, tmp_path):
    assert sweep_main(["smoke", "--ray-address", "127.0.0.1:1", "--engine", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--engine ray with --ray-address" in err and err.count("\n") == 1


def test_no_cluster_at_the_address_is_one_line_and_exit_2(capsys, tmp_path):
    port = _free_port()  # nothing listens there
    assert sweep_main(["smoke", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_a_task_on_a_node_returns_the_runs_folder_its_exit_code_and_log_and_leaves_no_temporary_folder():
    """What a Ray task runs (experiments.sweep.cluster.run_on_node), called here directly: the
    run in a temporary folder, returned as a tar.gz with its exit code and output."""
    import io
    import tarfile

    from experiments.sweep.cluster import run_on_node

    args = ["--attack", "rgap", "--observers", "server", "--clients", "2", "--rounds", "1", "--mode", "fedsgd"]
    args += ["--samples-per-client", "10", "--attack-workers", "0"]
    before = set(Path(tempfile.gettempdir()).glob("fl-sweep-node-test-*"))
    result = run_on_node("node-test", args, str(ROOT), {"OMP_NUM_THREADS": "1"}, None)
    assert result["code"] == 0, result["log"][-2000:]
    assert result["seconds"] > 0 and result["node"] == socket.gethostname()
    with tarfile.open(fileobj=io.BytesIO(result["files"]), mode="r:gz") as tar:
        names = set(tar.getnames())
        rows = tar.extractfile("node-test/results.csv").read().decode().splitlines()
    assert {"node-test/config.json", "node-test/results.csv", "node-test/rounds.csv"} <= names
    assert len(rows) == 3  # a header and the server's R-GAP on each of the 2 clients
    assert set(Path(tempfile.gettempdir()).glob("fl-sweep-node-test-*")) == before  # its folder removed
