"""Inverting Gradients (Geiping, Bauermeister, Droege and Moeller, NeurIPS 2020):
:class:`InvertingGradients`, registered as ``"ig"``.

Threat model: the observer (the parameter server) sees the weights a client started from and
the client's update for one batch: its loss gradient (FedSGD), or its weight delta after
``local_steps`` local SGD steps of learning rate ``lr`` (FedAvg). The batch size comes from
``threat`` or, when not granted, from :func:`attacks.idlg.estimate_batch_size`; labels are
granted (``threat.labels``) or recovered from the last layer (:func:`attacks.idlg.idlg_labels`).

Paper's setting: the objective is one minus the cosine similarity between the dummy's gradient
and the observed one, taken over the whole parameter vector (their code sums the inner products
and the squared norms over layers before dividing), plus a small total-variation prior; the
dummy is optimised with Adam on the *sign* of its gradient, with the learning rate divided by
10 at 3/8, 5/8 and 7/8 of the iterations, and pixels are kept in the valid box by projection
after every step; several restarts may be run and the one with the lowest objective is kept.
For FedAvg updates the local SGD steps are replayed differentiably on the dummy images and
the simulated weight delta is matched to the observed one (their setting: the data in a fixed
order, ``n`` images cut into batches, for several local steps or epochs). The steps follow
``threat.schedule`` (which dummy images form each step's batch: the order the client really
used when granted, else the order the observer assumes), or take every dummy image at every
step when there is none. On single-image gradients they report 18.0 +- 3.3 dB on the
untrained DLG-LeNet for the first 100 CIFAR-10 test images (24,000 iterations).

Here images are in [0, 1] unnormalised (the testbed's convention), so the box is [0, 1] and the
step size is in pixel units.

Measured changes (DLG's LeNet, CIFAR-10, labels from iDLG; see the defaults):

- *step size 0.1 in pixels* (Geiping's number, applied to [0, 1] pixels). With 0.025 the
  signed-Adam phase moves a pixel at most 0.025 per step and, after the decays, barely moves at
  all: 3000 steps ended at a median of 15.3 dB on images 0-9.
- *a refinement phase* (``refine_steps``, a documented deviation): signed Adam only finds the
  basin (about 10-13 dB after 1000 steps on the sigmoid LeNet, whose gradient landscape is
  badly conditioned for a sign-based first-order method); it is followed by L-BFGS with a
  strong-Wolfe line search on *the same objective* (cosine distance + TV), pixels projected
  back into [0, 1] after every L-BFGS step. It takes the reconstruction from ~12 dB to ~35 dB
  in a few hundred objective evaluations. ``refine_steps=0`` gives the method as published.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._gradient_matching import total_variation
from .base import (
    Attack,
    AttackOptions,
    AttackResult,
    ThreatModel,
    Update,
    as_update,
    check_gradients,
    check_input_shape,
    model_device,
    num_outputs,
    training_loss,
)
from .idlg import batch_size_for, idlg_labels

__all__ = [
    "InvertingGradients",
    "InvertingGradientsOptions",
    "inverting_gradients",
    "cosine_distance",
    "total_variation",
    "simulate_local_update",
]


@dataclass(frozen=True)
class InvertingGradientsOptions(AttackOptions):
    """The settings of :class:`InvertingGradients`.

    ``max_steps``: Adam iterations per restart; ``lr``: Adam's step size (pixels);
    ``tv``: weight of the total-variation prior; ``restarts``: independent starts (the lowest
    objective wins); ``signed``: feed Adam the sign of the gradient; ``lr_decay``: divide the
    step size by 10 at 3/8, 5/8 and 7/8 of ``max_steps``; ``replay``: replay the local steps of
    a weight-delta update (None: whenever ``local_steps > 1``; a one-step delta is an
    exact gradient); ``dtype``: arithmetic precision (weights are copied to it).
    ``refine_steps``: L-BFGS steps (each up to ``refine_iter`` iterations, strong-Wolfe line
    search) on the same objective after the Adam phase, pixels projected into [0, 1] after each
    step; 0 = the published method. ``max_steps`` defaults to 1000 here (with the refinement);
    the paper ran 4,800 to 24,000 Adam steps. ``time_limit``: seconds after which the attack
    stops and returns its best image so far with status ``"time_limit"`` (0: no limit; a
    budgeted probe, or a bounded run on an update too large for the full schedule).
    """

    max_steps: int = 1000
    lr: float = 0.1
    tv: float = 1e-4
    restarts: int = 1
    signed: bool = True
    lr_decay: bool = True
    dtype: torch.dtype = torch.float64
    replay: bool | None = None
    refine_steps: int = 20
    refine_iter: int = 20
    time_limit: float = 0.0

    def _check(self) -> None:
        if self.max_steps < 1 or self.restarts < 1:
            raise ValueError(f"max_steps and restarts must be >= 1, got {self.max_steps}, {self.restarts}")
        if not (math.isfinite(self.time_limit) and self.time_limit >= 0):
            raise ValueError(f"time_limit must be a number of seconds >= 0, got {self.time_limit}")


def cosine_distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """``1 - <dummy, target> / (|dummy| |target|)`` with sums taken over all layers."""
    dot = dummy[0].new_zeros(())
    n_d = dummy[0].new_zeros(())
    n_t = dummy[0].new_zeros(())
    for d, t in zip(dummy, target):
        dot = dot + (d * t).sum()
        n_d = n_d + d.pow(2).sum()
        n_t = n_t + t.pow(2).sum()
    return 1.0 - dot / (n_d.sqrt() * n_t.sqrt()).clamp_min(1e-30)


def simulate_local_update(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    lr: float,
    local_steps: int,
    create_graph: bool = True,
    schedule: Sequence[Sequence[int]] | None = None,
) -> list[Tensor]:
    """Replay ``local_steps`` SGD steps of ``lr`` from ``params`` and return the weight delta
    (new - start) per parameter, differentiable with respect to ``x``. Step ``s`` trains on
    the images ``schedule[s]`` of ``(x, y)`` (a :class:`ThreatModel` schedule), or on all of
    them when ``schedule`` is None."""
    names = list(params)
    params = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
    if schedule is not None and len(schedule) != local_steps:
        raise ValueError(f"the schedule has {len(schedule)} steps, the update {local_steps}")
    steps = (
        [None] * local_steps
        if schedule is None
        else [torch.as_tensor(list(b), dtype=torch.int64, device=x.device) for b in schedule]
    )
    current = dict(params)
    for batch in steps:
        xb, yb = (x, y) if batch is None else (x[batch], y[batch])
        loss = training_loss(functional_call(model, current, (xb,)), yb)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=create_graph)
        # the step as torch.optim.SGD takes it (p + (-lr) * g, one rounding): ``p - lr * g`` rounds twice, and a
        # 1-ulp weight difference can flip a LeakyReLU input that lies within rounding of 0 in a later step
        current = {n: torch.add(current[n], g, alpha=-lr) for n, g in zip(names, grads)}
    return [current[n] - params[n] for n in names]


class InvertingGradients(Attack):
    """Inverting Gradients (Geiping, Bauermeister, Droege and Moeller, NeurIPS 2020): a dummy
    batch optimised by signed Adam on the cosine distance between its update and the observed
    one, plus a total-variation prior, pixels kept in [0, 1]; here followed by an L-BFGS
    refinement (``refine_steps=0``: the published method).

    Threat model: the parameter server sees the weights a client started from and its update
    for one batch: a gradient (FedSGD) or a weight delta of several local steps (FedAvg, whose
    steps are replayed on the dummy, in ``threat.schedule``'s order when given); the batch
    size is granted or estimated, the labels granted or read off the last layer.

    Paper's setting: the cosine distance over the whole parameter vector, signed Adam with the
    step size divided by 10 at 3/8, 5/8 and 7/8 of 4,800 to 24,000 steps; single images (18.0
    dB on the untrained DLG LeNet, CIFAR-10) up to batches and multi-step FedAvg updates. The
    module docstring gives the changes made here and what they were measured to do.
    """

    name = "ig"
    Options = InvertingGradientsOptions

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: InvertingGradientsOptions,
    ) -> AttackResult:
        return _invert(model, update, input_shape, threat, seed, options)


def inverting_gradients(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    **options: Any,
) -> AttackResult:
    """Reconstruct a batch from its update with Inverting Gradients: ``InvertingGradients()(...)``;
    ``options``: the fields of :class:`InvertingGradientsOptions` by keyword."""
    return InvertingGradients()(model, update, input_shape, threat, seed=seed, **options)


def _invert(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel,
    seed: int,
    opts: InvertingGradientsOptions,
) -> AttackResult:
    """The attack (:class:`InvertingGradients`), its options resolved. Diagnostics count
    ``evaluations`` (objective evaluations)."""
    start_time = time.perf_counter()
    upd = as_update(update)
    observed = check_gradients(model, upd.tensors)
    shape = check_input_shape(input_shape)
    dtype = opts.dtype
    device = model_device(model)  # the caller's choice: the dummies live beside the model

    def out_of_time() -> bool:
        return opts.time_limit > 0 and time.perf_counter() - start_time > opts.time_limit

    replay = opts.replay
    if replay is None:
        replay = upd.kind == "weight_delta" and upd.local_steps > 1
    if replay and upd.kind != "weight_delta":
        raise ValueError("replay needs a weight_delta update (with its lr and local_steps)")

    batch, batch_source = batch_size_for(model, upd, threat)
    if threat.labels is not None:
        labels = torch.as_tensor(threat.labels, dtype=torch.int64).reshape(-1)
        label_source = "granted"
    else:
        labels = idlg_labels(model, upd, batch_size=batch)
        label_source = "idlg"
    outputs = num_outputs(model)
    y = (labels.to(dtype) if outputs == 1 else labels).to(device)

    params = {n: p.detach().to(dtype).requires_grad_(True) for n, p in model.named_parameters()}
    plist = list(params.values())
    if replay:
        target = [t.to(dtype) for t in observed]  # observed weight delta
    else:
        target = [t.to(dtype) for t in upd.as_gradients()]

    evaluations = 0

    def objective(x: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        if replay:
            dummy = simulate_local_update(model, params, x, y, float(upd.lr), upd.local_steps, schedule=threat.schedule)
        else:
            loss = training_loss(functional_call(model, params, (x,)), y)
            dummy = list(torch.autograd.grad(loss, plist, create_graph=True))
        value = cosine_distance(dummy, target)
        if opts.tv > 0:
            value = value + opts.tv * total_variation(x)
        return value

    gen = torch.Generator().manual_seed(int(seed))
    milestones = [int(opts.max_steps * f) for f in (3 / 8, 5 / 8, 7 / 8)] if opts.lr_decay else []
    history: list[float] = []
    finals: list[float] = []
    best: tuple[float, Tensor] | None = None
    status = "ok"
    total_steps = 0
    for _ in range(opts.restarts):
        if best is not None and out_of_time():
            break
        x = torch.rand((batch, *shape), generator=gen).to(device, dtype).requires_grad_(True)  # drawn on the CPU
        opt = torch.optim.Adam([x], lr=opts.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        value = math.nan
        for _step in range(opts.max_steps):
            obj = objective(x)
            (g,) = torch.autograd.grad(obj, [x])
            value = float(obj.detach())
            history.append(value)
            total_steps += 1
            if not math.isfinite(value):
                break
            if out_of_time():
                status = "time_limit"
                break
            x.grad = g.sign() if opts.signed else g
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        if opts.refine_steps > 0 and math.isfinite(value) and not out_of_time():
            # tolerances far below PyTorch's defaults (1e-7, 1e-9): the objective is ~1e-5 here and
            # its gradient with respect to a pixel far below 1e-7
            lbfgs = torch.optim.LBFGS(
                [x],
                lr=1.0,
                max_iter=opts.refine_iter,
                history_size=100,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-20,
                tolerance_change=1e-20,
            )

            def closure() -> Tensor:
                lbfgs.zero_grad()
                obj = objective(x)
                (g,) = torch.autograd.grad(obj, [x])
                x.grad = g
                return obj.detach()

            last = math.nan
            for _step in range(opts.refine_steps):
                value = float(lbfgs.step(closure))
                history.append(value)
                total_steps += 1
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                if not math.isfinite(value) or value == last:
                    break
                if out_of_time():
                    status = "time_limit"
                    break
                last = value
        with torch.enable_grad():
            value = float(objective(x).detach())
        finals.append(value)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, x.detach().clone())
    if best is None:
        images, final, status = torch.full((batch, *shape), 0.5), math.nan, "diverged"
    else:
        final, bx = best
        images = bx.float().clamp(0, 1).cpu()
    return AttackResult(
        attack="inverting_gradients",
        images=images,
        labels=labels,
        history=history,
        seconds=time.perf_counter() - start_time,
        steps=total_steps,
        status=status,
        diagnostics={
            "restarts": opts.restarts - 1,
            "evaluations": evaluations,
            "restart_objectives": finals,
            "final_objective": final,
            "label_source": label_source,
            "batch_size": batch,
            "batch_size_source": batch_source,
            "replayed_local_steps": upd.local_steps if replay else 0,
            "update_kind": upd.kind,
            "device": str(device),
        },
    )
