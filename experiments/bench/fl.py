"""Benchmark the federation: seconds per round and peak memory, 10 and 100 simulated clients,
FedSGD and FedAvg, on Flower's simulation engine.

    python -m experiments.bench.fl [--clients 10 100] [--modes fedsgd fedavg] [--rounds 3]

Each setting runs in its own process; peak memory is the largest resident set of that whole
process tree (driver, Ray and its workers; proportional set size, so shared libraries count
once), sampled every 0.2 s. Round 1 includes starting
the Ray actors and loading data in them, so it is reported apart from the steady rounds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fl_sim.device import DEVICES


def _rss(proc: psutil.Process) -> int:
    """Memory of ``proc``, its descendants and Ray's daemons (GCS, raylet, workers), each
    process counted once, as proportional set size (shared libraries such as torch's split
    among the processes that map them) where the OS reports it, else resident set size."""
    procs = {proc.pid: proc}
    for p in proc.children(recursive=True):
        procs[p.pid] = p
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd or "gcs_server" in cmd or "ray::" in (p.info["name"] or "") + cmd or "ray/" in cmd:
            procs[p.pid] = p
    total = 0
    for p in procs.values():
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def run_one(mode: str, clients: int, rounds: int, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--attack",
        "none",
        "--mode",
        mode,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, _rss(ps))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x {clients} clients failed (exit {proc.returncode}): {proc.stderr.read()[-500:]}")
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    secs = [float(r["seconds"]) for r in rows if int(r["round"]) >= 1]
    return {
        "mode": mode,
        "clients": clients,
        "rounds": rounds,
        "round1_s": secs[0],
        "steady_s_per_round": statistics.median(secs[1:]) if len(secs) > 1 else float("nan"),
        "final_acc": float(rows[-1]["test_accuracy"]),
        "wall_s": wall,
        "peak_mem_gib": peak / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.fl", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--modes", nargs="+", default=["fedsgd", "fedavg"], choices=["fedsgd", "fedavg"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV of the figures (default: print only)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="each run's --device (default: auto)")
    args, extra = p.parse_known_args(argv)
    extra = [*extra, "--device", args.device]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.clients:
            for mode in args.modes:
                r = run_one(mode, clients, args.rounds, Path(tmp) / f"{mode}-{clients}", extra)
                results.append(r)
                print(
                    f"{mode:7s} {clients:4d} clients: round 1 {r['round1_s']:6.1f} "
                    f"s, then {r['steady_s_per_round']:6.2f} s/round; "
                    f"peak memory {r['peak_mem_gib']:.2f} GiB; wall "
                    f"{r['wall_s']:.0f} s; final test acc {r['final_acc']:.3f}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, list(results[0]))
            w.writeheader()
            w.writerows(results)


if __name__ == "__main__":
    main()
