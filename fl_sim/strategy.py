"""Honest aggregation: FedAvg on weights, and FedSGD on gradients.

Both remember each round's aggregated client metrics (``train_history``) so the server can
log training loss beside the central evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

__all__ = ["HonestFedAvg", "FedSGD"]


def _reply_order(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, 0)
    return (0, int(msg.content["metrics"].get("partition-id", 0)))


class HonestFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``), recording aggregated train metrics."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_history: dict[int, dict[str, float]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Replies arrive in whatever order the clients finish; summing them in a fixed order
        # (by partition) makes a seeded run repeat bit for bit.
        arrays, metrics = super().aggregate_train(server_round, sorted(replies, key=_reply_order))
        if metrics is not None:
            self.train_history[server_round] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return arrays, metrics


class FedSGD(HonestFedAvg):
    """FedSGD: clients reply with one batch's gradient; the server averages the gradients
    (weighted by examples) and takes one step of size ``server_lr`` on the global model."""

    def __init__(self, server_lr: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None or self._global is None:
            return None, metrics
        weights = self._global.to_torch_state_dict()
        grads = mean_grad.to_torch_state_dict()
        stepped = OrderedDict((k, w - self.server_lr * grads[k]) for k, w in weights.items())
        return ArrayRecord(stepped), metrics
