"""Benchmark one attack on real images, one row per image (or batch).

    python -m experiments.bench_attacks --attack rgap --model cnn6 \\
        --data npz:../shared/data/cifar10_test150.npz --images 20 --out rgap.csv

The model is initialised as the attack's paper did (``init="paper"``, seeded), once for the
whole run. Each image's update is the gradient of the training loss on that image alone
(``--batch`` for more). Heads: DLG's LeNet has a softmax head over the dataset's classes;
R-GAP's CNN6 family a single logit with the logistic loss, and the label R-GAP's demo uses
(the one opposite to the model's prediction, so the gradient is not vanishingly small).
Prints the median and mean PSNR, the success rate (PSNR >= 30 dB), the median seconds per
image and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import ast
import csv
import inspect
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

FIELDS = ["index", "label", "psnr", "mse", "ssim", "label_correct", "seconds", "steps", "status", "reason"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from attacks import ATTACKS
    from fl_sim.models import model_names

    p = _Parser(prog="python -m experiments.bench_attacks", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attack", required=True, choices=list(ATTACKS))
    p.add_argument("--model", required=True, choices=model_names())
    p.add_argument("--data", required=True, help="npz:PATH (keys images, labels), e.g. npz:../shared/data/cifar10_test150.npz, or mnist5k")
    p.add_argument("--images", type=int, default=20, help="attack the first N images")
    p.add_argument("--batch", type=int, default=1, help="images per update")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and of the attack's draws")
    p.add_argument("--head", choices=["paper", "multiclass", "logit"], default="paper",
                   help="paper: a logit for the CNN6 family (R-GAP), softmax otherwise")
    p.add_argument("--labels-known", action="store_true", help="grant the attacker the labels (R-GAP always has them)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the attack's optimisation steps")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the attack function (a Python literal), e.g. image_std=1.0; repeatable")
    p.add_argument("--faithful", action="store_true",
                   help="dlg/idlg: the original algorithm (attacks.dlg.FAITHFUL, 300 steps)")
    p.add_argument("--out", default=None, help="CSV with one row per image")
    return p


def _images(name: str, n: int):
    """The first ``n`` images (float in [0, 1], NCHW), labels, class count and dataset indices."""
    from fl_sim.data import load_dataset

    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        if not path.is_file():
            raise ValueError(f"npz file not found: {path}")
        with np.load(path) as z:
            x, y = z["images"][:n], z["labels"][:n].astype(np.int64)
            classes = len(z["classes"]) if "classes" in z.files else int(z["labels"].max()) + 1
            index = z["index"][:n] if "index" in z.files else np.arange(len(x))
        if x.ndim == 3:
            x = x[:, None]
        elif x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        return torch.from_numpy(x.astype(np.float32) / 255), torch.from_numpy(y), classes, index
    data = load_dataset(name)
    return data.train_x[:n].float() / 255, data.train_y[:n], data.num_classes, np.arange(n)


def _options(args: argparse.Namespace) -> dict:
    """The attack's keyword options from ``--faithful``, ``--max-steps`` and ``--option``."""
    from attacks import get_attack
    from attacks.dlg import FAITHFUL, dlg

    options: dict = {}
    if args.faithful:
        if args.attack not in ("dlg", "idlg"):
            raise ValueError("--faithful applies to dlg and idlg only")
        options.update(FAITHFUL, max_steps=300)
    if args.max_steps:
        options["max_steps"] = args.max_steps
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--option {key}: {value!r} is not a Python literal") from None
    fn = dlg if args.attack == "idlg" else get_attack(args.attack)  # idlg passes its options to dlg
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"seed"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{args.attack} has no option {', '.join(unknown)} (options: {', '.join(sorted(accepted))})")
    return options


def main(argv: list[str] | None = None) -> int:
    from attacks import SUCCESS_PSNR, ThreatModel, get_attack, score_batch, training_loss
    from fl_sim.models import build_model

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1:
        parser.error("--images and --batch must be >= 1")
    try:
        x_all, y_all, classes, index = _images(args.data, args.images)
    except (ValueError, KeyError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    head = args.head if args.head != "paper" else ("logit" if args.model.startswith("cnn6") else "multiclass")
    kwargs = {"head": head} if args.model.startswith("cnn6") else {}
    if head == "logit" and args.model == "lenet":
        parser.error("lenet has a softmax head only")
    model = build_model(args.model, tuple(x_all.shape[1:]), classes, init="paper", seed=args.seed, **kwargs).eval()
    attack = get_attack(args.attack)
    try:
        options = _options(args)
    except ValueError as exc:
        parser.error(str(exc))

    rows: list[dict] = []
    out_file = open(args.out, "w", newline="") if args.out else None
    writer = csv.DictWriter(out_file, FIELDS) if out_file else None
    if writer:
        writer.writeheader()
    print(f"{args.attack} on {args.model} ({head} head, paper init, seed {args.seed}), {args.data}: "
          f"{len(x_all)} images in batches of {args.batch}"
          + (f", options {', '.join(f'{k}={v}' for k, v in options.items())}" if options else ""), flush=True)
    for start in range(0, len(x_all), args.batch):
        x, y = x_all[start:start + args.batch], y_all[start:start + args.batch]
        with torch.no_grad():
            logits = model(x)
        # R-GAP's demo label for a logit: the class opposite to the prediction.
        target = (logits.squeeze(-1) <= 0).long() if head == "logit" else y
        grads = torch.autograd.grad(training_loss(model(x), target), list(model.parameters()))
        labels_granted = args.attack == "rgap" or args.labels_known
        threat = ThreatModel(labels=target if labels_granted else None, batch_size=len(x))
        t0 = time.perf_counter()
        try:
            res = attack(model, [g.detach() for g in grads], tuple(x.shape[1:]), threat, seed=args.seed + start, **options)
            scores = score_batch(res.images, x, res.labels, target)
            status, reason, steps, secs = res.status, "", res.steps, res.seconds or time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failed image is a row, not the end of the benchmark
            scores = [{"psnr": math.nan, "mse": math.nan, "ssim": math.nan, "label_correct": math.nan}] * len(x)
            status, reason, steps, secs = "error", f"{type(exc).__name__}: {exc}"[:200], 0, time.perf_counter() - t0
        for i, sc in enumerate(scores):
            row = {"index": int(index[start + i]), "label": int(target[i]), "psnr": sc["psnr"], "mse": sc["mse"],
                   "ssim": sc["ssim"], "label_correct": sc.get("label_correct", math.nan), "seconds": secs / len(x),
                   "steps": steps, "status": status, "reason": reason}
            rows.append(row)
            if writer:
                writer.writerow(row)
                out_file.flush()
            print(f"  image {row['index']:5d}  label {row['label']:3d}  PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.3f}  "
                  f"label {'ok' if row['label_correct'] == 1 else '--' if math.isnan(row['label_correct']) else 'WRONG'}  "
                  f"{row['seconds']:6.2f} s  {row['steps']:5d} steps  {status}", flush=True)
    if out_file:
        out_file.close()

    psnrs = [r["psnr"] if not math.isnan(r["psnr"]) else -math.inf for r in rows]
    finite = [min(p, 300.0) for p in psnrs if p > -math.inf]
    labels = [r["label_correct"] for r in rows if not math.isnan(r["label_correct"])]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"median PSNR {statistics.median(psnrs):.2f} dB | mean PSNR {statistics.mean(finite) if finite else math.nan:.2f} dB | "
          f"min {min(psnrs):.2f} dB | success (>= {SUCCESS_PSNR:.0f} dB) {sum(p >= SUCCESS_PSNR for p in psnrs)}/{len(rows)} | "
          f"labels {100 * statistics.mean(labels) if labels else math.nan:.0f}% | "
          f"median {statistics.median(r['seconds'] for r in rows):.2f} s/image | peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
