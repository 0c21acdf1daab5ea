"""The CNNs of the testbed, chosen by name.

Every model is a flat ``nn.Sequential`` (layers in forward order, ``nn.Flatten`` before the
head) so that an analytic attack such as R-GAP can walk it layer by layer without knowing
the class. Input shape and class count come from the dataset, so 1x28x28 and 3x32x32 both
work.

Initialisations:
- ``"torch"``: PyTorch's default initialisation (after the caller seeds torch). What the
  federation trains from, and what R-GAP's demo used for CNN6.
- ``"paper"``: what the model's attack paper used: uniform(-0.5, 0.5) on every weight and
  bias for DLG's LeNet; PyTorch's default for CNN6 (R-GAP's demo).
- ``"kaiming"``: He-normal weights for the activation's slope, zero biases. The federation's
  default: the deep bias-free CNN6 barely trains from PyTorch's default (its signal shrinks
  layer by layer), and an attack is only as interesting as the model it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["MODELS", "INITS", "build_model", "model_names", "init_weights"]

INITS = ("torch", "paper", "kaiming")


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv_stack(
    in_shape: tuple[int, int, int],
    specs: list[tuple],
    make_act: Callable[[], nn.Module],
    bias: bool,
) -> tuple[list[nn.Module], tuple[int, int, int]]:
    """Build conv layers from ``(out_ch, kernel, stride, padding)`` or ``("avgpool"|"maxpool", k)``."""
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    for spec in specs:
        if spec[0] in ("avgpool", "maxpool"):
            k = spec[1]
            pool = nn.AvgPool2d(k, k) if spec[0] == "avgpool" else nn.MaxPool2d(k, k)
            layers.append(pool)
            height, width = _out_size(height, k, k, 0), _out_size(width, k, k, 0)
            continue
        out_ch, kernel, stride, padding = spec
        layers += [nn.Conv2d(channels, out_ch, kernel, stride=stride, padding=padding, bias=bias), make_act()]
        channels = out_ch
        height, width = _out_size(height, kernel, stride, padding), _out_size(width, kernel, stride, padding)
        if height < 1 or width < 1:
            raise ValueError(f"input shape {in_shape} is too small for this network")
    return layers, (channels, height, width)


def lenet(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """DLG's "LeNet": three 5x5 convolutions (strides 2, 2, 1; padding 2) with sigmoid, no
    pooling, one linear layer (768 -> classes on 3x32x32)."""
    specs = [(12, 5, 2, 2), (12, 5, 2, 2), (12, 5, 1, 2)]
    layers, (c, h, w) = _conv_stack(input_shape, specs, nn.Sigmoid, bias=True)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, num_classes))


_CNN6_SPECS = [(12, 4, 2, 2), (36, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1)]


def _cnn6_family(specs: list[tuple]) -> Callable[..., nn.Sequential]:
    def build(input_shape: tuple[int, int, int], num_classes: int, head: str = "multiclass") -> nn.Sequential:
        """R-GAP's CNN6 family: bias-free convolutions with LeakyReLU(0.2) and a bias-free
        linear head: ``num_classes`` logits (``head="multiclass"``) or R-GAP's single logit
        trained with a logistic loss (``head="logit"``)."""
        if head not in ("multiclass", "logit"):
            raise ValueError(f"unknown head {head!r}: choose 'multiclass' or 'logit'")
        layers, (c, h, w) = _conv_stack(input_shape, specs, lambda: nn.LeakyReLU(0.2), bias=False)
        out = 1 if head == "logit" else num_classes
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, out, bias=False))

    return build


# CNN6-d: the second layer narrowed to 20 channels, so its system is rank-deficient.
_CNN6D_SPECS = [(12, 4, 2, 2), (20, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1)]


def _pooled(kind: str, after: int) -> list[tuple]:
    """CNN6 with a 2x2 ``kind`` pool after convolution ``after`` (and its activation)."""
    return _CNN6_SPECS[:after] + [(kind, 2)] + _CNN6_SPECS[after:]


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Sequential]
    paper_init: str  # "uniform" (DLG) or "torch" (R-GAP)
    summary: str


MLP_WIDTH = 1024


def mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """A fully connected network: the flattened image, one hidden layer of ``MLP_WIDTH`` ReLU
    units, a linear head. The testbed's model whose first layer is linear on the input, where
    an active server's weights-only imprint fits (up to ``MLP_WIDTH`` bins)."""
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, MLP_WIDTH), nn.ReLU(), nn.Linear(MLP_WIDTH, num_classes))


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(lenet, "uniform", "DLG's LeNet: 3 conv 5x5 + sigmoid, linear head"),
    "mlp": ModelSpec(mlp, "torch", f"fully connected: {MLP_WIDTH} ReLU units, linear head (first layer linear)"),
    "cnn6": ModelSpec(_cnn6_family(_CNN6_SPECS), "torch", "R-GAP's CNN6: 6 bias-free conv + LeakyReLU(0.2)"),
    "cnn6d": ModelSpec(_cnn6_family(_CNN6D_SPECS), "torch", "CNN6-d: rank-deficient second layer (20 channels)"),
    **{
        f"cnn6_{kind}{after}": ModelSpec(
            _cnn6_family(_pooled(kind, after)),
            "torch",
            f"CNN6 with 2x2 {'average' if kind == 'avgpool' else 'max'} pooling after conv {after}",
        )
        for kind in ("avgpool", "maxpool")
        for after in (1, 3)
    },
}


def model_names() -> list[str]:
    return sorted(MODELS)


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise in place: ``"uniform"`` draws every parameter from U(-0.5, 0.5) (DLG);
    ``"kaiming"`` draws He-normal weights (fan-in, for the layer's activation) and zeroes biases."""
    if scheme == "uniform":
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.5, 0.5)
    elif scheme == "kaiming":
        layers = list(model)
        for i, layer in enumerate(layers):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                act = layers[i + 1] if i + 1 < len(layers) else None
                slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 1.0
                nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    elif scheme != "torch":
        raise ValueError(f"unknown initialisation {scheme!r}")
    return model


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    init: str = "torch",
    seed: int | None = None,
    **kwargs,
) -> nn.Sequential:
    """Build model ``name`` for images of ``input_shape`` (C, H, W) and ``num_classes`` classes.

    ``init`` is ``"torch"`` or ``"paper"`` (the attack paper's initialisation). With ``seed``
    the weights are drawn from a generator seeded with it, so the same call gives the same
    model; the global RNG is left as it was.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    spec = MODELS[name]
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = spec.build(tuple(int(s) for s in input_shape), int(num_classes), **kwargs)
        if init != "torch":
            init_weights(model, spec.paper_init if init == "paper" else init)
    return model
