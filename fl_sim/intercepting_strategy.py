"""A malicious parameter server: a strategy that records every client's reply, then
aggregates honestly.

``InterceptingStrategy`` wraps the honest strategy rather than copying it. In
``configure_train`` it notes the weights it sends; in ``aggregate_train`` it hands each
individual reply (round, node, partition, the weights that were sent, the update that came
back) to ``on_update``, passes the same replies untouched to the honest strategy, and hands
the round's aggregate (global model before and after) to ``on_aggregate``. It also remembers
which nodes it sent a train message to and which replied: a node that was sent one but whose
reply did not arrive (it died, or missed the round timeout) or came back as an error is
reported to ``on_missing`` as a ``MissingReply``, and listed in ``missing``. Training is
therefore identical with and without it. What the hooks do with the updates (run attacks,
say) is not this module's business: they are plain callables, and one that raises is logged
and ignored, so spying never breaks a round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["InterceptedUpdate", "RoundAggregate", "MissingReply", "InterceptingStrategy"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _state(arrays: ArrayRecord) -> StateDict:
    # Copies, so that nothing a hook does can touch what training uses.
    return {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}


@dataclass(frozen=True)
class InterceptedUpdate:
    """One client's reply as the server saw it."""

    server_round: int
    node_id: int
    partition_id: int
    sent: StateDict  # the global weights the server sent this round
    reply: StateDict  # what came back: a gradient (FedSGD) or new weights (FedAvg)
    kind: Literal["gradient", "weights"]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundAggregate:
    """What anyone who sees only successive global models learns from a round."""

    server_round: int
    before: StateDict
    after: StateDict
    partition_ids: tuple[int, ...]  # the clients whose replies were aggregated
    num_examples: tuple[int, ...]


@dataclass(frozen=True)
class MissingReply:
    """A node that was sent a train message in a round but whose reply never arrived."""

    server_round: int
    node_id: int
    partition_id: int  # -1 when the node never replied in any earlier round
    reason: str


class InterceptingStrategy(Strategy):
    """Wrap ``inner``; report replies to ``on_update`` and aggregates to ``on_aggregate``."""

    def __init__(
        self,
        inner: Strategy,
        *,
        kind: Literal["gradient", "weights"],
        on_update: Callable[[InterceptedUpdate], None] | None = None,
        on_aggregate: Callable[[RoundAggregate], None] | None = None,
        on_missing: Callable[[MissingReply], None] | None = None,
    ) -> None:
        self.inner = inner
        self.kind = kind
        self.on_update = on_update
        self.on_aggregate = on_aggregate
        self.on_missing = on_missing
        self._sent: dict[int, ArrayRecord] = {}
        self._sent_to: dict[int, list[int]] = {}  # round -> node ids sent a train message
        self.partition_of: dict[int, int] = {}  # node id -> partition id, learnt from replies
        self.missing: list[MissingReply] = []

    def __getattr__(self, name: str):
        # Anything else (e.g. the honest strategy's train_history) is the inner strategy's.
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {server_round: arrays}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent_to = {server_round: [int(m.metadata.dst_node_id) for m in messages]}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.get(server_round)
        sent_state = _state(sent) if sent is not None else {}
        seen_parts, seen_examples = [], []
        replied: set[int] = set()
        errors: dict[int, str] = {}
        for msg in replies:
            if msg.has_error():
                errors[int(msg.metadata.src_node_id)] = f"error reply: {msg.error.reason}"[:200]
                continue
            replied.add(int(msg.metadata.src_node_id))
            metrics = {k: float(v) for k, v in msg.content["metrics"].items() if isinstance(v, (int, float))}
            update = InterceptedUpdate(
                server_round=server_round,
                node_id=int(msg.metadata.src_node_id),
                partition_id=int(metrics.get("partition-id", -1)),
                sent=sent_state,
                reply=_state(msg.content["arrays"]),
                kind=self.kind,
                num_examples=int(metrics.get("num-examples", 0)),
                metrics=metrics,
            )
            seen_parts.append(update.partition_id)
            seen_examples.append(update.num_examples)
            self.partition_of[update.node_id] = update.partition_id
            self._call(self.on_update, update)
        for node in self._sent_to.get(server_round, []):
            if node not in replied:
                gone = MissingReply(server_round, node, self.partition_of.get(node, -1),
                                    errors.get(node, "no reply before the round timeout"))
                self.missing.append(gone)
                self._call(self.on_missing, gone)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None and sent is not None:
            aggregate = RoundAggregate(server_round, sent_state, _state(arrays), tuple(seen_parts), tuple(seen_examples))
            self._call(self.on_aggregate, aggregate)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    @staticmethod
    def _call(hook: Callable | None, item) -> None:
        if hook is None:
            return
        try:
            hook(item)
        except Exception:  # noqa: BLE001 - a broken spy must not break training
            log.exception("interception hook failed on round %s; training goes on", item.server_round)
