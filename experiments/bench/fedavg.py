"""Benchmark the FedAvg attack (``fedavg-sim``) against Inverting Gradients' replay (``ig``) on
real FedAvg updates, one line per update.

    python -m experiments.bench.fedavg --data mnist5k --images 50 --epochs 5 --batch 5 \\
        --lr 0.004 --model cnn6 --seeds 0
    python -m experiments.bench.fedavg --data npz:data/cifar10_test_jpeg.npz --offset 5000 \\
        --images 50 --epochs 5 --batch 5 --lr 0.004 --model cnn6 --seeds 0

Each seed is one client: the model is built with ``--init`` (kaiming by default) seeded by the
seed; the client holds ``--images`` images, those from ``offset + seed * images`` on (so seeds
are disjoint clients), and trains them as the testbed's client does
(:func:`fl_sim.task.local_sgd`: plain SGD at ``--lr``, ``--epochs`` passes, each a seeded
shuffle cut into batches of ``--batch``). The server is given what a FedAvg server has: the
weights it sent, the delta, the schedule's shape (the in-order schedule of
:func:`experiments.observe.assumed_schedule`) and the example count; not the labels, not the
order (``--grant labels`` or ``labels+order`` gives the attacks the true labels, or the labels
and the client's shuffle, to measure what each unknown costs). ``fedavg-sim`` estimates the
labels from the delta; ``ig`` replays the steps in the assumed order with iDLG's labels, its
FedAvg setting.

Per update and attack it prints: the fraction of images at >= 20 dB after the MSE-optimal
assignment (``attacks.match_batch``, this testbed's scoring), the paper's criterion (Dimitrov et
al.'s code: PSNR > 20 dB after the assignment that maximises the summed PSNR), the fraction at
least 4.2 dB above a blank page (the image's background everywhere: FEMNIST's blank page scores
15.8 dB, so this carries the paper's 20 dB bar to other data; a calibration, not the paper's
criterion), the median PSNR beside the blank page's, the label-count accuracy (the fraction of
the images whose label the estimated counts account for), the wall-clock seconds of the attack
call and its CPU seconds (on a shared machine the wall clock measures the load; with one thread
the CPU seconds are what a free core takes). ``--out`` writes the lines as CSV. Bad input ends
with one line on stderr and exit code 2.

``--floor`` first prints, per update, how close the exact replay of the *true* images comes to
the delta (cosine distance, the attack's objective) when the order is not the client's: in
another shuffle, in the in-order schedule, and for comparison with 20 dB-noisy images in the
true order and with random images (``--attacks none`` prints only that).
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from attacks import AttackResult, ThreatModel, Update, match_batch, score_batch
from attacks.fedavg import FedAvgSim
from attacks.inverting import InvertingGradients, cosine_distance, simulate_local_update
from attacks.metrics import psnr
from experiments.bench.attacks import BenchError, open_out, parse_seeds
from experiments.observe import assumed_schedule
from fl_sim.data import Dataset, DatasetError, load_dataset, read_npz
from fl_sim.models import build_model, model_names
from fl_sim.task import local_sgd

GRANTS = ("none", "labels", "labels+order")
BAR = 20.0  # dB: the issue's bar and Dimitrov et al.'s (their --delta=20.0 with the PSNR metric)
# FEMNIST's blank page (every pixel at the background) scores 15.8 dB against its digits (from the
# dataset's normalisation, mean 0.964 and std 0.158: -10 log10(0.158^2 + 0.036^2)), so the paper's
# 20 dB bar asks for 4.2 dB more than a blank image; MNIST's black page scores 8-10 dB.
FEMNIST_BLANK = 15.8
OVER_BLANK = BAR - FEMNIST_BLANK
FIELDS = [
    "seed",
    "attack",
    "grant",
    "images",
    "epochs",
    "batch",
    "lr",
    "frac_20db",
    "paper_frac",
    "frac_over_blank",
    "median_psnr",
    "median_blank_psnr",
    "label_count_accuracy",
    "seconds",
    "cpu_seconds",
    "steps",
    "status",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.bench.fedavg", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist5k", help="mnist5k (its training split) or npz:PATH (official order)")
    p.add_argument("--offset", type=int, default=0, help="index of the first image (default: 0)")
    p.add_argument("--images", type=int, default=50, help="images per client (default: 50)")
    p.add_argument("--epochs", type=int, default=5, help="local epochs (default: 5)")
    p.add_argument("--batch", type=int, default=5, help="local batch size (default: 5)")
    p.add_argument("--lr", type=float, default=0.004, help="local learning rate (default: 0.004)")
    p.add_argument("--model", default="cnn6", choices=model_names())
    p.add_argument("--init", default="kaiming", help="the model's initialisation (default: kaiming)")
    p.add_argument("--seeds", default="0", help="clients, one per seed: 0-4, 0,1,2 (default: 0)")
    p.add_argument(
        "--attacks", default="fedavg-sim,ig", help="comma-separated: fedavg-sim, ig, or none (default: fedavg-sim,ig)"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of fedavg-sim (a Python literal); repeatable",
    )
    p.add_argument(
        "--ig-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of ig (a Python literal); repeatable",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also print the objective's floor: the replay of the true images in other orders",
    )
    p.add_argument(
        "--grant",
        default="none",
        help="what the server is granted beyond a FedAvg server's view: none (the default), labels, "
        "or labels+order (the labels and the client's true shuffle: the attack's ceiling)",
    )
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (default: 1)")
    p.add_argument("--out", default=None, help="CSV with one row per update and attack")
    return p


def literal_options(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (values are Python literals) as a dict; ``BenchError`` otherwise."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise BenchError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BenchError(f"{flag} {key}: {value!r} is not a Python literal") from None
    return options


def load_client_data(name: str) -> Dataset:
    """The images a client may hold, in the source's order: mnist5k's training split, or all of
    an ``npz:PATH`` archive. ``BenchError`` with one line when it cannot be read."""
    try:
        if name.startswith("npz:"):
            z = read_npz(name[4:])
            return Dataset(name, z.images, z.labels, z.images[:1], z.labels[:1], z.num_classes, z.notes)
        return load_dataset(name)
    except DatasetError as exc:
        raise BenchError(str(exc)) from None


def client_update(data: Dataset, idx: np.ndarray, args: argparse.Namespace, seed: int):
    """The model sent, the client's delta after local SGD (the testbed's own training loop), and
    the true images and labels in ``idx``'s order."""
    model = build_model(args.model, data.input_shape, data.num_classes, init=args.init, seed=seed)
    client = build_model(args.model, data.input_shape, data.num_classes, init=args.init, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    order = torch.as_tensor(idx)
    positions = [c for _ in range(args.epochs) for c in torch.randperm(len(idx), generator=gen).split(args.batch)]
    _, steps = local_sgd(client, data, [order[c].numpy() for c in positions], lr=args.lr)
    delta = tuple((c.detach() - p.detach()) for c, p in zip(client.parameters(), model.parameters()))
    x = data.train_x[order].float() / 255
    schedule = tuple(tuple(c.tolist()) for c in positions)
    return model.eval(), Update(delta, "weight_delta", lr=args.lr, local_steps=steps), x, data.train_y[order], schedule


def floor(model, update: Update, x, y, schedule, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """The cosine distance to the delta of the exact replay (:func:`simulate_local_update`) of
    the true images, labels granted: in another seeded shuffle (the best ``dummies="shared"``
    can do without the order), in the in-order schedule (what IG's replay assumes), with
    Gaussian noise of std 0.1 (about 20 dB) in the true order, and of random images."""
    n, gen = len(y), torch.Generator().manual_seed(2000 + seed)
    params = {k: p.detach() for k, p in model.named_parameters()}
    other = tuple(
        tuple(c.tolist()) for _ in range(args.epochs) for c in torch.randperm(n, generator=gen).split(args.batch)
    )
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    cases = {
        "another shuffle": (x, other),
        "in order": (x, assumed_schedule(n, args.batch, update.local_steps)),
        "20 dB noise": (noisy, schedule),
        "random images": (torch.rand(x.shape, generator=gen), schedule),
    }
    out = {}
    for name, (images, sched) in cases.items():
        replay = simulate_local_update(model, params, images, y, args.lr, update.local_steps, False, sched)
        out[name] = float(cosine_distance([d.detach() for d in replay], list(update.tensors)))
    return out


def threat_for(grant: str, y, schedule, steps: int, args: argparse.Namespace) -> ThreatModel:
    """What the server is given: the example count and the in-order schedule a FedAvg server
    pictures (``none``); with the true labels (``labels``, in the images' order); or with the
    labels and the client's true shuffle (``labels+order``: only the pixels are unknown)."""
    if grant == "labels+order":
        return ThreatModel(labels=y, schedule=schedule)
    assumed = assumed_schedule(args.images, args.batch, steps)
    if grant == "labels":
        return ThreatModel(labels=y, schedule=assumed)
    return ThreatModel(batch_size=args.images, schedule=assumed)


def paper_fraction(images: torch.Tensor, truth: torch.Tensor) -> float:
    """Dimitrov et al.'s criterion: the assignment maximising the summed PSNR, then the fraction
    of the pairs above 20 dB (strictly)."""
    cost = np.array([[-psnr(r, t) for t in truth] for r in images])
    rows, cols = linear_sum_assignment(cost)
    return float(np.mean(-cost[rows, cols] > BAR))


def blank_psnr(truth: torch.Tensor) -> list[float]:
    """Per image, the PSNR of a blank page: every pixel at the image's median (its background)."""
    return [psnr(torch.full_like(t, float(t.median())), t) for t in truth]


def label_count_accuracy(labels: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    a, b = torch.bincount(labels, minlength=classes), torch.bincount(truth, minlength=classes)
    return float(torch.minimum(a, b).sum()) / len(truth)


def score(res: AttackResult, x: torch.Tensor, y: torch.Tensor, classes: int) -> dict[str, Any]:
    perm = match_batch(res.images, x)
    values = [s["psnr"] for s in score_batch(res.images, x, perm=perm)]
    blank = blank_psnr(x)
    return {
        "frac_20db": float(np.mean([v >= BAR for v in values])),
        "paper_frac": paper_fraction(res.images, x),
        "frac_over_blank": float(np.mean([v >= b + OVER_BLANK for v, b in zip(values, blank)])),
        "median_psnr": statistics.median(values),
        "median_blank_psnr": statistics.median(blank),
        "label_count_accuracy": label_count_accuracy(res.labels.reshape(-1), y, classes),
        "seconds": res.seconds,
        "steps": res.steps,
        "status": res.status,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip() and a.strip() != "none"]
        unknown = [a for a in attacks if a not in ("fedavg-sim", "ig")]
        if unknown or not (attacks or args.floor):
            raise BenchError(f"--attacks takes fedavg-sim and/or ig, got {args.attacks!r}")
        if args.grant not in GRANTS:
            raise BenchError(f"--grant takes one of {', '.join(GRANTS)}, got {args.grant!r}")
        if min(args.images, args.epochs, args.batch, args.threads) < 1 or args.offset < 0:
            raise BenchError("--images, --epochs, --batch and --threads must be >= 1, --offset >= 0")
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise BenchError(f"--lr must be > 0, got {args.lr}")
        seeds = parse_seeds(args.seeds)
        sim_options = literal_options(args.option, "--option")
        ig_options = literal_options(args.ig_option, "--ig-option")
        try:
            sim, ig = FedAvgSim(**sim_options), InvertingGradients(**ig_options)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"bad attack option: {exc}") from None
        data = load_client_data(args.data)
        need = args.offset + (max(seeds) + 1) * args.images
        if need > len(data.train_y):
            raise BenchError(f"{args.data} holds {len(data.train_y)} images; seeds {args.seeds} need {need}")
        out = open_out(args.out)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        writer = csv.DictWriter(out, FIELDS) if out else None
        if writer:
            writer.writeheader()
        print(
            f"# {args.data} from {args.offset}, {args.images} images, {args.epochs} epochs x batch {args.batch}, "
            f"lr {args.lr}, {args.model} ({args.init}); granted: {args.grant}; "
            f">= {BAR:g} dB after MSE matching, paper: > {BAR:g} dB after PSNR matching"
        )
        for seed in seeds:
            start = args.offset + seed * args.images
            idx = np.arange(start, start + args.images)
            model, update, x, y, schedule = client_update(data, idx, args, seed)
            if args.floor:
                cases = floor(model, update, x, y, schedule, args, seed)
                print(
                    f"seed {seed} floor (cosine distance of the true images' replay): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in cases.items()),
                    flush=True,
                )
            threat = threat_for(args.grant, y, schedule, update.local_steps, args)
            for name in attacks:
                t, cpu = time.perf_counter(), time.process_time()
                res = (sim if name == "fedavg-sim" else ig)(model, update, data.input_shape, threat, seed=seed)
                row = {
                    "seed": seed,
                    "attack": name,
                    "grant": args.grant,
                    "images": args.images,
                    "epochs": args.epochs,
                    "batch": args.batch,
                    "lr": args.lr,
                    **score(res, x, y, data.num_classes),
                }
                row["seconds"], row["cpu_seconds"] = time.perf_counter() - t, time.process_time() - cpu
                print(
                    f"seed {seed} {name:10s} >=20dB {row['frac_20db']:.2f}  paper {row['paper_frac']:.2f}  "
                    f"blank+{OVER_BLANK:.1f}dB {row['frac_over_blank']:.2f}  median {row['median_psnr']:.1f} dB "
                    f"(blank {row['median_blank_psnr']:.1f})  label counts {row['label_count_accuracy']:.2f}  "
                    f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU)  ({row['steps']} steps, {row['status']})",
                    flush=True,
                )
                if writer:
                    writer.writerow(row)
                    out.flush()
    finally:
        torch.set_num_threads(threads)
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
