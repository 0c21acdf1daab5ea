"""Runs that stop when told: Ctrl-C (SIGINT to the whole process group, as a terminal sends it)
in the middle of a run, during training, during the attacks and during the SecAgg+ phase. Each
must return within 10 s with exit code 130, keep every finished round and row, invent no
round, leave the last good model, and leave no process of the run behind; a stopped run
resumes to the same model as one that was never stopped. The run stopped during training runs
on Ray's engine (its Ray processes must go too); the others on the in-process engine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from experiments.run import main as run_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _start(args: list[str], log: Path, engine: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if engine:
        env["FL_SIM_ENGINE"] = engine
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment to interrupt it"
        assert time.monotonic() < deadline, "the moment to interrupt the run never came"
        time.sleep(0.1)


def _interrupt(proc: subprocess.Popen) -> tuple[int, float, list[psutil.Process]]:
    """Ctrl-C to the run's process group; returns (exit code, seconds to exit, the processes
    the run had when it was interrupted)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, time.monotonic() - start, tree


def _assert_gone(tree: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 5
    while True:
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"left behind: {[' '.join(p.cmdline())[:120] for p in alive]}"


def _assert_no_invented_round(folder: Path) -> int:
    rows = _rows(folder / "rounds.csv")
    rounds = [int(r["round"]) for r in rows]
    assert rounds == list(range(len(rounds))), rounds
    assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    assert json.loads((folder / "final_model.json").read_text())["round"] == rounds[-1]
    assert all(torch.isfinite(v).all() for v in torch.load(folder / "final_model.pt").values())
    return rounds[-1]


def test_ctrl_c_during_training_stops_and_resume_gives_the_uninterrupted_model(tmp_path):
    # an attacked FedSGD run: the server and the curious client attack rounds 1 to 3 of 12
    common = [
        "--attack",
        "rgap",
        "--observers",
        "server,client",
        "--attack-rounds",
        "1,2,3",
        "--clients",
        "3",
        "--rounds",
        "12",
        "--batch-size",
        "4",
        "--seed",
        "3",
    ]
    out = tmp_path / "stopped"
    proc = _start(common + ["--out", str(out)], tmp_path / "stopped.log", engine="ray")
    _wait_for(lambda: len(_rows(out / "rounds.csv")) >= 3, proc)  # round 2 is done
    code, seconds, tree = _interrupt(proc)
    assert code == 130, (tmp_path / "stopped.log").read_text()[-2000:]
    assert seconds < 10, seconds
    _assert_gone(tree)
    last = _assert_no_invented_round(out)
    assert 2 <= last < 12
    assert "main federation: **stopped**" in (out / "summary.md").read_text()

    assert run_main(["--out", str(out), "--resume"]) == 0  # its settings come from config.json
    assert _assert_no_invented_round(out) == 12
    rows = _rows(out / "results.csv")
    assert {r["round"] for r in rows} <= {"1", "2", "3"} and all(
        r["status"] in ("ok", "blend", "inconsistent", "interrupted") for r in rows
    )
    full = tmp_path / "full"
    assert run_main(common + ["--out", str(full)]) == 0
    resumed, never = torch.load(out / "final_model.pt"), torch.load(full / "final_model.pt")
    assert all(torch.equal(resumed[k], never[k]) for k in never)


def test_ctrl_c_during_the_attacks_marks_the_unfinished_ones(tmp_path):
    out = tmp_path / "run"
    proc = _start(
        [
            "--attack",
            "dlg",
            "--observers",
            "server",
            "--clients",
            "4",
            "--rounds",
            "1",
            "--defer-attacks",
            "--out",
            str(out),
        ],
        tmp_path / "run.log",
    )
    _wait_for(lambda: len(_rows(out / "results.csv")) >= 1, proc)  # the first of four attacks is done
    code, seconds, tree = _interrupt(proc)
    assert code == 130, (tmp_path / "run.log").read_text()[-2000:]
    assert seconds < 10, seconds
    _assert_gone(tree)
    assert _assert_no_invented_round(out) == 1
    rows = _rows(out / "results.csv")
    assert len(rows) == 4
    assert rows[0]["status"] == "ok" and float(rows[0]["psnr"]) > 30
    assert {r["status"] for r in rows[1:]} <= {"ok", "interrupted"} and rows[-1]["status"] == "interrupted"


def test_ctrl_c_during_the_secagg_phase(tmp_path):
    out = tmp_path / "run"
    proc = _start(
        ["--attack", "rgap", "--observers", "secagg", "--clients", "3", "--rounds", "30", "--out", str(out)],
        tmp_path / "run.log",
    )
    _wait_for(lambda: len(_rows(out / "secagg" / "rounds.csv")) >= 2, proc)  # SecAgg+ round 1 is done
    code, seconds, tree = _interrupt(proc)
    assert code == 130, (tmp_path / "run.log").read_text()[-2000:]
    assert seconds < 10, seconds
    _assert_gone(tree)
    assert 1 <= _assert_no_invented_round(out / "secagg") < 30
    assert "secagg federation: **stopped**" in (out / "summary.md").read_text()
