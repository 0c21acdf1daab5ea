"""Gradient-inversion attacks and their scores. No Flower in here: a plain PyTorch model and
a list of tensors in, an :class:`~attacks.base.AttackResult` out."""

from .base import AttackResult, ThreatModel, Update, as_update, check_gradients, loss_kind, training_loss
from .metrics import SUCCESS_PSNR, label_accuracy, match_batch, mse, psnr, score_batch, ssim

__all__ = [
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
