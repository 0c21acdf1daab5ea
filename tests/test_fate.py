"""Nothing of a run outlives it: a run on Ray's engine, its main process SIGKILLed (as the OOM
killer does) once Ray's processes exist, leaves no process behind within 10 s. Before the
watchdog of :mod:`fl_sim.fate`, Ray's DashboardAgent and RuntimeEnvAgent stayed under PID 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _tree(pid: int) -> list[psutil.Process]:
    """The run's processes: its descendants and every process of its session (it leads one)."""
    found = {}
    try:
        found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid != pid and os.getsid(p.pid) == pid:
                found.setdefault(p.pid, p)
        except (OSError, psutil.Error):
            pass
    return list(found.values())


def _names(processes: list[psutil.Process], width: int | None = 100) -> list[str]:
    out = []
    for p in processes:
        try:
            out.append(" ".join(p.cmdline())[:width])
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_of_a_ray_runs_main_process_leaves_no_process_of_the_run(tmp_path):
    env = {**os.environ, "FL_SIM_ENGINE": "ray"}
    # 5,000 rounds: it is killed long before; 50 ended before the loaded suite saw Ray's agents
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "--attack", "none", "--clients", "2", "--rounds", "5000"]
        + ["--quiet", "--out", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "run.log").open("w"),
    )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 150
        while True:  # Ray's node with its agents, and a client actor: the run is on Ray
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"Ray's processes never appeared: {_names(_tree(proc.pid))}"
            names = " ".join(_names(_tree(proc.pid), width=None))
            # each agent by its title (ray::DashboardAgent), or its script until it has set one
            agents = (("DashboardAgent", "dashboard/agent.py"), ("RuntimeEnvAgent", "runtime_env/agent/main.py"))
            if all(n in names for n in ("raylet", "ClientAppActor")) and all(
                any(form in names for form in agent) for agent in agents
            ):
                break
            time.sleep(0.3)
        tree = _tree(proc.pid)  # recorded before the kill: afterwards the orphans belong to PID 1
        assert any("fl_sim.fate" in n for n in _names(tree))  # the watchdog is one of them
        os.kill(proc.pid, signal.SIGKILL)  # the main process only
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), f"left behind: {_names(_alive(tree))}"
    finally:
        for p in _alive([*tree, *_tree(proc.pid)]):  # what a failed assertion leaves, by pid
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
