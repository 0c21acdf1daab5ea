"""Deep Leakage from Gradients (DLG) and its label-first variant (iDLG).

Threat model: the observer sees the weights a client started from and the client's update
for one batch: its loss gradient (FedSGD), or a weight delta (a one-step delta is the
gradient times ``-lr``; a multi-step delta is turned into its mean gradient, an
approximation). Only the parameter server sees an individual client's update. The batch size
is taken from ``threat``, or estimated from the last layer's gradient when not granted
(:func:`attacks.idlg.estimate_batch_size`, a lower bound: the distinct labels present).
Labels may be granted (``threat.labels``), recovered analytically from the last layer
(iDLG), or optimised jointly with the image (DLG).

Paper's setting (Zhu, Liu and Han, "Deep Leakage from Gradients", NeurIPS 2019, and its code):
a LeNet of three 5x5 sigmoid convolutions and one linear layer, every parameter drawn from
U(-0.5, 0.5), images in [0, 1] unnormalised. The dummy image and the dummy label logits are
drawn from a standard normal; the label enters through softmax as the soft target of
cross-entropy; the objective is the sum over layers of squared gradient differences,
minimised by L-BFGS with PyTorch's defaults (lr 1, 20 inner iterations per step, no line
search, history 100), 300 steps. iDLG (Zhao et al., 2020) reads the label off the last
layer's gradient first (:func:`attacks.idlg.idlg_labels`) and optimises only the image.
:data:`FAITHFUL` is that algorithm: ``dlg(..., options=FAITHFUL)``.

Where the original fails, it fails because of the random start: L-BFGS without a line search
takes a huge first step, the sigmoids saturate, the objective blows up (or turns NaN) within a
few steps and never recovers, or it settles on a plateau far from zero. The same image succeeds
from another draw. The default :class:`DLGOptions` keep the paper's objective, soft label and
quasi-Newton method, and change:

- *the optimiser*: L-BFGS with 300 curvature pairs and a strong-Wolfe line search (so the
  first steps do not throw the sigmoids into saturation), :class:`attacks.lbfgs.CompactLBFGS`
  (``optimizer="compact"``); ``optimizer="torch"`` is ``torch.optim.LBFGS`` with the same
  history and line search (the same PSNR for 5% more evaluations and 2.2 times the seconds,
  measured: see :mod:`attacks.lbfgs`);
- *restarts*: a start is abandoned and replaced by a fresh draw (from the same seeded
  generator) when the objective becomes NaN/Inf, exceeds ``explode`` times its starting value,
  L-BFGS stops moving far from a match, or the objective has not fallen enough by fixed
  checkpoints (``stall_checks``); at most ``max_restarts`` restarts, the best start is kept;
- *a start centred on the pixel range* (``image_mean=0.5, image_std=0.1``): the dummy image
  is still a normal draw, but N(0.5, 0.1^2) instead of the paper's N(0, 1). Images live in
  [0, 1]; from a standard-normal start about half of the work goes into pulling the dummy
  into that range (measured on CIFAR-100: about 1,000 objective evaluations per image
  instead of 2,100 to the same gradient match). The soft label keeps the paper's
  standard-normal draw (``label_init="random"``); ``label_init="idlg"`` starts its logits at
  ``label_scale`` on the class :func:`attacks.idlg.idlg_labels` reads off the last layer;
- *a stopping rule in two parts*: a start stops once the gradients match (the objective
  divided by the squared norm of the observed gradient below ``tol``) **and** the dummy image
  has settled (its RMS change over the last L-BFGS step of ``max_iter`` iterations below
  ``settle``, in pixel units of [0, 1]). Why both: how small a gradient mismatch has to be for
  a given image error depends on the image and on the model's initialisation (how well the
  gradient sees each direction of the image), so a mismatch threshold alone stops some runs at
  a worse image while the image is still moving (at a relative mismatch of 1e-8 the images
  were anywhere from 27 to 57 dB over the benchmark's CIFAR-100 and CIFAR-10 images and model
  seeds); the image's own motion is measured in the units of the score. Measured with
  ``experiments.bench.attacks --seeds ... --versus settle=0.0`` (DLG's LeNet, paper
  initialisation, 20 images per seed, labels not granted): on CIFAR-100, model seeds 0-4
  (where ``settle`` was chosen), the lowest per-seed median went from 44.1 to 49.1 dB, the
  old rule needing 0.86 times the new one's evaluations (median per image); on images and
  seeds not used to choose it, CIFAR-100 seeds 5-9 from 40.9 to 48.7 dB, CIFAR-10 seeds 0-4
  from 43.4 to 49.1 dB, and CIFAR-100 seeds 10-25 from 34.8 dB (seed 11: 18/20 above 30 dB,
  every image stopped "ok" after about 35 steps) to 44.4 dB (320/320 above 30 dB).
  ``settle=0`` gives the mismatch rule alone.

Batches (``batch > 1``): :func:`for_batch` applies these rules inside the attack, decided from
the batch size, so a caller need not remember them; one image keeps the settings above (the
same objective evaluations, steps and PSNR, image by image, on the benchmark's 20 CIFAR-100
images, model seed 0: 20/20, median 50.40 dB, before and after).

- *Why a batch is hard here*: the update of DLG's LeNet on 32x32 colour images holds 8,136
  convolution gradients (shared by the whole batch) and a last-layer gradient of rank ``B``
  (about ``B * (768 + classes - B)`` numbers, which pin each image's 768 features), for
  ``3,072 * B`` unknown pixels: more equations than unknowns for ``B <= 3``, fewer for
  ``B >= 4`` (CIFAR-100, B = 4: about 700 unknowns too many; B = 8: about 9,600). Even at
  ``B = 2`` the match is badly conditioned: unconstrained DLG matched the gradient of the
  first CIFAR-100 pair to a relative 1e-9 at 22-25 dB, and from the true pair plus noise
  (30.5 dB) L-BFGS climbed only to 39-40 dB in 1,500 iterations at the same mismatch.
- *the box* (``box``): pixels are kept in [0, 1]. ``"project"``: :class:`~attacks.lbfgs.CompactLBFGS`
  with bounds (two-metric projection: coordinates held at a bound by the gradient leave the
  quasi-Newton step, the line search runs along the projected path); ``"lbfgsb"``: scipy's
  L-BFGS-B (``scipy.optimize.minimize(..., jac=True, method="L-BFGS-B")``, the attack's rules
  checked every ``max_iter`` iterations). Measured on the first CIFAR-100 pair (no prior):
  L-BFGS-B with 100 pairs cost 22 ms per iteration against 2.5 ms per objective evaluation
  (its subspace step is quadratic in the pairs; with 20 pairs 7 ms, but the match after 1,000
  iterations was 6 times worse), so ``"project"`` (the compact form's 300 pairs at about the cost
  of an evaluation) is the batch default. The box alone does not recover a batch: first 8
  images in pairs, median 22.9 dB boxed against 23.1 dB free, at 4,600 against 2,750
  evaluations per image; scipy's L-BFGS-B reached 22.4-25.1 dB in 6,000 iterations.
- *a total-variation prior* (``tv``, relative to the observed gradient's squared norm, the
  same total variation as Inverting Gradients'): the measured difference. First CIFAR-100
  pair, 150 steps: ``tv=0`` 21-24 dB, ``tv=1e-5`` 35.5 / 37.2 dB; first batch of 4, 300 steps:
  ``tv=1e-5`` 26.4-29.6 dB (settled at step 250), ``tv=3e-6`` 26.7-29.2 dB and still moving,
  ``tv`` lowered from 3e-5 to 1e-6 over 250 steps 26.8-29.9 dB (not worth a schedule);
  first 4 images in pairs, the best of 9 starts of 150 steps each: ``tv=1e-6`` median 27.3 dB
  (min 19.7), ``tv=1e-5`` 34.0 dB (min 32.5).
  :data:`BATCH_TV` ``= 1e-5``.
- *stopping with a prior*: the objective no longer falls to zero, so a start stops once the
  image has settled alone (RMS change below :data:`PRIOR_SETTLE` ``= 1e-4`` over a step;
  PSNR had stopped rising there on the batch of 4), or at ``max_steps`` (outcome
  ``"budget"``: no restart, since a fresh start would cost as much again).

Measured with these rules (``python -m experiments.bench.attacks --attack dlg --model lenet
--data npz:data/FILE --images 20 --batch N``, model seed 0, labels not granted; the
seconds on a 2-core machine shared with another heavy job, so about 2-4 times the unloaded
cost, which the evaluations per batch give: about 2.5 / 4.6 / 9 ms each for 2 / 4 / 8 images):
CIFAR-100, pairs 18/20 at >= 30 dB, median 36.2 dB (min 23.6), 2,842 evaluations per pair;
batches of 4 6/20, median 28.9 dB (min 22.2), 4,957 evaluations; batches of 8 2/20, median
26.2 dB (min 22.8), 6,323 evaluations. CIFAR-10 (first 20), batches of 4: 4/20, median 28.5 dB
(min 23.6). iDLG, CIFAR-100, first 8 images in batches of 4: 2/8, median 29.3 dB (min 26.4),
4,654 evaluations per batch (with the prior the stall checks look at the mismatch alone: on
the objective, whose floor is the prior, every iDLG start was abandoned at step 100 and the
batch ran 900 steps, 19,000 evaluations, to 23-27 dB). Labels 100% throughout. Batches of 4 stay under 30 dB: the prior has to supply
what the update lacks.
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
    num_outputs,
    training_loss,
)
from .idlg import batch_size_for, idlg_labels
from .inverting import total_variation
from .lbfgs import CompactLBFGS

__all__ = ["dlg", "idlg", "gradient_distance", "for_batch", "DLGOptions", "DEFAULT", "FAITHFUL"]


@dataclass(frozen=True)
class DLGOptions(AttackOptions):
    """The settings of :func:`dlg` and :func:`idlg` (see the module docstring for why).

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
        if not self.dtype.is_floating_point or (self.memory_dtype is not None and not self.memory_dtype.is_floating_point):
            raise ValueError(f"options dtype and memory_dtype must be floating point, got {self.dtype}, {self.memory_dtype}")


BATCH_BOX = "project"
"""How a batch keeps its pixels in [0, 1] (see the module docstring)."""
BATCH_TV = 1e-5
"""The total-variation weight for a batch, relative to the observed gradient's squared norm."""
SETTLE = 3e-4
"""The settling threshold without a prior (RMS image change per step, pixels in [0, 1])."""
PRIOR_SETTLE = 1e-4
"""The settling threshold with a prior (``tv > 0``): the start's only stopping rule."""

DEFAULT = DLGOptions()

FAITHFUL = DLGOptions(
    max_steps=300, optimizer="torch", line_search="none", history_size=100, dtype=torch.float32,
    image_mean=0.0, image_std=1.0, label_init="random", tol=0.0, settle=0.0, max_restarts=0,
    explode=math.inf, stall_checks=None,
)
"""The original algorithm (Zhu et al.'s code): ``torch.optim.LBFGS`` with its defaults (no line
search, history 100), a standard-normal image and soft label, float32, 300 steps, no restarts,
no early stop."""


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


def _soft_target(label_logits: Tensor, outputs: int) -> Tensor:
    if outputs == 1:  # logistic loss: a probability of the positive class per sample
        return torch.sigmoid(label_logits.squeeze(-1))
    return F.softmax(label_logits, dim=-1)


def _optimizer(variables: list[Tensor], opts: DLGOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "compact":
        bounds = [(0.0, 1.0)] + [None] * (len(variables) - 1) if opts.box == "project" else None
        return CompactLBFGS(variables, lr=opts.lr, max_iter=opts.max_iter, history_size=opts.history_size,
                            memory_dtype=opts.memory_dtype, bounds=bounds)
    if opts.line_search == "none":  # the paper's: PyTorch's defaults, tolerances included
        return torch.optim.LBFGS(variables, lr=opts.lr, max_iter=opts.max_iter, history_size=opts.history_size)
    # With a line search, PyTorch's absolute tolerances (on the objective's change and on the
    # gradient) would end the iterations at a scale-dependent point; the attack's own rule stops.
    return torch.optim.LBFGS(variables, lr=opts.lr, max_iter=opts.max_iter, history_size=opts.history_size,
                             line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)


def _run_lbfgsb(variables: list[Tensor], closure: Any, opts: DLGOptions, check: Any, state: dict) -> bool:
    """One start with scipy's L-BFGS-B (pixels bounded to [0, 1], soft-label logits free):
    ``max_steps * max_iter`` iterations with ``history_size`` pairs, the attack's rule applied
    every ``max_iter`` iterations (``check``, as after a step of the other optimisers). True
    when ``check`` ended the start; False when L-BFGS-B stopped by itself or ran out."""
    from scipy.optimize import minimize  # lazy: only the optional L-BFGS-B box optimiser uses SciPy

    sizes = [v.numel() for v in variables]
    x = variables[0]

    def load(z: np.ndarray) -> None:
        flat = torch.from_numpy(z).to(x.dtype)
        with torch.no_grad():
            offset = 0
            for v, n in zip(variables, sizes):
                v.copy_(flat[offset : offset + n].view_as(v))
                offset += n

    def fg(z: np.ndarray) -> tuple[float, np.ndarray]:
        load(z)
        with torch.enable_grad():
            value = float(closure())
        return value, torch.cat([v.grad.reshape(-1) for v in variables]).double().numpy()

    z0 = torch.cat([v.detach().reshape(-1) for v in variables]).double().numpy()
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
    res = minimize(fg, z0, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                   options=dict(maxcor=opts.history_size, maxiter=opts.max_steps * opts.max_iter,
                                maxfun=100 * opts.max_steps * opts.max_iter, ftol=0.0, gtol=0.0))
    load(res.x)
    return bool(counter["done"])


def _resolve(options: DLGOptions | None, overrides: dict[str, Any], attack: str) -> DLGOptions:
    if options is not None and not isinstance(options, DLGOptions):
        raise ValueError(f"options must be a DLGOptions, got {type(options).__name__}")
    return (options or DEFAULT).override(overrides, attack=attack)


def dlg(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    options: DLGOptions | None = None,
    **overrides: Any,
) -> AttackResult:
    """Reconstruct a batch from its gradient with DLG (see the module docstring).

    ``options``: a :class:`DLGOptions` (default :data:`DEFAULT`; :data:`FAITHFUL` for the
    original algorithm); ``overrides``: its fields by keyword, applied on top
    (``dlg(..., max_steps=100)``); an unknown key or a bad value raises ``ValueError``.
    Granted ``threat.labels`` are used as fixed hard labels. The diagnostics count
    ``evaluations`` (forward + double-backward closures) and say why each start ended.
    """
    return _attack(model, update, input_shape, threat, seed, _resolve(options, overrides, "dlg"), "dlg")


def idlg(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    options: DLGOptions | None = None,
    **overrides: Any,
) -> AttackResult:
    """iDLG: labels from :func:`attacks.idlg.idlg_labels` (unless granted), then DLG on the
    image alone; same options as :func:`dlg`."""
    return _attack(model, update, input_shape, threat, seed, _resolve(options, overrides, "idlg"), "idlg")


def _attack(model: nn.Module, update: Update | Sequence[Tensor], input_shape: Sequence[int], threat: ThreatModel,
            seed: int, opts: DLGOptions, name: str) -> AttackResult:
    start_time = time.perf_counter()
    upd = as_update(update)
    target = check_gradients(model, upd.as_gradients())
    shape = check_input_shape(input_shape)
    dtype = opts.dtype

    outputs = num_outputs(model)
    batch, batch_source = batch_size_for(model, target, threat)
    opts = for_batch(opts, batch)
    if threat.labels is not None:
        labels: Tensor | None = torch.as_tensor(threat.labels, dtype=torch.int64).reshape(-1)
        label_source = "granted"
    elif name == "idlg":
        labels = idlg_labels(model, target, batch_size=batch)
        label_source = "idlg"
    else:
        labels = None
        label_source = "optimised"

    names = [n for n, _ in model.named_parameters()]
    # a private copy of the model in the attack's precision: calling it directly is ~20% cheaper
    # per evaluation than torch.func.functional_call on this small network
    work = copy.deepcopy(model).to(dtype)
    for p in work.parameters():
        p.grad = None
        p.requires_grad_(True)
    plist = list(work.parameters())
    target = [t.to(dtype) for t in target]
    scale = float(sum(float((t.double() ** 2).sum()) for t in target)) or 1.0
    tv_weight = float(opts.tv) * scale  # the prior's weight in the objective's units
    fixed_target: Tensor | None = None
    if labels is not None:
        fixed_target = labels.to(dtype) if outputs == 1 else labels

    gen = torch.Generator().manual_seed(int(seed))
    label_start: Tensor | None = None
    if labels is None and opts.label_init == "idlg":
        guess = idlg_labels(model, target, batch_size=batch)
        if outputs == 1:
            label_start = (2.0 * guess.to(dtype) - 1.0)[:, None] * opts.label_scale
        else:
            label_start = torch.zeros((batch, outputs), dtype=dtype)
            label_start[torch.arange(batch), guess] = opts.label_scale

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
        x = (opts.image_mean + opts.image_std * torch.randn((batch, *shape), generator=gen)).to(dtype)
        if opts.box != "none":
            x = x.clamp(0.0, 1.0)
        x.requires_grad_(True)
        lab = None
        if labels is None:
            lab = torch.randn((batch, outputs), generator=gen).to(dtype)
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
        attempts.append({"outcome": outcome, "steps": state["step"] + 1, "final": value, "start": state["start"],
                         "image_step": state["moved"], "evaluations": evaluations})
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
            rec_labels = (blab.squeeze(-1) > 0).to(torch.int64)
        else:
            rec_labels = blab.argmax(dim=-1).to(torch.int64)
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
            "update_kind": upd.kind,
            "approximate_update": upd.kind == "weight_delta" and upd.local_steps > 1,
            "parameters": names,
        },
    )
