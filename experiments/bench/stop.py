"""Benchmark what Ctrl-C costs: seconds from the signal to the exit of a run stopped in the
middle of training, of its attacks, of its SecAgg+ phase, and of a deployment, with what it
left behind.

    python -m experiments.bench.stop [--repeats 3] [--only training,attacks,secagg,deploy]

Each run is started in its own session and sent SIGINT (SIGTERM for the deployment, as
``docker stop`` would) to its whole process group, as a terminal's Ctrl-C is. Printed per
phase: the median and the largest seconds to exit, the exit codes, how many of the run's
processes (Ray, attack workers, SuperLink, SuperNodes, app processes) were still alive 5 s
after it exited, and whether rounds.csv held only finished rounds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fl_sim.device import DEVICES

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {
    # name: (module, flags, file whose rows say the moment has come, rows needed, signal)
    "training": (
        "experiments.run",
        [
            "--attack",
            "rgap",
            "--observers",
            "server,client",
            "--attack-rounds",
            "all",
            "--clients",
            "3",
            "--rounds",
            "40",
            "--batch-size",
            "4",
        ],
        "rounds.csv",
        3,
        signal.SIGINT,
    ),
    "attacks": (
        "experiments.run",
        ["--attack", "dlg", "--observers", "server", "--clients", "4", "--rounds", "1", "--defer-attacks"],
        "results.csv",
        1,
        signal.SIGINT,
    ),
    "secagg": (
        "experiments.run",
        ["--attack", "rgap", "--observers", "secagg", "--clients", "3", "--rounds", "40"],
        "secagg/rounds.csv",
        2,
        signal.SIGINT,
    ),
    "deploy": (
        "experiments.deploy",
        ["--attack", "none", "--clients", "2", "--rounds", "30", "--local-steps", "2"],
        "rounds.csv",
        2,
        signal.SIGTERM,
    ),
}


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _leftovers(tree: list[psutil.Process]) -> int:
    time.sleep(5)
    return sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)


def stop_once(name: str, out: Path, device: str = "auto") -> dict:
    module, flags, watch, needed, sig = SCENARIOS[name]
    flags = [*flags, "--device", device]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLWR_HOME")}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *flags, "--out", str(out)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(_rows(out / watch)) < needed:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name}: the run ended or stalled before the moment to stop it (exit {proc.returncode})")
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    start = time.monotonic()
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    seconds = time.monotonic() - start
    folder = out / "secagg" if name == "secagg" else out
    rounds = [int(r["round"]) for r in _rows(folder / "rounds.csv")]
    stamp = folder / "final_model.json"
    clean = (
        rounds == list(range(len(rounds))) and stamp.exists() and json.loads(stamp.read_text())["round"] == rounds[-1]
    )
    return {
        "seconds": seconds,
        "code": code,
        "left": _leftovers(tree),
        "processes": len(tree),
        "clean": clean,
        "rounds": rounds[-1] if rounds else -1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.stop", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--device", default="auto", choices=DEVICES, help="each run's --device (default: auto)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario {bad[0]!r}: choose from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs = [stop_once(name, Path(tmp) / f"{name}-{i}", args.device) for i in range(args.repeats)]
            secs = [r["seconds"] for r in runs]
            print(
                f"{name:9s} stopped in median {statistics.median(secs):.1f} "
                f"s (max {max(secs):.1f} s) over {len(runs)}; "
                f"exit codes {sorted({r['code'] for r in runs})}; processes left {sum(r['left'] for r in runs)} of "
                f"{sum(r['processes'] for r in runs)}; rounds.csv clean in {sum(r['clean'] for r in runs)}/{len(runs)} "
                f"(stopped after rounds {[r['rounds'] for r in runs]})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
