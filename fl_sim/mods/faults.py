"""Fault injection: clients that misbehave on purpose, so that anyone can check what a run
survives (``faulty-clients = "1:nan,2:shape"`` in the run config, ``--faulty-client`` on the
command line).

A faulty client trains as usual and then spoils its train reply:

- ``nan`` / ``inf``: the first entry of every array becomes NaN / +Inf;
- ``shape``: the first array loses its last row (one dimension one shorter);
- ``silent``: no reply before the round times out (it sleeps past ``round-timeout``);
- ``error``: the ClientApp raises, so the server gets an error reply.

``fault_mod`` does this for the Message-API ClientApp (a Flower client mod on the train
handler, outermost, so it spoils what would leave the client); :func:`spoil` is the same for
the arrays of the legacy SecAgg+ client. Nothing happens unless the run config names the
client.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.app.message_type import MessageType

from ..config import RunConfig

__all__ = ["fault_mod", "spoil", "InjectedFault"]


class InjectedFault(RuntimeError):
    """Raised by a client configured with the ``error`` fault."""


def spoil(arrays: list[np.ndarray], kind: str, round_timeout: float) -> list[np.ndarray]:
    """The arrays a client with fault ``kind`` sends instead of ``arrays`` (see the module
    docstring). ``silent`` sleeps past the round timeout and returns them unchanged; ``error``
    raises :class:`InjectedFault`."""
    if kind == "error":
        raise InjectedFault("injected fault: this client is configured to fail (faulty-clients)")
    if kind == "silent":
        time.sleep(round_timeout + 5.0)
        return arrays
    out = [np.array(a, copy=True) for a in arrays]
    if kind in ("nan", "inf"):
        for a in out:
            if a.size:
                a.reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        first = out[0]
        out[0] = first[:-1] if first.ndim and first.shape[0] > 1 else np.zeros(first.size + 1, dtype=first.dtype)
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return out


def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A client mod that spoils the train reply of a client named in ``faulty-clients``."""
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    kind = cfg.faults.get(int(context.node_config.get("partition-id", -1)))
    if kind is None:
        return call_next(msg, context)
    if kind == "error":
        spoil([], kind, cfg.round_timeout)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    record = reply.content["arrays"]
    names = list(record.keys())
    spoilt = spoil([record[k].numpy() for k in names], kind, cfg.round_timeout)
    reply.content["arrays"] = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in zip(names, spoilt)})
    return reply
