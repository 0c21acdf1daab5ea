"""Scores of a reconstruction against the client's true batch (docs/metrics.md).

Images are compared in [0, 1]: the reconstruction is clamped first, as an attacker would
display it. For a batch, each reconstruction is first matched to a true image by an optimal
assignment on pairwise MSE (an attack returns its images in no particular order).

- ``psnr``: 10 log10(1 / MSE), peak 1;
- ``ssim``: Wang et al.'s SSIM, an 11x11 Gaussian window of sigma 1.5, population
  covariances, K1 = 0.01, K2 = 0.03 (scikit-image with ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False``), averaged over the channels;
- ``registered_psnr``: the best PSNR over integer translations of up to
  :data:`REGISTER_SHIFT` pixels, over the overlap of the two images;
- ``identified``: image identifiability (IIP, Yin et al.; breaching's "pixel" IIP): is the
  reconstruction's nearest neighbour (pixel MSE) among the client's images its true image;
- ``lpips_distance``: LPIPS (AlexNet), only where its weights are already on disk.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

__all__ = [
    "mse",
    "psnr",
    "ssim",
    "registered_psnr",
    "identified",
    "lpips_distance",
    "lpips_unavailable",
    "label_accuracy",
    "match_batch",
    "score_batch",
    "SUCCESS_PSNR",
    "REGISTER_SHIFT",
    "SSIM_WINDOW",
]

SUCCESS_PSNR = 30.0  # dB: a reconstruction at or above this counts as a success
SSIM_SIGMA = 1.5  # Wang et al.'s Gaussian window; scikit-image truncates it at 3.5 sigma: 11x11
SSIM_WINDOW = 11
REGISTER_SHIFT = 2  # pixels: registered PSNR tries every translation of up to this many pixels
IDENTICAL = 1e-3  # L2 distance under which two images are the same (breaching's fudge; 8-bit images differ by >= 1/255)
LPIPS_MIN_SIDE = 32  # AlexNet's pooling leaves nothing of a smaller image: upsampled to this first
_ALEXNET = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1, the backbone lpips loads


def _pair(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    recon = torch.as_tensor(recon, dtype=torch.float64).detach().cpu()
    truth = torch.as_tensor(truth, dtype=torch.float64).detach().cpu()
    if recon.shape != truth.shape:
        raise ValueError(f"reconstruction shape {tuple(recon.shape)} does not match truth {tuple(truth.shape)}")
    return torch.nan_to_num(recon, nan=0.5).clamp(0, 1), truth


def _db(err: float) -> float:
    return math.inf if err <= 0 else -10.0 * math.log10(err)


def mse(recon: Tensor, truth: Tensor) -> float:
    """Mean squared error of one image (any shape) in [0, 1]."""
    r, t = _pair(recon, truth)
    return float(((r - t) ** 2).mean())


def psnr(recon: Tensor, truth: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1; ``inf`` for an exact match."""
    return _db(mse(recon, truth))


def ssim(recon: Tensor, truth: Tensor) -> float:
    """Wang et al.'s structural similarity of one ``(C, H, W)`` image (see the module
    docstring). An image smaller than 11 pixels keeps the same Gaussian (filtered with
    reflection at the border) and averages over the largest odd square that fits."""
    r, t = _pair(recon, truth)
    if r.dim() != 3:
        raise ValueError(f"ssim takes one (C, H, W) image, got shape {tuple(r.shape)}")
    side = min(r.shape[-2:])
    win = min(SSIM_WINDOW, side - (1 - side % 2))
    return float(
        structural_similarity(
            t.numpy(),
            r.numpy(),
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            win_size=win,
        )
    )


def registered_psnr(recon: Tensor, truth: Tensor, max_shift: int = REGISTER_SHIFT) -> float:
    """The highest PSNR of ``recon`` translated by ``(dy, dx)``, ``|dy|, |dx| <= max_shift``
    whole pixels, against ``truth``, each over the pixels where the two overlap (no
    wrap-around, no padding); shift 0 is the plain PSNR, so this is never lower. For attacks
    whose reconstruction may come out translated (docs/metrics.md)."""
    r, t = _pair(recon, truth)
    h, w = r.shape[-2:]
    k = max(0, min(max_shift, h - 1, w - 1))
    best = -math.inf
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            # the reconstruction moved by (dy, dx): truth[y, x] faces recon[y - dy, x - dx]
            rs = r[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            ts = t[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
            best = max(best, _db(float(((rs - ts) ** 2).mean())))
    return best


def _unit(x: Tensor) -> Tensor:
    """Images as float64 in [0, 1]: 8-bit images are divided by 255."""
    x = torch.as_tensor(x).detach().cpu()
    return x.to(torch.float64) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float64)


def identified(recon: Tensor, truth: Tensor, pool: Tensor, chunk: int = 4096) -> list[bool]:
    """Image identifiability, per reconstruction: ``recon[i]`` (matched to ``truth[i]``) is
    identified when its nearest neighbour in ``pool`` (the client's images, uint8 or float in
    [0, 1]; pixel MSE on [0, 1], the reconstruction clamped) is ``truth[i]`` itself, or an
    image identical to it (L2 distance below :data:`IDENTICAL`, as breaching). The rate over
    a batch is its IIP. ``pool`` is read ``chunk`` images at a time."""
    r = torch.nan_to_num(torch.as_tensor(recon, dtype=torch.float64).detach().cpu(), nan=0.5).clamp(0, 1).flatten(1)
    t = _unit(truth).flatten(1)
    if r.shape != t.shape or len(pool) == 0 or pool[0].numel() != r.shape[1]:
        raise ValueError(
            f"identified: {tuple(r.shape)} reconstructions, {tuple(t.shape)} truths, pool {tuple(pool.shape)}"
        )
    best = torch.full((len(r),), math.inf, dtype=torch.float64)
    nearest = torch.zeros((len(r), r.shape[1]), dtype=torch.float64)
    r_sq = (r**2).sum(1, keepdim=True)
    for start in range(0, len(pool), chunk):
        p = _unit(pool[start : start + chunk]).flatten(1)
        d = r_sq - 2 * r @ p.T + (p**2).sum(1)[None, :]  # squared L2, so the MSE's order
        value, where = d.min(1)
        closer = value < best
        best[closer] = value[closer]
        nearest[closer] = p[where[closer]]
    return [bool(v) for v in (nearest - t).norm(dim=1) < IDENTICAL]


def _lpips_weights() -> tuple[Path | None, Path]:
    """Where LPIPS's two weight files are: its linear layers (inside the lpips package; None
    when the package is not installed) and AlexNet's (torch hub's cache)."""
    spec = importlib.util.find_spec("lpips")
    lin = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth" if spec and spec.origin else None
    return lin, Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET


def lpips_unavailable() -> str | None:
    """None when LPIPS can be scored here without downloading anything; else one line that
    says why it is not (nothing is fetched: LPIPS is scored only from weights on disk)."""
    lin, alexnet = _lpips_weights()
    if lin is None:
        return "LPIPS not scored: the lpips package is not installed (pip install lpips)"
    if not lin.is_file():
        return f"LPIPS not scored: its linear weights are not at {lin}"
    if not alexnet.is_file():
        return f"LPIPS not scored: AlexNet's weights are not at {alexnet} (torch hub's cache)"
    return None


@functools.lru_cache(maxsize=1)
def _lpips_model() -> Any:
    """LPIPS (AlexNet, v0.1) built from the weights on disk (the caller checked
    :func:`lpips_unavailable` first), or None if that fails; built once per process."""
    try:
        import lpips  # optional dependency, imported only where its weights are on disk

        with warnings.catch_warnings():  # torchvision's notice that lpips asks with `pretrained=`
            warnings.simplefilter("ignore")
            return lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    except Exception:  # noqa: BLE001 - a broken optional metric is a blank column, never a failed score
        return None


def lpips_distance(recon: Tensor, truth: Tensor) -> list[float] | None:
    """LPIPS (AlexNet) between each ``recon[i]`` and ``truth[i]`` (``(B, C, H, W)`` in [0, 1];
    one channel is repeated to three; an image under 32 pixels is upsampled bilinearly to 32
    first); None where LPIPS is not available (:func:`lpips_unavailable`)."""
    model = _lpips_model() if lpips_unavailable() is None else None
    if model is None:
        return None
    r = torch.nan_to_num(torch.as_tensor(recon, dtype=torch.float32).detach().cpu(), nan=0.5).clamp(0, 1)
    t = torch.as_tensor(truth, dtype=torch.float32).detach().cpu()
    if r.shape[1] == 1:
        r, t = r.expand(-1, 3, -1, -1), t.expand(-1, 3, -1, -1)
    side = min(r.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        size = [math.ceil(s * LPIPS_MIN_SIDE / side) for s in r.shape[-2:]]
        r, t = (torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (r, t))
    with torch.inference_mode():
        return [float(v) for v in model(r, t, normalize=True).reshape(-1)]


def label_accuracy(pred: Tensor | None, truth: Tensor) -> float:
    """Share of labels recovered; ``nan`` when the attack returned none."""
    if pred is None:
        return math.nan
    pred = torch.as_tensor(pred).reshape(-1).cpu()
    truth = torch.as_tensor(truth).reshape(-1).cpu()
    if pred.numel() != truth.numel():
        raise ValueError(f"{pred.numel()} labels recovered for {truth.numel()} images")
    return float((pred == truth).double().mean())


def match_batch(recon: Tensor, truth: Tensor) -> np.ndarray:
    """``perm`` such that ``recon[perm[i]]`` is the reconstruction matched to ``truth[i]``
    (Hungarian assignment on pairwise MSE, one reconstruction per true image). An attack that
    returned fewer images than the batch holds leaves some true images unmatched:
    ``perm[i] = -1`` for them."""
    r = torch.nan_to_num(torch.as_tensor(recon, dtype=torch.float64).detach().cpu(), nan=0.5).clamp(0, 1)
    t = torch.as_tensor(truth, dtype=torch.float64).detach().cpu()
    if r.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"reconstructions of shape {tuple(r.shape[1:])} cannot be matched to images of shape {tuple(t.shape[1:])}"
        )
    cost = ((r.flatten(1)[None, :, :] - t.flatten(1)[:, None, :]) ** 2).mean(-1).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.full(len(t), -1, dtype=np.int64)
    perm[rows] = cols
    return perm


def score_batch(
    recon: Tensor,
    truth: Tensor,
    pred_labels: Tensor | None = None,
    true_labels: Tensor | None = None,
    perm: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Per true image: ``mse``, ``psnr``, ``ssim``, ``rpsnr`` (registered PSNR) and ``lpips``
    (``nan`` where LPIPS is not available) of its matched reconstruction and, when both label
    sets are given, ``label_correct`` (labels compared after the same matching). ``perm`` is
    the matching when the caller already has it (see :func:`match_batch`). A true image left
    without a reconstruction (``perm[i] = -1``) is scored against a mid-grey image (nothing
    reconstructed: a low score, never a credit) and its label counts as wrong."""
    if recon.dim() != 4 or truth.dim() != 4:
        raise ValueError("score_batch takes (B, C, H, W) batches")
    if perm is None:
        perm = match_batch(recon, truth)
    faced = [
        recon[j] if j >= 0 else torch.full_like(torch.as_tensor(truth[i], dtype=torch.float32), 0.5)
        for i, j in enumerate(perm)
    ]
    perceptual = lpips_distance(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in faced]), truth)
    rows = []
    for i, (j, image) in enumerate(zip(perm, faced)):
        row = {
            "mse": mse(image, truth[i]),
            "psnr": psnr(image, truth[i]),
            "ssim": ssim(image, truth[i]),
            "rpsnr": registered_psnr(image, truth[i]),
            "lpips": perceptual[i] if perceptual is not None else math.nan,
        }
        if pred_labels is not None and true_labels is not None:
            predicted = int(torch.as_tensor(pred_labels).reshape(-1)[j])
            correct = j >= 0 and predicted == int(torch.as_tensor(true_labels).reshape(-1)[i])
            row["label_correct"] = float(correct)
        rows.append(row)
    return rows
