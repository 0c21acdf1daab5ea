"""The optimisation DLG and iDLG share: a dummy batch (and, unless the labels are known, soft
labels) optimised by L-BFGS until its gradient matches the observed one.

:mod:`attacks.dlg` and :mod:`attacks.idlg` are the attacks, and :mod:`attacks.dlg`'s docstring
gives the settings of :class:`DLGOptions` and the measurements behind them. They differ only in
what they hand :func:`match_gradients` about the labels: DLG optimises them (granted ones
are kept fixed), iDLG reads them off the last layer first. This module knows no label rule, so
that both attack modules can use it without importing each other.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn
from torch.nn import functional as F

from .base import (
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
from .lbfgs import CompactLBFGS

__all__ = [
    "DLGOptions",
    "BATCH_BOX",
    "BATCH_TV",
    "SETTLE",
    "PRIOR_SETTLE",
    "for_batch",
    "gradient_distance",
    "total_variation",
    "check_observation",
    "granted_labels",
    "match_gradients",
]


@dataclass(frozen=True)
class DLGOptions(AttackOptions):
    """The settings of :class:`~attacks.dlg.DLG` and :class:`~attacks.idlg.IDLG` (see
    :mod:`attacks.dlg` for why).

    Optimiser: ``max_steps`` L-BFGS steps per start, each of up to ``max_iter`` iterations;
    ``lr`` the first trial step; ``optimizer`` ``"compact"`` (:class:`~attacks.lbfgs.CompactLBFGS`,
    strong-Wolfe line search only) or ``"torch"`` (``torch.optim.LBFGS``); ``line_search``
    ``"strong_wolfe"`` or ``"none"`` (the paper's; ``"torch"`` only); ``history_size`` the
    curvature pairs kept; ``memory_dtype`` the precision of the compact optimiser's stored
    pairs (float32 halves the memory traffic of the direction; no change in evaluations was
    measured); ``dtype`` the precision of the attack (float64: on the CPU no slower here than
    float32, and it lifts float32's floor on the gradient match, about 5e-9 relative).

    Start: the dummy image is drawn from N(``image_mean``, ``image_std``^2); the soft label's
    logits from N(0, 1) (``label_init="random"``) or ``label_scale`` on the iDLG class
    (``"idlg"``).

    Stop: ``tol`` and ``settle`` (both must hold; ``settle=0`` ignores the image's motion,
    ``tol=0`` never stops on a match). ``settle=3e-4`` was chosen from L-BFGS trajectories on
    CIFAR-100, model seeds 0-4: stopping at the first step that moved the image less than
    5e-4 / 3e-4 / 2e-4 gave median PSNRs of about 47 / 52 / 55 dB for median evaluations of
    about 1,000 / 1,050 / 1,340 per image. Restarts: ``max_restarts``, ``explode``,
    ``stall_checks`` ((step, ratio) pairs: at that step the objective must be below
    ``ratio`` times its start); ``explode=inf`` and ``stall_checks=None`` disable them.

    Box and prior: ``box`` ``"none"``, ``"project"`` (bounded compact L-BFGS) or ``"lbfgsb"``
    (scipy's L-BFGS-B); ``tv`` the total-variation weight relative to the observed
    gradient's squared norm (``tv > 0``: a start stops on ``settle`` alone). ``box="auto"``,
    ``tv=None`` and ``settle=None`` are decided from the batch size (:func:`for_batch`): one
    image ``"none"``, 0 and :data:`SETTLE`; a batch :data:`BATCH_BOX`, :data:`BATCH_TV` and
    :data:`PRIOR_SETTLE`.

    Time: ``time_limit`` seconds (0: none) after which the attack stops with its best image so
    far and status ``"time_limit"`` (a budgeted probe, or a bounded run on a large update).
    """

    max_steps: int = 300
    max_iter: int = 20
    lr: float = 1.0
    optimizer: Literal["compact", "torch"] = "compact"
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe"
    history_size: int = 300
    memory_dtype: torch.dtype | None = torch.float32
    dtype: torch.dtype = torch.float64
    image_mean: float = 0.5
    image_std: float = 0.1
    label_init: Literal["random", "idlg"] = "random"
    label_scale: float = 5.0
    tol: float = 1e-8
    settle: float | None = None
    max_restarts: int = 8
    explode: float = 10.0
    stall_checks: tuple[tuple[int, float], ...] | None = ((25, 1e-2), (100, 1e-5))
    box: Literal["auto", "none", "project", "lbfgsb"] = "auto"
    tv: float | None = None
    time_limit: float = 0.0

    def _check(self) -> None:
        for name in ("max_steps", "max_iter", "history_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name} must be >= 1, got {getattr(self, name)}")
        if self.max_restarts < 0:
            raise ValueError(f"option max_restarts must be >= 0, got {self.max_restarts}")
        if not (math.isfinite(self.time_limit) and self.time_limit >= 0):
            raise ValueError(f"option time_limit must be a number of seconds >= 0, got {self.time_limit}")
        if not self.lr > 0:
            raise ValueError(f"option lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.image_mean) and math.isfinite(self.image_std) and self.image_std > 0):
            raise ValueError(f"image_mean must be finite and image_std > 0, got {self.image_mean}, {self.image_std}")
        if not (self.tol >= 0 and (self.settle is None or self.settle >= 0)):
            raise ValueError(f"options tol and settle must be >= 0, got {self.tol}, {self.settle}")
        if not self.explode > 1:
            raise ValueError(f"option explode must be > 1, got {self.explode}")
        if self.optimizer == "compact" and self.line_search != "strong_wolfe":
            raise ValueError("optimizer 'compact' has a strong-Wolfe line search only: use optimizer='torch' for none")
        if self.tv is not None and not (math.isfinite(self.tv) and self.tv >= 0):
            raise ValueError(f"option tv must be a finite number >= 0 (or None: by batch size), got {self.tv}")
        if self.box == "project" and self.optimizer != "compact":
            raise ValueError("box 'project' is the compact optimiser's: use optimizer='compact' (or box='lbfgsb')")
        memory_float = self.memory_dtype is None or self.memory_dtype.is_floating_point
        if not (self.dtype.is_floating_point and memory_float):
            raise ValueError(
                f"options dtype and memory_dtype must be floating point, got {self.dtype}, {self.memory_dtype}"
            )


BATCH_BOX = "project"
"""How a batch keeps its pixels in [0, 1] (see the module docstring)."""
BATCH_TV = 1e-5
"""The total-variation weight for a batch, relative to the observed gradient's squared norm."""
SETTLE = 3e-4
"""The settling threshold without a prior (RMS image change per step, pixels in [0, 1])."""
PRIOR_SETTLE = 1e-4
"""The settling threshold with a prior (``tv > 0``): the start's only stopping rule."""


def for_batch(opts: DLGOptions, batch: int) -> DLGOptions:
    """``opts`` with its batch-size rules applied (the settings left to them: ``box="auto"``,
    ``tv=None``): one image keeps the unconstrained optimiser and no prior (the measured
    single-image figures); a batch gets :data:`BATCH_BOX` and :data:`BATCH_TV`."""
    box = opts.box if opts.box != "auto" else ("none" if batch == 1 else BATCH_BOX)
    tv = opts.tv if opts.tv is not None else (0.0 if batch == 1 else BATCH_TV)
    settle = opts.settle if opts.settle is not None else (SETTLE if tv == 0 else PRIOR_SETTLE)
    if box == "project" and opts.optimizer != "compact":
        box = "lbfgsb"
    return dataclasses.replace(opts, box=box, tv=tv, settle=settle)


def gradient_distance(dummy_grads: Sequence[Tensor], target_grads: Sequence[Tensor]) -> Tensor:
    """DLG's objective: the sum over layers of squared gradient differences."""
    # mse_loss(sum) is one fused kernel each way: ~10% cheaper per evaluation than (d ** 2).sum()
    return sum(F.mse_loss(gd, gt, reduction="sum") for gd, gt in zip(dummy_grads, target_grads))


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (the prior of
    Inverting Gradients, and DLG's for a batch)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _soft_target(label_logits: Tensor, outputs: int) -> Tensor:
    if outputs == 1:  # logistic loss: a probability of the positive class per sample
        return torch.sigmoid(label_logits.squeeze(-1))
    return F.softmax(label_logits, dim=-1)


def _optimizer(variables: list[Tensor], opts: DLGOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "compact":
        bounds = [(0.0, 1.0)] + [None] * (len(variables) - 1) if opts.box == "project" else None
        return CompactLBFGS(
            variables,
            lr=opts.lr,
            max_iter=opts.max_iter,
            history_size=opts.history_size,
            memory_dtype=opts.memory_dtype,
            bounds=bounds,
        )
    if opts.line_search == "none":  # the paper's: PyTorch's defaults, tolerances included
        return torch.optim.LBFGS(variables, lr=opts.lr, max_iter=opts.max_iter, history_size=opts.history_size)
    # With a line search, PyTorch's absolute tolerances (on the objective's change and on the
    # gradient) would end the iterations at a scale-dependent point; the attack's own rule stops.
    return torch.optim.LBFGS(
        variables,
        lr=opts.lr,
        max_iter=opts.max_iter,
        history_size=opts.history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )


def _run_lbfgsb(variables: list[Tensor], closure: Any, opts: DLGOptions, check: Any, state: dict) -> bool:
    """One start with scipy's L-BFGS-B (pixels bounded to [0, 1], soft-label logits free):
    ``max_steps * max_iter`` iterations with ``history_size`` pairs, the attack's rule applied
    every ``max_iter`` iterations (``check``, as after a step of the other optimisers). True
    when ``check`` ended the start; False when L-BFGS-B stopped by itself or ran out."""
    sizes = [v.numel() for v in variables]
    x = variables[0]

    def load(z: np.ndarray) -> None:
        flat = torch.from_numpy(z).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            offset = 0
            for v, n in zip(variables, sizes):
                v.copy_(flat[offset : offset + n].view_as(v))
                offset += n

    def fg(z: np.ndarray) -> tuple[float, np.ndarray]:
        load(z)
        with torch.enable_grad():
            value = float(closure())
        return value, torch.cat([v.grad.reshape(-1) for v in variables]).double().cpu().numpy()

    z0 = torch.cat([v.detach().reshape(-1) for v in variables]).double().cpu().numpy()  # scipy works on the CPU
    state["start"] = fg(z0)[0]
    counter = {"iterations": 0, "step": 0, "done": False}
    previous = [x.detach().clone()]

    def callback(intermediate_result: Any) -> None:
        counter["iterations"] += 1
        if counter["iterations"] % opts.max_iter:
            return
        load(intermediate_result.x)
        image, logits = x.detach().clone(), None if len(variables) == 1 else variables[1].detach().clone()
        done = check(counter["step"], float(intermediate_result.fun), image, logits, previous[0])
        previous[0] = image
        counter["step"] += 1
        if done:
            counter["done"] = True
            raise StopIteration

    bounds = [(0.0, 1.0)] * sizes[0] + [(None, None)] * sum(sizes[1:])
    res = minimize(
        fg,
        z0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        callback=callback,
        options=dict(
            maxcor=opts.history_size,
            maxiter=opts.max_steps * opts.max_iter,
            maxfun=100 * opts.max_steps * opts.max_iter,
            ftol=0.0,
            gtol=0.0,
        ),
    )
    load(res.x)
    return bool(counter["done"])


def check_observation(
    model: nn.Module, update: Update | Sequence[Tensor], input_shape: Sequence[int]
) -> tuple[Update, list[Tensor], tuple[int, int, int]]:
    """The observation, checked: the update, the gradient it stands for (one tensor per
    parameter, ``ValueError`` naming a bad one) and the image shape. A model without a linear
    head is refused here too (:func:`~attacks.base.num_outputs`), before anything is read off
    its last layer."""
    upd = as_update(update)
    target = check_gradients(model, upd.as_gradients())
    shape = check_input_shape(input_shape)
    num_outputs(model)
    return upd, target, shape


def granted_labels(threat: ThreatModel) -> Tensor | None:
    """The labels ``threat`` grants, as ``(B,)`` int64, or None."""
    return None if threat.labels is None else torch.as_tensor(threat.labels, dtype=torch.int64).reshape(-1)


def match_gradients(
    model: nn.Module,
    update: Update,
    target: list[Tensor],
    shape: tuple[int, int, int],
    opts: DLGOptions,
    *,
    seed: int,
    name: str,
    batch: int,
    batch_source: str,
    labels: Tensor | None,
    label_source: str,
    label_guess: Tensor | None = None,
    start_time: float,
) -> AttackResult:
    """Optimise a dummy batch of ``batch`` images of ``shape`` until its gradient on ``model``
    matches ``target`` (the gradient ``update`` stands for, from :func:`check_observation`).

    ``labels``: the batch's labels if the attack knows them (granted, or read off the last
    layer), used as fixed hard labels; None: soft labels are optimised with the image, their
    logits starting from a normal draw, or from ``opts.label_scale`` on ``label_guess`` when
    ``opts.label_init="idlg"``. ``batch_source`` and ``label_source`` only go into the
    diagnostics; ``start_time`` (``time.perf_counter()``) is when the attack began."""
    dtype = opts.dtype
    device = model_device(model)  # the caller's choice: the dummies live beside the model
    outputs = num_outputs(model)
    opts = for_batch(opts, batch)

    names = [n for n, _ in model.named_parameters()]
    # a private copy of the model in the attack's precision: calling it directly is ~20% cheaper
    # per evaluation than torch.func.functional_call on this small network
    work = copy.deepcopy(model).to(dtype)
    for p in work.parameters():
        p.grad = None
        p.requires_grad_(True)
    plist = list(work.parameters())
    target = [t.to(device=device, dtype=dtype) for t in target]
    scale = float(sum(float((t.double() ** 2).sum()) for t in target)) or 1.0
    tv_weight = float(opts.tv) * scale  # the prior's weight in the objective's units
    fixed_target: Tensor | None = None
    if labels is not None:
        fixed_target = (labels.to(dtype) if outputs == 1 else labels).to(device)

    gen = torch.Generator().manual_seed(int(seed))
    label_start: Tensor | None = None
    if labels is None and opts.label_init == "idlg":
        if label_guess is None:
            raise ValueError("label_init 'idlg' needs a label guess")
        if outputs == 1:
            label_start = (2.0 * label_guess.to(dtype) - 1.0)[:, None] * opts.label_scale
        else:
            label_start = torch.zeros((batch, outputs), dtype=dtype)
            label_start[torch.arange(batch), label_guess.cpu()] = opts.label_scale
        label_start = label_start.to(device)

    def objective(x: Tensor, label_logits: Tensor | None) -> Tensor:
        logits = work(x)
        y = fixed_target if label_logits is None else _soft_target(label_logits, outputs)
        loss = training_loss(logits, y)
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        value = gradient_distance(grads, target)
        return value + tv_weight * total_variation(x) if tv_weight > 0 else value

    history: list[float] = []
    attempts: list[dict] = []
    best: tuple[float, Tensor, Tensor | None] | None = None
    total_steps = 0
    evaluations = 0
    status = "not_converged"
    stall_checks = opts.stall_checks or ()

    for _attempt in range(opts.max_restarts + 1):
        # drawn on the CPU (the same start on every device), then moved
        x = (opts.image_mean + opts.image_std * torch.randn((batch, *shape), generator=gen)).to(device, dtype)
        if opts.box != "none":
            x = x.clamp(0.0, 1.0)
        x.requires_grad_(True)
        lab = None
        if labels is None:
            lab = torch.randn((batch, outputs), generator=gen).to(device, dtype)
            if label_start is not None:
                lab = label_start.clone()
            lab.requires_grad_(True)
        variables = [x] if lab is None else [x, lab]

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            for v in variables:
                v.grad = None
            value = objective(x, lab)
            grads = torch.autograd.grad(value, variables)
            for v, g in zip(variables, grads):
                v.grad = g
            return value.detach()

        def mismatch(value: float, image: Tensor) -> float:
            """The gradient mismatch part of an objective value (without the prior)."""
            return value - tv_weight * float(total_variation(image)) if tv_weight > 0 else value

        state = {"start": math.nan, "last": math.nan, "moved": math.inf, "step": 0, "outcome": "not_converged"}

        def check(step: int, value: float, image: Tensor, label_logits: Tensor | None, other: Tensor) -> bool:
            """Record one step: ``value`` the objective at ``image`` (and ``label_logits``),
            ``other`` the image at the step's other end. True when the start is over (its
            outcome in ``state``)."""
            nonlocal best, total_steps
            total_steps += 1
            history.append(value)
            state["step"] = step
            if step == 0 and math.isnan(state["start"]):
                state["start"] = value
            if math.isfinite(value) and (best is None or value < best[0]):
                best = (value, image, label_logits)
            if opts.time_limit > 0 and time.perf_counter() - start_time > opts.time_limit:
                state["outcome"] = "time_limit"
                return True
            if not math.isfinite(value) or not bool(torch.isfinite(other).all()):
                state["outcome"] = "diverged"
                return True
            # how far the image moved in this step; it has settled when that is small
            moved = state["moved"] = float((image - other).pow(2).mean().sqrt())
            if tv_weight > 0:
                # with a prior the objective does not fall to zero: the image's motion alone says stop
                if opts.settle > 0 and moved < opts.settle:
                    state["outcome"] = "ok"
                    return True
            elif mismatch(value, image) / scale < opts.tol and (opts.settle == 0 or moved < opts.settle):
                state["outcome"] = "ok"
                return True
            if value > opts.explode * state["start"]:
                state["outcome"] = "diverged"
                return True
            # with a prior the objective has a floor: the checks look at the gradient mismatch
            if any(step + 1 == k and mismatch(value, image) > r * state["start"] for k, r in stall_checks):
                state["outcome"] = "stalled"
                return True
            if step > 0 and value == state["last"]:  # L-BFGS has stopped moving
                matched = tv_weight > 0 or mismatch(value, image) / scale < 100 * opts.tol
                state["outcome"] = "stopped" if matched else "stuck"
                return True
            state["last"] = value
            return False

        if opts.box == "lbfgsb":
            finished = _run_lbfgsb(variables, closure, opts, check, state)
        else:
            opt = _optimizer(variables, opts)
            finished = False
            for step in range(opts.max_steps):
                snapshot = (x.detach().clone(), None if lab is None else lab.detach().clone())
                value = float(opt.step(closure))  # objective at the start of this step, i.e. at snapshot
                # the step is scored where it started (snapshot); its motion is to where it ended
                if check(step, value, snapshot[0], snapshot[1], x.detach()):
                    finished = True
                    break
        outcome = state["outcome"]
        if not finished:
            # evaluate where the last step left the dummy
            with torch.enable_grad():
                value = float(objective(x, lab).detach())
            if math.isfinite(value) and (best is None or value < best[0]):
                best = (value, x.detach().clone(), None if lab is None else lab.detach().clone())
            if math.isfinite(value) and mismatch(value, x.detach()) / scale < opts.tol:
                outcome = "ok"
            elif math.isfinite(value) and tv_weight > 0:
                outcome = "budget"  # still moving at max_steps: a fresh start would cost as much again
        else:
            value = history[-1]
        attempts.append(
            {
                "outcome": outcome,
                "steps": state["step"] + 1,
                "final": value,
                "start": state["start"],
                "image_step": state["moved"],
                "evaluations": evaluations,
            }
        )
        if outcome in ("ok", "stopped"):  # stopped: L-BFGS at its own tolerance, within 100 * tol
            status = "ok"
            break
        if outcome == "budget":
            status = "not_converged"
            break
        if outcome == "time_limit":
            status = "time_limit"
            break
        status = "diverged" if outcome in ("diverged", "stuck") else "not_converged"

    if best is None:  # every start NaN from its first step
        images = torch.full((batch, *shape), 0.5)
        final, rec_labels = math.nan, labels
        status = "diverged"
    else:
        final, bx, blab = best
        images = bx.detach().float().clamp(0, 1).cpu()
        if labels is not None:
            rec_labels = labels
        elif outputs == 1:
            rec_labels = (blab.squeeze(-1) > 0).to(torch.int64).cpu()
        else:
            rec_labels = blab.argmax(dim=-1).to(torch.int64).cpu()
        if status != "ok" and tv_weight == 0 and final / scale < opts.tol:
            status = "ok"
    return AttackResult(
        attack=name,
        images=images,
        labels=rec_labels,
        history=history,
        seconds=time.perf_counter() - start_time,
        steps=total_steps,
        status=status,
        diagnostics={
            "restarts": len(attempts) - 1,
            "evaluations": evaluations,
            "optimizer": opts.optimizer,
            "line_search": opts.line_search,
            "box": opts.box,
            "tv": opts.tv,
            "attempts": attempts,
            "final_objective": final,
            "relative_objective": final / scale if math.isfinite(final) else math.nan,
            "label_source": label_source,
            "batch_size": batch,
            "batch_size_source": batch_source,
            "update_kind": update.kind,
            "approximate_update": update.kind == "weight_delta" and update.local_steps > 1,
            "parameters": names,
            "device": str(device),
        },
    )
