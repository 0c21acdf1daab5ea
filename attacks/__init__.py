"""Gradient-inversion attacks and their scores. No Flower in here: a plain PyTorch model and
a list of tensors in, an :class:`~attacks.base.AttackResult` out.

Every attack is an :class:`~attacks.base.Attack` (one module each, like ``torch.optim``):
made with its options, then called on an observation::

    attack = get_attack("dlg", max_steps=100)          # = attacks.DLG(max_steps=100)
    result = attack(model, update, input_shape, threat, seed=0)
    ATTACKS["dlg"].Options.names()                      # the options it takes
"""

from typing import Any

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

__all__ = [
    "ATTACKS",
    "ACTIVE",
    "get_attack",
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
# (``ACTIVE[name].construct``, :func:`attacks.imprint.construct`), so none of them is in ATTACKS.
ACTIVE: dict[str, type[Attack]] = {cls.name: cls for cls in (Imprint, BlockImprint)}


def get_attack(name: str, **options: Any) -> Attack:
    """A new instance of the attack registered as ``name`` (in :data:`ATTACKS` or
    :data:`ACTIVE`) with ``options`` (its :attr:`~attacks.base.Attack.Options` fields, or
    ``options=`` a whole options object); call it as
    ``get_attack(name)(model, update, input_shape, threat, seed=0, **options)``."""
    cls = ATTACKS.get(name) or ACTIVE.get(name)
    if cls is None:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join([*ATTACKS, *ACTIVE])}")
    return cls(**options)
