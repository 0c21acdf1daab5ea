"""Gradient-inversion attacks and their scores. No Flower in here: a plain PyTorch model and
a list of tensors in, an :class:`~attacks.base.AttackResult` out."""

import importlib
from typing import Callable

from .base import AttackResult, ThreatModel, Update, as_update, check_gradients, loss_kind, training_loss
from .metrics import SUCCESS_PSNR, label_accuracy, match_batch, mse, psnr, score_batch, ssim

__all__ = [
    "ATTACKS",
    "ACTIVE",
    "get_attack",
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

# name -> "module:function"; every attack shares the calling convention
# fn(model, update, input_shape, threat=ThreatModel(), *, seed=0, **options) -> AttackResult.
ATTACKS: dict[str, str] = {
    "dlg": "attacks.dlg:dlg",
    "idlg": "attacks.dlg:idlg",
    "rgap": "attacks.rgap:rgap",
    "ig": "attacks.inverting:inverting_gradients",
}


# The active server's inversions, same calling convention; each reads an update of a model
# the server built for it (attacks.imprint.construct), so none of them is in ATTACKS, which
# attack what an honest server's round shows.
ACTIVE: dict[str, str] = {
    "imprint": "attacks.imprint:imprint",
    "imprint-block": "attacks.imprint:imprint",
}


def get_attack(name: str) -> Callable[..., AttackResult]:
    """The attack function registered as ``name`` (in ``ATTACKS`` or ``ACTIVE``)."""
    where = ATTACKS.get(name) or ACTIVE.get(name)
    if where is None:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    module, func = where.split(":")
    return getattr(importlib.import_module(module), func)
