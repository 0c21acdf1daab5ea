"""Defences against gradient inversion, each where it lives in a real deployment.

A run names them in its config (``defences = "prune:ratio=0.3;noise:sigma=0.01"``, the flag
``--defence NAME[:KEY=VALUE,...]``, repeatable). Where a defence sits decides whom it protects
against, and the testbed measures that rather than assumes it:

- ``prune:ratio=p`` (DLG's defence, Zhu et al. 2019, section 5): the client zeroes the
  smallest-magnitude fraction ``p`` of each tensor of its update (gradient compression), in a
  ClientApp mod, so every observer sees the pruned update.
- ``noise:sigma=s`` (DLG's other defence): the client adds Gaussian noise of standard deviation
  ``s`` to every entry of its update (DLG's paper gives the variance, ``s**2``), in a mod;
  ``noise:rms=k``: of ``k`` times the update's RMS entry (relative, as the clients' audit
  applies it).
- ``ldp:clip=C,epsilon=e[,delta=d,sensitivity=S]``: Flower's ``LocalDpMod`` on the ClientApp:
  the update is clipped to norm C and Gaussian noise calibrated to (e, d) for sensitivity S
  (default C) is added before it leaves the client; (e, d) per round.
- ``central-dp:noise=z,clip=C[,side=server|client,delta=d]``: Flower's central DP, the
  strategy wrappers ``DifferentialPrivacyServerSideFixedClipping`` (the server clips each
  update it received) or ``DifferentialPrivacyClientSideFixedClipping`` with Flower's
  ``fixedclipping_mod`` on the clients (the client clips before sending); either way the
  server adds noise of standard deviation ``z C / n`` to the aggregate of ``n`` clients. The
  server therefore sees un-noised updates (clipped ones with ``side=client``): central DP
  protects against whoever sees the model, not against the server. Under ``side=client`` the
  norm the client clips to arrives in the server's train config (Flower's design): the
  client trusts the server for it.
- ``dpsgd:noise=z,clip=C[,delta=d]``: sample-level DP-SGD with Opacus in the client's local
  training: per-sample gradients clipped to C, summed, Gaussian noise of standard deviation
  ``z C`` added, divided by the batch size (FedSGD: the one batch's gradient; FedAvg: every
  local step).

``ldp`` and ``central-dp`` clip the *weight* update (Flower's implementations clip
``reply - sent``), so they need FedAvg replies (``mode = fedavg``; one local step on one batch
is FedSGD's update in weight form). :func:`privacy_spent` reports the formal guarantee of a
run's defences from the real accountants (Opacus's RDP accountant for DP-SGD, Flower's RDP
accountant for central DP); pruning and plain noise have none.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

from ..config import RunConfig
from ..settings import CentralDP, Defence, GaussianNoise, LocalDP, Prune
from ..task import node_partition

__all__ = ["defend_update", "defence_mod"]

_NUMPY_GLOBAL_RNG = threading.Lock()  # numpy's global generator, which Flower's LocalDpMod draws from


def _generator(seed: int, partition_id: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, partition_id, server_round, salt]).generate_state(1)[0])
    )


def _prune(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` smallest-magnitude entries of ``t`` (ties at the threshold included)."""
    k = int(ratio * t.numel() + 1e-9)  # 0.29 * 100 is 28.999...
    if k == 0:
        return t
    threshold = t.abs().reshape(-1).kthvalue(k).values
    return torch.where(t.abs() <= threshold, torch.zeros_like(t), t)


def defend_update(
    update: dict[str, torch.Tensor], defences: tuple[Defence, ...], *, seed: int, partition_id: int, server_round: int
) -> dict[str, torch.Tensor]:
    """Apply the client's own update defences (pruning, Gaussian noise) to ``update`` (a
    gradient, or a weight delta), in order; the others live elsewhere. Seeded by (seed,
    partition, round), so a run repeats."""
    out = dict(update)
    for i, d in enumerate(defences):
        if isinstance(d, Prune):
            out = {k: _prune(v, d.ratio) for k, v in out.items()}
        elif isinstance(d, GaussianNoise):
            gen = _generator(seed, partition_id, server_round, 1000 + i)
            sigma = d.scale(out)
            out = {k: v + sigma * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in out.items()}
    return out


def _update_mod(msg, context, call_next):
    """Prune / noise the train reply's update: a FedSGD gradient as it is, a FedAvg reply as
    its delta from the weights that were sent."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    pid = node_partition(cfg, context.node_config)
    arrays = reply.content["arrays"].to_torch_state_dict()
    sent = msg.content["arrays"].to_torch_state_dict() if cfg.mode == "fedavg" else None
    update = arrays if sent is None else {k: arrays[k] - sent[k] for k in arrays}
    defended = defend_update(
        update,
        cfg.defence_list,
        seed=cfg.seed,
        partition_id=pid,
        server_round=int(msg.content["config"]["server-round"]),
    )
    new = defended if sent is None else {k: sent[k] + defended[k] for k in defended}
    reply.content["arrays"] = ArrayRecord({k: v.contiguous() for k, v in new.items()})
    return reply


def defence_mod(msg, context, call_next):
    """The client's defences as one Flower mod on the train handler: our pruning and noise,
    Flower's ``LocalDpMod`` and, under client-side central DP, Flower's ``fixedclipping_mod``,
    applied to the update in the order the run names them. DP-SGD is not a mod: it changes
    the local training itself (:mod:`fl_sim.task`)."""
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    defences = cfg.defence_list
    handler: Callable = call_next
    for d in defences:  # the first named applies first: innermost
        if isinstance(d, (Prune, GaussianNoise)):
            mod = _update_mod
        elif isinstance(d, LocalDP):
            mod = LocalDpMod(d.clip, d.sensitivity or d.clip, d.epsilon, d.delta)
        elif isinstance(d, CentralDP) and d.side == "client":
            mod = fixedclipping_mod
        else:
            continue
        handler = (lambda inner, m: lambda msg_, ctx_: m(msg_, ctx_, inner))(handler, mod)
    if not any(isinstance(d, LocalDP) for d in defences):
        return handler(msg, context)
    # LocalDpMod draws from numpy's global generator: seed it per (seed, client, round) so a run
    # repeats, and hold the generator for the whole call, so clients running at once in one
    # process (the in-process engine's threads) cannot interleave their draws
    round_ = int(msg.content["config"].get("server-round", 0))
    seed = np.random.SeedSequence([cfg.seed, node_partition(cfg, context.node_config), round_, 2000])
    with _NUMPY_GLOBAL_RNG:
        np.random.seed(seed.generate_state(1)[0])
        return handler(msg, context)
