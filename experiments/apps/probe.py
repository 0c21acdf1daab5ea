"""The leakage audit's analysis: :class:`fl_sim.mods.audit.Auditor` from the attack library.

The federation's audit mod (:mod:`fl_sim.mods.audit`) knows the policy, the tampering checks and
the defences; it asks this class two questions through a narrow interface, so that
``fl_sim`` imports no attack:

- :meth:`LeakageAuditor.assess`, no optimisation: is the label readable from the last layer
  (iDLG's rule, checked against the client's own labels), how many distinct labels the rule
  reads, the batch size estimated from the last layer (a lower bound: the classes with a
  negative signal), and R-GAP's rank analysis of the model received (is a one-sample update
  algebraically invertible: every layer's system of full rank). R-GAP's rank is generic in the
  weights: it is computed on the first model of an architecture a client receives and reused
  (it costs seconds on CNN6; a tampered model is the tampering checks' concern). The verdict
  ``flagged`` says the update is likely recoverable, by the limits this testbed measured
  (README, Results): one-step updates of up to :data:`FLAG_BATCH` images (DLG recovers
  batches of 8 on LeNet at about 26 dB, one image at 40 dB and more), one-sample gradients
  R-GAP can invert, and multi-step updates of at most :data:`FLAG_STEPS_IMAGES` images in at
  most :data:`FLAG_STEPS` steps (Inverting Gradients' replay recovered two-step updates of one
  image, nothing at five).
- :meth:`LeakageAuditor.probe`: a real attack on the update, scored against the client's own
  batch (the client holds the ground truth, so the PSNR is measured, not guessed), image by
  image: each true image against the reconstruction matched to it (the optimal assignment of
  :func:`attacks.match_batch`), and the image that leaks most is what meets the bar (one image
  recovered is a leak, whatever the batch's median). R-GAP where the update is one sample's
  gradient and the model one R-GAP solves; then, unless an image already reached the bar, DLG
  (one-step updates), fedavg-sim (the FedAvg attack, on a weight delta of several local steps:
  the strongest attack this testbed has there) and Inverting Gradients (with the local steps
  replayed on a FedAvg update), at the settings the server's runner uses, each capped at the
  budget's seconds (a cap, not a plan: a probe weaker than the server's attack passes updates
  the server recovers). The probe grants itself the labels and the true order of the local
  batches: the worst case a client should plan for (a server reads a single label off the
  last layer anyway). It does not cover a stronger attacker (more restarts, other priors):
  the policy's ``margin`` lowers the bar for that.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from attacks import ThreatModel, Update, get_attack, score_batch
from attacks.idlg import estimate_batch_size, idlg_labels
from attacks.rgap import rank_analysis
from fl_sim.mods.audit import Probe, UpdateView

__all__ = ["LeakageAuditor", "FLAG_BATCH", "FLAG_STEPS", "FLAG_STEPS_IMAGES", "image_verdict"]

FLAG_BATCH = 8
FLAG_STEPS = 2
FLAG_STEPS_IMAGES = 4


def image_verdict(recon: torch.Tensor, truth: torch.Tensor, bar: float) -> tuple[float, float, int]:
    """A reconstruction of a batch against the true images, image by image (each true image
    against the reconstruction the optimal assignment gives it, :func:`attacks.score_batch`):
    the highest image PSNR (capped at 300 dB: an exact image is infinite), the median, and the
    number of images at or above ``bar``. The first is what meets the bar."""
    scores = torch.tensor([r["psnr"] for r in score_batch(recon, truth)], dtype=torch.float64).clamp(max=300.0)
    return float(scores.max()), float(scores.median()), int((scores >= bar).sum())


def _update(view: UpdateView) -> Update:
    if view.kind == "gradient":
        return Update(tensors=view.tensors)
    return Update(tensors=view.tensors, kind="weight_delta", lr=view.lr, local_steps=view.local_steps)


def _rank_key(view: UpdateView) -> str:
    """The memory key of R-GAP's rank for the view's architecture."""
    shapes = ";".join("x".join(map(str, p.shape)) for p in view.model.parameters())
    return f"rgap-deficit:{type(view.model).__name__}:{'x'.join(map(str, view.input_shape))}:{shapes}"


class LeakageAuditor:
    """The analysis behind a client's audit (module docstring). Stateless: what it keeps
    across rounds (R-GAP's rank per architecture) lives in the ``memory`` it is handed."""

    # ---- the analytic checks ----------------------------------------------------------------

    @staticmethod
    def _rgap_rank(view: UpdateView, memory: dict[str, Any]) -> tuple[bool, int | str]:
        """(invertible, total deficit) of R-GAP's system for the view's model; deficit -1 in
        the memory: a layer R-GAP cannot invert (e.g. max pooling)."""
        key = _rank_key(view)
        if key not in memory:
            try:
                memory[key] = sum(int(row["deficit"]) for row in rank_analysis(view.model, view.input_shape))
            except ValueError:
                memory[key] = -1
        deficit = int(memory[key])
        return (deficit == 0, deficit) if deficit >= 0 else (False, "")

    @staticmethod
    def one_sample(view: UpdateView) -> bool:
        return view.labels.numel() == 1 and (view.kind == "gradient" or view.local_steps == 1)

    def assess(self, view: UpdateView, memory: dict[str, Any]) -> dict[str, Any]:
        upd = _update(view)
        n = int(view.labels.numel())
        read = idlg_labels(view.model, upd, batch_size=n)
        readable = sorted(read.tolist()) == sorted(view.labels.tolist())
        one_step = view.kind == "gradient" or view.local_steps == 1
        invertible, deficit = self._rgap_rank(view, memory) if self.one_sample(view) else ("", "")
        if one_step:
            flagged = n <= FLAG_BATCH or invertible is True
        else:
            flagged = n <= FLAG_STEPS_IMAGES and view.local_steps <= FLAG_STEPS
        return {
            "label_readable": readable,
            "labels_distinct": int(torch.unique(read).numel()),
            "batch_size_estimate": estimate_batch_size(view.model, upd),
            "rgap_invertible": invertible,
            "rgap_deficit": deficit,
            "flagged": bool(flagged),
        }

    # ---- the probe ----------------------------------------------------------------------------

    def probe(self, view: UpdateView, budget: float, bar: float, memory: dict[str, Any]) -> Probe:
        upd = _update(view)
        one_step = view.kind == "gradient" or view.local_steps == 1
        threat = ThreatModel(labels=view.labels, schedule=None if one_step else view.schedule)
        plan: list[tuple[str, dict[str, Any]]] = []
        if self.one_sample(view) and self._rgap_rank(view, memory)[0] is True:
            plan.append(("rgap", {"rank": False}))
        if one_step:
            plan.append(("dlg", {"time_limit": budget}))
        elif view.kind == "weight_delta":
            plan.append(("fedavg-sim", {"time_limit": budget}))
        plan.append(("ig", {"time_limit": budget}))
        best = Probe(psnr=-math.inf, attack="", seconds=0.0, status="none")
        model = copy.deepcopy(view.model).to(view.device)  # the attacks compute where their model lives
        spent = 0.0
        for name, options in plan:
            start = time.perf_counter()
            try:
                res = get_attack(name)(model, upd, view.input_shape, threat, seed=0, **options)
                value, median, at_bar = image_verdict(res.images, view.images, bar)
                status = res.status
            except ValueError as exc:  # an attack that does not apply to this update
                value, median, at_bar = -math.inf, math.nan, 0
                status = f"error: {' '.join(str(exc).split())[:80]}"
            spent += time.perf_counter() - start
            if value > best.psnr:
                best = Probe(value, name, spent, status, median=median, at_bar=at_bar)
            if value >= bar:
                break
        psnr = best.psnr if math.isfinite(best.psnr) else 0.0  # -inf: no attack applied
        return Probe(psnr, best.attack, spent, best.status, median=best.median, at_bar=best.at_bar)
