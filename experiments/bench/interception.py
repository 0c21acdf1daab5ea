"""Benchmark what spying costs the federation: seconds per round of the honest strategy
versus the intercepting strategy with attacks in worker processes, in one invocation.

    python -m experiments.bench.interception [--clients 10] [--rounds 8] [--batch-size 256] [--model cnn6]
        [--attack rgap] [--workers 1|ray] [--defer] [--repeats 1] [--attack-rounds all]

Both runs use the same FedSGD setting and seed. ``--workers ray`` places the attack jobs on
Ray (``--attack-workers ray``: a local Ray of the run's own here, or ``--ray-address``'s
cluster). ``--repeats N`` alternates N honest and N intercepting runs (honest, intercepting,
honest, ...), so that a shared machine's load drifts over both alike; each figure is then the
median over the runs of each run's figure. The attack workers run at the lowest CPU
priority, so the rounds keep the cores; the attacks finish after training if they must.
Round 1 (Ray starting its actors) is left out of the per-round figures. Flower's simulation
collects replies in polling steps of about 0.1 s, so rounds much shorter than a second
measure that step more than the strategy: the default batch of 256 images on CNN6 gives
rounds of about a second.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments.run import main as run_main
from fl_sim.device import DEVICES


def _per_round(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in csv.DictReader(open(out / "rounds.csv")) if int(r["round"]) >= 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.interception", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--attack", default="rgap")
    p.add_argument("--workers", default="1", help="attack worker processes, or ray (Ray tasks)")
    p.add_argument("--ray-address", default="", help="with --workers ray: the Ray cluster (default: a local Ray)")
    p.add_argument("--repeats", type=int, default=1, help="alternating honest and intercepting runs of each")
    p.add_argument(
        "--attack-rounds",
        default="all",
        help="rounds whose updates are attacked (every reply is intercepted all the same); with --defer, fewer "
        "attacks shorten the run, not the rounds",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="images per client update (R-GAP blends batches > 1, but does the same work)",
    )
    p.add_argument("--model", default="cnn6")
    p.add_argument("--defer", action="store_true", help="hold the attacks until training ends (--defer-attacks)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="both runs' --device (default: auto)")
    args = p.parse_args(argv)
    common = [
        "--mode",
        "fedsgd",
        "--batch-size",
        str(args.batch_size),
        "--model",
        args.model,
        "--init",
        "paper",
        "--clients",
        str(args.clients),
        "--rounds",
        str(args.rounds),
        "--device",
        args.device,
    ]
    intercepting = [
        "--attack",
        args.attack,
        "--observer",
        "server",
        "--attack-rounds",
        args.attack_rounds,
        "--attack-workers",
        str(args.workers),
        *(["--ray-address", args.ray_address] if args.ray_address else []),
        *(["--defer-attacks"] if args.defer else []),
    ]
    runs: dict[str, list[tuple[float, float, float, int]]] = {"honest": [], "intercepting": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in (("honest", ["--attack", "none"]), ("intercepting", intercepting)):
                out = Path(tmp) / f"{name}{i}"
                start = time.perf_counter()
                if run_main(common + extra + ["--out", str(out), "--quiet"]) != 0:
                    print(f"{name} run failed", file=sys.stderr)
                    return 1
                secs = _per_round(out)
                attacked = (
                    sum(1 for _ in csv.DictReader(open(out / "results.csv"))) if (out / "results.csv").exists() else 0
                )
                runs[name].append(
                    (statistics.median(secs), statistics.mean(secs), time.perf_counter() - start, attacked)
                )
    figures = {name: tuple(statistics.median(col) for col in zip(*rs)) for name, rs in runs.items()}
    (h_med, h_mean, h_wall, _), (i_med, i_mean, i_wall, n) = figures["honest"], figures["intercepting"]
    print(
        f"honest FedSGD       : median {h_med:.3f} s/round, mean {h_mean:.3f} "
        f"s/round (rounds 2..{args.rounds}), wall {h_wall:.0f} s"
    )
    print(
        f"intercepting + {args.attack:5s}: median {i_med:.3f} s/round, mean {i_mean:.3f} s/round, wall {i_wall:.0f} s "
        f"({n:.0f} attacks, workers {args.workers}{', deferred' if args.defer else ''})"
    )
    print(
        f"slowdown of the rounds: median {i_med / h_med:.3f}x ({100 * (i_med / h_med - 1):+.1f}%), "
        f"mean {i_mean / h_mean:.3f}x ({100 * (i_mean / h_mean - 1):+.1f}%)"
        + (f"; median over {args.repeats} runs of each" if args.repeats > 1 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
