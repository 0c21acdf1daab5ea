"""The audit's D-SNR check: its cost, its false alarms on honest training, what it detects.

    python -m experiments.bench.dsnr [--out runs/bench-dsnr] [--rounds 60] [--quick]

1. **cost**: milliseconds per check (:func:`fl_sim.mods.dsnr.dsnr`, both forms, median of 10
   after one warm-up) on batches of 16 and 64, for ``mlp`` and ``cnn6``, and the first call.
2. **honest runs**, each a real ``python -m experiments.run`` with ``--audit
   log:probe=false``, both D-SNRs read from its audit.csv (the values the mod computed on the
   model each client received and its own first batch):
   - the demo federation (CNN6, FedSGD, 10 clients, server learning rate 0.1, mnist5k) at
     batch sizes 2, 4, 8, 16, 32 and 64 for ``--rounds`` rounds, clients 0 to 3 auditing;
   - the same with the honest ``mlp`` (``--mlp-batches``, default 4 and 16), reported apart;
   - Flower's quickstart configuration (LeNet, FedAvg, 3 local epochs, batches of 32, lr 0.01,
     10 clients, CIFAR-10's 400 training images, ``--cifar``), every client auditing (first local
     batch: 32), for ``--rounds`` rounds.
3. **calibration and false alarms**: the calibration set is client 0 of the demo runs; the
   held-out set is clients 1 to 3 of the same runs (disjoint partitions of images) and every
   quickstart update (other images, model and training). The per-unit threshold in force
   (:data:`fl_sim.settings.DSNR_THRESHOLD`) against both, by batch size and by training phase
   (the first tenth of the rounds, the last tenth), and the value its rule gives.
4. **detection**: both D-SNRs of each active construction (:data:`attacks.ACTIVE`, on the
   honest model of the active preset, ``mlp``, and of ``cnn6`` for a block) against the honest
   model on the same batches, and whether the thresholds flag it.
5. **a trap tuned against the check** (the issue's stretch): trap weights firing for more
   images, what the check says and what the trap still reads, each update and their sum.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from attacks import ACTIVE, SUCCESS_PSNR, score_batch
from attacks.trap import plant_trap, trap
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset, to_float
from fl_sim.models import build_model
from fl_sim.mods.dsnr import dsnr
from fl_sim.settings import DSNR_MIN_BATCH, DSNR_THRESHOLD
from fl_sim.task import client_batch

from ..run import main as run_main

BATCHES = (2, 4, 8, 16, 32, 64)
MLP_BATCHES = (4, 16)  # the honest mlp's runs: reported beside the calibration, not part of it


def cost() -> None:
    data = load_dataset("mnist5k", "data")
    x, y = to_float(data.train_x[:64]), data.train_y[:64]
    print("\n1. cost per check (ms, median of 10, one thread)")
    for name in ("mlp", "cnn6"):
        model = build_model(name, data.input_shape, data.num_classes)
        t0 = time.perf_counter()
        dsnr(model, x[:16], y[:16])
        first = time.perf_counter() - t0
        cells = []
        for b in (16, 64):
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                dsnr(model, x[:b], y[:b])
                times.append(time.perf_counter() - t0)
            cells.append(f"batch {b}: {statistics.median(times) * 1e3:.1f}")
        print(f"   {name:5s} {', '.join(cells)}; first call in this process {first * 1e3:.0f}")


def _run(args: list[str], out: Path) -> pd.DataFrame:
    if not (out / "summary.json").exists():  # a finished run (one killed mid-way runs again)
        code = run_main(args + ["--out", str(out), "--overwrite"])
        if code != 0:
            raise SystemExit(f"bench_dsnr: the run in {out} failed (exit {code})")
    audit = pd.read_csv(out / "audit.csv")
    return audit[audit["dsnr"].notna()]


def honest(
    out: Path, rounds: int, cifar: Path, batches: tuple[int, ...] = BATCHES, mlp_batches: tuple[int, ...] = MLP_BATCHES
) -> pd.DataFrame:
    frames = []
    for b in batches:
        args = ["--attack", "none", "--mode", "fedsgd", "--batch-size", str(b), "--clients", "10"]
        args += ["--rounds", str(rounds), "--server-lr", "0.1", "--model", "cnn6", "--init", "kaiming"]
        audit = _run(args + ["--audit", "log:probe=false,clients=0+1+2+3"], out / f"demo-b{b}")
        frames.append(audit.assign(config="demo", batch=b, rounds=rounds))
    for b in mlp_batches:  # the honest mlp: a fully connected first layer, whose single-fired units leak
        args = ["--attack", "none", "--mode", "fedsgd", "--batch-size", str(b), "--clients", "10"]
        args += ["--rounds", str(rounds), "--server-lr", "0.1", "--model", "mlp", "--init", "torch"]
        audit = _run(args + ["--audit", "log:probe=false,clients=0+1+2+3"], out / f"mlp-b{b}")
        frames.append(audit.assign(config="mlp", batch=b, rounds=rounds))
    if cifar.exists():
        qr = rounds
        args = ["--attack", "none", "--dataset", f"npz:{cifar}", "--mode", "fedavg", "--lr", "0.01"]
        args += ["--clients", "10", "--local-epochs", "3", "--batch-size", "32", "--rounds", str(qr)]
        args += ["--model", "lenet", "--init", "paper", "--audit", "log:probe=false"]
        audit = _run(args, out / "quickstart")
        frames.append(audit.assign(config="quickstart", batch=32, rounds=qr))
    else:
        print(f"   (no {cifar}: the quickstart configuration is left out; scripts/make_npz.py makes it)")
    return pd.concat(frames, ignore_index=True)


def _phase(d: pd.DataFrame) -> pd.Series:
    tenth = (d["rounds"] / 10).clip(lower=1)
    return pd.Series(
        ["early" if r <= t else "late" if r > n - t else "middle" for r, t, n in zip(d["round"], tenth, d["rounds"])],
        index=d.index,
    )


def false_alarms(d: pd.DataFrame) -> None:
    judged = d["batch"] >= DSNR_MIN_BATCH
    above = d["dsnr_unit"] > DSNR_THRESHOLD
    d = d.assign(phase=_phase(d), above=above, judged=judged, alarm=judged & above)
    calib = d[(d["config"] == "demo") & (d["client"] == 0)]
    held = d[(d["config"] != "mlp") & ~d.index.isin(calib.index)]
    print(
        f"\n3. per-unit D-SNR on honest updates; threshold in force {DSNR_THRESHOLD:g}, judged from batches of "
        f"{DSNR_MIN_BATCH} (smaller: recorded only); SEER's layer-level D-SNR beside it"
    )
    print("   calibration set (demo federation, client 0): quantiles by batch size, per-unit | layer-level")
    print(f"   {'batch':>5s} {'n':>5s} {'median':>8s} {'99%':>8s} {'max':>8s} | {'median':>8s} {'99%':>8s} {'max':>9s}")
    for b, g in calib.groupby("batch"):
        q, r = g["dsnr_unit"], g["dsnr"]
        print(
            f"   {b:5d} {len(q):5d} {q.median():8.4f} {q.quantile(0.99):8.4f} {q.max():8.4f} | "
            f"{r.median():8.3f} {r.quantile(0.99):8.3f} {r.max():9.3f}"
        )
    top = calib[calib["judged"]]["dsnr_unit"].max()
    print(f"   the rule (1.5 x the calibration set's largest judged value): {1.5 * top:.4f}")
    print("   held-out set: false alarms (judged and above the threshold; 'above': were every batch judged)")
    print(
        f"   {'config':10s} {'batch':>5s} {'phase':>6s} {'updates':>8s} {'alarms':>7s} {'above':>6s} "
        f"{'max unit':>9s} {'max layer':>10s}"
    )
    for (c, b, ph), g in held.groupby(["config", "batch", "phase"]):
        alarms = int(g["alarm"].sum()) if b >= DSNR_MIN_BATCH else "-"
        print(
            f"   {c:10s} {b:5d} {ph:>6s} {len(g):8d} {alarms:>7} {int(g['above'].sum()):6d} "
            f"{g['dsnr_unit'].max():9.4f} {g['dsnr'].max():10.3f}"
        )
    for name, part in (("held-out", held), ("calibration", calib)):
        j = part[part["judged"]]
        k = int(j["alarm"].sum())
        print(
            f"   {name}: {k}/{len(j)} = {k / max(len(j), 1):.2%} false alarms over the judged updates "
            f"(batches {', '.join(map(str, sorted(j['batch'].unique())))}; up to round {int(j['rounds'].max())}); "
            f"{len(part) - len(j)} smaller-batch updates recorded only"
        )
    mlp = d[d["config"] == "mlp"]
    for b, g in mlp.groupby("batch"):
        print(
            f"   honest mlp, batch {b}: {int(g['above'].sum())}/{len(g)} above the threshold "
            f"(per-unit median {g['dsnr_unit'].median():.4f}, max {g['dsnr_unit'].max():.4f}; "
            f"round 1 {g[g['round'] == 1]['dsnr_unit'].max():.4f})"
        )


def detection(batches: int = 8) -> None:
    data = load_dataset("mnist5k", "data")
    public = to_float(data.test_x[:1000])
    gen = torch.Generator().manual_seed(0)
    print(
        f"\n4. each active construction against the honest model on the same {batches} batches of 16 "
        f"(built for 64 images; per-unit threshold {DSNR_THRESHOLD:g}, layer-level 4)"
    )
    print(
        f"   {'construction':14s} {'model':5s} {'honest unit':>16s} {'built unit':>16s} {'flagged':>7s} "
        f"{'honest layer':>14s} {'built layer':>14s} {'at 4':>5s}"
    )
    for name, cls in ACTIVE.items():
        base = "cnn6" if name == "imprint-block" else "mlp"
        model = build_model(base, data.input_shape, data.num_classes, init="torch" if base == "mlp" else "kaiming")
        built = cls.construct(model, data.input_shape, public, 500, seed=0, images=64)
        h, m = [], []
        for _ in range(batches):
            idx = torch.randperm(len(data.train_y), generator=gen)[:16]
            x, y = to_float(data.train_x[idx]), data.train_y[idx]
            h.append(dsnr(model, x, y))
            m.append(dsnr(built, x, y))
        hu, mu = [v.unit for v in h], [v.unit for v in m]
        hl, ml = [v.value for v in h], [v.value for v in m]
        print(
            f"   {name:14s} {base:5s} {min(hu):7.4f}..{max(hu):<7.4f} {min(mu):7.4f}..{max(mu):<7.4f} "
            f"{sum(v > DSNR_THRESHOLD for v in mu):3d}/{batches} {min(hl):6.3f}..{max(hl):<6.3f} "
            f"{min(ml):6.3f}..{max(ml):<6.3f} {sum(v > 4 for v in ml):2d}/{batches}"
        )


def evasion(rates: tuple[float, ...] = (1 / 64, 0.05, 0.1, 0.15, 0.2, 0.3)) -> None:
    """A trap tuned against the check: each unit firing for more images (``rate``) leaves fewer
    units to one image of a client's batch; what the check says and what the trap still reads,
    on 4 clients' round-1 batches of 16, each update and their sum (SecAgg+'s aggregate, unrounded)."""
    data = load_dataset("mnist5k", "data")
    public = to_float(data.test_x[:1000])
    honest = build_model("mlp", data.input_shape, data.num_classes, init="torch", seed=0)
    cfg = RunConfig(mode="fedsgd", batch_size=16, num_clients=4, model="mlp")
    batches = [client_batch(cfg, pid, 4, 1) for pid in range(4)]

    def read(model, grads, x) -> int:
        got = trap(model, grads, data.input_shape)
        return sum(s["psnr"] >= SUCCESS_PSNR for s in score_batch(got.images, x))

    print(f"\n5. trap weights tuned against the per-unit threshold {DSNR_THRESHOLD:g} (4 clients x 16, round 1)")
    print(f"   {'model':16s} {'per-unit D-SNR':>16s} {'flagged':>8s} {'each update':>12s} {'their sum':>10s}")
    models = [("honest", honest)] + [
        (f"trap 1 in {1 / r:.3g}", plant_trap(honest, data.input_shape, public, rate=r, seed=0)) for r in rates
    ]
    for tag, model in models:
        units, each, grads = [], 0, []
        for x, y in batches:
            units.append(dsnr(model, x, y).unit)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            grads.append(g)
            each += read(model, g, x)
        total = [sum(gs) / len(gs) for gs in zip(*grads)]
        summed = read(model, total, torch.cat([x for x, _ in batches]))
        flagged = sum(u > DSNR_THRESHOLD for u in units)
        print(f"   {tag:16s} {min(units):7.4f}..{max(units):<7.4f} {flagged:6d}/4 {each:9d}/64 {summed:7d}/64")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.dsnr", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-dsnr")
    p.add_argument("--rounds", type=int, default=60, help="rounds of each demo federation")
    p.add_argument("--quick", action="store_true", help="10 rounds")
    p.add_argument("--cifar", default="data/cifar10_train400.npz", help="CIFAR-10's 400 training images (2.)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="the demo runs' batch sizes (2.)")
    p.add_argument("--mlp-batches", default=",".join(map(str, MLP_BATCHES)), help="the honest mlp runs' (2.)")
    p.add_argument(
        "--parts",
        default="1,2,4",
        help="which: 1 cost, 2 honest runs and 3, 4 detection, 5 a trap tuned against the check",
    )
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",")}
    torch.set_num_threads(1)
    if "1" in parts:
        cost()
    if "2" in parts:
        batches = tuple(int(b) for b in args.batches.split(","))
        mlp = tuple(int(b) for b in args.mlp_batches.split(",") if b.strip())
        d = honest(Path(args.out), 10 if args.quick else args.rounds, Path(args.cifar), batches, mlp)
        false_alarms(d)
    if "4" in parts:
        detection()
    if "5" in parts:
        evasion()
    return 0


if __name__ == "__main__":
    sys.exit(main())
