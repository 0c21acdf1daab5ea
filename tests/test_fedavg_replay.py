"""FedAvg updates: the server's replay of the local steps, and what it is granted of them.

The replay must reproduce a client's real update exactly when it is given the true images and
schedule; the batch order the server was not granted must not reach the attack; and with the
schedule, Inverting Gradients recovers images from a multi-step update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from attacks import SUCCESS_PSNR, ThreatModel, Update, get_attack, match_batch, score_batch
from attacks.inverting import simulate_local_update
from experiments.observe import RefereeKey, assumed_schedule, observe_server
from experiments.scoring import Truth, true_batch
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptedUpdate
from fl_sim.models import build_model
from fl_sim.task import client_indices, local_schedule, local_sgd, parameter_names


def _cfg(**changes) -> RunConfig:
    base = dict(
        dataset="mnist5k", model="cnn6", init="kaiming", mode="fedavg", num_clients=40, batch_size=4, lr=0.05, seed=3
    )
    return RunConfig(**(base | changes)).validated()


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    """torch's intra-op thread count for the test, restored afterwards. The convolutions sum in
    an order that depends on it, so a pre-activation within rounding of 0 can change sign."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("changes", [{"local_steps": 5}, {"local_epochs": 2, "num_clients": 400}])
def test_replay_reproduces_the_clients_update_from_the_true_images_and_schedule(changes, threads):
    """The client's own training (fl_sim.task.local_sgd over its local_schedule) and the attack
    library's differentiable replay, given the referee's images and the true schedule, end at
    the same weights to float precision, at any thread count. With two local epochs every image
    is used twice, in a different order each pass. (Client 7's round 2 has a pre-activation of
    CNN6's last convolution within 5e-8 of 0 in its second step: a replay whose weights differ
    from the client's by one rounding there takes the other LeakyReLU slope and drifts by 1e-3.)"""
    cfg = _cfg(**changes)
    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = local_schedule(cfg, 7, cfg.num_clients, 2)
    _, steps = local_sgd(model, data, batches, lr=cfg.lr)
    client_delta = [p.detach() - start[n] for n, p in model.named_parameters()]

    truth = true_batch(cfg, RefereeKey((7,), "direct"), 2)
    assert truth.schedule is not None and len(truth.schedule) == steps == cfg.steps_for(
        len(client_indices(cfg, 7, cfg.num_clients))
    )
    if "local_epochs" in changes:
        assert len(truth.labels) == len(client_indices(cfg, 7, cfg.num_clients)) < sum(map(len, truth.schedule))
    fresh = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in fresh.named_parameters()}
    replayed = simulate_local_update(
        fresh, params, truth.images, truth.labels, cfg.lr, steps, create_graph=False, schedule=truth.schedule
    )
    for name, a, b in zip(parameter_names(fresh), client_delta, replayed):
        assert torch.allclose(a, b.detach(), rtol=0, atol=1e-6 * max(1.0, float(a.abs().max()))), (
            name,
            float((a - b.detach()).abs().max()),
        )
    # the replay without the schedule (every image at every step) is a different update
    wrong = simulate_local_update(fresh, params, truth.images, truth.labels, cfg.lr, steps, create_graph=False)
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(client_delta, wrong)) > 1e-3


def _reordered(truth: Truth) -> Truth:
    """The same images and labels, used in another order (what a different client shuffle is)."""
    n = len(truth.labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    where = {int(old): new for new, old in enumerate(perm)}
    return Truth(
        truth.images[perm],
        truth.labels[perm],
        truth.owners,
        tuple(tuple(where[i] for i in step) for step in truth.schedule),
    )


def test_the_batch_order_reaches_the_attack_only_when_granted():
    """The server's view of a FedAvg reply holds the schedule it can picture from its config
    and the reply's num-examples; the attack's threat model is the same whatever order the
    client really used (and the granted labels come sorted, so they do not tell it), unless
    the order is granted."""
    cfg = _cfg(local_steps=3)
    truth = true_batch(cfg, RefereeKey((5,), "direct"), 1)
    other = _reordered(truth)
    n = len(client_indices(cfg, 5, cfg.num_clients))
    sent = {k: torch.zeros(()) for k in ("w",)}
    reply = InterceptedUpdate(1, 11, 5, sent, sent, "weights", n)
    grants = observe_server(reply, cfg, ["w"], grant_batch_size="observed", grant_labels=True).grants
    assert grants.schedule == assumed_schedule(n, 4, 3) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    assert grants.batch_size == 12 and grants.batch_size_source == "config" and not grants.order
    a, b = grants.threat(truth), grants.threat(other)
    assert a.schedule == b.schedule == grants.schedule
    assert torch.equal(a.labels, b.labels) and torch.equal(a.labels, torch.sort(truth.labels).values)

    granted = observe_server(reply, cfg, ["w"], grant_batch_size="observed", grant_labels=True, grant_order=True).grants
    a, b = granted.threat(truth), granted.threat(other)
    assert a.schedule == truth.schedule and b.schedule == other.schedule and a.schedule != b.schedule
    assert torch.equal(a.labels, truth.labels) and torch.equal(b.labels, other.labels)


def test_a_schedule_is_checked_against_the_images():
    with pytest.raises(ValueError, match="cover 0..N-1"):
        ThreatModel(schedule=((0, 2),))
    with pytest.raises(ValueError, match="labels are granted"):
        ThreatModel(labels=torch.tensor([1, 2, 3]), schedule=((0,), (1,)))
    with pytest.raises(ValueError, match="the schedule has 1 steps, the update 2"):
        get_attack("ig")(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
            Update((torch.zeros(2, 4), torch.zeros(2)), "weight_delta", lr=0.1, local_steps=2),
            (1, 2, 2),
            ThreatModel(schedule=((0,),)),
            max_steps=1,
        )


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_inverting_gradients_recovers_two_images_from_two_local_steps():
    """Two local steps of one image each (a 2-image FedAvg update, labels granted in step
    order): IG replaying the steps as scheduled recovers both images; replaying them as if
    every step had used both images (no schedule) does not."""
    data = load_dataset("mnist5k", "data")
    idx = torch.tensor([0, int((data.train_y != data.train_y[0]).nonzero()[0])])  # two classes
    x = torch.nn.functional.interpolate(data.train_x[idx].float() / 255, size=(8, 8), mode="area")
    y = data.train_y[idx]
    model = _tiny()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    delta = simulate_local_update(model, params, x, y, 0.1, 2, create_graph=False, schedule=((0,), (1,)))
    update = Update(tuple(d.detach() for d in delta), "weight_delta", lr=0.1, local_steps=2)
    threat = ThreatModel(labels=y, schedule=((0,), (1,)))
    psnr = {}
    for name, t in (("scheduled", threat), ("every step both", dataclasses.replace(threat, schedule=None))):
        res = get_attack("ig")(model, update, (1, 8, 8), t, seed=0, max_steps=300)
        assert res.diagnostics["replayed_local_steps"] == 2
        psnr[name] = [s["psnr"] for s in score_batch(res.images, x, perm=match_batch(res.images, x))]
    assert min(psnr["scheduled"]) > 45, psnr
    assert min(psnr["every step both"]) < SUCCESS_PSNR, psnr
