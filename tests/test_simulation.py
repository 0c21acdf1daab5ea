"""End to end through Flower's simulation engine (Ray): real ServerApp, real ClientApps."""

import csv

import pytest
import torch

from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.models import build_model
from fl_sim.simulation import simulate
from fl_sim.task import batch_gradient, client_batch

pytestmark = pytest.mark.slow


def _capture(sent: dict, replies: list):
    """Wrap the honest strategy's two hooks to keep what it sent and what came back."""

    def wrap(strategy):
        configure, aggregate = strategy.configure_train, strategy.aggregate_train

        def configure_train(server_round, arrays, config, grid):
            sent[server_round] = arrays.to_torch_state_dict()
            return configure(server_round, arrays, config, grid)

        def aggregate_train(server_round, msgs):
            msgs = list(msgs)
            for m in msgs:
                replies.append(
                    (server_round, int(m.content["metrics"]["partition-id"]), m.content["arrays"].to_torch_state_dict())
                )
            return aggregate(server_round, msgs)

        strategy.configure_train, strategy.aggregate_train = configure_train, aggregate_train
        return strategy

    return wrap


def test_fedsgd_two_rounds_three_clients(tmp_path):
    cfg = RunConfig(
        mode="fedsgd",
        num_clients=3,
        num_server_rounds=2,
        batch_size=16,
        out_dir=str(tmp_path),
        server_lr=0.05,
        fraction_evaluate=1.0,
    )
    sent, replies, evaluated = {}, [], {}
    wrap = _capture(sent, replies)

    def wrap_and_watch_evaluation(strategy):
        strategy = wrap(strategy)
        aggregate = strategy.aggregate_evaluate

        def aggregate_evaluate(server_round, msgs):
            msgs = list(msgs)
            evaluated[server_round] = [dict(m.content["metrics"]) for m in msgs if not m.has_error()]
            return aggregate(server_round, msgs)

        strategy.aggregate_evaluate = aggregate_evaluate
        return strategy

    simulate(cfg, wrap_strategy=wrap_and_watch_evaluation)

    # One reply per client per round, and each is autograd's gradient on the recomputed batch.
    assert sorted((r, p) for r, p, _ in replies) == [(r, p) for r in (1, 2) for p in range(3)]
    data = load_dataset(cfg.dataset)
    for server_round, pid, grads in replies:
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(sent[server_round])
        images, labels = client_batch(cfg, pid, 3, server_round)
        expected, _ = batch_gradient(model, images, labels)
        for (name, _), g in zip(model.named_parameters(), expected):
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)

    # The server stepped along the mean gradient (all batches have 16 images).
    for name, w in sent[2].items():
        mean = sum(g[name] for r, _, g in replies if r == 1) / 3
        torch.testing.assert_close(w, sent[1][name] - 0.05 * mean, rtol=1e-5, atol=1e-6)

    # The evaluate handler ran on every client: its share of the held-out split, 1000 images.
    assert sorted(evaluated) == [1, 2]
    for metrics in evaluated.values():
        assert len(metrics) == 3 and sum(m["num-examples"] for m in metrics) == 1000
        assert all(0 <= m["eval_acc"] <= 1 and m["eval_loss"] > 0 for m in metrics)

    rows = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    losses = [float(r["test_loss"]) for r in rows]
    assert losses[2] < losses[1] < losses[0]  # FedSGD lowers the loss round over round
    assert (tmp_path / "final_model.pt").exists() and (tmp_path / "config.json").exists()
