"""A client's check of its own update before it leaves: the leakage-audit mod.

Every attack in this testbed works from the server's side. This mod gives a client the other
view: on its train handler, after the defences' mods (so it sees the final update, the one
that leaves), it asks how much of its own data the update reveals and whether the model it was
sent is built to extract it, then acts on a policy (run config ``audit``, the flag
``--audit``):

- ``log``: record the checks and the probe's PSNR (the reply carries them in a ConfigRecord
  ``audit``; the server writes them to ``audit.csv``; the node keeps them in its context);
- ``block``: refuse to send an update at risk (an error reply the server records as
  ``refused``, with the reason); training goes on without it;
- ``protect``: apply a defence of increasing strength (Gaussian noise relative to the
  update's RMS, or pruning) until the probe falls below the PSNR bar, then send; refuse if
  the strongest step does not bring it there.

The probe compares every image of the update with the bar, not the batch's median: one image
recovered is one image leaked, whatever became of the others.

Options: ``protect:psnr=20,margin=0,defence=noise,budget=30,probe=true,clients=0+2,dsnr=4,rows=true`` (``psnr``:
the probe's bar in dB, reached when any one image's reconstruction reaches it; ``margin``: dB
taken off the bar for safety, default 0, since the probe is a bounded attack and a server's may
be stronger (``margin=3``: an image at 17 dB against a bar of 20 is at risk); ``budget``: a
cap in seconds per probe attack, which otherwise runs as the server's does (a probe cut short
by a loaded machine underrates the leak: measured, a 2 s cap passed an update the server then
recovered at 40 dB); ``probe=false``: the analytic checks alone decide, by their ``flagged``
verdict; ``clients``: the partition ids that run the audit, joined by ``+``, default all: a
federation where only some clients installed it; ``dsnr``: the per-unit D-SNR threshold, or ``off``;
``rows=false``: leave out the copied-rows statistic of the tampering checks, e.g. to see what
the D-SNR check alone catches).

What a client can check without knowing any attack lives here: the update's kind and its
images, and the **tampering checks** on the model it was sent (its entries and shapes
against the ClientApp's own model, non-finite weights, and weight statistics of known
malicious-server constructions: many identical rows in a layer, most telling with distinct
biases, the bins of an imprint or trap layer), and the **D-SNR check** (Garov et al., SEER,
ICLR 2024; :mod:`fl_sim.mods.dsnr`): on the model sent and the client's own batch (FedSGD: its
batch; FedAvg: its first local step's), from per-sample gradients, before any training, SEER's
layer-level D-SNR (recorded, ``dsnr``) and the per-unit statistic (judged, ``dsnr_unit``: the
share of a sample's gradient in units it alone drives, as a trap's units are). A per-unit
D-SNR above the policy's ``dsnr`` is a model built to single samples out; like a tampered
model it is refused under ``block`` and ``protect`` whatever the probe says (no defence of the
update changes what the model does to the batch), and it sets the analytic ``flagged``
verdict. Batches of fewer than :data:`~fl_sim.settings.DSNR_MIN_BATCH` images are not judged
by it (their values are recorded): a batch of one is one sample's under every model, and in
honest batches of two to eight images the head's unit of a class held by one sample is that
sample's alone (per-unit values up to 1.0 at two images, 0.23 at eight), while the analytic
checks flag every one-step update of so few images anyway. What needs the
attack library (iDLG's label
rule, the batch-size estimate, R-GAP's rank analysis, the probe, which is a real attack
scored against the client's own batch) comes through one narrow interface,
:class:`Auditor`, which the composing application supplies (``experiments.apps.probe`` does,
from ``attacks/``): the federation imports no attack.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.app.message_type import MessageType
from torch import Tensor, nn

from ..config import RunConfig
from ..data import load_dataset, to_float
from ..device import resolve_device
from ..models import build_model
from ..settings import AUDIT_DEFENCES, DSNR_MIN_BATCH, AuditPolicy, GaussianNoise, Prune
from ..task import client_batch, local_schedule, node_partition, parameter_names
from .defences import defend_update
from .dsnr import dsnr

__all__ = [
    "AUDIT_FIELDS",
    "REFUSAL",
    "UpdateView",
    "Probe",
    "Auditor",
    "tampering",
    "protection_ladder",
    "make_audit_mod",
    "Audit",
    "AuditOutcome",
    "update_view",
    "refusal_reason",
    "write_audit_row",
    "audit_row",
    "refusal_of",
    "node_memory",
    "remember",
]

REFUSAL = "refused by the client's leakage audit"
MEMORY = "audit-memory"  # the auditor's memory in the node's context state
# audit.csv's columns, in order (the server adds round, node_id, client; the rest come from the client)
AUDIT_FIELDS = [
    "round",
    "node_id",
    "client",
    "policy",
    "kind",
    "images",
    "local_steps",
    "update_norm",
    "update_zeros",
    "label_readable",
    "labels_distinct",
    "batch_size_estimate",
    "rgap_invertible",
    "rgap_deficit",
    "flagged",
    "tampered",
    "tamper_reason",
    "dsnr",
    "dsnr_layer",
    "dsnr_unit",
    "dsnr_unit_layer",
    "dsnr_flagged",
    "probe_attack",
    "probe_psnr",
    "probe_median",
    "probe_at_bar",
    "probe_seconds",
    "probe_status",
    "action",
    "defence",
    "protected_psnr",
    "checks_seconds",
    "train_seconds",
    "seconds",
    "reason",
]


@dataclass(frozen=True)
class UpdateView:
    """A client's update as the audit sees it, with the client's own ground truth.

    ``model``: the ClientApp's model holding the weights it was sent; ``tensors``: the update,
    one tensor per parameter in ``model.parameters()`` order (FedSGD: the gradient; FedAvg:
    the weight delta, reply - sent); ``kind``: ``"gradient"`` or ``"weight_delta"``; ``lr``,
    ``local_steps``: FedAvg's local training; ``images`` (float in [0, 1]) and ``labels``: the
    distinct samples the update used, in the order of first use; ``schedule``: per local step,
    the indices into ``images`` of its batch; ``device``: where the run's ``device`` setting
    resolves on this client (where a probe's attacks compute; the view itself is on the CPU).
    """

    model: nn.Module
    tensors: tuple[Tensor, ...]
    kind: str
    lr: float
    local_steps: int
    images: Tensor
    labels: Tensor
    schedule: tuple[tuple[int, ...], ...]
    input_shape: tuple[int, int, int]
    device: str = "cpu"

    def with_tensors(self, tensors: tuple[Tensor, ...]) -> "UpdateView":
        return dataclasses.replace(self, tensors=tuple(tensors))


@dataclass(frozen=True)
class Probe:
    """A probe's outcome against the client's own batch, each image scored against the
    reconstruction matched to it: ``psnr``, the highest image PSNR of the attacks it ran (the
    image that leaks most, what the bar is compared with), which attack reached it, its cost,
    and that attack's ``median`` over the images and its images at or above the bar
    (``at_bar``)."""

    psnr: float
    attack: str
    seconds: float
    status: str = "ok"
    median: float = math.nan
    at_bar: int = 0


class Auditor(Protocol):
    """The analysis an audit needs from outside the federation (``experiments.apps.probe``).
    ``memory``: what the auditor keeps for this node across rounds (str, int, float or bool
    values; the node's Context state holds it, since a simulated ClientApp is a fresh copy
    for every message)."""

    def assess(self, view: UpdateView, memory: dict[str, Any]) -> dict[str, Any]:
        """Analytic risk checks, no optimisation: keys ``label_readable``, ``labels_distinct``,
        ``batch_size_estimate``, ``rgap_invertible``, ``rgap_deficit`` and ``flagged`` (the
        checks' verdict: this update is likely recoverable)."""

    def probe(self, view: UpdateView, budget: float, bar: float, memory: dict[str, Any]) -> Probe:
        """An attack on ``view``'s update, each image scored against ``view.images``; at most
        ``budget`` seconds per attack; may stop early once an image reaches ``bar`` dB."""


# ---- tampering: what a client can see in the model it was sent -------------------------------

DUPLICATE_COS = 0.999  # rows this aligned are copies: random or trained rows are nowhere near
DUPLICATE_SHARE = 0.25  # a layer with at least this share of its rows in duplicate groups ...
DUPLICATE_LEAST = 4  # ... and at least this many such rows is a constructed layer


def _duplicate_rows(weight: Tensor) -> Tensor:
    """Which rows of ``weight`` (rows = output units) have a near-copy among the others."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    norms = rows.norm(dim=1)
    live = norms > 1e-12
    copies = torch.zeros(weight.shape[0], dtype=torch.bool)
    if int(live.sum()) < 2:
        return copies
    unit = rows[live] / norms[live, None]
    cos = unit @ unit.T
    cos.fill_diagonal_(0.0)
    copies[live] = (cos.abs() > DUPLICATE_COS).any(dim=1)
    return copies


def tampering(own: Mapping[str, Tensor], sent: Mapping[str, Tensor], *, rows: bool = True) -> str:
    """``""`` when the model sent looks honest, else a one-line reason: entries or shapes
    that differ from the ClientApp's own model (``own``, a state dict), non-finite weights,
    or (``rows``) a linear layer whose rows are mostly copies of one another (an imprint or trap
    construction: honest initialisations and trained layers have no such rows)."""
    missing = [k for k in own if k not in sent]
    extra = [k for k in sent if k not in own]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}"] if extra else []
        )
        return f"the model sent is not this ClientApp's model: {'; '.join(parts)}"
    for name, ref in own.items():
        if tuple(sent[name].shape) != tuple(ref.shape):
            got, want = tuple(sent[name].shape), tuple(ref.shape)
            return f"the model sent is not this ClientApp's model: {name} has shape {got}, expected {want}"
    for name, value in sent.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"the model sent holds non-finite weights in {name}"
    for name, value in sent.items() if rows else ():
        # linear layers: where the published constructions sit (an imprint's bins, trap weights,
        # fishing's head); a convolution's filters are not checked (and would cost most of the time)
        if not name.endswith("weight") or value.dim() != 2 or value.shape[0] < DUPLICATE_LEAST:
            continue
        mask = _duplicate_rows(value)
        copies = int(mask.sum())
        if copies >= DUPLICATE_LEAST and copies >= DUPLICATE_SHARE * value.shape[0]:
            bias = sent.get(name[: -len("weight")] + "bias")
            ladder = ""
            if bias is not None and bias.numel() == value.shape[0]:
                ladder = f", {int(torch.unique(bias.detach()[mask]).numel())} distinct biases among them"
            return f"{name}: {copies} of {value.shape[0]} rows are copies of one another{ladder} (a constructed layer)"
    return ""


def protection_ladder(defence: str) -> tuple[float, ...]:
    return AUDIT_DEFENCES[defence]


def _protect(
    tensors: tuple[Tensor, ...], defence: str, strength: float, *, seed: int, partition_id: int, server_round: int
) -> tuple[Tensor, ...]:
    """The update under ``defence`` at ``strength`` (noise: sigma = strength x the update's RMS
    entry; prune: the smallest-magnitude fraction of each tensor zeroed), through the same
    functions the run's own defences use (:func:`fl_sim.mods.defences.defend_update`)."""
    named = {str(i): t for i, t in enumerate(tensors)}
    spec: Any = GaussianNoise(rms=strength) if defence == "noise" else Prune(ratio=strength)
    out = defend_update(named, (spec,), seed=seed, partition_id=partition_id, server_round=server_round)
    return tuple(out[str(i)] for i in range(len(tensors)))


def _config_value(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (int, float, str)) else str(value)


def refusal_of(reason: str) -> tuple[str, dict[str, Any]] | None:
    """An error reply's reason as ``(why, audit row)`` if the client's audit refused the
    update (the inverse of the reason :func:`make_audit_mod` writes), else None."""
    text = str(reason)
    if REFUSAL not in text:
        return None
    body = text[text.index(REFUSAL) + len(REFUSAL) :].lstrip(": ")
    why, sep, row = body.partition(" | audit ")
    try:
        values = json.loads(row) if sep else {}
    except json.JSONDecodeError:
        values = {}
    return why.strip(), values if isinstance(values, dict) else {}


def audit_row(msg) -> dict[str, Any] | None:
    """The audit record a train reply carries (its ConfigRecord ``audit``, or the refusal in
    its error), or None."""
    if msg.has_error():
        refused = refusal_of(msg.error.reason or "")
        return None if refused is None else {**refused[1], "action": "refused", "reason": refused[0]}
    if "audit" not in msg.content.config_records:
        return None
    return dict(msg.content.config_records["audit"])


# ---- the audit of one update (both clients) ---------------------------------------------------


def update_view(
    cfg, pid: int, server_round: int, model: nn.Module, update: Mapping[str, Tensor], input_shape
) -> UpdateView:
    """The audit's view of ``update`` (by parameter name: FedSGD's gradient, or FedAvg's
    weight delta) of a model holding the weights sent, with the client's own batch behind it."""
    tensors = tuple(update[n].detach().clone() for n in parameter_names(model))
    device = str(resolve_device(cfg.device))
    if cfg.mode == "fedsgd":
        images, labels = client_batch(cfg, pid, cfg.num_clients, server_round)
        schedule = (tuple(range(len(labels))),)
        return UpdateView(model, tensors, "gradient", cfg.lr, 1, images, labels, schedule, tuple(input_shape), device)
    batches = local_schedule(cfg, pid, cfg.num_clients, server_round)
    order: dict[int, int] = {}
    for batch in batches:
        for i in batch.tolist():
            order.setdefault(int(i), len(order))
    data = load_dataset(cfg.dataset, cfg.data_root)
    idx = torch.tensor(list(order))
    schedule = tuple(tuple(order[int(i)] for i in batch.tolist()) for batch in batches)
    return UpdateView(
        model,
        tensors,
        "weight_delta",
        cfg.lr,
        len(batches),
        to_float(data.train_x[idx]),
        data.train_y[idx],
        schedule,
        tuple(input_shape),
        device,
    )


@dataclass
class AuditOutcome:
    """What the audit decided for one update: ``action`` ``sent``, ``protected`` (send
    ``update`` instead, by parameter name) or ``refused`` (``reason``); ``row`` its audit.csv
    record."""

    action: str
    row: dict[str, Any]
    update: dict[str, Tensor] | None = None
    reason: str = ""


class Audit:
    """One client's audit of one train round, in the order a client meets it: :meth:`check_model`
    on the weights it was sent (before training), :meth:`check_update` on the update it would
    send. Used by the Message-API mod (:func:`make_audit_mod`) and the SecAgg+ client."""

    def __init__(self, auditor: Auditor, cfg, pid: int, server_round: int, memory: dict[str, Any]) -> None:
        self.auditor, self.cfg, self.pid, self.server_round = auditor, cfg, pid, server_round
        self.policy: AuditPolicy = cfg.audit_policy
        self.memory = memory
        self.start = time.perf_counter()
        self.data = load_dataset(cfg.dataset, cfg.data_root)
        self.own = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.row: dict[str, Any] = {k: "" for k in AUDIT_FIELDS if k not in ("round", "node_id")}
        self.row.update(
            client=pid, policy=self.policy.spec(), kind="gradient" if cfg.mode == "fedsgd" else "weight_delta"
        )
        self.tamper_seconds = 0.0

    def _done(self, action: str, update: dict[str, Tensor] | None = None, reason: str = "") -> AuditOutcome:
        self.row.update(action=action, reason=reason, seconds=round(time.perf_counter() - self.start, 4))
        return AuditOutcome(action, self.row, update, reason)

    def check_model(self, sent: Mapping[str, Tensor]) -> AuditOutcome | None:
        """The tampering checks on the model sent; a refusal (block, protect) or None (go on)."""
        t0 = time.perf_counter()
        reason = tampering(self.own.state_dict(), sent, rows=self.policy.rows)
        self.row.update(tampered=bool(reason), tamper_reason=reason)
        if reason and self.policy.action != "log":
            self.tamper_seconds = time.perf_counter() - t0
            self.row["checks_seconds"] = round(self.tamper_seconds, 5)
            return self._done("refused", reason=reason)  # never train on, or answer, a model built to extract data
        why = ""
        if not reason:
            self.own.load_state_dict(sent)
            try:
                why = self._check_dsnr()
            except Exception as exc:  # noqa: BLE001 - a check that fails must fail closed, not lose the reply
                why = f"the D-SNR check failed: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:200]}"
        self.tamper_seconds = time.perf_counter() - t0
        self.row["checks_seconds"] = round(self.tamper_seconds, 5)
        if why and self.policy.action != "log":
            return self._done("refused", reason=why)
        return None

    def first_batch(self) -> tuple[Tensor, Tensor]:
        """The client's batch the model sent meets first: FedSGD's batch, FedAvg's first local step's."""
        if self.cfg.mode == "fedsgd":
            return client_batch(self.cfg, self.pid, self.cfg.num_clients, self.server_round)
        idx = torch.as_tensor(local_schedule(self.cfg, self.pid, self.cfg.num_clients, self.server_round)[0])
        return to_float(self.data.train_x[idx]), self.data.train_y[idx]

    def _check_dsnr(self) -> str:
        """The D-SNR check on ``self.own`` (holding the model sent): records it, and returns the
        reason to refuse ("" when it does not flag, is off, or the batch is one image)."""
        if not self.policy.checks_dsnr:
            return ""
        images, labels = self.first_batch()
        if len(labels) < 2:
            return ""  # one sample always dominates: no verdict on the model (module docstring)
        got = dsnr(self.own, images, labels)
        self.row.update(
            dsnr=round(got.value, 5), dsnr_layer=got.layer, dsnr_unit=round(got.unit, 5), dsnr_unit_layer=got.unit_layer
        )
        if len(labels) < DSNR_MIN_BATCH:
            return ""  # recorded, not judged: honest small batches reach any value (module docstring)
        flagged = got.unit > self.policy.dsnr
        self.row["dsnr_flagged"] = flagged
        if not flagged:
            return ""
        return (
            f"per-unit D-SNR {got.unit:.3g} in {got.unit_layer} is above {self.policy.dsnr:g}: on the model sent, "
            f"a sample's gradient sits {got.unit:.0%} in units it alone drives (mean of {len(labels)} samples)"
        )

    def check_update(self, update: Mapping[str, Tensor], train_seconds: float) -> AuditOutcome:
        """The analytic checks, the probe and the policy's action on the update to be sent.
        Never raises: a failing audit sends under ``log`` and refuses otherwise (fails closed)."""
        self.row["train_seconds"] = round(train_seconds, 4)
        if self.row["tampered"]:  # log: recorded, sent as the handler made it
            return self._done("sent")
        try:
            return self._check_update(update)
        except Exception as exc:  # noqa: BLE001 - an audit that fails must not lose the reply silently
            why = f"the audit failed: {' '.join(f'{type(exc).__name__}: {exc}'.split())[:200]}"
            return self._done("sent", reason=why) if self.policy.action == "log" else self._done("refused", reason=why)

    def _check_update(self, update: Mapping[str, Tensor]) -> AuditOutcome:
        policy, row, auditor, memory = self.policy, self.row, self.auditor, self.memory
        view = update_view(self.cfg, self.pid, self.server_round, self.own, update, self.data.input_shape)
        count = sum(t.numel() for t in view.tensors)
        row.update(
            images=int(view.labels.numel()),
            local_steps=view.local_steps,
            update_norm=round(math.sqrt(sum(float((t.double() ** 2).sum()) for t in view.tensors)), 6),
            update_zeros=round(sum(int((t == 0).sum()) for t in view.tensors) / max(count, 1), 4),
        )
        t0 = time.perf_counter()
        checks = auditor.assess(view, memory)
        row["checks_seconds"] = round(self.tamper_seconds + time.perf_counter() - t0, 5)
        row.update(
            {
                k: checks.get(k, "")
                for k in (
                    "label_readable",
                    "labels_distinct",
                    "batch_size_estimate",
                    "rgap_invertible",
                    "rgap_deficit",
                    "flagged",
                )
            }
        )
        row["flagged"] = bool(row["flagged"]) or row["dsnr_flagged"] is True
        probe = auditor.probe(view, policy.budget, policy.bar, memory) if policy.probe else None
        if probe is not None:
            row.update(
                probe_attack=probe.attack,
                probe_psnr=round(probe.psnr, 3),
                probe_median=round(probe.median, 3),
                probe_at_bar=probe.at_bar,
                probe_seconds=round(probe.seconds, 3),
                probe_status=probe.status,
            )
        at_risk = (probe.psnr >= policy.bar) if probe is not None else bool(checks.get("flagged"))
        if not at_risk or policy.action == "log":
            return self._done("sent")
        if policy.action == "block":
            return self._done(
                "refused",
                reason=(
                    f"the probe's {probe.attack} reconstructs {probe.at_bar} of its images at up to "
                    f"{probe.psnr:.1f} dB (bar {policy.bar:g})"
                    if probe is not None
                    else "the analytic checks flag this update as recoverable"
                ),
            )
        for strength in protection_ladder(policy.defence):
            tensors = _protect(
                view.tensors,
                policy.defence,
                strength,
                seed=self.cfg.seed,
                partition_id=self.pid,
                server_round=self.server_round,
            )
            again = auditor.probe(view.with_tensors(tensors), policy.budget, policy.bar, memory)
            row["probe_seconds"] = round(float(row["probe_seconds"] or 0) + again.seconds, 3)
            if again.psnr < policy.bar:
                row.update(defence=f"{policy.defence}:{strength:g}", protected_psnr=round(again.psnr, 3))
                return self._done("protected", dict(zip(parameter_names(self.own), tensors)))
        return self._done(
            "refused",
            reason=f"the strongest {policy.defence} ({protection_ladder(policy.defence)[-1]:g}) "
            f"leaves the probe at or above {policy.bar:g} dB",
        )


def write_audit_row(path, row: Mapping[str, Any]) -> None:
    """Append ``row`` to the audit.csv at ``path`` (header first if new), under a file lock:
    the server writes the rows its replies carry, SecAgg+ clients write their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            w = csv.DictWriter(f, AUDIT_FIELDS, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in AUDIT_FIELDS})
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def refusal_reason(outcome: AuditOutcome) -> str:
    """The error reason of a refused update: the why, then the record (see :func:`refusal_of`)."""
    record = json.dumps({k: _config_value(v) for k, v in outcome.row.items()})
    return f"{REFUSAL}: {outcome.reason} | audit {record}"


def node_memory(context) -> dict[str, Any]:
    return dict(context.state[MEMORY]) if MEMORY in context.state.config_records else {}


def remember(context, server_round: int, audit: Audit) -> None:
    """The auditor's memory and the node's own record of its audits (its context's state
    persists across rounds)."""

    try:
        context.state[MEMORY] = ConfigRecord(audit.memory)
        context.state[f"audit-{server_round}"] = ConfigRecord({k: _config_value(v) for k, v in audit.row.items()})
    except Exception:  # noqa: BLE001 - a context that cannot hold it must not lose the reply
        pass


# ---- the mod (Message-API ClientApp) -------------------------------------------------------


def make_audit_mod(auditor: Auditor) -> Callable:
    """The leakage-audit mod for a ClientApp's train handler, with ``auditor``'s analysis.
    Place it outside (before, in the mods list) the defences' mods so that it sees the update
    that leaves. It does nothing unless the run config sets ``audit``. The reply carries the
    record in a ConfigRecord ``audit``; a refusal is an error reply whose reason carries it."""

    def audit_mod(msg, context, call_next):
        if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
            return call_next(msg, context)
        cfg = RunConfig.from_mapping(dict(msg.content["config"]))
        policy = cfg.audit_policy
        pid = node_partition(cfg, context.node_config)
        if policy is None or not policy.audits(pid):
            return call_next(msg, context)
        server_round = int(msg.content["config"].get("server-round", 0))
        audit = Audit(auditor, cfg, pid, server_round, node_memory(context))
        sent = msg.content["arrays"].to_torch_state_dict()

        def refuse(outcome: AuditOutcome) -> Message:
            remember(context, server_round, audit)
            return Message(error=Error(code=0, reason=refusal_reason(outcome)), reply_to=msg)

        early = audit.check_model(sent)
        if early is not None:
            return refuse(early)
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        train_seconds = time.perf_counter() - t0
        if reply.has_error():
            return reply
        arrays = reply.content["arrays"].to_torch_state_dict()
        names = parameter_names(audit.own)
        foreign = not all(n in arrays and n in sent for n in names)  # another architecture (logged): nothing to analyse
        update = (
            {}
            if foreign
            else {n: arrays[n] for n in names}
            if cfg.mode == "fedsgd"
            else {n: arrays[n] - sent[n] for n in names}
            if not audit.row["tampered"]
            else {}
        )
        outcome = audit.check_update(update, train_seconds)
        if outcome.action == "refused":
            return refuse(outcome)
        if outcome.update is not None:
            new = dict(arrays)
            for n, t in outcome.update.items():
                new[n] = (t if cfg.mode == "fedsgd" else sent[n] + t).to(arrays[n].dtype).contiguous()
            reply.content["arrays"] = ArrayRecord(new)
        remember(context, server_round, audit)
        reply.content["audit"] = ConfigRecord({k: _config_value(v) for k, v in outcome.row.items()})
        return reply

    return audit_mod
