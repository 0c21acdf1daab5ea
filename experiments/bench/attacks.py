"""Benchmark one attack on real images, one row per image (or batch), over one or more model seeds.

    python -m experiments.bench.attacks --attack dlg --model lenet \\
        --data npz:data/cifar100_test20.npz --images 20 --seeds 0-4
    python -m experiments.bench.attacks --attack rgap --model cnn6 \\
        --data npz:data/cifar10_test150.npz --images 20 --label random --no-labels

For each seed the model is initialised as the attack's paper did (``init="paper"``, seeded by
the seed); the attack's own draws are seeded by the seed plus the image's position. Each
image's update is the gradient of the training loss on that image alone (``--batch`` for
more). Heads: DLG's LeNet has a softmax head over the dataset's classes and the dataset's
label; R-GAP's CNN6 family a single logit with the logistic loss and a binary label:
``--label demo`` is R-GAP's demo label (the one opposite to the model's prediction, for which
the head's equation has one root), ``--label random`` a seeded random one (half of them agree
with the prediction: the two-root case). Labels are granted to R-GAP (its paper's threat
model) and to no other attack, unless ``--labels-known`` / ``--no-labels`` say otherwise; label
accuracy is reported only where the label was not granted.

With ``--batch N`` each update is the mean gradient of N consecutive images (the last batch
may be smaller) and the attack is told the batch size, not the labels; its reconstructions are
matched to the true images (``attacks.metrics.match_batch``) before scoring, labels after the
same matching; an image's row carries the batch's seconds divided by N and the batch's
objective evaluations. DLG and iDLG switch to their batch rules by themselves
(``attacks.dlg.for_batch``: pixels kept in [0, 1], a small total-variation prior). A model with
BatchNorm (``resnet18``, ``resnet18_w16``) is trained and attacked in train mode, and the
batch's BatchNorm statistics are granted (``ThreatModel.bn_statistics``: what the client's
buffers disclose), which only ``gradinversion`` reads. ``--start N`` skips a file's first N
images and ``--exclude npz:FILE`` leaves out the images of a tuning set (by official index).

Prints one line per image, one summary line per seed (successes at >= 30 dB, median, minimum
and mean PSNR, labels, median seconds and objective evaluations per image) and, for several
seeds, an overall line; ``--out`` writes the rows as CSV. ``--versus KEY=VALUE`` attacks every
image a second time with those options on top (variant B) and prints B against A: medians of
the per-image ratios of seconds and evaluations, measured side by side in this process, and
of the PSNR difference (e.g. ``--versus optimizer="'torch'"``, ``--versus settle=0.0``, or for
R-GAP ``--versus fresh-solver``). Timings are wall-clock seconds of the attack call; the
evaluation counts do not depend on the machine or its load. Bad input (an unknown dataset, a
malformed file, an unwritable ``--out``, a bad option) ends with one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import inspect
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch

from attacks import ATTACKS, SUCCESS_PSNR, AttackResult, ThreatModel, get_attack, score_batch, training_loss
from attacks.dlg import DEFAULT as DLG_DEFAULT
from attacks.dlg import FAITHFUL
from attacks.gradinversion import batchnorm_layers, bn_batch_statistics
from attacks.rgap import RGAP, RGAPOptions
from fl_sim.data import DatasetError, load_dataset, read_npz
from fl_sim.device import DeviceError, resolve_device
from fl_sim.models import build_model, model_names

FIELDS = [
    "seed",
    "variant",
    "index",
    "label",
    "psnr",
    "mse",
    "ssim",
    "label_correct",
    "seconds",
    "steps",
    "evaluations",
    "status",
    "reason",
]


class BenchError(Exception):
    """Bad input; the message is one line for the user (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.bench.attacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--attack", required=True, choices=list(ATTACKS))
    p.add_argument("--model", required=True, choices=model_names())
    p.add_argument(
        "--data", required=True, help="npz:PATH (keys images, labels), e.g. npz:data/cifar10_test150.npz, or mnist5k"
    )
    p.add_argument("--images", type=int, default=20, help="attack the first N images (default: 20)")
    p.add_argument("--batch", type=int, default=1, help="images per update (default: 1)")
    p.add_argument(
        "--start",
        type=int,
        default=0,
        help="skip the file's first N images (an evaluation set further into a file; default: 0)",
    )
    p.add_argument(
        "--exclude",
        default=None,
        metavar="npz:PATH",
        help="leave out every image whose official index is in this file (a tuning set), e.g. "
        "npz:data/cifar10_test150.npz",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=None, help="one seed (the model's initialisation and the attack's draws)"
    )
    seeds.add_argument(
        "--seeds", default=None, metavar="SPEC", help="several seeds, one run each: 0-4, 0,1,2 or 0-2,7 (default: 0)"
    )
    p.add_argument(
        "--head",
        choices=["paper", "multiclass", "logit"],
        default="paper",
        help="paper (the default): a logit for the CNN6 family (R-GAP), softmax otherwise",
    )
    p.add_argument(
        "--label",
        choices=["demo", "random"],
        default=None,
        help="a logit head's binary label: demo (opposite to the model's prediction, R-GAP's demo; "
        "the default) or random (seeded)",
    )
    grant = p.add_mutually_exclusive_group()
    grant.add_argument("--labels-known", action="store_true", help="grant the attacker the labels")
    grant.add_argument(
        "--no-labels", action="store_true", help="grant no labels, R-GAP included (it then recovers them)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap on the attack's optimisation steps")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the attack (a Python literal), e.g. image_std=1.0; repeatable",
    )
    p.add_argument(
        "--faithful", action="store_true", help="dlg/idlg: the original algorithm (attacks.dlg.FAITHFUL, 300 steps)"
    )
    p.add_argument(
        "--fresh-solver",
        action="store_true",
        help="rgap: a new solver per image (no reuse of the weights' matrices across images)",
    )
    p.add_argument(
        "--versus",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also run every image with these options on top (variant B; the word fresh-solver: R-GAP "
        "with a new solver per image) and print B against A; repeatable",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch intra-op threads; 1 because the attacks' small operations gain little from a "
        "second thread, and on a shared machine a busy core makes two threads many times slower (default: 1)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the attacks compute: auto (cuda when torch sees a GPU), cpu or cuda; the updates are "
        "computed on the CPU either way (default: auto)",
    )
    p.add_argument("--out", default=None, help="CSV with one row per image")
    return p


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class BenchImages:
    """The first ``n`` images of a dataset as the benchmark uses them: float32 in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    index: np.ndarray
    notes: tuple[str, ...] = ()  # repairs the reader made, one line each


def load_images(name: str, n: int, start: int = 0, exclude: str | None = None) -> BenchImages:
    """``npz:PATH`` (checked by :func:`fl_sim.data.read_npz`; all of it, the official
    indices kept) or a dataset name of :func:`fl_sim.data.load_dataset` (its training split).
    Raises ``BenchError`` with one line."""
    try:
        if exclude is not None and not exclude.startswith("npz:"):
            raise BenchError(f"--exclude takes npz:PATH, got {exclude!r}")
        if name.startswith("npz:"):
            z = read_npz(name[4:])
            keep = np.arange(start, len(z.labels))
            if exclude is not None:
                held = set(read_npz(exclude[4:]).index.tolist())
                keep = np.array([i for i in keep if int(z.index[i]) not in held], dtype=np.int64)
            keep = keep[:n]
            x, y, classes, index, notes = z.images[keep], z.labels[keep], z.num_classes, z.index[keep], z.notes
        else:
            data = load_dataset(name)
            x, y, classes, notes = data.train_x[:n], data.train_y[:n], data.num_classes, data.notes
            index = np.arange(len(x))
    except DatasetError as exc:
        raise BenchError(str(exc)) from None
    return BenchImages(x.float() / 255, y, classes, index, notes)


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"`` -> 0..4, ``"0,2"`` -> 0, 2, ``"0-2,7"`` -> 0, 1, 2, 7 (in order, no repeats)."""
    seeds: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise BenchError(f"--seeds takes numbers and ranges such as 0-4 or 0,1,2, got {spec!r}") from None
        if first < 0 or last < first:
            raise BenchError(f"--seeds: {part.strip()!r} is not a range of non-negative seeds")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return seeds


def open_out(path: str | None) -> TextIO | None:
    """The CSV file for ``--out``, opened before any attack runs; ``BenchError`` when it
    cannot be written."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise BenchError(f"--out {p} is a folder: give a file name")
    try:
        return p.open("w", newline="")
    except OSError as exc:
        raise BenchError(f"--out {p}: cannot write ({exc.strerror or type(exc).__name__})") from None


# --------------------------------------------------------------------------- options


def _literal_options(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (values are Python literals) as a dict."""
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


@dataclass(frozen=True)
class Variant:
    """One way of running the attack: the options given (on top of the attack's defaults, or
    of FAITHFUL), whether R-GAP gets a new solver per image, and a maker of the attack
    callable (for R-GAP a new solver per call; the other attacks are plain functions)."""

    name: str
    overrides: dict[str, Any]
    fresh_solver: bool
    make: Callable[[], Callable[..., AttackResult]]

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.overrides.items()] + (
            ["fresh solver per image"] if self.fresh_solver else []
        )
        return ", ".join(parts) or "defaults"


def make_variant(args: argparse.Namespace, name: str, overrides: dict[str, Any], fresh_solver: bool) -> Variant:
    """A :class:`Variant`, its options validated once (``BenchError`` on a bad one)."""
    if args.faithful and args.attack not in ("dlg", "idlg"):
        raise BenchError("--faithful applies to dlg and idlg only")
    if fresh_solver and args.attack != "rgap":
        raise BenchError("--fresh-solver applies to rgap only")
    fn = get_attack(args.attack)
    try:
        if args.attack in ("dlg", "idlg"):
            opts = (FAITHFUL if args.faithful else DLG_DEFAULT).override(overrides, attack=args.attack)
            return Variant(name, overrides, fresh_solver, lambda: lambda *a, **k: fn(*a, options=opts, **k))
        if args.attack == "rgap":
            rgap_opts = RGAPOptions().override(overrides, attack="rgap")
            return Variant(name, overrides, fresh_solver, lambda: RGAP(rgap_opts))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"seed"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise BenchError(f"{args.attack} has no option {', '.join(unknown)} (options: {', '.join(sorted(accepted))})")
    return Variant(name, overrides, fresh_solver, lambda: lambda *a, **k: fn(*a, **overrides, **k))


def variants(args: argparse.Namespace) -> list[Variant]:
    """``A`` from ``--faithful``, ``--max-steps``, ``--option`` and ``--fresh-solver``; with
    ``--versus``, ``B``: the same with the ``--versus`` options on top (the word
    ``fresh-solver`` there gives R-GAP a new solver per image)."""
    overrides = _literal_options(args.option, "--option")
    if args.max_steps:
        overrides = {"max_steps": args.max_steps, **overrides}
    out = [make_variant(args, "A", overrides, args.fresh_solver)]
    if args.versus:
        fresh = "fresh-solver" in args.versus
        extra = _literal_options([v for v in args.versus if v != "fresh-solver"], "--versus")
        out.append(make_variant(args, "B", {**overrides, **extra}, args.fresh_solver or fresh))
    return out


# --------------------------------------------------------------------------- the runs


def _targets(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, head: str, rule: str, gen: torch.Generator | None
) -> torch.Tensor:
    """The labels the client trains on: the dataset's for a softmax head; for a logit head
    R-GAP's demo label (opposite to the prediction) or a seeded random one."""
    if head != "logit":
        return y
    if rule == "random":
        return torch.randint(0, 2, (len(x),), generator=gen)
    with torch.no_grad():
        return (model(x).squeeze(-1) <= 0).long()


def _attack_rows(
    attack: Callable[..., AttackResult],
    model: torch.nn.Module,
    grads: list[torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    threat: ThreatModel,
    seed: int,
) -> list[dict]:
    """Run one attack on one update; one row per image of the batch (an exception is a row)."""
    t0 = time.perf_counter()
    try:
        res = attack(model, grads, tuple(x.shape[1:]), threat, seed=seed)
        scores = score_batch(res.images, x, res.labels, target)
        status, reason, steps, secs = res.status, "", res.steps, res.seconds or time.perf_counter() - t0
        evaluations = res.diagnostics.get("evaluations", math.nan)
    except Exception as exc:  # noqa: BLE001 - a failed image is a row, not the end of the benchmark
        scores = [{"psnr": math.nan, "mse": math.nan, "ssim": math.nan, "label_correct": math.nan}] * len(x)
        status, reason, steps, secs = "error", f"{type(exc).__name__}: {exc}"[:200], 0, time.perf_counter() - t0
        evaluations = math.nan
    granted = threat.labels is not None
    return [
        {
            "psnr": sc["psnr"],
            "mse": sc["mse"],
            "ssim": sc["ssim"],
            "label_correct": math.nan if granted else sc.get("label_correct", math.nan),
            "seconds": secs / len(x),
            "steps": steps,
            "evaluations": evaluations,
            "status": status,
            "reason": reason,
        }
        for sc in scores
    ]


def _run_seed(
    args: argparse.Namespace,
    seed: int,
    data: BenchImages,
    head: str,
    runs: list[Variant],
    granted: bool,
    write: Callable[[dict], None],
) -> dict[str, list[dict]]:
    """Every image (or batch) of one seed, attacked by every variant; rows by variant."""
    kwargs = {"head": head} if args.model.startswith("cnn6") else {}
    model = build_model(args.model, tuple(data.images.shape[1:]), data.num_classes, init="paper", seed=seed, **kwargs)
    # a model with BatchNorm is attacked as a client trains it: in train mode, on the batch's statistics
    model.train(any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()))
    # the client's gradients on the CPU model; the attacks on a copy where --device says
    attacked = copy.deepcopy(model).to(args.device)
    label_gen = torch.Generator().manual_seed(seed)
    attacks = {v.name: v.make() for v in runs}
    rows: dict[str, list[dict]] = {v.name: [] for v in runs}
    for number, start in enumerate(range(0, len(data.images), args.batch)):
        x, y = data.images[start : start + args.batch], data.labels[start : start + args.batch]
        target = _targets(model, x, y, head, args.label or "demo", label_gen)
        # the client trains a copy (a train-mode BatchNorm moves its running statistics); the attack gets
        # the weights the client started from and, with BatchNorm, the batch's statistics its buffers disclose
        client = copy.deepcopy(model)
        grads = [g.detach() for g in torch.autograd.grad(training_loss(client(x), target), list(client.parameters()))]
        bn = bn_batch_statistics(model, client) if batchnorm_layers(model) and model.training else None
        threat = ThreatModel(labels=target if granted else None, batch_size=len(x), bn_statistics=bn)
        # alternate which variant goes first, so that drifting load falls on both alike
        for v in runs if number % 2 == 0 else runs[::-1]:
            if v.fresh_solver:
                attacks[v.name] = v.make()
            for i, row in enumerate(_attack_rows(attacks[v.name], attacked, grads, x, target, threat, seed + start)):
                row = {
                    "seed": seed,
                    "variant": v.name,
                    "index": int(data.index[start + i]),
                    "label": int(target[i]),
                    **row,
                }
                rows[v.name].append(row)
                write(row)
                lab = (
                    "granted"
                    if granted
                    else ("--" if math.isnan(row["label_correct"]) else "ok" if row["label_correct"] == 1 else "WRONG")
                )
                evals = "" if math.isnan(row["evaluations"]) else f"  {row['evaluations']:6.0f} evals"
                tag = f"{v.name}  " if len(runs) > 1 else ""
                print(
                    f"  {tag}seed {seed}  image {row['index']:5d}  label "
                    f"{row['label']:3d}  PSNR {row['psnr']:6.2f} dB  "
                    f"SSIM {row['ssim']:.3f}  label {lab}  {row['seconds']:6.2f} s  {row['steps']:5d} steps{evals}  "
                    f"{row['status']}",
                    flush=True,
                )
    return rows


def _psnr(row: dict) -> float:
    return row["psnr"] if not math.isnan(row["psnr"]) else -math.inf


def summary(rows: list[dict], granted: bool) -> str:
    """One line: successes, median / min / mean PSNR, labels, median s and evaluations per image."""
    psnrs = [_psnr(r) for r in rows]
    finite = [min(p, 300.0) for p in psnrs if p > -math.inf]
    labels = [r["label_correct"] for r in rows if not math.isnan(r["label_correct"])]
    evals = [r["evaluations"] for r in rows if not math.isnan(r["evaluations"])]
    label_text = (
        "labels granted" if granted else (f"labels {100 * statistics.mean(labels):.0f}%" if labels else "labels --")
    )
    return (
        f"success (>= {SUCCESS_PSNR:.0f} dB) {sum(p >= SUCCESS_PSNR for p in psnrs)}/{len(rows)} | "
        f"median PSNR {statistics.median(psnrs):.2f} dB | min {min(psnrs):.2f} dB | "
        f"mean {statistics.mean(finite) if finite else math.nan:.2f} dB | {label_text} | "
        f"median {statistics.median(r['seconds'] for r in rows):.2f} s/image"
        + (f" | median {statistics.median(evals):.0f} evaluations/image" if evals else "")
    )


def comparison(a: list[dict], b: list[dict]) -> str:
    """B against A on the same images: medians of the per-image ratios of seconds and
    evaluations (both measured in this process, side by side) and of the PSNR difference."""

    def ratio(key: str) -> str:
        pairs = [
            rb[key] / ra[key]
            for ra, rb in zip(a, b)
            if ra[key] > 0 and not (math.isnan(ra[key]) or math.isnan(rb[key]))
        ]
        return f"{statistics.median(pairs):.2f}" if pairs else "--"

    diffs = [min(_psnr(rb), 300.0) - min(_psnr(ra), 300.0) for ra, rb in zip(a, b)]
    return (
        f"B/A seconds {ratio('seconds')} | B/A evaluations {ratio('evaluations')} | "
        f"B - A PSNR {statistics.median(diffs):+.2f} dB (median per image)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--images, --batch and --threads must be >= 1")
    out_file = None
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed if args.seed is not None else 0]
        head = args.head if args.head != "paper" else ("logit" if args.model.startswith("cnn6") else "multiclass")
        if head == "logit" and args.model == "lenet":
            raise BenchError("lenet has a softmax head only")
        if args.label is not None and head != "logit":
            raise BenchError("--label applies to a single-logit head (--head logit, or the cnn6 family)")
        runs = variants(args)
        try:
            args.device = str(resolve_device(args.device))
        except DeviceError as exc:
            raise BenchError(f"--device: {exc}") from None
        data = load_images(args.data, args.images, args.start, args.exclude)
        out_file = open_out(args.out)
    except BenchError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    writer = csv.DictWriter(out_file, FIELDS) if out_file else None
    if writer:
        writer.writeheader()

    def write(row: dict) -> None:
        if writer:
            writer.writerow(row)
            out_file.flush()

    granted = args.labels_known or (args.attack == "rgap" and not args.no_labels)
    print(
        f"{args.attack}{' (faithful)' if args.faithful else ''} on "
        f"{args.model} ({head} head, paper init), {args.data}: "
        f"{len(data.images)} images in batches of {args.batch}, seeds {', '.join(map(str, seeds))}"
        + (f", label {args.label or 'demo'}" if head == "logit" else "")
        + f", labels {'granted' if granted else 'not granted'}, {args.threads} thread(s) on {args.device}"
        + (f", options {runs[0].describe()}" if runs[0].overrides or runs[0].fresh_solver else ""),
        flush=True,
    )
    if len(runs) > 1:
        print(f"A: {runs[0].describe()}; B: {runs[1].describe()} (each image attacked by both, in alternating order)")
    for note in data.notes:
        print(f"note: {note}", flush=True)
    per_seed: dict[int, dict[str, list[dict]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for seed in seeds:
            per_seed[seed] = _run_seed(args, seed, data, head, runs, granted, write)
    finally:
        torch.set_num_threads(threads)  # main() called in-process: the caller's count back
        if out_file:
            out_file.close()
    for v in runs:
        tag = f"{v.name} " if len(runs) > 1 else ""
        for seed, by_variant in per_seed.items():
            print(f"{tag}seed {seed}: {summary(by_variant[v.name], granted)}")
        if len(seeds) > 1:
            every = [r for by_variant in per_seed.values() for r in by_variant[v.name]]
            medians = [statistics.median(map(_psnr, by_variant[v.name])) for by_variant in per_seed.values()]
            print(f"{tag}all {len(seeds)} seeds: {summary(every, granted)} | lowest seed median {min(medians):.2f} dB")
    if len(runs) > 1:
        for seed, by_variant in per_seed.items():
            print(f"seed {seed}: {comparison(by_variant['A'], by_variant['B'])}")
        if len(seeds) > 1:
            print(
                f"all {len(seeds)} seeds: {comparison(*([r for bv in per_seed.values() for r in bv[k]] for k in 'AB'))}"
            )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
