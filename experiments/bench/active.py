"""What the active server recovers, against the number of bins and the images in an update
(figures for the README).

    python -m experiments.bench.active [--out runs/bench-active] [--parts 1,2,3,4,5,6] [--trials 5]

Six measurements on the offline default (mnist5k; the server places the bins on its own
1,000 held-out digits):

1. **bins x images** (the attack alone, no federation): the imprinted ``mlp`` (weights only,
   up to 1,024 bins) and the imprint block in front of ``cnn6`` (2,000 bins), one gradient of
   N images (the plain mean of the batch gradients: what the server reads from one client's
   update, or from a SecAgg+ aggregate before rounding), ``--trials`` batches per cell: the
   fraction of images at >= 30 dB beside the expected fraction
   (:func:`attacks.imprint.expected_recovery`), the attack's own seconds; a figure
   ``recovery.png``.
2. **the target**: ``experiments.run --attack none --observers active,secagg --batch-size 16
   --clients 4`` over ``--trials`` seeds: images recovered at >= 30 dB by the active server
   with and without SecAgg+, and the attack's seconds per update.
3. **the observer table**: one run per (clients, batch) in {4, 10} x {1, 8, 32} with
   ``--observers active,secagg`` (500 bins): recovered out of the images, per observer.
4. **what the clients see**: the target run with ``--audit log:probe=false`` (the tampering
   check on every model received: alarms in the active round and in the honest one) and with
   ``--audit block:probe=false`` (what the server then recovers).
5. **trap weights in federations** (``--active-attack trap``): one run per (clients, batch) in
   {4, 10} x {8, 16, 32, 64, 128} with ``--observers active,secagg`` on the in-process engine:
   recovered out of the images, per observer, beside :func:`attacks.trap.expected_recovery`
   (the trap tuned to the round's aggregate, batch x clients images).
6. **trap weights alone** (no federation): one gradient of N random training digits on the trap
   tuned to N, for firing rates of 1/N and 2/N (:data:`attacks.trap.LONE_UNITS`), ``--trials``
   batches per cell: the fraction at >= 30 dB beside the expectation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F

from attacks import SUCCESS_PSNR, Update, score_batch
from attacks import trap as traps
from attacks.imprint import expected_recovery, imprint, imprint_block_model, plan_imprint, plant_imprint
from fl_sim.data import load_dataset, to_float
from fl_sim.device import DEVICES
from fl_sim.models import build_model

from ..run import main as run_main


def _run(args: list[str], out: Path, device: str = "auto") -> Path:
    code = run_main(args + ["--out", str(out), "--overwrite", "--attack-workers", "0", "--device", device])
    if code != 0:
        raise SystemExit(f"bench_active: the run in {out} failed (exit {code})")
    return out


def _recovered(model, x, y, shape) -> tuple[int, float]:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    start = time.perf_counter()
    res = imprint(model, Update(tuple(grads)), shape)
    seconds = time.perf_counter() - start
    psnr = torch.tensor([s["psnr"] for s in score_batch(res.images, x)])
    return int((psnr >= SUCCESS_PSNR).sum()), seconds


def bins_and_images(out: Path, trials: int) -> pd.DataFrame:
    data = load_dataset("mnist5k", "")
    public, shape = to_float(data.test_x), data.input_shape
    cells = [("mlp", b) for b in (50, 100, 200, 500, 1000)] + [("cnn6+block", 2000)]
    rows = []
    for name, bins in cells:
        plan = plan_imprint(public, bins, seed=0)
        if name == "mlp":
            model = plant_imprint(build_model("mlp", shape, data.num_classes, seed=0), shape, plan)
        else:
            model = imprint_block_model(
                build_model("cnn6", shape, data.num_classes, init="kaiming", seed=0), shape, plan
            )
        for images in (8, 16, 32, 64, 128, 256):
            got, secs = [], []
            for t in range(trials):
                idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1000 * t + images))[
                    :images
                ]
                n, s = _recovered(model, to_float(data.train_x[idx]), data.train_y[idx], shape)
                got.append(n / images)
                secs.append(s)
            rows.append(
                {
                    "model": name,
                    "bins": bins,
                    "images": images,
                    "recovered": statistics.mean(got),
                    "expected": expected_recovery(bins, images),
                    "attack_seconds": statistics.median(secs),
                }
            )
            print(
                f"   {name:10s} bins {bins:5d} images {images:4d}: recovered {rows[-1]['recovered']:.3f} "
                f"(expected {rows[-1]['expected']:.3f}), {rows[-1]['attack_seconds'] * 1000:.1f} ms"
            )
    table = pd.DataFrame(rows)
    table.to_csv(out / "recovery.csv", index=False)
    _plot(table, out / "recovery.png")
    return table


def _plot(table: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, bins), g in table.groupby(["model", "bins"], sort=False):
        line = ax.plot(g["images"], g["recovered"], marker="o", label=f"{bins} bins ({name})")[0]
        ax.plot(g["images"], g["expected"], linestyle="--", color=line.get_color(), linewidth=0.9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images in the update (all clients' batches under SecAgg+)")
    ax.set_ylabel(f"fraction recovered at >= {SUCCESS_PSNR:.0f} dB")
    ax.set_ylim(0, 1.02)
    ax.set_title("Active server's imprint: measured (solid) and expected (dashed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _by_observer(folder: Path) -> dict[str, tuple[int, int, float, float]]:
    d = pd.read_csv(folder / "results.csv")
    out = {}
    for observer, g in d.groupby("observer"):
        out[observer] = (
            int(g["recovered"].sum()),
            int(g["images"].sum()),
            float(g["psnr"].median()),
            float(g["seconds"].median()),
        )
    return out


def target(out: Path, trials: int, device: str = "auto") -> None:
    got = {"active": [0, 0], "active-secagg": [0, 0]}
    for seed in range(trials):
        folder = _run(
            [
                "--attack",
                "none",
                "--observers",
                "active,secagg",
                "--batch-size",
                "16",
                "--clients",
                "4",
                "--seed",
                str(seed),
            ],
            out / f"target-s{seed}",
            device,
        )
        for observer, (rec, images, psnr, secs) in _by_observer(folder).items():
            got[observer][0] += rec
            got[observer][1] += images
            print(
                f"   seed {seed} {observer:13s}: {rec}/{images} at >= 30 dB, median {psnr:.1f} dB, "
                f"{secs:.2f} s per row (scoring included)"
            )
    for observer, (rec, images) in got.items():
        print(
            f"   {observer}: {rec}/{images} = {rec / max(images, 1):.3f} over {trials} seeds "
            f"(expected {expected_recovery(500, 64 if observer == 'active-secagg' else 16):.3f})"
        )


def table(out: Path, device: str = "auto") -> None:
    for clients in (4, 10):
        for batch in (1, 8, 32):
            folder = _run(
                [
                    "--attack",
                    "none",
                    "--observers",
                    "active,secagg",
                    "--batch-size",
                    str(batch),
                    "--clients",
                    str(clients),
                ],
                out / f"table-c{clients}-b{batch}",
                device,
            )
            for observer, (rec, images, psnr, _) in _by_observer(folder).items():
                n = batch if observer == "active" else batch * clients
                print(
                    f"   {clients:2d} clients x batch {batch:2d} {observer:13s}: {rec}/{images} "
                    f"({rec / max(images, 1):.3f}; expected {expected_recovery(500, n):.3f}), median {psnr:.1f} dB"
                )


def clients_see(out: Path, device: str = "auto") -> None:
    common = ["--attack", "none", "--observers", "active", "--batch-size", "16", "--clients", "4"]
    folder = _run(common + ["--audit", "log:probe=false"], out / "audit-log", device)
    audit = pd.read_csv(folder / "audit.csv")
    for r, g in audit.groupby("round"):
        print(
            f"   log: round {r}: tampering flagged by {int(g['tampered'].astype(str).isin(['True', 'true']).sum())} "
            f"of {len(g)} clients ({g['tamper_reason'].dropna().astype(str).head(1).tolist()})"
        )
    folder = _run(common + ["--audit", "block:probe=false"], out / "audit-block", device)
    d = pd.read_csv(folder / "results.csv")
    print(
        f"   block: active rows {len(d)}, statuses {d['status'].value_counts().to_dict()}, "
        f"recovered {int(pd.to_numeric(d['recovered'], errors='coerce').fillna(0).sum())}"
    )


def trap_table(out: Path, device: str = "auto") -> None:
    units = 1024  # mlp's first layer: every unit is a trap
    rows = []
    for clients in (4, 10):
        for batch in (8, 16, 32, 64, 128):
            args = ["--attack", "none", "--observers", "active,secagg", "--active-attack", "trap"]
            args += ["--batch-size", str(batch), "--clients", str(clients), "--engine", "inprocess"]
            folder = _run(args, out / f"trap-c{clients}-b{batch}", device)
            rate = traps.trap_rate(batch * clients)
            for observer, (rec, images, psnr, _) in _by_observer(folder).items():
                n = batch if observer == "active" else batch * clients
                rows.append(
                    {
                        "clients": clients,
                        "batch": batch,
                        "observer": observer,
                        "recovered": rec,
                        "images": images,
                        "expected": traps.expected_recovery(units, n, rate),
                        "psnr": psnr,
                    }
                )
                print(
                    f"   {clients:2d} clients x batch {batch:3d} {observer:13s}: {rec}/{images} "
                    f"({rec / max(images, 1):.3f}; expected {rows[-1]['expected']:.3f}), median {psnr:.1f} dB"
                )
    pd.DataFrame(rows).to_csv(out / "trap.csv", index=False)


def trap_alone(out: Path, trials: int) -> None:
    data = load_dataset("mnist5k", "")
    public, shape = to_float(data.test_x), data.input_shape
    honest = build_model("mlp", shape, data.num_classes, seed=0)
    rows = []
    for lone in (1.0, 2.0):
        for images in (8, 16, 32, 64, 128, 256):
            rate = min(0.5, lone / images)
            model = traps.plant_trap(honest, shape, public, rate=rate)
            got = []
            for t in range(trials):
                idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(100 * t + images))
                x, y = to_float(data.train_x[idx[:images]]), data.train_y[idx[:images]]
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
                res = traps.trap(model, Update(tuple(grads)), shape)
                psnr = torch.tensor([s["psnr"] for s in score_batch(res.images, x)])
                got.append(float((psnr >= SUCCESS_PSNR).float().mean()))
            rows.append(
                {
                    "rate": f"{lone:g}/N",
                    "images": images,
                    "recovered": statistics.mean(got),
                    "expected": traps.expected_recovery(1024, images, rate),
                }
            )
            print(
                f"   rate {lone:g}/N images {images:4d}: recovered {rows[-1]['recovered']:.3f} "
                f"(expected {rows[-1]['expected']:.3f})"
            )
    pd.DataFrame(rows).to_csv(out / "trap-alone.csv", index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.active", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-active")
    p.add_argument("--parts", default="1,2,3,4,5,6")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--device", default="auto", choices=DEVICES, help="each run's --device (default: auto)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {int(v) for v in args.parts.split(",")}
    if 1 in parts:
        print("1. bins x images (the attack alone)")
        bins_and_images(out, args.trials)
    if 2 in parts:
        print("2. the target: 4 clients x batch 16 under SecAgg+, 500 bins")
        target(out, args.trials, args.device)
    if 3 in parts:
        print("3. the observer table")
        table(out, args.device)
    if 4 in parts:
        print("4. what the clients' audit sees")
        clients_see(out, args.device)
    if 5 in parts:
        print("5. trap weights in federations: each update and through SecAgg+")
        trap_table(out, args.device)
    if 6 in parts:
        print("6. trap weights alone: recovered against images, two firing rates")
        trap_alone(out, args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
