"""The FedAvg attack of Dimitrov et al. (attacks.fedavg.FedAvgSim): the client's whole local
training simulated on dummies, the labels of every step estimated, the epochs tied by an
order-invariant prior. Updates are made by the client's real training (fl_sim.task.local_sgd)
on real MNIST digits, shrunk to 12x12 so that a test runs in seconds on two cores."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from attacks import ATTACKS, Attack, ThreatModel, Update, match_batch, score_batch
from attacks.fedavg import FedAvgSim, align_epochs, counts_to_labels, epoch_layout, layer_weights, update_distance
from attacks.inverting import simulate_local_update
from experiments.observe import assumed_schedule
from fl_sim.data import Dataset, load_dataset, to_float
from fl_sim.models import build_model
from fl_sim.task import local_sgd

SIZE = 12
LR = 0.004


@pytest.fixture(scope="module")
def data() -> Dataset:
    full = load_dataset("mnist5k", "data")
    small = torch.nn.functional.interpolate(full.train_x.float(), size=(SIZE, SIZE), mode="area")
    return dataclasses.replace(full, train_x=small.round().clamp(0, 255).to(torch.uint8))


def _index(data: Dataset, label: int, nth: int = 0) -> int:
    return int((data.train_y == label).nonzero()[nth])


def _fedavg_update(data: Dataset, idx: list[int], epochs: int, batch: int, seed: int = 1):
    """The start model, the client's weight delta (epochs over ``idx`` in batches, reshuffled
    every epoch, real local SGD), the true images and labels."""
    model = build_model("cnn6", data.input_shape, data.num_classes, init="kaiming", seed=0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.tensor(idx)
    batches = [c.numpy() for _ in range(epochs) for c in order[torch.randperm(len(idx), generator=gen)].split(batch)]
    client = copy.deepcopy(model)
    local_sgd(client, data, batches, lr=LR)
    delta = tuple(c.detach() - p.detach() for c, p in zip(client.parameters(), model.parameters()))
    update = Update(delta, "weight_delta", lr=LR, local_steps=len(batches))
    return model, update, to_float(data.train_x[order]), data.train_y[order]


@pytest.fixture
def one_thread():
    """One intra-op thread for an attack's many small operations: a second thread gains little,
    and on a busy machine it made this test 60 times slower (470 s against 7 s of CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_recovers_two_images_from_a_two_step_fedavg_update(data, one_thread):
    """Two local epochs of one batch of two digits (a 7 and a 0), labels not granted, order
    unknown, one shared dummy set (7 s of one core): both digits come back above 20 dB after
    the optimal assignment (measured 34.8 and 35.8 dB), labels right."""
    model, update, x, y = _fedavg_update(data, [_index(data, 7), _index(data, 0)], epochs=2, batch=2)
    threat = ThreatModel(batch_size=2, schedule=assumed_schedule(2, 2, 2))
    res = FedAvgSim(dummies="shared")(model, update, data.input_shape, threat, seed=0, max_steps=300)
    assert res.status == "ok" and res.images.shape == x.shape and res.steps == 300
    assert res.diagnostics["dummy_sets"] == 1
    perm = match_batch(res.images, x)
    psnr = [s["psnr"] for s in score_batch(res.images, x, perm=perm)]
    assert min(psnr) >= 20, psnr
    assert torch.equal(res.labels[torch.as_tensor(perm)], y)
    assert res.diagnostics["epochs"] == 2 and res.diagnostics["order"] == "unknown"
    assert res.diagnostics["final_distance"] < 0.1


def test_label_counts_per_step_are_exact_on_a_batch_with_repeated_labels(data):
    """Labels [3, 3, 7, 1]: in one step of the four, and over two epochs of two batches of two
    (reshuffled), the count estimate from the delta's last layer is exact; every epoch's steps
    hold the four labels; granted labels are used as given, the estimate scored against them."""
    idx = [_index(data, 3), _index(data, 3, 1), _index(data, 7), _index(data, 1)]
    for epochs, batch in ((1, 4), (2, 2)):
        model, update, _, y = _fedavg_update(data, idx, epochs=epochs, batch=batch)
        steps = update.local_steps
        threat = ThreatModel(batch_size=4, schedule=assumed_schedule(4, batch, steps))
        res = FedAvgSim(max_steps=1)(model, update, data.input_shape, threat, seed=0)
        assert sorted(res.diagnostics["estimated_labels"]) == [1, 3, 3, 7]
        assert sorted(res.labels.tolist()) == [1, 3, 3, 7]
        per_epoch = res.diagnostics["steps_per_epoch"]
        assert per_epoch == 4 // batch and len(res.diagnostics["step_labels"]) == steps
        for e in range(epochs):
            epoch = res.diagnostics["step_labels"][e * per_epoch : (e + 1) * per_epoch]
            assert sorted(v for step in epoch for v in step) == [1, 3, 3, 7]
        granted = FedAvgSim(max_steps=1)(
            model, update, data.input_shape, dataclasses.replace(threat, labels=y, batch_size=None)
        )
        assert granted.diagnostics["label_source"] == "granted" and granted.diagnostics["label_count_accuracy"] == 1.0
        assert torch.equal(granted.labels, y)


def test_without_granted_labels_the_attack_says_it_estimated_them(data):
    model, update, _, _ = _fedavg_update(data, [_index(data, 2), _index(data, 5)], epochs=1, batch=1)
    res = FedAvgSim()(model, update, data.input_shape, ThreatModel(batch_size=2), seed=0, max_steps=2)
    d = res.diagnostics
    assert res.images.shape == (2, *data.input_shape) and res.labels.shape == (2,)
    assert 0.0 <= float(res.images.min()) and float(res.images.max()) <= 1.0
    assert d["labels_granted"] is False and d["label_source"] == "counts" and d["label_count_accuracy"] is None
    assert len(res.history) == res.steps == 2 and d["final_distance"] >= 0
    idlg = FedAvgSim(label_strategy="idlg")(
        model, update, data.input_shape, ThreatModel(batch_size=2), seed=0, max_steps=1
    )
    assert idlg.diagnostics["label_source"] == "idlg"


def test_a_granted_order_is_followed_with_one_dummy_set(data):
    """With the true (shuffled) schedule and the labels granted, one set of dummies follows it;
    the in-order schedule an observer assumes is read as no order at all."""
    model, update, _, y = _fedavg_update(data, [_index(data, 2), _index(data, 5)], epochs=2, batch=1)
    shuffled = ThreatModel(labels=y, schedule=((1,), (0,), (0,), (1,)))
    res = FedAvgSim(max_steps=1)(model, update, data.input_shape, shuffled, seed=0)
    assert res.diagnostics["order"] == "granted" and res.diagnostics["epochs"] == 1
    assumed = ThreatModel(labels=y, schedule=assumed_schedule(2, 1, 4))
    res = FedAvgSim(max_steps=1)(model, update, data.input_shape, assumed, seed=0)
    assert res.diagnostics["order"] == "unknown" and res.diagnostics["epochs"] == 2
    res = FedAvgSim(max_steps=1, order="unknown")(model, update, data.input_shape, shuffled, seed=0)
    assert res.diagnostics["order"] == "unknown"


def test_a_shared_dummy_set_is_visited_once_per_epoch_in_a_new_order(data):
    """``dummies="shared"``: one set of N dummies; every epoch's steps use each of them once
    (so each epoch holds the N labels), the epochs in different orders (as the client's
    reshuffles are), and no epoch prior is needed."""
    idx = [_index(data, c) for c in (1, 2, 3, 4)]
    model, update, _, _ = _fedavg_update(data, idx, epochs=3, batch=2)
    threat = ThreatModel(batch_size=4, schedule=assumed_schedule(4, 2, update.local_steps))
    res = FedAvgSim(max_steps=1, dummies="shared")(model, update, data.input_shape, threat, seed=0)
    d = res.diagnostics
    assert d["dummy_sets"] == 1 and d["epochs"] == 3 and d["steps_per_epoch"] == 2
    epochs = [[v for step in d["step_labels"][2 * e : 2 * e + 2] for v in step] for e in range(3)]
    assert all(sorted(e) == sorted(res.labels.tolist()) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # not the same order every epoch
    with pytest.raises(ValueError, match="dummies"):
        FedAvgSim(dummies="many")


def test_epoch_alignment_undoes_a_shuffle_within_labels():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(5, 1, 4, 4, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2])
    perm = torch.tensor([1, 0, 4, 3, 2])
    x = torch.stack([base, base[perm] + 0.01 * torch.rand(5, 1, 4, 4, generator=gen)])
    perms = align_epochs(x, torch.stack([labels, labels[perm]]))
    assert torch.allclose(x[1][torch.as_tensor(perms[1])], base, atol=0.02)
    assert counts_to_labels(torch.tensor([0, 2, 1])).tolist() == [1, 1, 2]
    assert epoch_layout(7, 6, assumed_schedule(7, 3, 6)) == ([3, 3, 1, 3, 3, 1], 3)


def test_follows_the_interface_and_is_registered():
    """Registered like the others (the plan's rules for it: tests/test_plan.py)."""
    assert ATTACKS["fedavg-sim"] is FedAvgSim and issubclass(FedAvgSim, Attack) and FedAvgSim.name == "fedavg-sim"
    attack = FedAvgSim(epoch_prior=0.5)
    assert attack.options.epoch_prior == 0.5
    with pytest.raises(ValueError, match="relabel_at"):
        FedAvgSim(relabel_at=1.5)


def test_paper_distance_weights_each_layer_by_its_depth(data):
    """``distance="l2-layers"`` (Dimitrov et al.'s): a layer's weight and bias share ``e^-k`` for
    the ``k``-th layer from the input; relative to the target, so the true images replayed in the
    true order score 0, random images far above, and the attack records the distance it used."""
    femnist = build_model("femnist_cnn", (1, 28, 28), 10, seed=0)
    assert layer_weights(femnist) == pytest.approx([math.exp(-k) for k in (0, 0, 1, 1, 2, 2, 3, 3)])
    model, update, x, y = _fedavg_update(data, [_index(data, 2), _index(data, 5)], epochs=1, batch=2)
    weights = layer_weights(model)
    assert weights == pytest.approx([math.exp(-k) for k in range(7)])
    params = {k: p.detach() for k, p in model.named_parameters()}
    target = list(update.tensors)
    for images, bound in ((x, (0, 1e-6)), (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), (0.1, 10))):
        replay = [d.detach() for d in simulate_local_update(model, params, images, y, LR, 1, False)]
        assert bound[0] <= float(update_distance(replay, target, "l2-layers", weights)) <= bound[1]
    res = FedAvgSim(distance="l2-layers", max_steps=1)(model, update, data.input_shape, ThreatModel(labels=y), seed=0)
    assert res.diagnostics["distance"] == "l2-layers" and res.diagnostics["final_distance"] > 0
    with pytest.raises(ValueError, match="distance"):
        FedAvgSim(distance="l1")
