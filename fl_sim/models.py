"""The CNNs of the testbed, chosen by name.

Every model is a flat ``nn.Sequential`` (layers in forward order, ``nn.Flatten`` before the
head) so that an analytic attack such as R-GAP can walk it layer by layer without knowing
the class. The BatchNorm ResNets are an ``nn.Sequential`` of a stem, residual blocks (each one
module), a pool and the head: flat at the level of blocks, so R-GAP refuses them (a block is not
a layer it can invert). Input shape and class count come from the dataset, so 1x28x28 and 3x32x32 both
work.

Initialisations:
- ``"torch"``: PyTorch's default initialisation (after the caller seeds torch). What the
  federation trains from, and what R-GAP's demo used for CNN6.
- ``"paper"``: what the model's attack paper used: uniform(-0.5, 0.5) on every weight and
  bias for DLG's LeNet; PyTorch's default for CNN6 (R-GAP's demo) and for the ResNets
  (GradInversion attacked a trained ResNet-50; untrained, PyTorch's default is the nearest).
- ``"kaiming"``: He-normal weights for the activation's slope, zero biases. The federation's
  default: the deep bias-free CNN6 barely trains from PyTorch's default (its signal shrinks
  layer by layer), and an attack is only as interesting as the model it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "MODELS",
    "INITS",
    "build_model",
    "model_names",
    "init_weights",
    "BasicBlock",
    "RESNET_WIDTH",
    "RESNET_NARROW_WIDTH",
]

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


FEMNIST_CNN_SPECS = [(32, 3, 1, 1), ("avgpool", 2), (64, 3, 1, 1), ("avgpool", 2)]


def femnist_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Dimitrov et al.'s FEMNIST CNN ("Data Leakage in Federated Averaging", TMLR 2022; their
    code's ``cnn``): two 3x3 convolutions with bias and "same" padding (32 and 64 channels), each
    followed by ReLU and 2x2 average pooling, a dense layer of 100 ReLU units, a linear head
    (3136 -> 100 -> classes on 1x28x28). Their flax code initialises LeCun-normal weights and
    zero biases, which is what ``init="kaiming"`` draws here for ReLU layers (slope 1: variance
    1/fan_in)."""
    layers, (c, h, w) = _conv_stack(input_shape, FEMNIST_CNN_SPECS, nn.ReLU, bias=True)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, 100), nn.ReLU(), nn.Linear(100, num_classes))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions, each followed by BatchNorm, ReLU after the
    sum with the shortcut (a strided 1x1 convolution + BatchNorm where the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet18(width: int) -> Callable[..., nn.Sequential]:
    def build(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
        """ResNet-18 for CIFAR-sized images (He et al. 2016, the CIFAR variant): a 3x3 stem
        (stride 1, no max-pool) with BatchNorm and ReLU, four stages of two basic blocks of
        ``width``, 2, 4 and 8 times ``width`` channels (strides 1, 2, 2, 2), global average
        pooling and a linear head with bias."""
        c = input_shape[0]
        layers: list[nn.Module] = [
            nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            layers += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    return build


RESNET_WIDTH = 64
"""The width of ``resnet18`` (the standard ResNet-18: 64, 128, 256, 512 channels)."""
RESNET_NARROW_WIDTH = 16
"""The width of ``resnet18_w16`` (16, 32, 64, 128 channels): the same network at about 1/16 of
the arithmetic, which the attack benchmarks can afford on two CPU cores."""


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
    "femnist_cnn": ModelSpec(femnist_cnn, "torch", "Dimitrov et al.'s FEMNIST CNN: 2 conv 3x3 + avg pool, dense 100"),
    "resnet18": ModelSpec(_resnet18(RESNET_WIDTH), "torch", f"ResNet-18 (CIFAR stem, BatchNorm), width {RESNET_WIDTH}"),
    "resnet18_w16": ModelSpec(
        _resnet18(RESNET_NARROW_WIDTH), "torch", f"ResNet-18 (CIFAR stem, BatchNorm), width {RESNET_NARROW_WIDTH}"
    ),
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
                # the activation that follows (past a BatchNorm), for its slope
                after = [m for m in layers[i + 1 :] if not isinstance(m, nn.BatchNorm2d)][:1]
                act = after[0] if after else None
                slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 1.0
                nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, BasicBlock):  # its convolutions feed BatchNorm and ReLU
                for conv in (m for m in layer.modules() if isinstance(m, nn.Conv2d)):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
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
