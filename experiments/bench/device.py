"""What each attack costs on the device ``--device`` resolves to: seconds per image for DLG, iDLG,
Inverting Gradients and R-GAP, and seconds per update for the FedAvg attack (fedavg-sim).

    python -m experiments.bench.device --device auto [--images 3] [--cifar npz:data/cifar10_test150.npz]

Two settings, one image per FedSGD gradient (the papers'):

- DLG's LeNet (U(-0.5, 0.5)) on CIFAR-10 images (3x32x32, ``--cifar``; skipped with a note
  when the archive is absent: ``scripts/make_npz.py`` makes it, docs/data.md);
- CNN6 (He-normal, a 10-class head: the federation's model) on the mnist5k digits (1x28x28).

The budgets are small on purpose (``--dlg-steps``, ``--ig-steps``, ``--fedavg-steps``): this
measures the cost of an attack's steps on a device, not what the attack recovers at its full
budget. The PSNR printed beside each time only shows that the attack ran. The FedAvg attack
attacks one CNN6 update of ``--fedavg-images`` digits trained for ``--fedavg-epochs`` epochs
in batches of ``--fedavg-batch`` at learning rate 0.004 (the paper's), with the batch size
granted and the labels estimated.

The client's update is computed on the CPU and handed to the attack with a copy of the model
on the device. Each time is the wall clock of the attack call, with the device synchronised
before the clock stops; the median over the images. Threads: ``--threads`` (default 1, as
the run's attack jobs use).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from attacks import AttackResult, FedAvgSim, ThreatModel, Update, get_attack, score_batch, training_loss
from attacks.inverting import simulate_local_update
from fl_sim.data import DatasetError, load_dataset, read_npz, to_float
from fl_sim.device import DeviceError, resolve_device
from fl_sim.models import build_model

from ..cli import Parser

__all__ = ["main", "FEDAVG_LR"]

FEDAVG_LR = 0.004  # Dimitrov et al.'s local learning rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, call: Callable[[], AttackResult]) -> tuple[AttackResult, float]:
    """The attack's result and its wall-clock seconds, the device's queue drained at both ends."""
    _sync(device)
    start = time.perf_counter()
    result = call()
    _sync(device)
    return result, time.perf_counter() - start


def _gradient(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """The client's FedSGD update of one batch, on the CPU."""
    loss = training_loss(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _warm(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward and backward on the device before any clock runs (CUDA's start-up, kernels)."""
    device = next(model.parameters()).device
    _gradient(model, x.to(device), y.to(device))
    _sync(device)


def attack_rows(
    setting: str, model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, budgets: dict[str, dict]
) -> list[dict[str, Any]]:
    """Every attack of ``budgets`` on every image's gradient: one row per (attack, image)."""
    on_device = copy.deepcopy(model).to(device)
    _warm(on_device, images[:1], labels[:1])
    shape = tuple(images.shape[1:])
    rows = []
    for name, options in budgets.items():
        attack = get_attack(name, **options)
        for i in range(len(images)):
            x, y = images[i : i + 1], labels[i : i + 1]
            grads = _gradient(model, x, y)
            threat = ThreatModel(labels=y) if name == "rgap" else ThreatModel(batch_size=1)  # R-GAP's paper grants it
            res, seconds = timed(device, lambda: attack(on_device, grads, shape, threat, seed=i))
            psnr = score_batch(res.images, x)[0]["psnr"]
            rows.append(dict(setting=setting, attack=name, seconds=seconds, psnr=psnr, status=res.status))
    return rows


def fedavg_row(
    model: nn.Module, images: Tensor, labels: Tensor, epochs: int, batch: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """The FedAvg attack on one update: ``epochs`` passes over ``images`` in batches of ``batch``
    (in order), plain SGD at :data:`FEDAVG_LR`, the delta computed on the CPU."""
    n = len(images)
    schedule = [tuple(range(s, min(s + batch, n))) for _ in range(epochs) for s in range(0, n, batch)]
    params = {k: p.detach() for k, p in model.named_parameters()}
    delta = simulate_local_update(model, params, images, labels, FEDAVG_LR, len(schedule), False, schedule)
    update = Update(tuple(d.detach() for d in delta), "weight_delta", lr=FEDAVG_LR, local_steps=len(schedule))
    on_device = copy.deepcopy(model).to(device)
    _warm(on_device, images[:1], labels[:1])
    attack = FedAvgSim(max_steps=steps)  # by its class: the registry may not list it yet
    res, seconds = timed(device, lambda: attack(on_device, update, tuple(images.shape[1:]), ThreatModel(batch_size=n)))
    psnrs = [r["psnr"] for r in score_batch(res.images, images, res.labels, labels)]
    return dict(seconds=seconds, local_steps=len(schedule), psnr=statistics.median(psnrs), status=res.status, images=n)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m experiments.bench.device", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU), cpu or cuda (default: auto)")
    p.add_argument("--images", type=int, default=3, help="images per setting, one per update (default: 3)")
    p.add_argument(
        "--cifar",
        default="npz:data/cifar10_test150.npz",
        help="CIFAR-10 images for LeNet (default: npz:data/cifar10_test150.npz)",
    )
    p.add_argument("--dlg-steps", type=int, default=5, help="DLG and iDLG: L-BFGS steps of 20 iterations (default: 5)")
    p.add_argument("--ig-steps", type=int, default=100, help="Inverting Gradients: Adam steps (default: 100)")
    p.add_argument("--fedavg-steps", type=int, default=20, help="fedavg-sim: Adam steps (default: 20)")
    p.add_argument("--fedavg-images", type=int, default=10, help="images in the FedAvg update (default: 10)")
    p.add_argument("--fedavg-epochs", type=int, default=2, help="its local epochs (default: 2)")
    p.add_argument("--fedavg-batch", type=int, default=5, help="its batch size (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (default: 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = (args.images, args.dlg_steps, args.ig_steps, args.fedavg_steps, args.fedavg_images, args.threads)
    if min(counts) < 1 or min(args.fedavg_epochs, args.fedavg_batch) < 1:
        parser.error("--images, the steps, the FedAvg sizes and --threads must be >= 1")
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        parser.error(f"--device: {exc}")
    budgets: dict[str, dict] = {
        "dlg": {"max_steps": args.dlg_steps, "max_restarts": 0},
        "idlg": {"max_steps": args.dlg_steps, "max_restarts": 0},
        "ig": {"max_steps": args.ig_steps, "refine_steps": 0},
        "rgap": {"rank": False},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), {args.threads} thread(s); budgets: DLG/iDLG {args.dlg_steps} L-BFGS steps, no "
        f"restart; IG {args.ig_steps} Adam steps, no refinement; fedavg-sim {args.fedavg_steps} Adam steps",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    try:
        try:
            z = read_npz(args.cifar[4:] if args.cifar.startswith("npz:") else args.cifar)
            lenet = build_model("lenet", tuple(z.images.shape[1:]), z.num_classes, init="paper", seed=0)
            rows += attack_rows(
                "lenet/cifar10", lenet, to_float(z.images[: args.images]), z.labels[: args.images], device, budgets
            )
        except DatasetError as exc:
            print(f"note: LeNet/CIFAR-10 skipped: {exc}", flush=True)
        digits = load_dataset("mnist5k")
        cnn6 = build_model("cnn6", digits.input_shape, digits.num_classes, init="kaiming", seed=0)
        rows += attack_rows(
            "cnn6/mnist", cnn6, to_float(digits.train_x[: args.images]), digits.train_y[: args.images], device, budgets
        )
        n = args.fedavg_images
        fed = fedavg_row(
            cnn6,
            to_float(digits.train_x[:n]),
            digits.train_y[:n],
            args.fedavg_epochs,
            args.fedavg_batch,
            args.fedavg_steps,
            device,
        )
    finally:
        torch.set_num_threads(threads)  # main() called in-process: the caller's count back
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for attack in budgets:
            mine = [r for r in rows if r["setting"] == setting and r["attack"] == attack]
            statuses = ",".join(sorted({r["status"] for r in mine}))
            print(
                f"{setting:14s} {attack:5s} {statistics.median(r['seconds'] for r in mine):8.3f} s/image on "
                f"{device.type}  (median PSNR {statistics.median(r['psnr'] for r in mine):5.1f} dB over "
                f"{len(mine)} images; {statuses})",
                flush=True,
            )
    print(
        f"cnn6/mnist     fedavg-sim {fed['seconds']:8.3f} s/update on {device.type}  ({fed['images']} images, "
        f"{fed['local_steps']} local steps, {args.fedavg_steps} Adam steps: "
        f"{fed['seconds'] / args.fedavg_steps:.3f} s/step; median PSNR {fed['psnr']:.1f} dB; {fed['status']})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
