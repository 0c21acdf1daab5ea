"""A malicious parameter server: a strategy that records every client's reply, then
aggregates honestly.

``InterceptingStrategy`` wraps the honest server (its :class:`fl_sim.strategy.ScreeningStrategy`)
rather than copying it. The honest server screens the round's replies (:mod:`fl_sim.replies`:
a NaN, a wrong shape or a missing reply is dropped, logged and reported by it); this wrapper
then hands each reply that was aggregated (round, node, partition, the weights that were
sent, the update that came back, as it came back: before any server-side defence, such as
central DP's clipping, touched it) to ``on_update``, and the round's aggregate (global model
before and after, and who contributed) to ``on_aggregate``. The replies pass to the honest
server untouched, so training is identical with and without it (a round in which the
honest server's ``replace_model`` hook sent another model is reported with ``replaced`` set,
and has no aggregate). What the hooks do with the updates (run attacks,
say) is not this module's business: they are plain callables, and one that raises is logged
and ignored, so spying never breaks a round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from .strategy import ScreeningStrategy, WrappingStrategy

__all__ = ["InterceptedUpdate", "RoundAggregate", "InterceptingStrategy"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _state(arrays: ArrayRecord) -> StateDict:
    # Copies, so that nothing a hook does can touch what training uses.
    return {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}


@dataclass(frozen=True)
class InterceptedUpdate:
    """One client's reply as the server saw it (it passed the server's checks)."""

    server_round: int
    node_id: int
    partition_id: int
    sent: StateDict  # the global weights the server sent this round
    reply: StateDict  # what came back: a gradient (FedSGD: one per parameter) or new weights (FedAvg)
    kind: Literal["gradient", "weights"]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    replaced: bool = False  # ``sent`` was a replaced model (``ScreeningStrategy.replace_model``), not the global one


@dataclass(frozen=True)
class RoundAggregate:
    """One round's global model before and after aggregation, and who contributed.

    ``before`` and ``after`` are what anyone who receives successive global models sees.
    ``contributors`` (partition id, example count per aggregated reply, in partition order)
    is what the server knows: a client does not, and the observation functions decide who is
    told (the referee always is, to score a reconstruction)."""

    server_round: int
    before: StateDict
    after: StateDict
    contributors: tuple[tuple[int, int], ...]
    # a round that sent a replaced model (not aggregated into the global model): ``before`` is
    # the model sent, ``after`` the step its replies would have made, ``update`` the aggregate
    # itself where the server holds it (SecAgg+'s decoded sum: no float32 weights in between)
    replaced: bool = False
    update: StateDict | None = None

    @property
    def partition_ids(self) -> tuple[int, ...]:
        return tuple(p for p, _ in self.contributors)


class InterceptingStrategy(WrappingStrategy):
    """Wrap the honest strategy ``inner``; report the replies it aggregated to ``on_update``
    and each aggregate to ``on_aggregate``."""

    def __init__(
        self,
        inner: ScreeningStrategy,
        *,
        kind: Literal["gradient", "weights"],
        on_update: Callable[[InterceptedUpdate], None] | None = None,
        on_aggregate: Callable[[RoundAggregate], None] | None = None,
    ) -> None:
        super().__init__(inner)
        self.kind = kind
        self.on_update = on_update
        self.on_aggregate = on_aggregate

    def __getattr__(self, name: str):
        # Anything else (e.g. the honest strategy's train_history) is the inner strategy's.
        return getattr(self.inner, name)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self.inner.sent_weights(server_round)
        # What came back, before the server's own processing (a defence may change it in place)
        raw = {id(m): m.content.array_records.get("arrays") for m in replies if not m.has_error()}
        raw = {k: _state(v) for k, v in raw.items() if v is not None}
        replaced = bool(getattr(self.inner, "replaced", lambda r: False)(server_round))
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
        finally:  # a failed round still shows the spy whatever valid replies it had
            screened = self.inner.last_screened
            if sent is not None and screened is not None and screened.server_round == server_round:
                sent_state = _state(sent)
                for msg in screened.accepted:
                    m = {k: float(v) for k, v in msg.content["metrics"].items() if isinstance(v, (int, float))}
                    self._call(
                        self.on_update,
                        InterceptedUpdate(
                            server_round=server_round,
                            node_id=int(msg.metadata.src_node_id),
                            partition_id=int(m.get("partition-id", -1)),
                            sent=sent_state,
                            reply=raw[id(msg)],
                            kind=self.kind,
                            num_examples=int(m.get("num-examples", 0)),
                            metrics=m,
                            replaced=replaced,
                        ),
                    )
        # a replaced round leaves the global model as it was: there is no aggregate to observe
        if arrays is not None and sent is not None and screened is not None and not replaced:
            contributors = tuple(
                (int(msg.content["metrics"].get("partition-id", -1)), int(msg.content["metrics"]["num-examples"]))
                for msg in screened.accepted
            )
            self._call(self.on_aggregate, RoundAggregate(server_round, _state(sent), _state(arrays), contributors))
        return arrays, metrics

    @staticmethod
    def _call(hook: Callable | None, item) -> None:
        if hook is None:
            return
        try:
            hook(item)
        except Exception:  # noqa: BLE001 - a broken spy must not break training
            log.exception("interception hook failed on round %s; training goes on", item.server_round)
