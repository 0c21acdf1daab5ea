"""The ClientApp: trains on its own partition and replies with its update.

``fedsgd``: the gradient of the loss on one batch (chosen by ``client_batch``, a pure function
of partition, round and seed). ``fedavg``: the weights after local SGD. The run's settings
arrive from the server in the message's ``config`` record; the partition comes from the
node's own ``partition-id`` / ``num-partitions``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig
from .data import load_dataset
from .models import build_model
from .task import batch_gradient, client_batch, client_indices, evaluate, local_sgd

app = ClientApp()


def _setup(msg: Message, context: Context):
    torch.set_num_threads(1)  # simulated clients share the machine's cores
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    pid = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, pid, num_partitions, data, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, num_partitions, data, model = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    if cfg.mode == "fedsgd":
        images, labels = client_batch(cfg, pid, num_partitions, server_round)
        grads, loss = batch_gradient(model, images, labels)
        names = [name for name, _ in model.named_parameters()]
        arrays = ArrayRecord(OrderedDict(zip(names, grads)))
        num_examples, steps = len(labels), 1
    else:
        indices = client_indices(cfg, pid, num_partitions)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, pid, server_round]).generate_state(1)[0]))
        loss, steps = local_sgd(
            model, data, indices, lr=cfg.lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps, generator=gen,
        )
        arrays = ArrayRecord(model.state_dict())
        num_examples = len(indices)
    metrics = MetricRecord(
        {"train_loss": loss, "num-examples": num_examples, "partition-id": pid, "local-steps": steps}
    )
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation on the node's share of the held-out test split."""
    cfg, pid, num_partitions, data, model = _setup(msg, context)
    share = torch.arange(pid, len(data.test_y), num_partitions)
    loss, acc = evaluate(model, data.test_x[share], data.test_y[share])
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(share)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
