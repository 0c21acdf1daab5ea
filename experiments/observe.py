"""What each observer of a federation has: observations as pure functions.

An observation is what one observer sees of one round, split in two: what its attacker gets
(the weights the update was computed on, the update, and the facts it is entitled to: the
:class:`Grants`), and the :class:`RefereeKey`, kept apart, with which the referee rebuilds the
true batch to score a reconstruction. Nothing in the key is handed to an attack.

Observers and what they are entitled to (``grant-batch-size = "observed"``, the default):

- ``server`` (the parameter server) sees each client's own reply: the weights it sent, the
  update, and the reply's clear-text ``num-examples`` (so it knows a FedSGD batch size); for
  FedAvg it knows the local schedule it configured (learning rate, steps or epochs, batch
  size) and, from num-examples, how many images the steps used, but not the client's shuffle
  (which image went into which step) unless ``grant-batch-order`` grants it.
- ``client`` (a curious client) sees only successive global models, and its own update. It
  knows the run config it was sent (``server-lr``, ``num-clients``, ``fraction-train``,
  ``batch-size``) but not who took part in a round or with how many examples: it assumes the
  configured number of participants with equal weights, subtracts its own update and attacks
  the estimated mean of the others, with no batch size (the attacks estimate it). If a client
  dropped out, its estimate is wrong, as it would be in a real federation.
- ``secagg`` (the server under SecAgg+) sees only the aggregate, but each client's
  ``num_examples`` travels in the clear under Flower's SecAgg+, so it knows the total number
  of images in the aggregate.
- ``active`` (a malicious server) chose the model it sent in an attacked round (the one the
  update was computed on, which is what its attack reads); it sees each client's own reply
  like ``server``. ``active-secagg``: the same server under SecAgg+, with the round's
  aggregate (the decoded mean it holds) and the clear-text example counts. Neither needs
  labels or a batch size, and neither is told them unless granted.

``grant-batch-size = "all"`` grants every observer the true number of images (an upper
bound), ``"none"`` grants it to none (every attack estimates: a lower bound);
``grant-labels`` grants every observer the true labels, which no observer sees. Rows of the
aggregate observers score the union of the contributors' batches and are attributed to
clients by matching after the fact (``attribution = "post-hoc"``): SecAgg+ and the curious
client cannot tell whose image is whose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from attacks import ThreatModel, Update
from attacks.imprint import BLOCK_KEYS, load_model
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate
from fl_sim.models import build_model

__all__ = [
    "Truth",
    "Grants",
    "assumed_schedule",
    "RefereeKey",
    "Observation",
    "update_of",
    "observe_server",
    "observe_curious_client",
    "observe_secagg",
    "observe_active",
    "observe_active_secagg",
    "with_imprint_block",
]

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Truth:
    """The true batch behind an update: images in [0, 1], labels, each image's owner and, for
    one client's FedAvg update, its true local schedule (per step, the indices into
    ``images`` of that step's batch); ``indices``: each image's index in its dataset
    (:meth:`fl_sim.data.Dataset.source_index`), None when unknown; ``partitions``: each
    owner's images (its partition, the candidates of the IIP score), None when unknown."""

    images: Tensor
    labels: Tensor
    owners: tuple[int, ...]
    schedule: tuple[tuple[int, ...], ...] | None = None
    indices: tuple[int, ...] | None = None
    partitions: Mapping[int, Tensor] | None = None


@dataclass(frozen=True)
class Grants:
    """What an attacker is told besides the weights and the update: the true labels (or
    not), and the number of images in the update (None: not granted, the attack estimates it)
    with where that number came from (``reply``: the reply's num-examples; ``config``: the
    FedAvg schedule the server configured; ``clear-counts``: SecAgg+'s clear-text example
    counts; ``granted``: a grant beyond what the observer sees; ``none``).

    For a FedAvg update seen by the server, ``schedule`` is the local steps as the server
    pictures them (:func:`assumed_schedule`: it set the steps and the batch size, and the
    reply says how many images the client holds, but not the client's shuffle); ``order``
    grants the client's true batch order instead (an upper bound, like the labels)."""

    labels: bool
    batch_size: int | None
    batch_size_source: Literal["reply", "config", "clear-counts", "granted", "none"]
    schedule: tuple[tuple[int, ...], ...] | None = None
    order: bool = False

    def threat(self, truth: Truth) -> ThreatModel:
        """The :class:`attacks.ThreatModel` of these grants. What goes beyond the observation
        comes from the referee's ``truth``: the true labels (in the true order of the images
        when the batch order is granted, sorted otherwise, so that they do not reveal it)
        and the true schedule."""
        schedule = truth.schedule if self.order and truth.schedule is not None else self.schedule
        labels = None
        if self.labels:
            labels = truth.labels.clone() if schedule is None or self.order else torch.sort(truth.labels).values
        return ThreatModel(labels=labels, batch_size=self.batch_size, schedule=schedule)


def assumed_schedule(examples: int, batch_size: int, steps: int) -> tuple[tuple[int, ...], ...]:
    """The local steps of a client with ``examples`` images as an observer that does not know
    its shuffle pictures them: every pass over the images in one fixed order, cut into batches
    of ``batch_size`` (the last of a pass shorter), ``steps`` batches in all (Geiping et al.'s
    FedAvg setting). Indices are into the distinct images the steps used."""
    out: list[tuple[int, ...]] = []
    while len(out) < steps:
        for start in range(0, examples, batch_size):
            out.append(tuple(range(start, min(start + batch_size, examples))))
            if len(out) == steps:
                break
    return tuple(out)


@dataclass(frozen=True)
class RefereeKey:
    """For the referee only: whose data the update mixes (partition ids) and whether a row is
    attributed to a client directly (its own update) or by matching after the fact."""

    targets: tuple[int, ...]
    attribution: Literal["direct", "post-hoc"]


@dataclass(frozen=True)
class Observation:
    """One observer's view of one update, and the referee's key to it."""

    observer: str
    server_round: int
    weights: dict[str, Tensor]  # the model the update was computed on
    update: Update  # tensors in model.parameters() order
    grants: Grants
    key: RefereeKey


def update_of(
    sent: StateDict, reply: StateDict, kind: str, names: Sequence[str], *, lr: float, local_steps: int = 1
) -> Update:
    """The attack library's :class:`attacks.Update` of a reply: a FedSGD gradient as it is, or
    FedAvg weights as their delta from ``sent``; ``names`` are the model's parameters in order."""
    if kind == "gradient":
        return Update(tuple(reply[n].detach().clone() for n in names), "gradient")
    return Update(
        tuple((reply[n] - sent[n]).detach().clone() for n in names),
        "weight_delta",
        lr=lr,
        local_steps=max(1, int(local_steps)),
    )


def _weights(state: StateDict) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def observe_server(
    u: InterceptedUpdate,
    cfg: RunConfig,
    names: Sequence[str],
    *,
    grant_batch_size: str,
    grant_labels: bool,
    grant_order: bool = False,
) -> Observation:
    """The parameter server's view of one client's reply."""
    # FedAvg: num-examples is the client's partition; the server set the learning rate, the
    # steps (or epochs) and the batch size, so it knows how many steps of how many images
    steps = 1 if u.kind == "gradient" else cfg.steps_for(u.num_examples)
    update = update_of(u.sent, u.reply, u.kind, names, lr=cfg.lr, local_steps=steps)
    if grant_batch_size == "none":
        grants = Grants(grant_labels, None, "none")
    elif u.kind == "gradient":  # FedSGD: the reply's num-examples is the batch
        grants = Grants(grant_labels, u.num_examples, "reply")
    else:
        schedule = assumed_schedule(u.num_examples, cfg.batch_size, steps)
        images = 1 + max(i for step in schedule for i in step)
        grants = Grants(grant_labels, images, "config", schedule=schedule, order=grant_order)
    return Observation(
        "server", u.server_round, _weights(u.sent), update, grants, RefereeKey((u.partition_id,), "direct")
    )


def _mean_update(agg: RoundAggregate, cfg: RunConfig, names: Sequence[str]) -> tuple[tuple[Tensor, ...], str]:
    """The round's mean update as a global-model watcher reads it: FedSGD's mean gradient
    ``(before - after) / server_lr``, or FedAvg's mean weight delta ``after - before``."""
    if cfg.mode == "fedsgd":
        return tuple((agg.before[n] - agg.after[n]) / cfg.server_lr for n in names), "gradient"
    return tuple(agg.after[n] - agg.before[n] for n in names), "weight_delta"


def _as_update(tensors: tuple[Tensor, ...], kind: str, cfg: RunConfig, examples: int) -> Update:
    """A mean update as an aggregate observer reads it; a FedAvg mean is taken as the steps
    of a client holding ``examples`` images (clients holding different numbers ran
    different numbers of steps: an aggregate has no one schedule)."""
    if kind == "gradient":
        return Update(tensors, "gradient")
    return Update(tensors, "weight_delta", lr=cfg.lr, local_steps=cfg.steps_for(examples))


def observe_curious_client(
    agg: RoundAggregate,
    own: InterceptedUpdate | None,
    cfg: RunConfig,
    names: Sequence[str],
    *,
    curious_client: int,
    grant_batch_size: str,
    grant_labels: bool,
) -> Observation | str:
    """A curious client's view of a round: the estimated mean update of the others. Returns a
    one-line reason instead when it has nothing to attack (it took no part in the round, so
    it has no own update to subtract, or it would be alone)."""
    if own is None or own.server_round != agg.server_round:
        return f"client {curious_client} has no update of its own in round {agg.server_round} to subtract"
    n = cfg.clients_per_round()  # what the config says; who really took part it cannot see
    if n < 2:
        return "a single participant: nothing of the others to attack"
    mean, kind = _mean_update(agg, cfg, names)
    mine = update_of(own.sent, own.reply, own.kind, names, lr=cfg.lr).tensors
    # mean of the others = (n * mean - own) / (n - 1), all weighted equally by assumption
    others = tuple((n * m - o) / (n - 1) for m, o in zip(mean, mine))
    targets = tuple(p for p in agg.partition_ids if p != curious_client)
    # images in the update: FedSGD's batches are the example counts; under FedAvg every image
    # each client's local steps used
    counts = [c for p, c in agg.contributors if p != curious_client]
    images = sum(counts) if cfg.mode == "fedsgd" else sum(cfg.images_for(c) for c in counts)
    grants = (
        Grants(grant_labels, images, "granted") if grant_batch_size == "all" else Grants(grant_labels, None, "none")
    )
    # it assumes the others hold as many images as it does itself
    return Observation(
        "client",
        agg.server_round,
        _weights(agg.before),
        _as_update(others, kind, cfg, own.num_examples),
        grants,
        RefereeKey(targets, "post-hoc"),
    )


def observe_secagg(
    agg: RoundAggregate, cfg: RunConfig, names: Sequence[str], *, grant_batch_size: str, grant_labels: bool
) -> Observation:
    """The SecAgg+ server's view of a round: the mean update of everyone, and the clients'
    clear-text example counts."""
    mean, kind = _mean_update(agg, cfg, names)
    counts = [c for _, c in agg.contributors]
    images = sum(counts) if kind == "gradient" else sum(cfg.images_for(c) for c in counts)
    if grant_batch_size == "none":
        grants = Grants(grant_labels, None, "none")
    else:
        grants = Grants(grant_labels, images, "clear-counts" if grant_batch_size == "observed" else "granted")
    update = _as_update(mean, kind, cfg, max(counts, default=1))
    return Observation(
        "secagg", agg.server_round, _weights(agg.before), update, grants, RefereeKey(agg.partition_ids, "post-hoc")
    )


def observe_active(u: InterceptedUpdate, cfg: RunConfig, names: Sequence[str], *, grant_labels: bool) -> Observation:
    """The active server's view of one client's reply to the model it built (``u.sent``, whose
    entries, not ``names``, the update follows: an imprint block adds its own)."""
    names = [n for n in u.sent if n in u.reply] if set(u.sent) != set(names) else names
    steps = 1 if u.kind == "gradient" else cfg.steps_for(u.num_examples)
    update = update_of(u.sent, u.reply, u.kind, names, lr=cfg.lr, local_steps=steps)
    images = u.num_examples if u.kind == "gradient" else cfg.images_for(u.num_examples)
    return Observation(
        "active",
        u.server_round,
        _weights(u.sent),
        update,
        Grants(grant_labels, images, "reply" if u.kind == "gradient" else "config"),
        RefereeKey((u.partition_id,), "direct"),
    )


def observe_active_secagg(
    agg: RoundAggregate, cfg: RunConfig, names: Sequence[str], *, grant_labels: bool
) -> Observation:
    """The active server's view of a SecAgg+ round that sent its model (``agg.before``): the
    decoded mean update (``agg.update``; from the model step when it has none)."""
    names = list(agg.before) if set(agg.before) != set(names) else names  # an imprint block adds entries
    if agg.update is not None:
        tensors = tuple(agg.update[n].detach().clone() for n in names)
        kind = "gradient" if cfg.mode == "fedsgd" else "weight_delta"
    else:
        tensors, kind = _mean_update(agg, cfg, names)
    counts = [c for _, c in agg.contributors]
    images = sum(counts) if kind == "gradient" else sum(cfg.images_for(c) for c in counts)
    update = _as_update(tensors, kind, cfg, max(counts, default=1))
    return Observation(
        "active-secagg",
        agg.server_round,
        _weights(agg.before),
        update,
        Grants(grant_labels, images, "clear-counts"),
        RefereeKey(agg.partition_ids, "post-hoc"),
    )


def with_imprint_block(cfg: RunConfig, state):
    """The dataset and the run's model holding ``state`` (a state dict, or SecAgg+'s arrays in
    order), with the imprint block in front when the server sent one: what the server's
    ClientApp builds, and what its attack reads the update with."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    base = build_model(cfg.model, data.input_shape, data.num_classes)
    if not isinstance(state, Mapping):  # unnamed arrays: the block's three come first when they are there
        keys = list(base.state_dict())
        keys = [*BLOCK_KEYS, *(f"1.{k}" for k in keys)] if len(state) == len(keys) + len(BLOCK_KEYS) else keys
        state = dict(zip(keys, state))
    return data, load_model(base, state, data.input_shape)
