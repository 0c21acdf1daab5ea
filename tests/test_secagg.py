"""FedSGD under SecAgg+ through Flower's simulation engine: the server sees only the aggregate."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from fl_sim import secagg
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.models import build_model
from fl_sim.task import batch_gradient, client_batch

pytestmark = pytest.mark.slow


def _true_gradients(cfg, before, round_):
    """Each client's gradient on ``before``, recomputed from its batch, keyed by partition."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(before)
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for pid in range(cfg.num_clients):
        images, labels = client_batch(cfg, pid, cfg.num_clients, round_)
        grads, loss = batch_gradient(model, images, labels)
        out[pid] = (dict(zip(names, grads)), loss)
    return out


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


def test_secagg_fedsgd_server_sees_only_the_aggregate(tmp_path, monkeypatch):
    cfg = RunConfig(
        mode="fedsgd", num_clients=4, num_server_rounds=2, batch_size=2, server_lr=0.05, out_dir=str(tmp_path)
    )
    settings = secagg.secagg_settings(cfg)
    assert (settings.num_shares, settings.reconstruction_threshold) == (3, 2)

    # What aggregate_fit is handed, recorded before the strategy touches it.
    received = []
    original = secagg.SecAggStrategy.aggregate_fit

    def recording(self, server_round, results, failures):
        received.append(
            (
                server_round,
                [
                    (
                        res.num_examples,
                        dict(res.metrics),
                        [np.array(a) for a in secagg.parameters_to_ndarrays(res.parameters)],
                    )
                    for _, res in results
                ],
                len(failures),
            )
        )
        return original(self, server_round, results, failures)

    monkeypatch.setattr(secagg.SecAggStrategy, "aggregate_fit", recording)
    aggregates, rows = [], []
    secagg.simulate_secagg(cfg, on_aggregate=aggregates.append, on_round=rows.append)

    # aggregate_fit: one entry per client, every one the same aggregate; only the partition id
    # and the number of examples are per client.
    assert [r for r, _, _ in received] == [1, 2]
    for _, results, failures in received:
        assert failures == 0 and len(results) == 4
        assert sorted(m["partition-id"] for _, m, _ in results) == [0, 1, 2, 3]
        assert all(set(m) == {"partition-id"} and n == 2 for n, m, _ in results)
        first = results[0][2]
        for _, _, arrays in results[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(arrays, first))

    assert [a.server_round for a in aggregates] == [1, 2]
    for agg, (_, results, _) in zip(aggregates, received):
        assert agg.contributors == ((0, 2), (1, 2), (2, 2), (3, 2))
        truth = _true_gradients(cfg, agg.before, agg.server_round)
        mean = {k: sum(truth[p][0][k] for p in truth) / 4 for k in agg.before}
        recovered = {k: (agg.before[k] - agg.after[k]) / cfg.server_lr for k in agg.before}
        err = (_flat(recovered) - _flat(mean)).abs().max().item()
        rel = ((_flat(recovered) - _flat(mean)).norm() / _flat(mean).norm()).item()
        assert err < 1e-3 and rel < 1e-3, (agg.server_round, err, rel)

        # What aggregate_fit got (gradient arrays, then the mean loss) is that mean too...
        handed = results[0][2]
        handed_grad = torch.cat([torch.from_numpy(a).flatten() for a in handed[:-1]]).double()
        assert (handed_grad - _flat(mean)).abs().max().item() < 1e-6
        mean_loss = sum(loss for _, loss in truth.values()) / 4
        assert handed[-1].reshape(-1)[0] / settings.loss_scale == pytest.approx(mean_loss, abs=1e-4)
        # ...and far from every individual client's gradient.
        for pid, (grads, _) in truth.items():
            g = _flat(grads)
            assert (handed_grad - g).norm().item() > 0.1 * g.norm().item(), pid
            assert (_flat(recovered) - g).norm().item() > 0.1 * g.norm().item(), pid

    # Round 2 started where round 1 ended.
    for k in aggregates[0].after:
        torch.testing.assert_close(aggregates[1].before[k], aggregates[0].after[k])

    # The run folder: config.json, rounds.csv with rounds 0..2 in server_app's format, the model.
    assert json.loads((tmp_path / "config.json").read_text())["mode"] == "fedsgd"
    with (tmp_path / "rounds.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["round", "train_loss", "test_loss", "test_accuracy", "aggregated", "dropped", "seconds"]
    assert [int(r["round"]) for r in table] == [0, 1, 2]
    assert all(math.isfinite(float(r["test_loss"])) for r in table)
    assert all(math.isfinite(float(r["train_loss"])) for r in table[1:])
    assert [(r["aggregated"], r["dropped"]) for r in table[1:]] == [("4", "0"), ("4", "0")]
    assert [r["round"] for r in rows] == [0, 1, 2]
    final = torch.load(tmp_path / "final_model.pt")
    for k, v in aggregates[1].after.items():
        torch.testing.assert_close(final[k], v)


def test_secagg_fedavg_aggregate_is_the_mean_weight_delta(tmp_path):
    """FedAvg under SecAgg+: each client masks its weight delta after its local steps (with
    its partition size as the clear-text weight); the server adds the example-weighted mean
    delta, which is what the honest FedAvg's weighted mean of the weights gives, and sees no
    client's own delta."""
    from fl_sim.task import client_indices, local_schedule, local_sgd

    cfg = RunConfig(
        mode="fedavg",
        num_clients=4,
        num_server_rounds=1,
        batch_size=4,
        local_steps=3,
        lr=0.05,
        partition="dirichlet",
        alpha=1.0,
        out_dir=str(tmp_path),
    )
    aggregates = []
    secagg.simulate_secagg(cfg, on_aggregate=aggregates.append)
    (agg,) = aggregates
    data = load_dataset(cfg.dataset, cfg.data_root)
    sizes = {p: len(client_indices(cfg, p, cfg.num_clients)) for p in range(4)}
    assert agg.contributors == tuple(sorted(sizes.items())) and len(set(sizes.values())) > 1
    deltas = {}
    for pid in range(4):
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(agg.before)
        local_sgd(model, data, local_schedule(cfg, pid, 4, 1), lr=cfg.lr)
        deltas[pid] = {k: v - agg.before[k] for k, v in model.state_dict().items()}
    total = sum(sizes.values())
    mean = {k: sum(sizes[p] * deltas[p][k] for p in deltas) / total for k in agg.before}
    seen = {k: agg.after[k] - agg.before[k] for k in agg.before}
    err = (_flat(seen) - _flat(mean)).abs().max().item()
    assert err < 1e-6 * max(1.0, _flat(mean).abs().max().item()) + 1e-7, err
    for pid, d in deltas.items():
        assert (_flat(seen) - _flat(d)).norm().item() > 0.1 * _flat(d).norm().item(), pid
