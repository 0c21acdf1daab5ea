"""The batch table: attacks on batches of 4, 8 and 16 images, per model, over model seeds, on an
evaluation set that no constant of the attacks was tuned on; and the label counts' exactness.

    python -m experiments.bench.batches --labels-only --models lenet,cnn6,resnet18_w16 \\
        --data npz:data/cifar10_test.npz --start 5000 --exclude npz:data/cifar10_test150.npz --images 96
    python -m experiments.bench.batches --models lenet --attacks dlg --batches 4,8,16 --seeds 0-2 \\
        --data npz:data/cifar10_test.npz --start 5000 --exclude npz:data/cifar10_test150.npz --images 16 \\
        --out-dir runs/batches
    python -m experiments.bench.batches --summarise runs/batches

Each (model, attack, batch) cell is one run of :mod:`experiments.bench.attacks` (its rows in
``OUT_DIR/ATTACK_MODEL_bBATCH.csv``, the model initialised as its attack paper did, labels not
granted, the batch size granted); ``--summarise`` prints the table from those files: per cell the
images and seeds, successes at >= 30 dB, the median PSNR over images and the lowest per-seed
median. ``--labels-only`` counts, per model and seed, the batches of ``--label-batch`` images
whose label counts :func:`attacks.labels.batch_label_counts` gets exactly right. Models with
BatchNorm are run in train mode (the client's). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

import torch

from attacks import ATTACKS, SUCCESS_PSNR, training_loss
from attacks.labels import batch_label_counts
from fl_sim.models import build_model, model_names

from .attacks import BenchError, load_images, parse_seeds
from .attacks import main as attacks_main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.batches", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet", help="comma-separated models (default: lenet)")
    p.add_argument("--attacks", default="dlg", help="comma-separated attacks (default: dlg)")
    p.add_argument("--batches", default="4,8,16", help="comma-separated batch sizes (default: 4,8,16)")
    p.add_argument("--seeds", default="0-2", help="model seeds, e.g. 0-2 (default)")
    p.add_argument("--data", default=None, help="npz:PATH, e.g. npz:data/cifar10_test.npz")
    p.add_argument("--start", type=int, default=0, help="skip the file's first N images")
    p.add_argument("--exclude", default=None, help="npz:PATH of a tuning set whose images are left out")
    p.add_argument("--images", type=int, default=16, help="images per seed (default: 16)")
    p.add_argument("--out-dir", default=None, help="folder for the cells' CSV files")
    p.add_argument("--option", action="append", default=[], help="an attack option KEY=VALUE, for every cell")
    p.add_argument("--labels-only", action="store_true", help="only the label counts' exactness")
    p.add_argument("--label-batch", type=int, default=8, help="batch size for --labels-only (default: 8)")
    p.add_argument("--summarise", default=None, metavar="DIR", help="print the table from a folder of cell CSVs")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def label_exactness(args: argparse.Namespace, models: list[str], seeds: list[int]) -> int:
    data = load_images(args.data, args.images, args.start, args.exclude)
    b = args.label_batch
    print(f"label counts, batches of {b}, {len(data.images) // b * b} images from {args.data} (start {args.start})")
    for name in models:
        kwargs = {"head": "multiclass"} if name.startswith("cnn6") else {}
        exact = total = 0
        for seed in seeds:
            model = build_model(name, tuple(data.images.shape[1:]), data.num_classes, init="paper", seed=seed, **kwargs)
            model.train(any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()))
            for start in range(0, len(data.images) - b + 1, b):
                x, y = data.images[start : start + b], data.labels[start : start + b]
                grads = [g.detach() for g in torch.autograd.grad(training_loss(model(x), y), list(model.parameters()))]
                counts = batch_label_counts(model, grads, b)
                exact += bool((counts == torch.bincount(y, minlength=data.num_classes)).all())
                total += 1
        print(f"{name:14s} exact label counts in {exact}/{total} batches ({100 * exact / total:.0f}%), seeds {seeds}")
    return 0


def summarise(folder: Path) -> int:
    def key(f: Path) -> tuple[str, str, int]:
        head, _, batch = f.stem.rpartition("_b")
        return head.partition("_")[2], head.partition("_")[0], int(batch) if batch.isdigit() else 0

    files = sorted(folder.glob("*_b*.csv"), key=key)
    if not files:
        raise BenchError(f"no cell files (ATTACK_MODEL_bN.csv) in {folder}")
    print("| model | attack | batch | images x seeds | >= 30 dB | median dB | lowest seed median dB | labels |")
    print("|---|---|---|---|---|---|---|---|")
    for f in files:
        rows = list(csv.DictReader(f.open()))
        if not rows:
            continue
        attack, _, rest = f.stem.partition("_")
        model, _, batch = rest.rpartition("_b")
        psnr = [float(r["psnr"]) if r["psnr"] not in ("", "nan") else -math.inf for r in rows]
        by_seed: dict[str, list[float]] = {}
        for r, p in zip(rows, psnr):
            by_seed.setdefault(r["seed"], []).append(p)
        labels = [float(r["label_correct"]) for r in rows if r["label_correct"] not in ("", "nan")]
        per_seed = {s: len(v) for s, v in by_seed.items()}
        shape = f"{statistics.median(per_seed.values()):.0f} x {len(by_seed)}"
        label_text = f"{100 * statistics.mean(labels):.0f}%" if labels else "--"
        print(
            f"| {model} | {attack} | {batch} | {shape} | {sum(p >= SUCCESS_PSNR for p in psnr)}/{len(psnr)} | "
            f"{statistics.median(psnr):.1f} | {min(statistics.median(v) for v in by_seed.values()):.1f} | "
            f"{label_text} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.summarise:
            return summarise(Path(args.summarise))
        models, attacks = _split(args.models), _split(args.attacks)
        seeds = parse_seeds(args.seeds)
        unknown = [m for m in models if m not in model_names()] + [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise BenchError(f"unknown model or attack: {', '.join(unknown)}")
        if args.data is None:
            raise BenchError("--data is required (npz:PATH)")
        if args.labels_only:
            return label_exactness(args, models, seeds)
        if args.out_dir is None:
            raise BenchError("--out-dir is required for the table")
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        batches = [int(b) for b in _split(args.batches)]
    except (BenchError, ValueError, OSError) as exc:
        print(f"python -m experiments.bench.batches: error: {exc}", file=sys.stderr)
        return 2
    for model in models:
        for attack in attacks:
            for batch in batches:
                cell = [
                    "--attack", attack, "--model", model, "--data", args.data, "--start", str(args.start),
                    "--images", str(args.images), "--batch", str(batch), "--seeds", args.seeds,
                    "--head", "multiclass", "--out", str(out / f"{attack}_{model}_b{batch}.csv"),
                ]  # fmt: skip
                if args.exclude:
                    cell += ["--exclude", args.exclude]
                for option in args.option:
                    cell += ["--option", option]
                code = attacks_main(cell)
                if code:
                    return code
    return summarise(out)


if __name__ == "__main__":
    sys.exit(main())
