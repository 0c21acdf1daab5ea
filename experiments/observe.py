"""What each observer of a federation has: observations as pure functions.

An observation is what one observer sees of one round, split in two: what its attacker gets
(the weights the update was computed on, the update, and the facts it is entitled to: the
:class:`Grants`), and the :class:`RefereeKey`, kept apart, with which the referee rebuilds the
true batch to score a reconstruction. Nothing in the key is handed to an attack.

Observers and what they are entitled to (``grant-batch-size = "observed"``, the default):

- ``server`` (the parameter server) sees each client's own reply: the weights it sent, the
  update, and the reply's clear-text ``num-examples`` (so it knows a FedSGD batch size); for
  FedAvg it knows the local schedule it configured (learning rate, steps, batch size).
- ``client`` (a curious client) sees only successive global models, and its own update. It
  knows the run config it was sent (``server-lr``, ``num-clients``, ``fraction-train``,
  ``batch-size``) but not who took part in a round or with how many examples: it assumes the
  configured number of participants with equal weights, subtracts its own update and attacks
  the estimated mean of the others, with no batch size (the attacks estimate it). If a client
  dropped out, its estimate is wrong, as it would be in a real federation.
- ``secagg`` (the server under SecAgg+) sees only the aggregate, but each client's
  ``num_examples`` travels in the clear under Flower's SecAgg+, so it knows the total number
  of images in the aggregate.

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

from torch import Tensor

from attacks import Update
from fl_sim.config import RunConfig
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate

__all__ = [
    "Grants",
    "RefereeKey",
    "Observation",
    "update_of",
    "observe_server",
    "observe_curious_client",
    "observe_secagg",
]

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Grants:
    """What an attacker is told besides the weights and the update: the true labels (or
    not), and the number of images in the update (None: not granted, the attack estimates it)
    with where that number came from (``reply``: the reply's num-examples; ``clear-counts``:
    SecAgg+'s clear-text example counts; ``granted``: a grant beyond what the observer sees;
    ``none``)."""

    labels: bool
    batch_size: int | None
    batch_size_source: Literal["reply", "config", "clear-counts", "granted", "none"]


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


def update_of(sent: StateDict, reply: StateDict, kind: str, names: Sequence[str], *, lr: float,
              local_steps: int = 1) -> Update:
    """The attack library's :class:`attacks.Update` of a reply: a FedSGD gradient as it is, or
    FedAvg weights as their delta from ``sent``; ``names`` are the model's parameters in order."""
    if kind == "gradient":
        return Update(tuple(reply[n].detach().clone() for n in names), "gradient")
    return Update(tuple((reply[n] - sent[n]).detach().clone() for n in names), "weight_delta", lr=lr,
                  local_steps=max(1, int(local_steps)))


def _weights(state: StateDict) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def observe_server(u: InterceptedUpdate, cfg: RunConfig, names: Sequence[str], *, grant_batch_size: str,
                   grant_labels: bool) -> Observation:
    """The parameter server's view of one client's reply."""
    steps = int(u.metrics.get("local-steps", 1))
    update = update_of(u.sent, u.reply, u.kind, names, lr=cfg.lr, local_steps=steps)
    if grant_batch_size == "none":
        grants = Grants(grant_labels, None, "none")
    elif u.kind == "gradient":  # FedSGD: the reply's num-examples is the batch
        grants = Grants(grant_labels, u.num_examples, "reply")
    else:  # FedAvg: num-examples is the partition; the server set the batch size of each local step
        grants = Grants(grant_labels, cfg.batch_size, "config")
    return Observation("server", u.server_round, _weights(u.sent), update, grants, RefereeKey((u.partition_id,), "direct"))


def _mean_update(agg: RoundAggregate, cfg: RunConfig, names: Sequence[str]) -> tuple[tuple[Tensor, ...], str]:
    """The round's mean update as a global-model watcher reads it: FedSGD's mean gradient
    ``(before - after) / server_lr``, or FedAvg's mean weight delta ``after - before``."""
    if cfg.mode == "fedsgd":
        return tuple((agg.before[n] - agg.after[n]) / cfg.server_lr for n in names), "gradient"
    return tuple(agg.after[n] - agg.before[n] for n in names), "weight_delta"


def _as_update(tensors: tuple[Tensor, ...], kind: str, cfg: RunConfig) -> Update:
    if kind == "gradient":
        return Update(tensors, "gradient")
    return Update(tensors, "weight_delta", lr=cfg.lr, local_steps=max(1, cfg.local_steps or 1))


def observe_curious_client(agg: RoundAggregate, own: InterceptedUpdate | None, cfg: RunConfig, names: Sequence[str],
                           *, curious_client: int, grant_batch_size: str, grant_labels: bool) -> Observation | str:
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
    # images in the update per step: FedSGD's batches are the example counts; a FedAvg step
    # uses one batch of the configured size per client
    images = (sum(c for p, c in agg.contributors if p != curious_client) if cfg.mode == "fedsgd"
              else len(targets) * cfg.batch_size)
    grants = (Grants(grant_labels, images, "granted") if grant_batch_size == "all"
              else Grants(grant_labels, None, "none"))
    return Observation("client", agg.server_round, _weights(agg.before), _as_update(others, kind, cfg), grants,
                       RefereeKey(targets, "post-hoc"))


def observe_secagg(agg: RoundAggregate, cfg: RunConfig, names: Sequence[str], *, grant_batch_size: str,
                   grant_labels: bool) -> Observation:
    """The SecAgg+ server's view of a round: the mean update of everyone, and the clients'
    clear-text example counts."""
    mean, kind = _mean_update(agg, cfg, names)
    images = sum(c for _, c in agg.contributors)
    if grant_batch_size == "none":
        grants = Grants(grant_labels, None, "none")
    else:
        grants = Grants(grant_labels, images, "clear-counts" if grant_batch_size == "observed" else "granted")
    return Observation("secagg", agg.server_round, _weights(agg.before), _as_update(mean, kind, cfg), grants,
                       RefereeKey(agg.partition_ids, "post-hoc"))
