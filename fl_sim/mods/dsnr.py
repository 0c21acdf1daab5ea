"""The disaggregation signal-to-noise ratio (D-SNR): does one sample dominate a layer's gradient?

Garov et al., "Hiding in Plain Sight: Disguising Data Stealing Attacks in Federated
Learning" (SEER, ICLR 2024), propose it as a principled client-side check against a malicious
server: a model built to read single images back from a batch's gradient (an imprint, trap
weights, fishing) must let one sample's gradient stand out of the batch's, in some layer,
where an honest model spreads the batch's gradient over its samples. For a batch
``x_1..x_B`` and the set of linear layers' weights ``W`` (fully connected and convolutional;
their biases are left out)::

    D-SNR = max over W of   max_i ||dL(x_i)/dW||  /  (sum_i ||dL(x_i)/dW|| - max_i ||dL(x_i)/dW||)

the largest per-sample gradient norm of the layer over the sum of the others', the largest
over the layers. It is scale-free (a mean or a sum over the batch gives the same value). With
``B = 1`` the denominator is zero: one sample always dominates, honest or not, and the measure
says nothing about the model (:func:`dsnr` returns ``inf``; the audit does not judge a batch of
one by it, see :mod:`fl_sim.mods.audit`).

The per-sample gradients come from ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``): it works on any model built of standard modules with no hooks and no
wrapping of the model (Opacus's ``GradSampleModule`` would add hooks to the client's model and
knows a fixed list of layer types), and only each sample's norms are kept, never its
gradient, in chunks of samples. A model with BatchNorm is evaluated with its running
statistics (a per-sample gradient through batch statistics is not defined).

Plain torch, no Flower and no attack: the client's audit applies it to the model it was sent
and its own batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["DSNR", "dsnr", "linear_weights", "per_sample_norms"]

CHUNK = 16  # samples whose gradients are held at once (memory: CHUNK x the model's size)


def linear_weights(model: nn.Module) -> list[str]:
    """The parameter names of the weights of ``model``'s linear layers (``nn.Linear`` and
    ``nn.Conv1d/2d/3d``), in module order: the layers D-SNR looks at."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, kinds)]


def per_sample_norms(model: nn.Module, images: Tensor, labels: Tensor, names: list[str] | None = None) -> Tensor:
    """``(B, L)``: the norm of each sample's loss gradient (softmax cross-entropy, the
    clients' training loss) with respect to each of the ``L`` weights ``names`` (default:
    :func:`linear_weights`), computed on the model's device and returned on the CPU."""
    names = linear_weights(model) if names is None else names
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]}")
    device = next(iter(params.values())).device
    frozen = {k: v.detach() for k, v in params.items() if k not in names}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    watched = {k: params[k].detach() for k in names}

    def loss(w: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **w, **buffers}, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def norms(x: Tensor, y: Tensor) -> Tensor:
        g = grad(loss)(watched, x, y)
        return torch.stack([g[n].norm() for n in names])

    was_training = model.training
    model.eval()  # BatchNorm: running statistics (module docstring)
    try:
        out = vmap(norms, chunk_size=CHUNK)(images.to(device).float(), labels.to(device).long())
    finally:
        model.train(was_training)
    return out.detach().double().cpu()


@dataclass(frozen=True)
class DSNR:
    """A D-SNR measurement: ``value`` (the largest over the layers; ``inf`` for one sample or a
    layer whose gradient is one sample's alone; 0 when no layer has any gradient), the
    ``layer`` that reached it, each layer's ``per_layer`` value, and the batch size."""

    value: float
    layer: str
    per_layer: dict[str, float]
    batch: int


def _ratio(col: Tensor) -> float:
    top = float(col.max())
    rest = float(col.sum()) - top
    if top <= 0:
        return 0.0  # no gradient in this layer: nothing dominates
    return math.inf if rest <= 1e-12 * top else top / rest


def dsnr(model: nn.Module, images: Tensor, labels: Tensor) -> DSNR:
    """The D-SNR of ``model`` on the batch ``images`` (float, ``(B, C, H, W)``), ``labels``
    (module docstring)."""
    names = linear_weights(model)
    if not names:
        raise ValueError("D-SNR needs a model with a linear or convolutional layer")
    if len(labels) == 0:
        raise ValueError("D-SNR needs a batch of at least one sample")
    table = per_sample_norms(model, images, labels, names)
    per_layer = {n: _ratio(table[:, j]) for j, n in enumerate(names)}
    layer = max(per_layer, key=lambda n: per_layer[n])
    return DSNR(per_layer[layer], layer, per_layer, len(labels))
