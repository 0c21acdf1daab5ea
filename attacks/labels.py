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

- *With a bias on the last layer*: the rule of :func:`idlg_labels` (iDLG's, for a batch: a class is
  present when its weight-gradient row has a negative entry, Yin et al.; the bias ranks the
  classes and LLG's deficit ``-B * db_c`` hands out the repeated counts).
- *Without a bias* (R-GAP's CNN6): the rows of ``G = B * dW = sum_b (p_b - onehot(y_b)) a_b^T``
  are projected on the layer's mean input direction (the top right singular vector of ``G``,
  signed so that most rows are positive along it). With near-uniform predictions (small
  logits, PyTorch's default initialisation) ``mean_b p_b`` is about ``1/C`` and the projection is
  ``r_c = kappa (B/C - n_c)`` for an image's "impact" ``kappa``, which the classes no image holds
  fix (the largest ``r_c`` is ``kappa B / C``; with ``C > B`` at least ``C - B`` classes are
  empty). Predictions are not quite uniform: the softmax's first-order term adds
  ``kappa^2 (B/C) (J W u)_c`` (``W`` the head, ``u`` the direction, ``J`` centring), and ``kappa``
  is then searched for the counts nearest to integers. The unrounded counts are repaired to a
  total of ``B`` on the largest residuals.

Measured (``python -m experiments.bench.batches --labels-only``, docs/results/batches.md),
batches of 8, 3 model seeds, evaluation set (tuning set): exact counts for 54/54 (54/54)
batches on the BatchNorm ResNet, 45/54 (36/54) on CNN6 and 20/54 (23/54) on DLG's LeNet. On
CNN6 what is left is the spread of an untrained model's predictions around ``1/C``; on LeNet's
peaked softmax a class that images hold *and* the model predicts for other images loses its
negative entries. Exact counts there need the mean prediction per class, which the gradient
alone gives only through the images (iLRG's route): with the true ``mean_b p_b``,
``round(B (mean p - db))`` was exact on all 54 tuning batches of LeNet.

:func:`labels_from_counts` turns counts into a label per image
(sorted by class: the counts carry nothing about which image holds which label).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Update, as_update, check_gradients

__all__ = ["batch_label_counts", "labels_from_counts", "idlg_labels", "last_linear_gradients", "bias_free_counts"]


def last_linear_gradients(model: nn.Module, gradients: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """The observed gradients of the model's last ``nn.Linear``: ``(weight_grad, bias_grad or None)``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no linear layer: cannot recover labels")
    head = linears[-1]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    w = gradients[index[id(head.weight)]].detach().double()
    b = gradients[index[id(head.bias)]].detach().double() if head.bias is not None else None
    return w, b


def _fill_counts(signal: Tensor, batch_size: int, present: Tensor | None = None) -> list[int]:
    """Classes for ``batch_size`` images from a per-class signal (negative = present), or from
    ``present`` (a mask) ranked by the signal."""
    order = torch.argsort(signal).tolist()
    negative = [c for c in order if (signal[c] < 0 if present is None else bool(present[c]))]
    if not negative:  # nothing negative (e.g. all images confidently right): most negative first
        negative = order[:1]
    labels = negative[:batch_size]
    if len(labels) < batch_size:
        # LLG-style count estimate: each present class accounts for about -B * signal images;
        # hand the remaining slots to the classes with the largest leftover deficit.
        deficit = {c: float(-signal[c]) * batch_size - 1.0 for c in labels}
        while len(labels) < batch_size:
            c = max(deficit, key=deficit.get)
            labels.append(c)
            deficit[c] -= 1.0
    return labels


def idlg_labels(model: nn.Module, gradients: Update | Sequence[Tensor], batch_size: int = 1) -> Tensor:
    """Recover the labels of the batch behind ``gradients`` (see the module docstring).

    ``gradients``: one tensor per parameter in ``model.parameters()`` order, or an
    :class:`Update` (a weight delta is turned into its gradient). Returns ``(batch_size,)``
    int64 labels on the CPU (class indices; 0/1 for a single-logit model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grads = check_gradients(model, as_update(gradients).as_gradients())
    w, b = last_linear_gradients(model, grads)
    classes = w.shape[0]

    if classes == 1:  # logistic loss: dL/dz = sigmoid(z) - y < 0  <=>  y = 1
        s = float(b.sum()) if b is not None else float(w.sum())
        label = 1 if s < 0 else 0
        return torch.full((batch_size,), label, dtype=torch.int64)

    if batch_size == 1:
        if b is not None:
            return torch.argmin(b).reshape(1).to(torch.int64).cpu()
        sums = w.sum(dim=1)
        negative = sums < 0
        if int(negative.sum()) == 1 or classes == 2:
            pick = torch.argmin(sums)
        elif int((~negative).sum()) == 1:  # inputs with a negative sum flip every sign
            pick = torch.argmax(sums)
        else:
            pick = torch.argmin(sums)
        return pick.reshape(1).to(torch.int64).cpu()

    if b is None:
        # no bias: the rows projected on the mean input direction (batch_label_counts), in place of
        # the row-minimum rule, which the inputs of a leaky ReLU (of either sign) defeat
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        return labels_from_counts(bias_free_counts(w, head.weight, batch_size))
    signal, present = b, None
    # With non-negative inputs to the last layer an absent class's weight-gradient row,
    # mean_b(p_bc a_b), has no negative entry, while a present class's row has one unless
    # every coordinate is masked, which is rarer than its bias entry being masked (the
    # sum). So presence is read off the row minima (Yin et al.), the ranking and the counts
    # off the bias; when the rows do not look like non-negative inputs (none or every row
    # with a negative entry), the bias alone. Measured on the benchmark's first 20
    # CIFAR-10 / CIFAR-100 images in batches of 2, 4 and 8, DLG's LeNet, model seeds 0-5:
    # labels right 691 / 720 (bias alone 685), never fewer on any dataset, seed and batch size.
    rows = w.min(dim=1).values < 0
    if bool(rows.any()) and not bool(rows.all()):
        present = rows
    return torch.tensor(_fill_counts(signal, batch_size, present), dtype=torch.int64)


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


def bias_free_counts(weight_grad: Tensor, head_weight: Tensor, batch_size: int) -> Tensor:
    """Per-class counts (``(C,)`` int64 summing to ``batch_size``) for a bias-free softmax head
    from its weight gradient and weights (the module docstring's rule)."""
    G = weight_grad.double() * batch_size
    return _repair(_bias_free_estimate(G, head_weight.detach().double(), batch_size), batch_size)


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
    if b is not None:
        return torch.bincount(idlg_labels(model, grads, batch_size=batch_size), minlength=classes)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return bias_free_counts(w, head.weight, batch_size)


def labels_from_counts(counts: Tensor) -> Tensor:
    """One label per image from per-class counts, in class order: ``(sum(counts),)`` int64."""
    counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
