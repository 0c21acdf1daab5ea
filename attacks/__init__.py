"""Gradient-inversion attacks and their scores. No Flower in here: a plain PyTorch model and
a list of tensors in, an :class:`~attacks.base.AttackResult` out.

Every attack is an :class:`~attacks.base.Attack` (one module each, like ``torch.optim``):
made with its options, then called on an observation::

    attack = get_attack("dlg", max_steps=100)          # = attacks.DLG(max_steps=100)
    result = attack(model, update, input_shape, threat, seed=0)
    ATTACKS["dlg"].Options.names()                      # the options it takes
"""

from typing import Any

from torch import Tensor, nn

from .base import (
    Attack,
    AttackOptions,
    AttackResult,
    ThreatModel,
    Update,
    as_update,
    check_gradients,
    loss_kind,
    training_loss,
)
from .dlg import DLG
from .fedavg import FedAvgSim
from .gradinversion import GradInversion
from .idlg import IDLG
from .imprint import BlockImprint, Imprint
from .inverting import InvertingGradients
from .metrics import SUCCESS_PSNR, label_accuracy, match_batch, mse, psnr, score_batch, ssim
from .rgap import RGAP
from .trap import Trap

__all__ = [
    "ATTACKS",
    "ACTIVE",
    "get_attack",
    "construct",
    "Attack",
    "AttackOptions",
    "DLG",
    "IDLG",
    "RGAP",
    "InvertingGradients",
    "FedAvgSim",
    "GradInversion",
    "Imprint",
    "BlockImprint",
    "Trap",
    "AttackResult",
    "ThreatModel",
    "Update",
    "as_update",
    "check_gradients",
    "loss_kind",
    "training_loss",
    "SUCCESS_PSNR",
    "label_accuracy",
    "match_batch",
    "mse",
    "psnr",
    "score_batch",
    "ssim",
]

# The attacks on what an honest server's round shows, by name. FedAvgSim ("fedavg-sim") reads a
# FedAvg weight delta of one client (experiments.plan says where it applies).
ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (DLG, IDLG, RGAP, InvertingGradients, GradInversion, FedAvgSim)
}

# The active server's inversions: each reads an update of a model the server built for it
# (``ACTIVE[name].construct``, :func:`construct`), so none of them is in ATTACKS.
ACTIVE: dict[str, type[Attack]] = {cls.name: cls for cls in (Imprint, BlockImprint, Trap)}


def construct(
    name: str, model: nn.Module, input_shape, public: Tensor, bins: int, *, seed: int = 0, images: int | None = None
) -> nn.Module:
    """The model the active server sends instead of ``model`` (the honest global one): the
    construction of the attack ``name`` of :data:`ACTIVE`, placed with ``public`` images of the
    same kind. ``bins``: the imprint's number of bins; ``images``: the images the server
    expects in one gradient, which the trap tunes its firing rate to (None: 64)."""
    cls = ACTIVE.get(name)
    if cls is None:
        raise ValueError(f"unknown active attack {name!r}: choose one of {', '.join(ACTIVE)}")
    return cls.construct(model, input_shape, public, bins, seed=seed, images=images)


def get_attack(name: str, **options: Any) -> Attack:
    """A new instance of the attack registered as ``name`` (in :data:`ATTACKS` or
    :data:`ACTIVE`) with ``options`` (its :attr:`~attacks.base.Attack.Options` fields, or
    ``options=`` a whole options object); call it as
    ``get_attack(name)(model, update, input_shape, threat, seed=0, **options)``."""
    cls = ATTACKS.get(name) or ACTIVE.get(name)
    if cls is None:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join([*ATTACKS, *ACTIVE])}")
    return cls(**options)
