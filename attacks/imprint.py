"""The active server's imprint: a linear layer built so that each image's gradient can be read
back alone, even from an aggregate of many (Fowl et al., "Robbing the Fed", ICLR 2022).

Threat model
------------
A *malicious* server: it chooses the weights it sends (and, in a deployment, can ship the
ClientApp too). It knows the image shape and holds some public images of the same kind (here:
its own held-out evaluation set) to place the bins. It needs no labels, no batch size and no
individual update: the inversion works on one client's gradient and on the SecAgg+ aggregate
of many alike, because the aggregate is a sum of the same per-image terms.

The construction
----------------
``k`` units of a linear layer on the flattened image ``x`` share one measurement direction
``m`` (every row of the weight is ``m``) and have biases ``-q_1 > ... > -q_k`` at quantiles
``q_i`` of ``h = m . x`` over public images; a ReLU follows. Unit ``i`` is active for exactly
the images with ``h(x) > q_i``. If the loss's derivative with respect to a unit's output is
the same for every unit (``g(x)``: arranged by giving every bin unit the same outgoing
weights), the gradients are cumulative sums over the images above each threshold::

    dL/dW_i = sum_{x: h(x) > q_i} g(x) x,      dL/db_i = sum_{x: h(x) > q_i} g(x)

so for the images in the interval ``(q_i, q_{i+1}]`` the differences of consecutive units
give ``sum g(x) x`` and ``sum g(x)``, and their ratio is the image itself when it is alone in
its interval (a weighted blend of the images sharing it otherwise). Analytic: two subtractions
and a division per bin. With bins at the quantiles, one image of a total batch of ``N`` is
alone in one of ``k`` recoverable intervals with probability about
``k/(k+1) * (1 - 1/(k+1))**(N-1)`` (:func:`expected_recovery`; about ``exp(-(N-1)/k)``).

Two forms:

- :func:`plant_imprint` (weights only): the model's own first linear layer on the input
  becomes the imprint and the next linear layer (the head) gets identical columns for the bin
  units (its other columns and units are zeroed). Same architecture and shapes: an unmodified
  ClientApp trains on it. Needs a model whose first layer is linear (``mlp`` here) and at
  most as many bins as that layer has units.
- :class:`ImprintBlock` (architecture change, the paper's form): a residual block in front of
  any model, ``x + dec(relu(enc(x)))`` with the bins in ``enc`` and identical columns in
  ``dec``; needs a ClientApp that builds it, i.e. one the server ships.

:class:`Imprint` (registered as ``"imprint"``) and :class:`BlockImprint` (``"imprint-block"``)
are the attack in each form: ``construct`` builds the model the server sends, and calling the
attack inverts an update of it, given the weights that were sent (the same inversion for both).
A FedAvg update of one local step is ``-lr`` times the gradient and inverts the same way; more
local steps move the thresholds between steps and blur the differences (not this paper's
setting).
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

__all__ = [
    "Imprint",
    "BlockImprint",
    "ImprintOptions",
    "ImprintBlock",
    "ImprintPlan",
    "plan_imprint",
    "plant_imprint",
    "imprint_block_model",
    "imprint",
    "expected_recovery",
    "trap_layer",
    "layer_gradients",
    "load_model",
    "BLOCK_KEYS",
]


def expected_recovery(bins: int, images: int) -> float:
    """The expected fraction of ``images`` alone in a recoverable interval when ``bins``
    thresholds sit at the quantiles of the measurement (the ``bins + 1`` intervals equally
    likely, the lowest one not recoverable)."""
    if bins < 1 or images < 1:
        return 0.0
    p = 1.0 / (bins + 1)
    return (1.0 - p) * (1.0 - p) ** (images - 1)


@dataclass(frozen=True)
class ImprintPlan:
    """The imprint's measurement direction ``m`` (unit norm, over the flattened image), its
    ``thresholds`` (ascending quantiles of ``m . x`` over the public images) and the scale
    ``reach``: the largest ``sum_i relu(m . x - q_i)`` over the public images, used to keep
    the model's outputs moderate (so that ``g(x)`` never vanishes by saturation)."""

    measurement: Tensor
    thresholds: Tensor
    reach: float

    @property
    def bins(self) -> int:
        return int(self.thresholds.numel())


def plan_imprint(public: Tensor, bins: int, *, seed: int = 0) -> ImprintPlan:
    """Bins for ``public`` images ``(N, C, H, W)`` in [0, 1]: a seeded Gaussian direction and
    the quantiles of its measurement at ``i / (bins + 1)``, ``i = 1..bins``, smoothed
    (:func:`_smooth_quantiles`)."""
    if bins < 1:
        raise ValueError(f"an imprint needs at least one bin, got {bins}")
    if public.dim() != 4 or len(public) < 2:
        raise ValueError("plan_imprint needs a batch of at least 2 public images (N, C, H, W)")
    flat = public.detach().double().flatten(1).cpu()  # the plan is made on the CPU
    gen = torch.Generator().manual_seed(int(seed))
    m = torch.randn(flat.shape[1], generator=gen, dtype=torch.float64)
    m = m / m.norm()
    h = flat @ m
    q = _smooth_quantiles(h, torch.arange(1, bins + 1, dtype=torch.float64) / (bins + 1))
    reach = float(torch.relu(h[:, None] - q[None, :]).sum(1).max())
    return ImprintPlan(m.float(), q.float(), max(reach, 1e-12))


def _smooth_quantiles(values: Tensor, probs: Tensor, grid: int = 20_000) -> Tensor:
    """Quantiles of a Gaussian kernel density estimate of ``values`` (Silverman's bandwidth).
    Empirical quantiles of a few public images put several bins between two neighbouring
    samples and leave wide gaps elsewhere: measured on mnist5k (1,000 public images, 500
    bins, 64 images), 83.7% of the images alone in their interval against 87.9% with these
    (the quantile rule's expectation: 88.0%)."""
    n = len(values)
    bw = 1.06 * float(values.std()) * n**-0.2 + 1e-12
    xs = torch.linspace(float(values.min()) - 4 * bw, float(values.max()) + 4 * bw, grid, dtype=torch.float64)
    cdf = torch.zeros(grid, dtype=torch.float64)
    for chunk in values.split(256):
        cdf += (0.5 * (1 + torch.erf((xs[:, None] - chunk[None, :]) / (bw * math.sqrt(2))))).sum(1)
    cdf /= n
    at = torch.searchsorted(cdf, probs.to(torch.float64)).clamp(max=grid - 1)
    return torch.sort(xs[at]).values


def _linear_on_input(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, nn.Linear]:
    """The position and the first layer of a flat Sequential that starts ``Flatten, Linear``."""
    layers = list(model) if isinstance(model, nn.Sequential) else []
    size = math.prod(input_shape)
    if (
        len(layers) >= 2
        and isinstance(layers[0], nn.Flatten)
        and isinstance(layers[1], nn.Linear)
        and layers[1].in_features == size
    ):
        return 1, layers[1]
    raise ValueError("the weights-only imprint needs a model whose first layer is linear on the image (mlp)")


def plant_imprint(model: nn.Sequential, input_shape, plan: ImprintPlan) -> nn.Sequential:
    """A copy of ``model`` (``Flatten, Linear, ReLU, Linear``, the second the head) with the
    imprint in its first linear layer: the first ``plan.bins`` units measure ``m`` with biases
    ``-q``, both divided by ``plan.reach`` (the same units fire; the sum of the bin units'
    outputs stays below 1 on the public images), the other units are switched off (zero
    weights, bias -1), and the head reads every bin unit through the same column ``2 e_0``:
    only the first class's logit moves, by at most about 2, so no softmax saturates and
    ``g(x) = 2 (p_0 - [y = 0])`` stays of order 1 (large against SecAgg+'s rounding). Same
    names and shapes as ``model``."""
    shape = check_input_shape(input_shape)
    at, first = _linear_on_input(model, shape)
    layers = list(model)
    if len(layers) != at + 3 or not isinstance(layers[at + 1], nn.ReLU) or not isinstance(layers[at + 2], nn.Linear):
        raise ValueError("the weights-only imprint needs Flatten, Linear, ReLU, Linear (the head): mlp")
    k = plan.bins
    if k > first.out_features:
        raise ValueError(
            f"{k} bins do not fit in a layer of {first.out_features} units: use at most {first.out_features}"
        )
    built = copy.deepcopy(model)
    enc, head = built[at], built[at + 2]
    with torch.no_grad():
        enc.weight.zero_()
        enc.weight[:k] = (plan.measurement / plan.reach).to(enc.weight)
        if enc.bias is not None:
            enc.bias.fill_(-1.0)
            enc.bias[:k] = (-plan.thresholds / plan.reach).to(enc.bias)
        head.weight.zero_()
        head.weight[0, :k] = 2.0
        if head.bias is not None:
            head.bias.zero_()
    return built


class ImprintBlock(nn.Module):
    """Robbing the Fed's imprint as a residual block in front of a model:
    ``x + dec(relu(enc(flatten(x))))`` reshaped to the image. ``enc`` holds the bins; every
    column of ``dec`` is the same small constant, so the model behind sees the image shifted by
    a little brightness and every bin unit gets the same ``g(x)``."""

    def __init__(self, input_shape, bins: int) -> None:
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        size = math.prod(self.input_shape)
        self.enc = nn.Linear(size, bins)
        self.dec = nn.Linear(bins, size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dec(torch.relu(self.enc(x.flatten(1))))
        return x + out.view(x.shape)

    def arm(self, plan: ImprintPlan) -> "ImprintBlock":
        if plan.bins != self.enc.out_features:
            raise ValueError(f"the block has {self.enc.out_features} bins, the plan {plan.bins}")
        with torch.no_grad():
            self.enc.weight.copy_((plan.measurement / plan.reach).expand_as(self.enc.weight))
            self.enc.bias.copy_(-plan.thresholds / plan.reach)
            self.dec.weight.fill_(0.1)  # shifts every pixel by at most about 0.1
        return self


def imprint_block_model(model: nn.Module, input_shape, plan: ImprintPlan) -> nn.Sequential:
    """``ImprintBlock`` (armed with ``plan``) in front of a copy of ``model``: the model a server
    that ships the ClientApp has its clients train. The block's parameters come first."""
    return nn.Sequential(ImprintBlock(input_shape, plan.bins).arm(plan), copy.deepcopy(model))


BLOCK_KEYS = ("0.enc.weight", "0.enc.bias", "0.dec.weight")  # an imprint block's entries in front of a model


def load_model(base: nn.Module, state, input_shape) -> nn.Module:
    """The model ``state`` describes: ``base`` holding it, or, when ``state`` carries an
    imprint block (:data:`BLOCK_KEYS`), the block in front of ``base`` (its entries under
    ``1.``), holding it. What a ClientApp shipped by the server builds from the weights it
    is sent, and what the server's attack builds from the weights it sent."""
    if not all(k in state for k in BLOCK_KEYS):
        base.load_state_dict(state)
        return base
    model = nn.Sequential(ImprintBlock(input_shape, int(state["0.enc.weight"].shape[0])), base)
    model.load_state_dict(state)
    return model


def trap_layer(model: nn.Module, input_shape) -> tuple[int, nn.Linear]:
    """The imprint's linear layer in ``model`` and the index of its weight in
    ``model.parameters()`` (its bias follows): the encoder of an :class:`ImprintBlock` in
    front, else the first layer of a ``Flatten, Linear, ...`` model."""
    shape = check_input_shape(input_shape)
    first = next(iter(model.children()), None)
    layer = first.enc if isinstance(first, ImprintBlock) else _linear_on_input(model, shape)[1]
    if layer.bias is None:
        raise ValueError("the imprint's layer needs a bias (its thresholds)")
    ids = [id(p) for p in model.parameters()]
    return ids.index(id(layer.weight)), layer


def layer_gradients(update: Update, at: int, layer: nn.Linear, what: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The update's weight and bias gradients of ``layer`` (its weight at position ``at`` of the
    model's parameters, its bias next) and the layer's own weight and bias, in float64 on the
    CPU whatever the model's device (the read-backs are divisions); ``what`` names the
    construction in the errors."""
    if len(update.tensors) <= at + 1:
        raise ValueError(f"the update has no gradient for the {what}'s layer")
    grads = update.as_gradients() if update.kind == "weight_delta" else list(update.tensors)
    dw, db = grads[at].double().cpu(), grads[at + 1].double().cpu()
    if dw.shape != layer.weight.shape or db.shape != layer.bias.shape:
        raise ValueError(
            f"the update's {what} gradients {tuple(dw.shape)}, {tuple(db.shape)} do not match the layer "
            f"{tuple(layer.weight.shape)}"
        )
    return dw, db, layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()


@dataclass(frozen=True)
class ImprintOptions(AttackOptions):
    """The settings of :class:`Imprint` and :class:`BlockImprint`. ``rel_tol``: a bin whose
    bias-gradient difference is at most this fraction of the largest cumulative one counts as
    empty (rounding noise, e.g. SecAgg+'s quantisation)."""

    rel_tol: float = 1e-5

    def _check(self) -> None:
        if not (math.isfinite(self.rel_tol) and self.rel_tol >= 0):
            raise ValueError(f"option rel_tol must be a finite number >= 0, got {self.rel_tol}")


class Imprint(Attack):
    """Robbing the Fed's imprint (Fowl et al., ICLR 2022), weights-only form: the active server
    plants bins in the model's first linear layer (:meth:`construct`, :func:`plant_imprint`)
    and reads each image back from an update of that model, two subtractions and a division
    per bin.

    Threat model: a malicious server that chooses the weights it sends and holds public
    images of the same kind to place the bins; it needs no labels and no batch size, and an
    aggregate (SecAgg+) inverts as well as one client's update. Paper's setting: the block
    (:class:`BlockImprint`) in front of an unmodified architecture, one local step, large
    aggregates; this form keeps the architecture but needs a model whose first layer is linear
    (``mlp``). ``threat`` and ``seed`` are unused: nothing is granted, nothing is random."""

    name = "imprint"
    Options = ImprintOptions

    @classmethod
    def construct(
        cls, model: nn.Module, input_shape, public: Tensor, bins: int, *, seed: int = 0, images: int | None = None
    ) -> nn.Module:
        """The model the server sends instead of ``model``: :func:`plant_imprint` with
        ``bins`` bins placed on ``public`` images (:func:`plan_imprint`). ``images`` (the
        images expected per gradient) is unused: the bins need no count."""
        return plant_imprint(model, input_shape, plan_imprint(public, bins, seed=seed))

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: ImprintOptions,
    ) -> AttackResult:
        return _read_back(model, update, input_shape, options.rel_tol)


class BlockImprint(Imprint):
    """Robbing the Fed's imprint in its paper's form: a residual block in front of any model
    (:class:`ImprintBlock`), which needs a ClientApp that builds it (one the server ships).
    The inversion, threat model and options are :class:`Imprint`'s."""

    name = "imprint-block"

    @classmethod
    def construct(
        cls, model: nn.Module, input_shape, public: Tensor, bins: int, *, seed: int = 0, images: int | None = None
    ) -> nn.Module:
        """The model the server sends instead of ``model``: :func:`imprint_block_model`, the
        block with ``bins`` bins placed on ``public`` images in front of a copy of ``model``
        (``images`` unused, as for :class:`Imprint`)."""
        return imprint_block_model(model, input_shape, plan_imprint(public, bins, seed=seed))


def imprint(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape,
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    **options: Any,
) -> AttackResult:
    """Read the images back from an update of a model carrying an imprint: ``Imprint()(...)``.

    The bin units are the rows of the trap layer with a non-zero weight, ordered by threshold
    (``-bias``); each consecutive difference with a non-negligible bias gradient (above
    ``rel_tol`` of the largest) gives one image, kept only when its own measurement falls in
    its bin's interval (a check the attacker can make; it rejects rounding noise in empty
    bins). ``threat`` and ``seed`` are unused: nothing is granted, nothing is random. Returns
    the images in bin order; ``diagnostics`` counts the bins, the non-empty intervals and the
    images kept."""
    return Imprint()(model, update, input_shape, threat, seed=seed, **options)


def _read_back(model: nn.Module, update: Update | Sequence[Tensor], input_shape, rel_tol: float) -> AttackResult:
    """The inversion of :func:`imprint`."""
    start = time.perf_counter()
    shape = check_input_shape(input_shape)
    update = as_update(update)
    at, layer = trap_layer(model, shape)
    dw, db, w, b = layer_gradients(update, at, layer, "imprint")
    live = torch.nonzero(w.abs().sum(1) > 0).flatten()
    if len(live) == 0:
        raise ValueError("the layer carries no imprint (every row is zero)")
    order = live[torch.argsort(-b[live])]  # thresholds q = -b ascending
    q = -b[order]
    m = w[order[0]]
    cum_w, cum_b = dw[order], db[order]
    nxt_w = torch.cat([cum_w[1:], torch.zeros_like(cum_w[:1])])
    nxt_b = torch.cat([cum_b[1:], torch.zeros_like(cum_b[:1])])
    diff_w, diff_b = cum_w - nxt_w, cum_b - nxt_b
    scale = float(cum_b.abs().max()) if len(cum_b) else 0.0
    filled = diff_b.abs() > rel_tol * scale if scale > 0 else torch.zeros_like(diff_b, dtype=torch.bool)
    images, kept = [], 0
    for i in torch.nonzero(filled).flatten().tolist():
        x = diff_w[i] / diff_b[i]
        h = float(x @ m)
        upper = float(q[i + 1]) if i + 1 < len(q) else math.inf
        slack = 1e-3 * (abs(float(q[i])) + 1e-12)
        if not (float(q[i]) - slack <= h <= upper + slack):
            continue
        kept += 1
        images.append(x.float().view(shape).clamp(0, 1))
    recon = torch.stack(images) if images else torch.full((1, *shape), 0.5)
    return AttackResult(
        attack="imprint",
        images=recon,
        labels=None,
        seconds=time.perf_counter() - start,
        status="ok" if images else "empty",
        diagnostics={"bins": len(order), "filled": int(filled.sum()), "kept": kept, "device": "cpu"},
    )
