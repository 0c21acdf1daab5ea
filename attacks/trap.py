"""The active server's trap weights: a first linear layer rescaled so that each unit fires for
very few images, each image then read back from a unit it fired alone (Boenisch et al., "When
the Curious Abandon Honesty: Federated Learning Is Not Private", EuroS&P 2023).

Threat model
------------
A *malicious* server that chooses the weights it sends, and nothing else: no change of
architecture, no ClientApp of its own, no labels, no individual update (the inversion reads one
client's gradient and a SecAgg+ aggregate alike: the aggregate is a sum of the same per-image
terms). It knows the image shape and that pixels lie in [0, 1] on 8-bit levels. Here it also
uses a few public images of the same kind (its own held-out evaluation set) to calibrate how
often each unit fires; the paper tunes one scale factor per dataset instead. Paper's setting:
one gradient (FedSGD), the trap in the first fully connected layer, batches of up to 100
ImageNet images of which more than half come back exactly; the paper gives no closed-form
expectation (:func:`expected_recovery` is derived here).

The construction
----------------
Pixels are non-negative, so a unit's pre-activation on an image ``x`` is
``a(x) = P.x - N.x + b`` with ``P`` the row's positive entries and ``N`` the magnitudes of its
negative ones. :func:`plant_trap` keeps the magnitudes of the layer it is given (random at
initialisation, trained later), draws for each row a fresh random half of the entries to be
negative, and scales that half by the row's own factor ``s_i`` (the paper's scale factor):
``a(x) = P.x - s_i N.x + b_i``. Calibrated on the public images: the scale factor alone (the
``1 - rate`` quantile of ``(P.x + b) / N.x``, the row's bias kept) would make the firing
depend on the image's ink, so ``s_i`` sits between it and the factor that leaves ``a``
uncorrelated with the ink (:data:`INK_MIX`), and the bias ``b_i`` makes the unit fire for
``rate`` of the public images. Each row is then rescaled (weights and bias together, which
leaves its firing unchanged) to its original norm. Same entries, shapes and row norms; no two
rows alike.

The inversion
-------------
For the mean gradient of a batch, unit ``i``'s weight and bias gradients are
``sum_{x fires i} g_i(x) x / B`` and ``sum_{x fires i} g_i(x) / B``: their ratio is the image
itself when ``x`` is the only image that fired the unit, and a weighted mean of the images that
did otherwise. Each candidate ``dW_i / db_i`` is kept only when it is consistent: its pixels lie
in [0, 1], the unit fires on it, and its pixels sit on 8-bit levels (a mean of two images does
not, except where they agree). Candidates that agree (several units trapped the same image) are
one image. The tolerances widen with the update's own noise (SecAgg+'s rounding), estimated
from the weight gradients of the units with the smallest bias gradients (units no image fired,
whose gradients are that noise alone). :class:`Trap`
(registered as ``"trap"``) is the attack: ``construct`` builds the model the server sends, and
calling the attack inverts an update of it.

Not built: the paper's adaptation to convolutional models (the trap in the first fully
connected layer after the convolutions reads back that layer's input, a feature map, which
must still be inverted through the convolutions to give an image).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import Attack, AttackOptions, AttackResult, ThreatModel, Update, as_update, check_input_shape
from .imprint import layer_gradients, trap_layer

__all__ = [
    "Trap",
    "TrapOptions",
    "plant_trap",
    "trap_rate",
    "expected_recovery",
    "trap",
    "NEGATIVE_SHARE",
    "LONE_UNITS",
    "INK_MIX",
    "NOISE_SIGMAS",
]

NEGATIVE_SHARE = 0.5  # the share of each row's entries made negative (and scaled)
# The firing rate is tuned for the images the server expects in one gradient, N: each unit fires
# for about LONE_UNITS / N of the images. Measured on mnist5k with mlp's 1,024 units (the attack
# alone, 3 batches per cell, N = 8, 16, 32, 64, 128, 256): 1/N recovers 1.00, 1.00, 1.00, 0.98,
# 0.87, 0.66; 2/N 1.00, 1.00, 1.00, 0.97, 0.82, 0.54 (and, before INK_MIX, 0.35/N and 4/N less
# than 1/N from N = 32 on).
LONE_UNITS = 1.0
# Where each row's scale factor sits between the ink-neutral one (0) and the scale factor alone
# (1), the bias then setting the rate. The factor alone makes a unit's pre-activation fall with
# the image's ink faster than its spread grows: dense digits (0, 8) fire no unit at all (7 of
# the target run's 64 images). Measured like LONE_UNITS at rate 1/N (N = 16 read with a trap
# tuned to 64, 64, 128, 256): 0.90, 0.89, 0.65, 0.43 with the factor alone; 0.98, 0.90, 0.74,
# 0.58 ink-neutral; 1.00, 0.97-0.99, 0.86-0.88, 0.62-0.66 at 0.3-0.5; 0.98, 0.95, 0.78, 0.54 at 0.7.
INK_MIX = 0.4
# How many standard deviations of the update's own noise (SecAgg+'s rounding) a unit's bias
# gradient must exceed to count as fired, and a candidate's pixels may stray.
NOISE_SIGMAS = 4.0


def trap_rate(images: int) -> float:
    """The share of images each trap unit should fire for when the server expects ``images``
    images in one gradient (one client's batch, or all the clients' under SecAgg+)."""
    if images < 1:
        raise ValueError(f"the trap needs at least one expected image, got {images}")
    return min(0.5, LONE_UNITS / images)


def expected_recovery(units: int, images: int, rate: float) -> float:
    """The expected share of ``images`` recovered when each of ``units`` units fires for each
    image independently with probability ``rate``: an image comes back when at least one unit
    fires for it and for no other image, ``1 - (1 - rate (1 - rate)^(images - 1))^units``.
    Real images are not independent (a bright, thick digit fires more units than a thin one),
    so this is an upper guide, not a promise; the paper gives no closed form."""
    if units < 1 or images < 1 or not 0 < rate < 1:
        return 0.0
    alone = rate * (1.0 - rate) ** (images - 1)
    return 1.0 - (1.0 - alone) ** units


def plant_trap(
    model: nn.Module, input_shape, public: Tensor, *, rate: float, seed: int = 0, share: float = NEGATIVE_SHARE
) -> nn.Module:
    """A copy of ``model`` whose first linear layer on the image holds trap weights firing for
    about ``rate`` of ``public`` images ``(N, C, H, W)`` in [0, 1] (see the module docstring).
    Only that layer's weight and bias change; every entry keeps its name, shape and dtype, and
    every row its norm. Needs a model that starts ``Flatten, Linear`` (``mlp``)."""
    shape = check_input_shape(input_shape)
    if not 0 < rate < 1:
        raise ValueError(f"the trap's firing rate must be in (0, 1), got {rate}")
    if not 0 < share < 1:
        raise ValueError(f"the trap's negative share must be in (0, 1), got {share}")
    if public.dim() != 4 or len(public) < 2 or tuple(public.shape[1:]) != shape:
        raise ValueError(f"the trap needs at least 2 public images of shape {shape}")
    built = copy.deepcopy(model)
    _, layer = _trap_layer(built, shape)
    w = layer.weight.detach().double().cpu()
    b = layer.bias.detach().double().cpu()
    flat = public.detach().double().flatten(1).cpu()  # the calibration is made on the CPU
    gen = torch.Generator().manual_seed(int(seed))
    negative = torch.rand(w.shape, generator=gen, dtype=torch.float64).argsort(1) < round(share * w.shape[1])
    magnitude = w.abs()
    pos, neg = torch.where(negative, 0.0, magnitude), torch.where(negative, magnitude, 0.0)
    p, n = flat @ pos.T, flat @ neg.T  # (images, units): the two halves' sums
    ink = flat.sum(1, keepdim=True) - flat.sum(1).mean()
    # the scale factor alone, the row's own bias kept: the unit fires when (P.x + b) / N.x > s
    alone = torch.quantile((p + b) / n.clamp_min(1e-12), 1.0 - rate, dim=0)
    # the factor that leaves the pre-activation uncorrelated with the image's ink
    neutral = ((p - p.mean(0)) * ink).sum(0) / ((n - n.mean(0)) * ink).sum(0).clamp_min(1e-12)
    scale = (neutral + INK_MIX * (alone - neutral)).clamp_min(1e-6)
    trapped = pos - scale[:, None] * neg
    bias = -torch.quantile(p - scale * n, 1.0 - rate, dim=0)  # fires for ``rate`` of the public images
    norm = w.norm(dim=1) / trapped.norm(dim=1).clamp_min(1e-12)  # keep each row's norm (and its firing)
    with torch.no_grad():
        layer.weight.copy_((trapped * norm[:, None]).to(layer.weight))
        layer.bias.copy_((bias * norm).to(layer.bias))
    return built


def _trap_layer(model: nn.Module, shape: tuple[int, int, int]) -> tuple[int, nn.Linear]:
    """:func:`attacks.imprint.trap_layer` (the first layer, linear on the image), refused in the
    trap's words."""
    try:
        return trap_layer(model, shape)
    except ValueError:
        raise ValueError("trap weights need a model whose first layer is linear on the image (mlp)") from None


@dataclass(frozen=True)
class TrapOptions(AttackOptions):
    """The settings of :class:`Trap`'s inversion.

    ``rel_tol``: a unit whose bias gradient is at most this fraction of the largest did not
    fire (rounding noise, e.g. SecAgg+'s quantisation). ``range_tol``: how far outside [0, 1]
    a candidate's pixels may stray. ``levels``: the images' quantisation (255: 8-bit; 0: no
    such check); ``level_tol``: the largest distance of a candidate's pixel from a level, in
    levels. ``same_psnr``: candidates this close (dB) are one image. ``min_units``: an image
    needs at least this many units that agree on it (1: a unit alone suffices)."""

    rel_tol: float = 1e-5
    range_tol: float = 1e-3
    levels: int = 255
    level_tol: float = 0.25
    same_psnr: float = 60.0
    min_units: int = 1

    def _check(self) -> None:
        for name in ("rel_tol", "range_tol", "level_tol", "same_psnr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"option {name} must be a finite number >= 0, got {value}")
        if self.levels < 0:
            raise ValueError(f"option levels must be >= 0 (0: no check), got {self.levels}")
        if self.min_units < 1:
            raise ValueError(f"option min_units must be >= 1, got {self.min_units}")


class Trap(Attack):
    """Trap weights (Boenisch et al., EuroS&P 2023): the active server rescales the model's
    first linear layer so that each unit fires for few images (:meth:`construct`,
    :func:`plant_trap`), and reads each image back from a unit it fired alone, one division
    per unit, kept when the candidate is consistent (see the module docstring).

    Threat model: a malicious server that chooses the weights it sends (entries and shapes
    unchanged: an unmodified ClientApp trains on them) and calibrates the firing rate on public
    images of the same kind; it needs no labels and no batch size, and an aggregate (SecAgg+)
    inverts as well as one client's update. Paper's setting: FedSGD, the trap in the first fully
    connected layer; this form needs a model whose first layer is linear on the image (``mlp``).
    ``threat`` and ``seed`` are unused: nothing is granted, nothing is random."""

    name = "trap"
    Options = TrapOptions

    @classmethod
    def construct(
        cls, model: nn.Module, input_shape, public: Tensor, bins: int, *, seed: int = 0, images: int | None = None
    ) -> nn.Module:
        """The model the server sends instead of ``model``: :func:`plant_trap` with the firing
        rate for ``images`` expected images per gradient (:func:`trap_rate`; None: the
        imprint's default target, 64). ``bins`` is the imprint's setting: the trap uses every
        unit of the layer."""
        return plant_trap(model, input_shape, public, rate=trap_rate(images or 64), seed=seed)

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: TrapOptions,
    ) -> AttackResult:
        return _read_traps(model, update, input_shape, options)


def trap(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape,
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    **options: Any,
) -> AttackResult:
    """Read the images back from an update of a model carrying trap weights: ``Trap()(...)``.
    Returns one image per distinct consistent candidate, the most precise first (the largest
    bias gradient); ``diagnostics`` counts the layer's units, those that fired, the candidates
    kept and the images, and ``agreed``: the images that more than one unit gave."""
    return Trap()(model, update, input_shape, threat, seed=seed, **options)


def _read_traps(model: nn.Module, update: Update | Sequence[Tensor], input_shape, opts: TrapOptions) -> AttackResult:
    """The inversion of :func:`trap`."""
    start = time.perf_counter()
    shape = check_input_shape(input_shape)
    update = as_update(update)
    at, layer = _trap_layer(model, shape)
    dw, db, w, b = layer_gradients(update, at, layer, "trap")
    # the update's own noise per entry (SecAgg+'s rounding; 0 for a plain gradient), from the
    # weight gradient of the quarter of units with the smallest bias gradient: units no image
    # fired (a trap tuned to the aggregate leaves about a third of them unfired)
    quiet = torch.argsort(db.abs())[: max(1, db.numel() // 4)]
    noise = 1.4826 * float(dw[quiet].abs().median()) if db.numel() else 0.0
    top = float(db.abs().max()) if db.numel() else 0.0
    floor = max(opts.rel_tol * top, NOISE_SIGMAS * noise)
    fired = torch.nonzero(db.abs() > floor).flatten() if top > 0 else torch.zeros(0, dtype=torch.long)
    fired = fired[torch.argsort(-db[fired].abs())]  # the most precise candidates first
    cand = dw[fired] / db[fired, None]
    # a candidate's pixel error: the noise of both gradients over its bias gradient
    spread = NOISE_SIGMAS * 2 * noise / db[fired].abs()
    slack = spread.clamp_min(opts.range_tol)[:, None]
    ok = (cand >= -slack).all(1) & (cand <= 1 + slack).all(1)
    ok &= (cand * w[fired]).sum(1) + b[fired] > 0  # the unit fires on its own candidate
    if opts.levels:  # as tight as the noise allows (none left beyond half a level)
        scaled = cand * opts.levels
        ok &= (scaled - scaled.round()).abs().amax(1) <= (spread * opts.levels).clamp_min(opts.level_tol)
    cand, spread = cand[ok], spread[ok]
    # one image per group of agreeing candidates (within the noise), represented by its most precise one
    same = 10.0 ** (-opts.same_psnr / 10.0)
    reps: list[int] = []
    votes: list[int] = []
    if len(cand):
        bound = (spread[:, None] ** 2 + spread[None, :] ** 2).clamp_min(same)
        close = torch.cdist(cand, cand).pow(2) / cand.shape[1] <= bound
        taken = torch.zeros(len(cand), dtype=torch.bool)
        for i in range(len(cand)):
            if taken[i]:
                continue
            group = close[i] & ~taken
            taken |= group
            reps.append(i)
            votes.append(int(group.sum()))
    chosen = [r for r, v in zip(reps, votes) if v >= opts.min_units]
    images = cand[chosen].float().view(-1, *shape).clamp(0, 1) if chosen else torch.full((1, *shape), 0.5)
    return AttackResult(
        attack="trap",
        images=images,
        labels=None,
        seconds=time.perf_counter() - start,
        status="ok" if chosen else "empty",
        diagnostics={
            "units": int(db.numel()),
            "fired": int(len(fired)),
            "kept": int(len(cand)),
            "images": len(chosen),
            "agreed": sum(1 for v in votes if v >= max(2, opts.min_units)),
            "device": "cpu",
        },
    )
