"""Label counts of a batch from the last layer's gradient (FedSGD): how many images of each
class the batch holds, with repeated labels.

Threat model: the observer (the parameter server) sees the weights a client started from and
the client's loss gradient for one batch of softmax cross-entropy (or a one-step weight delta,
the gradient up to ``-lr``), and knows the batch size ``B`` (the server configured it, or
:func:`attacks.idlg.estimate_batch_size`). Nothing else about the batch.

Papers' setting: Wainakh et al., "User-level label leakage from gradients in federated
learning" (PETS 2022; LLG): the last layer's bias gradient is ``mean_b(p_b) - counts / B``, so
``counts = B * (mean_b p_b - db)`` once the mean prediction is estimated (LLG estimates it, and
an image's "impact", on the model at hand); Yin et al., "See through Gradients" (CVPR 2021):
with non-negative inputs to the last layer, a class is present exactly when its row of the
weight gradient has a negative entry; Ma et al., "Instance-wise batch label restoration via
gradients" (iLRG, ICLR 2023): exact counts on untrained models from the last layer's
low-rank structure. Ours, with no auxiliary data:

- *With a bias on the last layer*: the rule of :func:`attacks.idlg.idlg_labels` (a class is
  present when its weight-gradient row has a negative entry, Yin et al.; the bias ranks the
  classes and LLG's deficit ``-B * db_c`` hands out the repeated counts).
- *Without a bias* (R-GAP's CNN6): the rows of ``G = B * dW = sum_b (p_b - onehot(y_b)) a_b^T``
  are projected on the layer's mean input direction (the top right singular vector of ``G``,
  signed so that most rows are positive along it). With near-uniform predictions (small
  logits, PyTorch's default initialisation) ``mean_b p_b`` is about ``1/C`` and the projection is
  ``r_c = kappa (B/C - n_c)`` for an image's "impact" ``kappa``, which the classes no image holds
  fix (the largest ``r_c`` is ``kappa B / C``; with ``C > B`` at least ``C - B`` classes are
  empty). The unrounded counts are repaired to a total of ``B`` on the largest residuals.

Measured (``python -m experiments.bench.batches --labels-only``, docs/results/batches.md): exact
counts for every batch on the BatchNorm ResNet, and for fewer than half of the batches of 8 on
DLG's LeNet and CNN6: an untrained model's softmax is not uniform enough for the bias-free rule,
and on LeNet's peaked softmax a class that images hold *and* the model predicts for other images
loses its negative entries. Exact counts there need the mean prediction per class, which the
gradient alone gives only through the images (iLRG's route): with the true ``mean_b p_b``,
``round(B (mean p - db))`` was exact on all 54 tuning batches of LeNet.

:func:`labels_from_counts` turns counts into a label per image
(sorted by class: the counts carry nothing about which image holds which label).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Update, as_update, check_gradients
from .idlg import idlg_labels, last_linear_gradients

__all__ = ["batch_label_counts", "labels_from_counts"]


def _repair(values: Tensor, total: int) -> Tensor:
    """``values`` rounded to non-negative integers summing to ``total``: classes gain (lose) a
    count where the rounding took the most (gave the most)."""
    counts = values.round().clamp_min(0).to(torch.int64)
    residual = values - counts.to(values.dtype)
    while int(counts.sum()) < total:
        c = int(torch.argmax(residual))
        counts[c] += 1
        residual[c] -= 1.0
    while int(counts.sum()) > total:
        residual = torch.where(counts > 0, residual, torch.full_like(residual, float("inf")))
        c = int(torch.argmin(residual))
        counts[c] -= 1
        residual[c] += 1.0
    return counts


def _bias_free_estimate(G: Tensor, W: Tensor, total: int) -> Tensor:
    """Counts, unrounded, for a bias-free head with near-uniform predictions (see the module
    docstring): the rows projected on the mean input direction, with the first-order
    correction of the softmax around ``1/C``."""
    classes = G.shape[0]
    _, _, vh = torch.linalg.svd(G, full_matrices=False)
    u = vh[0]
    if float(u.sum()) < 0:  # the mean input of a (leaky) ReLU layer is positive
        u = -u
    r = G @ u
    wu = W @ u
    wu = wu - wu.mean()
    # r_c = kappa (B/C - n_c) + kappa^2 (B/C) (J W u)_c: choose the impact kappa that puts
    # the counts nearest to integers (none clearly negative), searched around the empty classes' value
    base = float(r.max()) * classes / total
    best, best_cost = None, float("inf")
    for kappa in torch.linspace(0.5 * abs(base), 2.0 * abs(base), 301, dtype=G.dtype).tolist():
        if kappa <= 0:
            continue
        n = total / classes + (total * kappa / classes) * wu - r / kappa
        cost = float(((n - n.round()) ** 2).sum()) + 10.0 * float((n.clamp(max=-0.5) + 0.5).pow(2).sum())
        if cost < best_cost:
            best, best_cost = n, cost
    return best if best is not None else torch.full((classes,), total / classes, dtype=G.dtype)


def batch_label_counts(model: nn.Module, gradients: Update | Sequence[Tensor], batch_size: int) -> Tensor:
    """How many of the ``batch_size`` images behind ``gradients`` (a softmax cross-entropy
    gradient of ``model``, one tensor per parameter, or an :class:`~attacks.base.Update`) hold
    each class: ``(C,)`` int64 summing to ``batch_size`` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grads = check_gradients(model, as_update(gradients).as_gradients())
    w, b = last_linear_gradients(model, grads)
    classes = w.shape[0]
    if classes < 2:
        raise ValueError("label counts need a softmax head with at least 2 classes")
    G = w * batch_size
    if b is not None:
        return torch.bincount(idlg_labels(model, grads, batch_size=batch_size), minlength=classes)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return _repair(_bias_free_estimate(G, head.weight.detach().to(G.dtype), batch_size), batch_size)


def labels_from_counts(counts: Tensor) -> Tensor:
    """One label per image from per-class counts, in class order: ``(sum(counts),)`` int64."""
    counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
