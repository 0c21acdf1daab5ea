"""Honest aggregation: FedAvg on weights and FedSGD on gradients, behind the server's checks.

``ScreeningStrategy`` is the outermost honest layer: it remembers which nodes it sent a train
message to in each round, screens every reply with :func:`fl_sim.replies.check_reply`, and
drops the ones that fail (or never arrive): each is logged with its node and reason, kept in
``dropped`` and handed to ``on_dropped``, and only the rest reach the strategy it wraps (the
honest one, or a defence such as Flower's central-DP wrappers around it, which must never see
a NaN or a wrong shape). A round with no valid reply leaves the model as it was and raises
:class:`RoundFailed` (a federation in which nobody can train has failed, and waiting out more
rounds would only hide it). The aggregate itself is checked too: a non-finite model is never
adopted.

``HonestFedAvg`` is Flower's FedAvg summing replies in partition order (so a seeded run
repeats bit for bit) and recording each round's aggregated client metrics
(``train_history``); ``FedSGD`` averages gradients and steps the global model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .mods.audit import audit_row
from .replies import DroppedReply, ReplySpec, check_reply

__all__ = [
    "HonestFedAvg",
    "FedSGD",
    "ScreeningStrategy",
    "WrappingStrategy",
    "RoundFailed",
    "ScreenedRound",
    "ModelSwap",
    "swapped_model",
]

log = logging.getLogger(__name__)

# A caller's hook to replace the model a round sends: (round, the honest global weights) -> the
# weights to send instead, or None to send the honest ones. A round whose model was replaced is
# not aggregated: its replies were computed on other weights, so the global model stays as it
# was and training continues from it. What the replacement is for is the caller's business.
ModelSwap = Callable[[int, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor] | None]


def swapped_model(swap: ModelSwap | None, server_round: int, honest: Mapping[str, torch.Tensor]):
    """``swap``'s replacement for this round (None: send the honest model). A hook that fails
    is logged and the honest model goes out: a broken hook must not break a round."""
    if swap is None:
        return None
    try:
        out = swap(server_round, {k: v.detach().clone() for k, v in honest.items()})
    except Exception:  # noqa: BLE001
        log.exception("round %s: the model-swap hook failed; the honest model is sent", server_round)
        return None
    return None if out is None else OrderedDict((k, torch.as_tensor(v).detach()) for k, v in out.items())


class RoundFailed(RuntimeError):
    """A round in which no reply could be aggregated; the message names the first reason."""


def _partition(msg: Message) -> int:
    return int(msg.content["metrics"].get("partition-id", -1))


class ScreenedRound:
    """One round's replies after screening: ``accepted`` (aggregated, in partition order) and
    ``dropped``."""

    def __init__(self, server_round: int, accepted: list[Message], dropped: list[DroppedReply]) -> None:
        self.server_round = server_round
        self.accepted = accepted
        self.dropped = dropped


class HonestFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``), over replies in partition order,
    recording aggregated train metrics."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_history: dict[int, dict[str, float]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Replies arrive in whatever order the clients finish; summing them in a fixed order
        # (by partition) makes a seeded run repeat bit for bit.
        arrays, metrics = super().aggregate_train(server_round, sorted(replies, key=_partition))
        if metrics is not None:
            self.train_history[server_round] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return arrays, metrics


class FedSGD(HonestFedAvg):
    """FedSGD: clients reply with one batch's gradient of the model's parameters; the server
    averages the gradients (weighted by examples) and takes one step of size ``server_lr`` on
    the global model (entries without a gradient, such as buffers, stay as they are)."""

    def __init__(self, server_lr: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self._global: tuple[int, ArrayRecord] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = (server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None or self._global is None or self._global[0] != server_round:
            return None, metrics
        weights = self._global[1].to_torch_state_dict()
        grads = mean_grad.to_torch_state_dict()
        stepped = OrderedDict((k, w - self.server_lr * grads[k] if k in grads else w) for k, w in weights.items())
        return ArrayRecord(stepped), metrics


class WrappingStrategy(Strategy):
    """A strategy around ``inner`` that hands it every call; subclasses override what they
    change."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


class ScreeningStrategy(WrappingStrategy):
    """The server's checks around ``inner`` (see the module docstring).

    ``reply_names``: the names a reply must carry (default: every entry of the model sent);
    ``max_examples``: a bound on ``num-examples`` if the server knows one; ``num_partitions``:
    the number of data partitions, so a claimed ``partition-id`` can be checked. ``honest``:
    the honest strategy under any wrappers, whose ``train_history`` this exposes.
    ``replace_model``: a :data:`ModelSwap` hook; a replaced round's replies are screened (and
    the audit records passed on) but the global model it returns is the honest one it held.
    """

    def __init__(
        self,
        inner: Strategy,
        honest: HonestFedAvg,
        *,
        reply_names: Sequence[str] | None = None,
        max_examples: int | None = None,
        num_partitions: int | None = None,
        on_dropped: Callable[[DroppedReply], None] | None = None,
        on_audit: Callable[[dict], None] | None = None,
        replace_model: ModelSwap | None = None,
    ) -> None:
        super().__init__(inner)
        self.on_audit = on_audit
        self.replace_model = replace_model
        self._honest: tuple[int, ArrayRecord] | None = None  # a replaced round's honest global weights
        self.honest = honest
        self.reply_names = list(reply_names) if reply_names is not None else None
        self.max_examples = max_examples
        self.num_partitions = num_partitions
        self.on_dropped = on_dropped
        self.dropped: list[DroppedReply] = []
        self.last_screened: ScreenedRound | None = None
        self.partition_of: dict[int, int] = {}  # node id -> partition id, learnt from valid replies
        self._sent: tuple[int, ArrayRecord, list[int]] | None = None  # round, weights, node ids

    @property
    def train_history(self) -> dict[int, dict[str, float]]:
        return self.honest.train_history

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        swapped = swapped_model(self.replace_model, server_round, arrays.to_torch_state_dict())
        self._honest = (server_round, arrays) if swapped is not None else None
        sent = ArrayRecord(swapped) if swapped is not None else arrays
        messages = list(self.inner.configure_train(server_round, sent, config, grid))
        self._sent = (server_round, sent, [int(m.metadata.dst_node_id) for m in messages])
        return messages

    def replaced(self, server_round: int) -> bool:
        """Whether ``server_round`` sent a replaced model (see ``replace_model``)."""
        return self._honest is not None and self._honest[0] == server_round

    def sent_weights(self, server_round: int) -> ArrayRecord | None:
        """The global weights sent in ``server_round`` (None if no train message went out)."""
        return self._sent[1] if self._sent is not None and self._sent[0] == server_round else None

    def screen(self, server_round: int, replies: Iterable[Message]) -> ScreenedRound:
        """Split a round's replies into those to aggregate and those to drop."""
        sent = self.sent_weights(server_round)
        targets = self._sent[2] if sent is not None else []
        names = None if self.replaced(server_round) else self.reply_names  # a replaced model has its own entries
        spec = (
            ReplySpec.like(sent, names, max_examples=self.max_examples, num_partitions=self.num_partitions)
            if sent is not None
            else None
        )
        accepted, dropped, answered = [], [], set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            answered.add(node)
            verdict = ("invalid", "no train message was sent in this round") if spec is None else check_reply(msg, spec)
            pid = _partition(msg) if verdict is None else self._claimed(node, msg)
            if verdict is None:
                self.partition_of[node] = pid
                accepted.append(msg)
            else:
                dropped.append(DroppedReply(server_round, node, pid, verdict[0], verdict[1]))
            self._audit(server_round, node, pid, msg)
        for node in targets:
            if node not in answered:
                dropped.append(
                    DroppedReply(
                        server_round,
                        node,
                        self.partition_of.get(node, -1),
                        "missing",
                        "no reply before the round timed out",
                    )
                )
        accepted.sort(key=_partition)
        return ScreenedRound(server_round, accepted, dropped)

    def _claimed(self, node: int, msg: Message) -> int:
        """The partition a dropped reply is put down to: the node's, learnt from an earlier
        valid reply; else what the reply claims (its metrics, or a refusal's audit record);
        else -1."""
        pid = self.partition_of.get(node, -1)
        if msg.has_error():
            if pid < 0:
                claimed = (audit_row(msg) or {}).get("client")  # a refusal names its client only there
                pid = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else pid
        elif "metrics" in msg.content.metric_records:
            claimed = msg.content.metric_records["metrics"].get("partition-id")
            pid = int(claimed) if isinstance(claimed, (int, float)) and claimed == int(claimed) else pid
        return pid

    def _audit(self, server_round: int, node: int, pid: int, msg: Message) -> None:
        """Pass on the record of the client's own audit (:mod:`fl_sim.mods.audit`) a reply carries."""
        if self.on_audit is None:
            return

        try:
            row = audit_row(msg)
            if row is not None:
                self.on_audit({**row, "round": server_round, "node_id": node, "client": pid})
        except Exception:  # noqa: BLE001 - bookkeeping must not break a round
            log.exception("on_audit hook failed")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = self.screen(server_round, replies)
        self.last_screened = screened
        for d in screened.dropped:
            log.warning(
                "round %s: dropped the reply of client %s (node %s): %s: %s",
                server_round,
                d.partition_id,
                d.node_id,
                d.status,
                d.reason,
            )
            self.dropped.append(d)
            if self.on_dropped is not None:
                try:
                    self.on_dropped(d)
                except Exception:  # noqa: BLE001 - bookkeeping must not break a round
                    log.exception("on_dropped hook failed")
        if not screened.accepted and self.replaced(server_round):
            # the replaced model was refused by all: nothing was to be aggregated anyway
            log.warning("round %s sent a replaced model and no reply came back valid", server_round)
            return self._honest[1], None
        if not screened.accepted:
            first = screened.dropped[0] if screened.dropped else None
            why = (
                f"client {first.partition_id} (node {first.node_id}): {first.status}: {first.reason}"
                if first
                else "no client was sampled"
            )
            raise RoundFailed(
                f"round {server_round}: no reply could be aggregated ({len(screened.dropped)} dropped); first: {why}"
            )
        arrays, metrics = self.inner.aggregate_train(server_round, screened.accepted)
        if self.replaced(server_round):
            log.info("round %s sent a replaced model: its replies are not aggregated", server_round)
            return self._honest[1], metrics
        if arrays is not None and not all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values()):
            log.error("round %s: the aggregate is not finite; the global model stays as it was", server_round)
            return None, metrics
        return arrays, metrics
