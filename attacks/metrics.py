"""Scores of a reconstruction against the client's true batch.

Images are compared in [0, 1]: the reconstruction is clamped first, as an attacker would
display it. For a batch, each reconstruction is first matched to a true image by an optimal
assignment on pairwise MSE (an attack returns its images in no particular order).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

__all__ = ["mse", "psnr", "ssim", "label_accuracy", "match_batch", "score_batch", "SUCCESS_PSNR"]

SUCCESS_PSNR = 30.0  # dB: a reconstruction at or above this counts as a success


def _pair(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    recon = torch.as_tensor(recon, dtype=torch.float64).detach().cpu()
    truth = torch.as_tensor(truth, dtype=torch.float64).detach().cpu()
    if recon.shape != truth.shape:
        raise ValueError(f"reconstruction shape {tuple(recon.shape)} does not match truth {tuple(truth.shape)}")
    return torch.nan_to_num(recon, nan=0.5).clamp(0, 1), truth


def mse(recon: Tensor, truth: Tensor) -> float:
    """Mean squared error of one image (any shape) in [0, 1]."""
    r, t = _pair(recon, truth)
    return float(((r - t) ** 2).mean())


def psnr(recon: Tensor, truth: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1; ``inf`` for an exact match."""
    err = mse(recon, truth)
    return math.inf if err <= 0 else -10.0 * math.log10(err)


def ssim(recon: Tensor, truth: Tensor) -> float:
    """Structural similarity of one ``(C, H, W)`` image (scikit-image, data range 1)."""
    r, t = _pair(recon, truth)
    if r.dim() != 3:
        raise ValueError(f"ssim takes one (C, H, W) image, got shape {tuple(r.shape)}")
    r_np, t_np = r.numpy(), t.numpy()
    win = min(7, r.shape[-1], r.shape[-2])
    win -= 1 - win % 2  # odd window no larger than the image
    return float(structural_similarity(t_np, r_np, data_range=1.0, channel_axis=0, win_size=win))


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
    """Per true image: ``mse``, ``psnr``, ``ssim`` of its matched reconstruction and, when
    both label sets are given, ``label_correct`` (labels compared after the same matching).
    ``perm`` is the matching when the caller already has it (see :func:`match_batch`). A true
    image left without a reconstruction (``perm[i] = -1``) is scored against a mid-grey image
    (nothing reconstructed: a low score, never a credit) and its label counts as wrong."""
    if recon.dim() != 4 or truth.dim() != 4:
        raise ValueError("score_batch takes (B, C, H, W) batches")
    if perm is None:
        perm = match_batch(recon, truth)
    rows = []
    for i, j in enumerate(perm):
        matched = j >= 0
        image = recon[j] if matched else torch.full_like(torch.as_tensor(truth[i], dtype=torch.float32), 0.5)
        row = {"mse": mse(image, truth[i]), "psnr": psnr(image, truth[i]), "ssim": ssim(image, truth[i])}
        if pred_labels is not None and true_labels is not None:
            predicted = int(torch.as_tensor(pred_labels).reshape(-1)[j])
            correct = matched and predicted == int(torch.as_tensor(true_labels).reshape(-1)[i])
            row["label_correct"] = float(correct)
        rows.append(row)
    return rows
