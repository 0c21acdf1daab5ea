"""The disaggregation signal-to-noise ratio (D-SNR): does one sample dominate a layer's gradient?

Garov et al., "Hiding in Plain Sight: Disguising Data Stealing Attacks in Federated
Learning" (SEER, ICLR 2024), propose it as a principled client-side check against a malicious
server: a model built to read single images back from a batch's gradient (an imprint, trap
weights, fishing) must let one sample's gradient stand out of the batch's, in some layer,
where an honest model spreads the batch's gradient over its samples. Two forms are computed
here, on a batch ``x_1..x_B`` and the linear layers (fully connected and convolutional).

**SEER's layer-level ratio** (``DSNR.value``; biases left out)::

    D-SNR = max over W of   max_i ||dL(x_i)/dW||  /  (sum_i ||dL(x_i)/dW|| - max_i ||dL(x_i)/dW||)

the largest per-sample gradient norm of the layer over the sum of the others', the largest
over the layers. It does not see trap weights (each sample's gradient over the whole layer has
a similar norm; what the attacker reads is single units) and it is high on honest models late
in training, where one misclassified sample dominates every unit (docs/results/audit.md).

**The per-unit statistic** (``DSNR.unit``, the one the audit judges): per layer, each sample's
gradient norm in each unit ``n[i, r]`` (a row of a linear layer with its bias entry, since the
attacker divides the row's weight gradient by its bias gradient; an output channel of a
convolution), divided by the sample's whole gradient norm in the layer, so that a sample with a
large loss does not count as dominant. Unit ``r`` is *isolated* when one sample holds more than
:data:`KAPPA` times the others' sum in it; each sample's share of its (squared, normalised)
gradient that sits in units it isolates, averaged over the samples, is the layer's value, and
the largest over the layers is the statistic (0 to 1: what an attacker reading single units
gets of a sample alone). A trap unit fires for one image of the batch; an honest unit for many.

With ``B = 1`` both say nothing about the model: the layer-level denominator is zero
(:func:`dsnr` returns ``inf``) and every unit is the one sample's (the per-unit value is 1);
the audit does not judge a batch of one by them, see :mod:`fl_sim.mods.audit`.

The per-sample gradients come from ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``): it works on any model built of standard modules with no hooks and no
wrapping of the model (Opacus's ``GradSampleModule`` would add hooks to the client's model and
knows a fixed list of layer types), and only each sample's per-unit norms are kept, never its
gradient, in chunks of samples. A model with BatchNorm is evaluated with its running
statistics (a per-sample gradient through batch statistics is not defined).

Plain torch, no Flower and no attack: the client's audit applies it to the model it was sent
and its own batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["DSNR", "KAPPA", "dsnr", "isolated_share", "linear_weights", "per_sample_norms", "per_sample_unit_norms"]

CHUNK = 16  # samples whose gradients are held at once (memory: CHUNK x the model's size)
KAPPA = 10.0  # a unit is isolated when one sample's normalised gradient in it is KAPPA x the others' sum


def linear_weights(model: nn.Module) -> list[str]:
    """The parameter names of the weights of ``model``'s linear layers (``nn.Linear`` and
    ``nn.Conv1d/2d/3d``), in module order: the layers D-SNR looks at."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, kinds)]


def per_sample_unit_norms(
    model: nn.Module, images: Tensor, labels: Tensor, names: list[str] | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """For each weight in ``names`` (default: :func:`linear_weights`), ``(weight, bias)``: two
    ``(B, R)`` tensors, the squared norm of each sample's loss gradient (softmax cross-entropy,
    the clients' training loss) in each of the layer's ``R`` units (rows of a linear layer,
    output channels of a convolution), over the unit's weights and over its bias (zeros where
    the layer has none). Computed on the model's device in one ``vmap`` pass, returned on the
    CPU in float64."""
    names = linear_weights(model) if names is None else names
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]}")
    biases = {n: n[: -len("weight")] + "bias" for n in names if n.endswith("weight")}
    biases = {n: b for n, b in biases.items() if b in params and params[b].shape == params[n].shape[:1]}
    watched_names = list(names) + list(biases.values())
    device = next(iter(params.values())).device
    frozen = {k: v.detach() for k, v in params.items() if k not in watched_names}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    watched = {k: params[k].detach() for k in watched_names}

    def loss(w: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **w, **buffers}, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def norms(x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        g = grad(loss)(watched, x, y)
        rows = [torch.linalg.vector_norm(g[n].reshape(g[n].shape[0], -1), dim=1).square() for n in names]
        bias = [g[biases[n]].pow(2) if n in biases else torch.zeros_like(r) for n, r in zip(names, rows)]
        return rows, bias

    was_training = model.training
    model.eval()  # BatchNorm: running statistics (module docstring)
    try:
        rows, bias = vmap(norms, chunk_size=CHUNK)(images.to(device).float(), labels.to(device).long())
    finally:
        model.train(was_training)
    return {n: (r.detach().double().cpu(), b.detach().double().cpu()) for n, r, b in zip(names, rows, bias)}


def per_sample_norms(model: nn.Module, images: Tensor, labels: Tensor, names: list[str] | None = None) -> Tensor:
    """``(B, L)``: the norm of each sample's loss gradient with respect to each of the ``L``
    weights ``names`` (default: :func:`linear_weights`; biases left out)."""
    table = per_sample_unit_norms(model, images, labels, names)
    return torch.stack([w.sum(1).sqrt() for w, _ in table.values()], dim=1)


def isolated_share(units: Tensor, kappa: float = KAPPA) -> float:
    """The per-unit statistic of one layer from ``units`` ``(B, R)``, each sample's gradient norm
    in each unit: each sample's norms are divided by its whole gradient's norm in the layer
    (so a sample with a large loss does not dominate by scale), a unit is *isolated* by the
    sample holding more than ``kappa`` times the others' sum in it, and each sample's share of
    its (squared, normalised) gradient in the units it isolates is averaged over the samples:
    what an attacker reading single units gets of a sample alone, on average (0 to 1)."""
    total = units.pow(2).sum(1, keepdim=True).sqrt()
    norm = torch.where(total > 0, units / total.clamp_min(1e-300), torch.zeros_like(units))
    top, who = norm.max(0)
    rest = norm.sum(0) - top
    isolated = (top > 0) & (top > kappa * rest)
    owned = torch.zeros_like(norm)
    owned[who[isolated], torch.nonzero(isolated).flatten()] = 1.0
    return float((owned * norm.pow(2)).sum(1).mean())


@dataclass(frozen=True)
class DSNR:
    """A D-SNR measurement. ``value``: SEER's layer-level D-SNR, the largest over the layers
    (``inf`` for one sample or a layer whose gradient is one sample's alone; 0 when no layer has
    any gradient), the ``layer`` that reached it and each layer's ``per_layer`` value;
    ``unit``: the per-unit statistic (:func:`isolated_share`), the largest over the layers,
    the ``unit_layer`` that reached it and each layer's ``per_unit``; the batch size."""

    value: float
    layer: str
    per_layer: dict[str, float]
    batch: int
    unit: float = 0.0
    unit_layer: str = ""
    per_unit: dict[str, float] = field(default_factory=dict)


def _ratio(col: Tensor) -> float:
    top = float(col.max())
    rest = float(col.sum()) - top
    if top <= 0:
        return 0.0  # no gradient in this layer: nothing dominates
    return math.inf if rest <= 1e-12 * top else top / rest


def dsnr(model: nn.Module, images: Tensor, labels: Tensor, kappa: float = KAPPA) -> DSNR:
    """The D-SNR of ``model`` on the batch ``images`` (float, ``(B, C, H, W)``), ``labels``,
    layer-level and per unit (module docstring)."""
    names = linear_weights(model)
    if not names:
        raise ValueError("D-SNR needs a model with a linear or convolutional layer")
    if len(labels) == 0:
        raise ValueError("D-SNR needs a batch of at least one sample")
    table = per_sample_unit_norms(model, images, labels, names)
    per_layer = {n: _ratio(w.sum(1).sqrt()) for n, (w, _) in table.items()}
    per_unit = {n: isolated_share((w + b).sqrt(), kappa) for n, (w, b) in table.items()}
    layer = max(per_layer, key=lambda n: per_layer[n])
    unit_layer = max(per_unit, key=lambda n: per_unit[n])
    return DSNR(per_layer[layer], layer, per_layer, len(labels), per_unit[unit_layer], unit_layer, per_unit)
