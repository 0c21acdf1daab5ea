"""End to end on Flower's deployment engine, no Docker: ``python -m experiments.deploy`` starts
a SuperLink and SuperNodes on 127.0.0.1 (free ports), submits the spying app with ``flwr
run``, waits for the run by polling its status, and stops everything it started.

One run kills one of two SuperNodes after round 1 (FedSGD, batch size 1, 2 rounds, R-GAP by the
server): it must still finish with the other and mark the missing client. Another is terminated
mid-way and must stop everything. (A run of the compose file's own commands, compared with the
simulation, is in test_compose.py.)
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PSNR_OK = 40.0  # R-GAP on CNN6 with one image recovers it to >100 dB here; 40 leaves room


def _deploy(*args: str, timeout: float = 360) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "experiments.deploy", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _leftovers(record: dict) -> list[str]:
    """Flower processes still alive that belong to this deployment (by its ports)."""
    import psutil

    marks = []
    if record.get("superlink"):
        marks.append(record["superlink"])
        marks.append(f"--port {record['superlink'].rsplit(':', 1)[1]}")
    marks += [f"--port {p}" for p in record.get("supernode_ports", [])]
    marks += [f"127.0.0.1:{p}" for p in record.get("supernode_ports", [])]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if ("flower-" in cmd or "flwr" in cmd) and any(m in cmd for m in marks):
            found.append(f"{proc.pid}: {cmd}")
    return found


def _assert_no_leftovers(record: dict) -> None:
    deadline = time.monotonic() + 10  # the SuperExecs notice their parent is gone within seconds
    while (left := _leftovers(record)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
def test_deploy_survives_a_killed_supernode(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    res = _deploy(
        "--clients",
        "2",  # each SuperNode's ClientApp is a fresh process per message: 2 keep the rounds short
        "--rounds",
        "2",
        "--attack",
        "rgap",
        "--observers",
        "server",
        "--attack-rounds",
        "2",
        "--kill-node",
        "1",
        "--kill-node-after-round",
        "1",
        "--round-timeout",
        "30",  # waits this long for the killed node; round 1 includes the ClientApps' cold start
        "--out",
        str(out),
        "--run-config",
        "attack-workers=0",
        "--audit",
        "log:probe=false",
        "--timeout",
        "300",
    )
    record = json.loads((out / "deploy.json").read_text())
    _assert_no_leftovers(record)
    assert res.returncode == 0, res.stderr[-2000:]
    assert record["status"] == "finished:completed"
    assert record["killed"]["partition"] == 1
    assert [int(r["round"]) for r in _rows(out / "rounds.csv")] == [0, 1, 2]
    dropped = _rows(out / "dropped.csv")
    assert [(int(m["round"]), int(m["client"]), m["status"]) for m in dropped] == [(2, 1, "missing")]
    rows = {int(r["client"]): r for r in _rows(out / "results.csv") if int(r["round"]) == 2}
    assert sorted(rows) == [0, 1]
    assert rows[1]["status"] == "missing"
    assert rows[0]["status"] == "ok" and float(rows[0]["psnr"]) > PSNR_OK, rows[0]
    assert "Replies of the federation that were not aggregated" in (out / "summary.md").read_text()
    page = (out / "report.html").read_text()  # the ServerApp ends with the run's page, as a simulation does
    assert 'id="observer-table"' in page and "<td>missing</td>" in page
    # the SuperNodes load pyproject's ClientApp, the one with the clients' audit; the killed
    # node took part in round 1
    audit = _rows(out / "audit.csv")
    assert sorted((int(a["round"]), int(a["client"])) for a in audit) == [(1, 0), (1, 1), (2, 0)]
    assert all(a["flagged"] == "True" and a["action"] == "sent" for a in audit)
    assert time.monotonic() - start < 300


@pytest.mark.slow
def test_deploy_stops_everything_on_sigterm(tmp_path):
    """Terminated in the middle of a round: every process goes within seconds, exit code 143,
    and the run folder keeps the finished rounds and no invented one."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONPATH")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.deploy",
            "--clients",
            "2",
            "--rounds",
            "20",
            "--attack",
            "none",
            "--local-steps",
            "2",
            "--out",
            str(out),
            "--timeout",
            "240",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            rows = _rows(out / "rounds.csv") if (out / "rounds.csv").exists() else []
            if len(rows) >= 2:  # round 1 is done: the run is mid-way
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = json.loads((out / "deploy.json").read_text())
    assert record["superlink"] and record["status"].startswith("interrupted")
    _assert_no_leftovers(record)
    rounds = [int(r["round"]) for r in _rows(out / "rounds.csv")]
    assert rounds == list(range(len(rounds))) and 1 <= rounds[-1] < 20
    assert json.loads((out / "final_model.json").read_text())["round"] == rounds[-1]
