"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz and Molchanov, "See through Gradients:
Image Batch Recovery via GradInversion", CVPR 2021): :class:`GradInversion`, registered as
``"gradinversion"``.

Threat model: the observer (the parameter server) sees the weights a client started from and
the client's loss gradient for one batch (FedSGD; a one-step weight delta is the gradient up
to ``-lr``), and knows the batch size (``threat.batch_size``: the server configured it). Labels
are granted (``threat.labels``) or their counts read off the last layer
(:func:`attacks.labels.batch_label_counts`). For a model with BatchNorm the client trains in
train mode, so each BatchNorm layer normalises with *the batch's own* mean and variance; the
attacker's BatchNorm targets are:

- ``threat.bn_statistics`` when granted: per BatchNorm layer (``model.modules()`` order) the
  batch's mean and biased variance of the layer's input. A server that receives the client's
  BatchNorm buffers (Flower's quickstart sends the whole ``state_dict``) has them exactly from
  the running statistics before and after one step: :func:`bn_batch_statistics`;
- otherwise the model's own running statistics (the paper's setting: a trained model's
  statistics stand in for the batch's; on an untrained model they are 0 and 1, a weak prior).

The model is called in the mode it is handed in (``model.train()`` for the client's train-mode
BatchNorm); the attack works on a private copy.

Paper's setting: a pretrained ResNet-50 on ImageNet, batches of 8 to 48 with distinct labels
(read off the last layer's weight-gradient row minima), 20,000 Adam iterations; the objective
is the squared gradient distance plus an image prior (total variation, l2 norm), the
BatchNorm-statistics prior ``sum_l ||mu_l(x) - mu_l||_2 + ||sigma^2_l(x) - sigma^2_l||_2`` and
group consistency: several seeded restarts ("groups") optimised side by side, each pulled
towards their registered mean (they register with image alignment; here the groups' images are
matched by an optimal assignment within each label), and the final image is a group's.

Ours: the optimiser is DLG's L-BFGS with a strong-Wolfe line search (the budget of a 2-core
machine buys a few thousand evaluations, not 20,000 Adam steps), pixels kept in [0, 1] by
projection after each step; the gradient distance is divided by the observed gradient's
squared norm; labels are fixed hard labels from the counts. Group consistency runs in rounds:
every group optimised alone first, then ``group_rounds`` rounds in which each group is
re-optimised with ``group`` times its mean squared distance to the others' aligned mean. The
answer is the aligned mean of the groups or the best single group, whichever has the lower
gradient mismatch (no ground truth is looked at). The weights were set, not tuned (no CPU time
was left to tune them): ``tv`` is DLG's batch prior (:data:`attacks.dlg.BATCH_TV`, chosen on
CIFAR-100 images 0-3), ``bn`` and ``group`` 1e-3. ``settle`` is DLG's (1e-4): on the ResNet it
stopped L-BFGS after 14 steps, long before convergence; use ``settle=0`` with a ``time_limit``
there (docs/results/batches.md).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F

from ._gradient_matching import check_observation, gradient_distance, granted_labels, total_variation
from .base import Attack, AttackOptions, AttackResult, ThreatModel, Update, num_outputs, training_loss
from .idlg import batch_size_for
from .labels import batch_label_counts, idlg_labels, labels_from_counts

__all__ = ["GradInversion", "GradInversionOptions", "bn_batch_statistics", "bn_prior", "batchnorm_layers"]


@dataclass(frozen=True)
class GradInversionOptions(AttackOptions):
    """The settings of :class:`GradInversion`.

    ``groups``: seeded restarts optimised side by side (group consistency; 1: none);
    ``max_steps``: L-BFGS steps per group in the first round, each of up to ``max_iter``
    iterations; ``group_rounds`` rounds of ``round_steps`` steps with the group term;
    ``tv``, ``bn``, ``group``: the weights of the total-variation prior, the BatchNorm-statistics
    prior and the group term, relative to the gradient distance divided by the observed
    gradient's squared norm; ``settle``: a round stops once the images move less than this (RMS,
    pixels in [0, 1]) over a step; ``dtype``: the attack's precision; ``time_limit``: seconds
    (0: none) after which the attack returns its best so far with status ``"time_limit"``.
    """

    groups: int = 2
    max_steps: int = 200
    max_iter: int = 20
    group_rounds: int = 1
    round_steps: int = 50
    tv: float = 1e-5
    bn: float = 1e-3
    group: float = 1e-3
    settle: float = 1e-4
    dtype: torch.dtype = torch.float64
    time_limit: float = 0.0

    def _check(self) -> None:
        for name in ("groups", "max_steps", "max_iter", "round_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name} must be >= 1, got {getattr(self, name)}")
        if self.group_rounds < 0:
            raise ValueError(f"option group_rounds must be >= 0, got {self.group_rounds}")
        for name in ("tv", "bn", "group", "settle", "time_limit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"option {name} must be a finite number >= 0, got {value}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"option dtype must be floating point, got {self.dtype}")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_batch_statistics(before: nn.Module, after: nn.Module) -> tuple[tuple[Tensor, Tensor], ...]:
    """The batch's mean and biased variance at each BatchNorm layer, from the layers' running
    statistics before and after one train-mode step (``running = (1 - m) running + m batch``,
    the variance stored unbiased): what a server that receives the BatchNorm buffers knows."""
    out = []
    for b, a in zip(batchnorm_layers(before), batchnorm_layers(after), strict=True):
        m = a.momentum
        if m is None or not a.track_running_stats or a.num_batches_tracked != b.num_batches_tracked + 1:
            raise ValueError("batch statistics need one step of a BatchNorm with a fixed momentum between the two")
        mean = (a.running_mean.double() - (1 - m) * b.running_mean.double()) / m
        var_unbiased = (a.running_var.double() - (1 - m) * b.running_var.double()) / m
        out.append((mean, var_unbiased))
    return tuple(out)


def _unbias(stats: Sequence[tuple[Tensor, Tensor]], counts: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Turn the unbiased variances of :func:`bn_batch_statistics` into the biased ones the
    forward pass normalises with (``n`` values per channel: batch x height x width)."""
    return [(mu, var * (n - 1) / n) for (mu, var), n in zip(stats, counts)]


class _Recorder:
    """Forward hooks that keep each BatchNorm layer's input batch mean and biased variance."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.stats: list[tuple[Tensor, Tensor]] = []
        self.sizes: list[int] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        self.stats.append((x.mean(dims), x.var(dims, unbiased=False)))
        self.sizes.append(x.numel() // x.shape[1])

    def clear(self) -> None:
        self.stats, self.sizes = [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bn_prior(recorded: Sequence[tuple[Tensor, Tensor]], targets: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """GradInversion's BatchNorm prior: ``sum_l ||mu_l - mu*_l||_2 + ||var_l - var*_l||_2``;
    zero when the dummy batch has the target statistics."""
    total = recorded[0][0].new_zeros(())
    for (mu, var), (tm, tv) in zip(recorded, targets, strict=True):
        total = total + torch.linalg.vector_norm(mu - tm.to(mu)) + torch.linalg.vector_norm(var - tv.to(var))
    return total


def _align(reference: Tensor, other: Tensor, labels: Tensor) -> Tensor:
    """``other`` reordered so that each of its images faces the ``reference`` image it is
    nearest to (an optimal assignment on pixel MSE, within each label)."""
    perm = torch.arange(len(labels))
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        r, o = reference[idx].flatten(1), other[idx].flatten(1)
        cost = torch.cdist(r.double(), o.double()).numpy()
        rows, cols = linear_sum_assignment(cost)
        perm[idx[rows]] = idx[cols]
    return other[perm]


class GradInversion(Attack):
    """GradInversion (Yin et al., CVPR 2021): label counts from the last layer, then a dummy
    batch optimised to match the gradient under an image prior, the BatchNorm-statistics prior
    and group consistency over several seeded restarts.

    Threat model: the parameter server sees the weights a client started from and its gradient
    for one batch of known size; labels granted or counted from the last layer; BatchNorm
    targets granted (``threat.bn_statistics``, from the client's buffers) or the model's running
    statistics. Paper's setting: a trained ResNet-50 on ImageNet, batches of 8-48 with distinct
    labels, 20,000 Adam iterations. The module docstring gives what differs here.
    """

    name = "gradinversion"
    Options = GradInversionOptions

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: GradInversionOptions,
    ) -> AttackResult:
        start = time.perf_counter()
        opts = options
        upd, target, shape = check_observation(model, update, input_shape)
        batch, batch_source = batch_size_for(model, target, threat)
        labels, label_source = granted_labels(threat), "granted"
        if labels is None:
            if batch == 1 or num_outputs(model) == 1:
                labels, label_source = idlg_labels(model, target, batch_size=batch), "idlg"
            else:
                labels, label_source = labels_from_counts(batch_label_counts(model, target, batch)), "counts"
        labels = labels.to(torch.int64)
        dtype = opts.dtype
        work = copy.deepcopy(model).to(dtype)
        work.train(model.training)
        plist = list(work.parameters())
        for p in plist:
            p.requires_grad_(True)
        target = [t.to(dtype) for t in target]
        scale = float(sum(float((t.double() ** 2).sum()) for t in target)) or 1.0
        y = labels.to(dtype) if num_outputs(model) == 1 else labels
        layers = batchnorm_layers(work)
        recorder = _Recorder(layers) if layers and opts.bn > 0 else None
        bn_targets: list[tuple[Tensor, Tensor]] | None = None
        bn_source = "none"
        if recorder is not None:
            if threat.bn_statistics is not None:
                bn_source = "granted"
            else:
                bn_source = "running"
                bn_targets = [(m.running_mean.detach().to(dtype), m.running_var.detach().to(dtype)) for m in layers]
        evaluations = 0

        def parts(x: Tensor) -> tuple[Tensor, Tensor]:
            """(gradient mismatch / scale, BatchNorm prior) at ``x``."""
            nonlocal evaluations, bn_targets
            evaluations += 1
            if recorder is not None:
                recorder.clear()
            loss = training_loss(work(x), y)
            grads = torch.autograd.grad(loss, plist, create_graph=True)
            mismatch = gradient_distance(grads, target) / scale
            prior = x.new_zeros(())
            if recorder is not None:
                if bn_targets is None:  # granted: the unbiased variances, biased by the layers' sizes
                    bn_targets = [(m.to(dtype), v.to(dtype)) for m, v in _unbias(threat.bn_statistics, recorder.sizes)]
                prior = bn_prior(recorder.stats, bn_targets)
            return mismatch, prior

        def objective(x: Tensor, anchor: Tensor | None) -> Tensor:
            mismatch, prior = parts(x)
            value = mismatch + opts.bn * prior
            if opts.tv > 0:
                value = value + opts.tv * total_variation(x)
            if anchor is not None and opts.group > 0:
                value = value + opts.group * F.mse_loss(x, anchor)
            return value

        history: list[float] = []
        status = "ok"
        total_steps = 0

        def out_of_time() -> bool:
            return opts.time_limit > 0 and time.perf_counter() - start > opts.time_limit

        def optimise(x0: Tensor, anchor: Tensor | None, steps: int) -> Tensor:
            nonlocal status, total_steps
            x = x0.detach().clone().requires_grad_(True)
            lbfgs = torch.optim.LBFGS(
                [x],
                lr=1.0,
                max_iter=opts.max_iter,
                history_size=100,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-30,
                tolerance_change=1e-30,
            )

            def closure() -> Tensor:
                lbfgs.zero_grad()
                value = objective(x, anchor)
                (g,) = torch.autograd.grad(value, [x])
                x.grad = g
                return value.detach()

            for _ in range(steps):
                before = x.detach().clone()
                value = float(lbfgs.step(closure))
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                history.append(value)
                total_steps += 1
                if not math.isfinite(value):
                    status = "diverged"
                    return before
                if out_of_time():
                    status = "time_limit"
                    break
                if float((x.detach() - before).pow(2).mean().sqrt()) < opts.settle:
                    break
            return x.detach()

        gen = torch.Generator().manual_seed(int(seed))
        groups: list[Tensor] = []
        try:
            for _ in range(opts.groups):
                x0 = (0.5 + 0.1 * torch.randn((batch, *shape), generator=gen)).clamp(0, 1).to(dtype)
                groups.append(optimise(x0, None, opts.max_steps))
                if status == "time_limit":
                    break
            for _ in range(opts.group_rounds if len(groups) > 1 else 0):
                if status == "time_limit":
                    break
                for i in range(len(groups)):
                    others = [_align(groups[i], g, labels) for j, g in enumerate(groups) if j != i]
                    anchor = torch.stack(others).mean(0)
                    groups[i] = optimise(groups[i], anchor, opts.round_steps)
            candidates = list(groups)
            if len(groups) > 1:
                candidates.append(torch.stack([_align(groups[0], g, labels) for g in groups]).mean(0))
            scores = []
            for c in candidates:
                with torch.enable_grad():
                    scores.append(float(parts(c)[0].detach()))
        finally:
            if recorder is not None:
                recorder.remove()
        finite = [s if math.isfinite(s) else math.inf for s in scores]
        pick = int(np.argmin(finite))
        images = candidates[pick].float().clamp(0, 1).cpu()
        return AttackResult(
            attack=self.name,
            images=images,
            labels=labels,
            history=history,
            seconds=time.perf_counter() - start,
            steps=total_steps,
            status=status if math.isfinite(finite[pick]) else "diverged",
            diagnostics={
                "evaluations": evaluations,
                "groups": len(groups),
                "picked": "group mean" if pick == len(groups) else f"group {pick}",
                "relative_mismatch": scores,
                "label_source": label_source,
                "bn_targets": bn_source,
                "batch_size": batch,
                "batch_size_source": batch_source,
                "update_kind": upd.kind,
            },
        )
