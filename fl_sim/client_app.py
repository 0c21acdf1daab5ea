"""The ClientApp: trains on its own partition and replies with its update.

``fedsgd``: the gradient of the loss on one batch (chosen by ``client_batch``, a pure function
of partition, round and seed), one array per model parameter. ``fedavg``: the weights after
local SGD over the batches of ``local_schedule`` (also a pure function; the whole state dict).
The run's settings arrive from the server in the message's ``config`` record; the partition
comes from the node's own ``partition-id`` / ``num-partitions``, which must agree with the
run's ``num-clients``. The train handler carries
the fault-injection mod (:mod:`fl_sim.mods.faults`, outermost: it spoils what would leave) and the
defences' mod (:mod:`fl_sim.mods.defences`: pruning, noise, Flower's local-DP and clipping mods);
DP-SGD changes the training itself (Opacus). Each does nothing unless the run config names it.

:func:`make_client_app` builds the app with a leakage-audit mod (:mod:`fl_sim.mods.audit`) between
the two, so that the audit sees the update the defences made; the audit's analysis comes from
the composing application (``experiments.apps.client_app``, the app pyproject names), so ``app``
here has none and refuses a run config that asks for one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig
from .device import resolve_device
from .mods.defences import defence_mod
from .mods.faults import fault_mod
from .task import (
    client_round,
    evaluate,
    model_with,
    node_partition,
    parameter_names,
)

Builder = Callable[[RunConfig, Mapping[str, torch.Tensor]], tuple]  # (cfg, weights) -> (dataset, model)


def _setup(msg: Message, context: Context, build: Builder):
    torch.set_num_threads(1)  # simulated clients share the machine's cores
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    pid = node_partition(cfg, context.node_config)
    data, model = build(cfg, msg.content["arrays"].to_torch_state_dict())
    return cfg, pid, data, model.to(resolve_device(cfg.device))  # this node's own answer to the run's device


def train(msg: Message, context: Context, build: Builder = model_with) -> Message:
    cfg, pid, data, model = _setup(msg, context, build)
    server_round = int(msg.content["config"]["server-round"])
    done = client_round(cfg, pid, server_round, data, model)
    # Flower's records carry numpy arrays: the reply leaves from the CPU
    if done.gradients is not None:
        arrays = ArrayRecord(OrderedDict(zip(parameter_names(model), (g.cpu() for g in done.gradients))))
    else:
        arrays = ArrayRecord(OrderedDict((k, v.cpu()) for k, v in model.state_dict().items()))
    loss, num_examples, steps = done.loss, done.num_examples, done.steps
    metrics = MetricRecord(
        {"train_loss": loss, "num-examples": num_examples, "partition-id": pid, "local-steps": steps}
    )
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate_local(msg: Message, context: Context, build: Builder = model_with) -> Message:
    """Federated evaluation on the node's share of the held-out test split."""
    cfg, pid, data, model = _setup(msg, context, build)
    share = torch.arange(pid, len(data.test_y), cfg.num_clients)
    loss, acc = evaluate(model, data.test_x[share], data.test_y[share])
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(share)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _no_audit(msg: Message, context: Context, call_next) -> Message:
    if "config" in msg.content.config_records and str(msg.content["config"].get("audit", "")).strip():
        raise ValueError(
            "this ClientApp has no leakage audit: run experiments.apps.client_app:app (pyproject's clientapp)"
        )
    return call_next(msg, context)


def make_client_app(audit_mod=None, build: Builder = model_with) -> ClientApp:
    """The ClientApp; ``audit_mod`` (:func:`fl_sim.mods.audit.make_audit_mod`) goes inside the fault
    mod (which spoils what would leave) and outside the defences (whose output it audits).
    ``build(cfg, state) -> (dataset, model)`` makes the model of the weights received
    (:func:`fl_sim.task.model_with`: the run config's model; an app that builds another
    architecture from the weights is another party's code, such as a malicious server's)."""
    client_app = ClientApp()

    def train_handler(msg: Message, context: Context) -> Message:
        return train(msg, context, build)

    def evaluate_handler(msg: Message, context: Context) -> Message:
        return evaluate_local(msg, context, build)

    client_app.train(mods=[fault_mod, audit_mod or _no_audit, defence_mod])(train_handler)
    client_app.evaluate()(evaluate_handler)
    return client_app


app = make_client_app()
