"""What the clients' leakage audit costs and whether it keeps its promise (figures for the README).

    python -m experiments.bench.audit [--out runs/bench-audit] [--quick]

Five measurements, each a real run of ``python -m experiments.run`` in its own folder:

1. **protect**: the papers' attack setting (DLG's LeNet, FedSGD, one image per client, 4
   clients, 2 rounds, every attack by the server), undefended and with
   ``--audit protect:psnr=20``: the server's median PSNR per attack, the defence strengths
   protect chose, and the probe's cost per reply.
2. **analytic cost and false alarms**: the demo federation (CNN6, FedSGD, 10 clients) for 100
   rounds with ``--audit log:probe=false``: the checks' seconds against the client's own
   handler time, per reply (medians), and how many of the 1,000 honest models raised a
   tampering alarm.
3. **tampering**: a constructed extraction layer (rows copied with a bias ladder, the shape
   of an imprint's bins) in each round's honest global model of run 2, checked by the same
   function the mod uses: detected in how many rounds.
4. **risk ranking**: Flower's quickstart configuration (FedAvg, 3 local epochs, batches of
   32, 10 clients, CIFAR-10 from data/cifar10_train400.npz when present: ``scripts/make_npz.py``
   makes it) with ``--audit log:probe=false``
   for the flags; what the server's attacks recover on the same updates comes from a
   finished realistic-row run folder (``--attacked FOLDER``, optional): the confusion table
   of flagged against recovered (>= 30 dB).
5. **accuracy cost**: the demo federation (CNN6, FedSGD, 10 clients, 150 rounds) trained
   under the relative noise protect chose (``noise:rms=0.1`` and ``0.3``) against undefended.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from fl_sim.data import load_dataset
from fl_sim.device import DEVICES
from fl_sim.models import build_model
from fl_sim.mods.audit import tampering

from ..run import main as run_main


def _run(args: list[str], out: Path, device: str = "auto") -> tuple[float, Path]:
    start = time.perf_counter()
    code = run_main(args + ["--out", str(out), "--overwrite", "--device", device])
    if code != 0:
        raise SystemExit(f"bench_audit: the run in {out} failed (exit {code})")
    if (out / "dropped.csv").exists():
        print(f"   note: {out} dropped replies: see its dropped.csv")
    return time.perf_counter() - start, out


def _medians(results: Path) -> dict[str, float]:
    d = pd.read_csv(results)
    return {a: float(g["psnr"].median()) for a, g in d.groupby("attack")}


def protect(out: Path, budget: float, device: str = "auto") -> None:
    common = ["--attack", "all", "--observers", "server"]
    t0, plain = _run(common, out / "undefended", device)
    t1, guarded = _run(common + ["--audit", f"protect:psnr=20,budget={budget:g}"], out / "protect", device)
    before, after = _medians(plain / "results.csv"), _medians(guarded / "results.csv")
    audit = pd.read_csv(guarded / "audit.csv")
    print("\n1. protect:psnr=20 in the papers' attack setting (LeNet, FedSGD, 1 image, 4 clients, 2 rounds)")
    print(f"   {'attack':8s} {'undefended dB':>14s} {'protected dB':>13s}")
    for a in sorted(before):
        print(f"   {a:8s} {before[a]:14.1f} {after.get(a, float('nan')):13.1f}")
    print(
        f"   actions: {audit['action'].value_counts().to_dict()}; strengths chosen: "
        f"{audit['defence'].value_counts().to_dict()}"
    )
    print(
        f"   probe seconds per reply: median {audit['probe_seconds'].median():.1f} "
        f"(max {audit['probe_seconds'].max():.1f}); "
        f"probe's PSNR after protection: median {audit['protected_psnr'].median():.1f} dB"
    )
    res = pd.read_csv(guarded / "results.csv")
    best = res.groupby(["round", "client"])["psnr"].max()
    print(
        f"   replies some server attack still reconstructs at >= 20 dB: {int((best >= 20).sum())}/{len(best)} "
        f"(best per reply: median {best.median():.1f}, max {best.max():.1f} dB)"
    )
    print(f"   wall: undefended {t0:.0f} s, protected {t1:.0f} s (probe cap {budget:g} s)")


def analytic(out: Path, rounds: int, device: str = "auto") -> None:
    t, folder = _run(
        [
            "--attack",
            "none",
            "--mode",
            "fedsgd",
            "--batch-size",
            "1",
            "--clients",
            "10",
            "--rounds",
            str(rounds),
            "--server-lr",
            "0.1",
            "--model",
            "cnn6",
            "--audit",
            "log:probe=false",
        ],
        out / "honest",
        device,
    )
    audit = pd.read_csv(folder / "audit.csv")
    later = audit[audit["round"] > 1]  # round 1 computes R-GAP's rank once per client (kept in its context)
    ratio = (later["checks_seconds"] / later["train_seconds"]).median()
    acc = pd.read_csv(folder / "rounds.csv")["test_accuracy"].iloc[-1]
    print(
        f"\n2. the analytic checks on the demo federation (CNN6, FedSGD, 10 clients, {rounds} rounds, {t:.0f} s, "
        f"final accuracy {acc:.3f})"
    )
    print(
        f"   per reply after round 1: checks {later['checks_seconds'].median() * 1e3:.2f} ms, the client's handler "
        f"{later['train_seconds'].median() * 1e3:.2f} ms: ratio {ratio:.2f} (median over {len(later)} replies)"
    )
    round_s = pd.read_csv(folder / "rounds.csv")["seconds"].iloc[2:].median()
    print(
        f"   against the round's wall time ({round_s * 1e3:.0f} ms median): "
        f"{later['checks_seconds'].median() / round_s:.3f}"
    )
    first = audit[audit["round"] == 1]["checks_seconds"]
    print(f"   round 1 (with R-GAP's rank analysis): median {first.median():.2f} s")
    print(
        f"   flagged {int(audit['flagged'].sum())}/{len(audit)}; label readable {int(audit['label_readable'].sum())}"
        f"/{len(audit)}; tampering alarms on honest models: {int(audit['tampered'].sum())}/{len(audit)}"
    )


def tampering_check(folder: Path) -> None:
    data = load_dataset("mnist5k", "data")
    own = build_model("cnn6", data.input_shape, data.num_classes).state_dict()
    final = torch.load(folder / "final_model.pt")
    head = [k for k in final if k.endswith("weight") and final[k].dim() == 2][-1]
    detected, honest_alarm = 0, 0
    gen = torch.Generator().manual_seed(0)
    trials = 100
    for _ in range(trials):
        # the honest final model, perturbed per trial as rounds differ, then the construction
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in final.items()}
        honest_alarm += bool(tampering(own, state))
        rows = max(4, state[head].shape[0] // 2)
        state[head][:rows] = torch.randn(state[head].shape[1], generator=gen)
        bias = head[: -len("weight")] + "bias"
        if bias in state:  # CNN6's head has none: the copied rows alone
            state[bias][:rows] = torch.linspace(-1, 1, rows)
        detected += bool(tampering(own, state))
    print(
        f"\n3. a constructed layer ({head}: half its rows one vector, a "
        f"bias ladder where it has a bias) in {trials} perturbed copies of "
        f"the trained model: detected {detected}/{trials}; the same "
        f"copies unconstructed: {honest_alarm}/{trials} alarms"
    )


def ranking(out: Path, attacked: Path | None, dataset: str, device: str = "auto") -> None:
    args = [
        "--attack",
        "none",
        "--dataset",
        dataset,
        "--mode",
        "fedavg",
        "--lr",
        "0.01",
        "--clients",
        "10",
        "--local-epochs",
        "3",
        "--batch-size",
        "32",
        "--rounds",
        "2",
        "--model",
        "lenet",
        "--init",
        "paper",
        "--audit",
        "log:probe=false",
    ]
    _, folder = _run(args, out / "quickstart", device)
    audit = pd.read_csv(folder / "audit.csv")
    print(
        f"\n4. risk ranking, Flower's quickstart configuration on {dataset} (FedAvg, 3 epochs, batch 32, 10 clients, "
        "2 rounds)"
    )
    print(
        f"   checks {audit['checks_seconds'].median() * 1e3:.2f} ms per reply, the handler "
        f"{audit['train_seconds'].median() * 1e3:.1f} ms: ratio "
        f"{(audit['checks_seconds'] / audit['train_seconds']).median():.3f}"
    )
    print(
        f"   flagged {int(audit['flagged'].sum())}/{len(audit)} updates ({audit['images'].median():.0f} images, "
        f"{audit['local_steps'].median():.0f} local steps each); label set readable "
        f"{int(audit['label_readable'].sum())}/{len(audit)}"
    )
    if attacked is None or not (attacked / "results.csv").exists():
        print("   (no attacked run folder given: --attacked FOLDER for the confusion table)")
        return
    res = pd.read_csv(attacked / "results.csv")
    best = res.groupby(["round", "client"])["psnr"].max().reset_index()
    joined = best.merge(audit[["round", "client", "flagged"]], on=["round", "client"])
    joined["recovered"] = joined["psnr"] >= 30
    table = pd.crosstab(joined["flagged"], joined["recovered"], rownames=["flagged"], colnames=["recovered >= 30 dB"])
    print(f"   against {attacked} (best attack per update, {len(joined)} updates):")
    print("   " + table.to_string().replace("\n", "\n   "))


def accuracy_cost(out: Path, strengths: tuple[float, ...] = (0.1, 0.3), device: str = "auto") -> None:
    """The demo federation trained under the noise protect applies (fixed at each strength it
    chose; protect itself adapts per reply, and its probe on CNN6 for 1,500 replies is beyond
    a benchmark's time here), against the same federation undefended."""
    common = [
        "--attack",
        "none",
        "--mode",
        "fedsgd",
        "--batch-size",
        "1",
        "--clients",
        "10",
        "--rounds",
        "150",
        "--server-lr",
        "0.1",
        "--model",
        "cnn6",
    ]
    rows = []
    for k in (0.0, *strengths):
        extra = ["--defence", f"noise:rms={k:g}"] if k else []
        t, folder = _run(common + extra, out / f"train-rms{k:g}", device)
        acc = float(pd.read_csv(folder / "rounds.csv")["test_accuracy"].iloc[-1])
        rows.append((k, acc, t))
    base = rows[0][1]
    print("\n5. accuracy cost: the demo federation (CNN6, FedSGD, 10 clients, 150 rounds) under noise:rms=k")
    for k, acc, t in rows:
        print(f"   rms={k:<4g} accuracy {acc:.3f} ({(acc - base) * 100:+.1f} points, {t:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.audit", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-audit")
    p.add_argument("--rounds", type=int, default=100, help="rounds of the honest federation (2.)")
    p.add_argument("--budget", type=float, default=30.0, help="the probe's cap in seconds per attack")
    p.add_argument("--attacked", default=None, help="a realistic-row run folder, for the confusion table (4.)")
    p.add_argument("--quick", action="store_true", help="10 honest rounds")
    p.add_argument("--parts", default="1,2,3,4,5", help="which measurements, e.g. 1,4 (3 needs 2's folder)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="each run's --device (default: auto)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cifar = Path("data/cifar10_train400.npz")  # made by scripts/make_npz.py (docs/data.md)
    dataset = f"npz:{cifar}" if cifar.exists() else "mnist5k"
    parts = {p.strip() for p in args.parts.split(",")}
    if "1" in parts:
        protect(out, args.budget, args.device)
    if "2" in parts:
        analytic(out, 10 if args.quick else args.rounds, args.device)
    if "3" in parts:
        tampering_check(out / "honest")
    if "4" in parts:
        ranking(out, Path(args.attacked) if args.attacked else None, dataset, args.device)
    if "5" in parts:
        accuracy_cost(out, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
