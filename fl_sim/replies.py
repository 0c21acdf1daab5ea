"""What the server accepts from a client: the checks every train reply passes before it is
aggregated, and the record of a reply that was not.

A federated server cannot trust its clients: one reply with a NaN, an array of the wrong shape
or a negative example count would poison (or crash) the honest aggregation. ``check_reply``
holds the rule, in one place; the honest strategies drop a reply that fails it and the round
goes on with the others. What a server can check is the reply's form (records, names, shapes,
dtypes, finite values, a plausible example count), not whether its numbers are honest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .mods.audit import refusal_of

__all__ = ["DroppedReply", "ReplySpec", "check_reply", "error_summary", "DROPPED_FIELDS"]

DROPPED_FIELDS = ["round", "node_id", "client", "status", "reason"]


@dataclass(frozen=True)
class DroppedReply:
    """A client that was sent a train message in a round but whose reply was not aggregated.

    ``status``: ``missing`` (no reply before the round timed out: it died, or was too slow),
    ``error`` (an error reply: the ClientApp raised), ``invalid`` (a reply that failed
    :func:`check_reply`). ``partition_id`` is what the client claimed in an earlier or this
    reply, -1 when unknown."""

    server_round: int
    node_id: int
    partition_id: int
    status: Literal["missing", "error", "invalid"]
    reason: str

    def row(self) -> dict:
        return {
            "round": self.server_round,
            "node_id": self.node_id,
            "client": self.partition_id,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ReplySpec:
    """What a valid train reply holds: one array per name, of these shapes and dtypes (a
    FedSGD gradient: the model's parameters; FedAvg weights: its whole state dict), a positive
    integer ``num-examples`` of at most ``max_examples`` (when the server knows a bound: FedSGD
    clients use one batch of the configured size) and, when ``num_partitions`` is set, a
    ``partition-id`` in ``0..num_partitions-1``."""

    arrays: Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    max_examples: int | None = None
    num_partitions: int | None = None

    @classmethod
    def like(cls, sent: ArrayRecord, names: list[str] | None = None, **kwargs) -> "ReplySpec":
        """The spec of a reply to ``sent``, restricted to ``names`` (in that order) if given."""
        keys = names if names is not None else list(sent.keys())
        return cls({k: (tuple(sent[k].shape), sent[k].dtype) for k in keys}, **kwargs)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Fault|Exit|Interrupt|Warning)): (.+)$")


def _short(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_summary(reason: str) -> str:
    """The line that says what went wrong in an error reply's reason: a simulated client's
    reason is a whole traceback (Ray's, wrapping Flower's, wrapping the ClientApp's), and the
    client's own exception is what a user needs to see."""
    text = _ANSI.sub("", str(reason))
    if "Message: " in text:  # Flower's ClientAppException: "... occurred. Message: <the client's message>"
        return _short(text.rsplit("Message: ", 1)[1].rstrip("'>\n "))
    lines = [line.strip() for line in text.splitlines()]
    found = [m for m in map(_EXCEPTION_LINE.match, lines) if m]
    if found:
        name, _, message = found[-1].groups()
        return _short(f"{name.rsplit('.', 1)[-1]}: {message}")
    return _short(text)


def check_reply(msg: Message, spec: ReplySpec) -> tuple[str, str] | None:
    """``None`` for a reply the server may aggregate, else ``(status, reason)`` with status
    ``error`` (an error reply) or ``invalid`` and a one-line reason naming what is wrong."""
    if msg.has_error():
        refused = refusal_of(msg.error.reason or "")
        if refused is not None:
            return "refused", f"the client's leakage audit refused to send it: {_short(refused[0])}"
        return "error", f"the client's ClientApp failed: {error_summary(msg.error.reason)}"
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "invalid", (
            f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
            f"{len(content.metric_records)}"
        )
    arrays: ArrayRecord = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) or n < 1:
        return "invalid", f"num-examples must be a positive integer, got {n!r}"
    if spec.max_examples is not None and n > spec.max_examples:
        return "invalid", f"num-examples {int(n)} exceeds the {spec.max_examples} a client may use in this round"
    if spec.num_partitions is not None:
        pid = metrics.get("partition-id")
        if (
            isinstance(pid, bool)
            or not isinstance(pid, (int, float))
            or pid != int(pid)
            or not 0 <= pid < spec.num_partitions
        ):
            return "invalid", f"partition-id must be one of 0..{spec.num_partitions - 1}, got {pid!r}"
    missing = [k for k in spec.arrays if k not in arrays]
    extra = [k for k in arrays if k not in spec.arrays]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}"] if extra else []
        )
        return "invalid", f"arrays do not match the model: {'; '.join(parts)}"
    for name, (shape, dtype) in spec.arrays.items():
        arr: Array = arrays[name]
        if tuple(arr.shape) != shape:
            return "invalid", f"array {name!r} has shape {tuple(arr.shape)}, expected {shape}"
        if arr.dtype != dtype:
            return "invalid", f"array {name!r} has dtype {arr.dtype}, expected {dtype}"
    for name in spec.arrays:
        values = arrays[name].numpy()
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            return "invalid", f"array {name!r} holds {bad} NaN or Inf value(s)"
    return None
