"""iDLG (:class:`IDLG`): the labels read off the last layer's gradient, then DLG on the image
alone; and that label rule (:func:`idlg_labels`, with its batch extensions), which the other
attacks use too when the labels are not granted. The rule lives in :mod:`attacks.labels` (with
the batch's label counts, :func:`attacks.labels.batch_label_counts`) and is re-exported here.

Threat model of the label rule: the observer sees the weights a client started from and the
client's loss gradient (or a one-step weight delta, which is the gradient up to ``-lr``).
Nothing about the batch is needed besides, for ``batch_size > 1``, the number of images
(:func:`batch_size_for`: granted, or estimated by :func:`estimate_batch_size`).

Paper's setting (Zhao, Mopuri and Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020):
one image, softmax cross-entropy, a last linear layer whose inputs are non-negative (the
sigmoid LeNet of DLG). The gradient of the loss with respect to the logits is ``p - onehot(y)``:
only the true class has a negative entry. So

- with a bias on the last layer, the bias gradient *is* ``p - onehot(y)``: the true class is its
  only negative entry;
- without a bias, the weight gradient's row ``c`` is ``(p_c - [c = y]) * a`` for the layer's
  input ``a``; with ``a >= 0`` the true class is the only row whose sum is negative. We use the
  sign-agnostic form: the one row whose sum has the sign the others lack (the same answer when
  ``a >= 0``, and still right when ``sum(a) < 0``).

Batches (``batch_size > 1``): the heuristic of Yin et al. ("See through gradients", CVPR 2021)
and Wainakh et al. ("User-level label leakage", PETS 2022): the averaged logit gradient is
``mean_b(p_b) - counts / B``, so a class that occurs in the batch usually gets a negative entry
and an absent class a positive one. We rank classes by that signal (bias gradient, else the
row-minimum of the weight gradient as in Yin et al.) and return the negative ones, most
negative first (with a bias, a class counts as present when its weight-gradient row has a
negative entry, the row-minimum rule, which a confident mistake masks less often than the bias
entry: see :func:`idlg_labels`); when fewer classes are present than images, the remaining slots repeat the
classes with the largest leftover deficit (LLG's count estimate, ``-B * signal``). Limits: a
class present once can be masked when the model is confidently wrong on other images
(``mean p_c > 1/B``), label counts beyond distinct classes are estimates, and the order of the
returned labels carries no information about which image holds which label.

Single logit (logistic loss, R-GAP's head): ``dL/dz = sigmoid(z) - y`` is negative exactly
when ``y = 1``. With a bias the sign of its gradient gives the label; without one the sign of
the weight gradient's sum gives it when the layer's inputs are non-negative (otherwise the
sign is not identifiable from the last layer alone; we still answer with that rule). For a
batch every image gets the label consistent with the sign of the *mean* gradient.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from torch import Tensor, nn

from ._gradient_matching import DLGOptions, check_observation, granted_labels, match_gradients
from .base import Attack, AttackResult, ThreatModel, Update, as_update, check_gradients
from .labels import idlg_labels, last_linear_gradients

__all__ = ["IDLG", "idlg", "idlg_labels", "last_linear_gradients", "estimate_batch_size", "batch_size_for"]


def estimate_batch_size(model: nn.Module, gradients: Update | Sequence[Tensor]) -> int:
    """A lower bound on the number of images behind a softmax cross-entropy gradient, for a
    threat model that does not grant the batch size: the number of classes with a negative
    last-layer signal (the bias gradient, else the row-minimum of the weight gradient), i.e.
    the distinct labels present, under the module's assumptions (non-negative inputs to the
    last layer, no class masked by confident mistakes). Images sharing a label are counted
    once: the true batch size can be larger. 1 for a single-logit head (not identifiable)."""
    grads = check_gradients(model, as_update(gradients).as_gradients())
    w, b = last_linear_gradients(model, grads)
    if w.shape[0] == 1:
        return 1
    signal = b if b is not None else w.min(dim=1).values
    return max(1, int((signal < 0).sum()))


def batch_size_for(model: nn.Module, gradients: Update | Sequence[Tensor], threat: ThreatModel) -> tuple[int, str]:
    """The batch size an attack works with and where it came from: ``"labels"`` (as many as
    the granted labels), ``"granted"`` (``threat.batch_size``) or ``"estimated"``
    (:func:`estimate_batch_size`)."""
    if threat.labels is None and threat.batch_size is None:
        return estimate_batch_size(model, gradients), "estimated"
    return threat.resolved_batch_size(), "labels" if threat.labels is not None else "granted"


class IDLG(Attack):
    """iDLG (Zhao, Mopuri and Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020): the
    labels are read off the last layer's gradient (:func:`idlg_labels`), unless granted, and
    DLG's optimisation runs on the image alone, against fixed hard labels.

    Threat model: DLG's (:class:`attacks.dlg.DLG`): the parameter server sees the weights a
    client started from and its update for one batch; the batch size is granted or estimated
    from the last layer. Paper's setting: DLG's, one image, softmax cross-entropy on a last
    layer with non-negative inputs; the options are DLG's (:class:`~attacks.dlg.DLGOptions`,
    ``IDLG(attacks.dlg.FAITHFUL)`` for the original optimiser; ``label_init`` does not apply).
    """

    name = "idlg"
    Options = DLGOptions

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: DLGOptions,
    ) -> AttackResult:
        start = time.perf_counter()
        upd, target, shape = check_observation(model, update, input_shape)
        batch, batch_source = batch_size_for(model, target, threat)
        labels, label_source = granted_labels(threat), "granted"
        if labels is None:
            labels, label_source = idlg_labels(model, target, batch_size=batch), "idlg"
        return match_gradients(
            model,
            upd,
            target,
            shape,
            options,
            seed=seed,
            name=self.name,
            batch=batch,
            batch_source=batch_source,
            labels=labels,
            label_source=label_source,
            start_time=start,
        )


def idlg(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    options: DLGOptions | None = None,
    **overrides: Any,
) -> AttackResult:
    """iDLG: ``IDLG(options)(...)`` (see :class:`IDLG`); same options as :func:`attacks.dlg.dlg`."""
    return IDLG(options)(model, update, input_shape, threat, seed=seed, **overrides)
