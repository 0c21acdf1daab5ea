#!/usr/bin/env python3
r"""Write images of an official dataset as an .npz archive the testbed reads.

    python scripts/make_npz.py cifar10 --split test --indices 0-149 --out data/cifar10_first150.npz
    python scripts/make_npz.py cifar10 --split test --indices @docs/data/cifar10_test150.txt \
        --out data/cifar10_test150.npz
    python scripts/make_npz.py mnist --split test --out data/mnist_test.npz

The dataset is downloaded with torchvision (``download=True``) under ``--root`` (default
``data/``). The archive holds ``images`` (uint8, N x H x W x C for colour, N x H x W for
greyscale, exactly as the dataset stores them), ``labels`` (int64, the dataset's own class
ids; CIFAR-100: the fine labels), ``index`` (int64, each image's index in the official split)
and ``classes`` (the class names). Images are written in the order ``--indices`` gives.

Standalone: needs only numpy and torchvision. A bad argument is one line on stderr and exit
code 2; a dataset that cannot be downloaded or read is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DATASETS = ("mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


class FetchError(Exception):
    """The dataset could not be downloaded or read: one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, not the usage block
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parse_indices(spec: str) -> list[int]:
    """``"0-149"``, ``"3,5,10-12"`` or ``"@FILE"`` (indices separated by commas or whitespace;
    ``#`` starts a comment) -> a list of indices, in the order given."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise InputError(f"--indices: cannot read {path} ({exc.strerror or exc})") from None
        parts = [p for line in text.splitlines() for p in line.split("#", 1)[0].replace(",", " ").split()]
    else:
        parts = [p.strip() for p in spec.split(",")]
    out: list[int] = []
    for part in parts:
        lo, dash, hi = part.partition("-")
        try:
            if dash:
                a, b = int(lo), int(hi)
                if b < a:
                    raise InputError(f"--indices: range {part!r} runs backwards")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"--indices: {part!r} is not an index or a range A-B") from None
    if not out:
        raise InputError("--indices: no index given")
    if min(out) < 0:
        raise InputError(f"--indices: negative index {min(out)}")
    if len(set(out)) != len(out):
        raise InputError("--indices: an index is given twice")
    return out


def load(name: str, split: str, root: Path):
    """The torchvision dataset (downloaded when missing)."""
    # Imported here, not at the top: --help and argument errors then work without torchvision.
    try:
        from torchvision import datasets
    except ImportError:
        raise FetchError("needs torchvision (pip install torchvision)") from None

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        return cls(root=str(root), train=split == "train", download=True)
    except Exception as exc:  # noqa: BLE001 - network, checksum and archive errors all mean "could not get it"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise FetchError(
            f"{name}: could not download or read it under {root} ({type(exc).__name__}: {first[:120]})"
        ) from None


def build(name: str, ds, indices: list[int] | None) -> dict[str, np.ndarray]:
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    targets = np.asarray(ds.targets, dtype=np.int64)
    n = len(data)
    if indices is None:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.max() >= n:
            raise InputError(
                f"--indices: index {int(idx.max())} is out of range: this split holds {n} images (0-{n - 1})"
            )
    classes = [str(i) for i in range(10)] if name == "mnist" else list(ds.classes)
    return {
        "images": np.ascontiguousarray(data[idx]).astype(np.uint8),
        "labels": targets[idx],
        "index": idx,
        "classes": np.asarray(classes),
    }


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="make_npz.py",
        description="Write images of MNIST, CIFAR-10 or CIFAR-100 (downloaded with torchvision) as an .npz "
        "archive with images, labels, index and classes.",
    )
    p.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--split", default="test", help="train or test (default: test)")
    p.add_argument(
        "--indices", help="official indices to keep, in this order: 0-149, 3,5,10-12 or @FILE (default: all)"
    )
    p.add_argument("--root", default="data", help="where torchvision keeps the download (default: data)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    args = p.parse_args(argv)
    try:
        if args.dataset not in DATASETS:
            raise InputError(f"dataset: unknown {args.dataset!r}; choose one of {', '.join(DATASETS)}")
        if args.split not in SPLITS:
            raise InputError(f"--split: unknown {args.split!r}; choose train or test")
        out = Path(args.out)
        if out.suffix != ".npz":
            raise InputError(f"--out: {out} must end in .npz")
        if out.is_dir():
            raise InputError(f"--out: {out} is a folder")
        indices = parse_indices(args.indices) if args.indices is not None else None
        arrays = build(args.dataset, load(args.dataset, args.split, Path(args.root)), indices)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out, **arrays)
        except OSError as exc:
            raise InputError(f"--out: cannot write {out} ({exc.strerror or exc})") from None
    except InputError as exc:
        print(f"make_npz.py: {exc}", file=sys.stderr)
        return 2
    except FetchError as exc:
        print(f"make_npz.py: {exc}", file=sys.stderr)
        return 1
    x = arrays["images"]
    print(f"wrote {out}: {len(x)} images {'x'.join(map(str, x.shape[1:]))}, {len(arrays['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
