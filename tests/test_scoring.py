"""The referee and the observers' entitlements (no Flower runtime)."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.metrics import psnr
from experiments.observe import observe_curious_client, observe_secagg, observe_server
from experiments.plan import ExperimentPlan
from experiments.scoring import Truth, score, true_batch
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate


def _truth():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((3, 1, 8, 8), generator=gen)
    return Truth(images, torch.tensor([4, 5, 6]), owners=(0, 0, 1))


def test_a_clients_row_is_the_median_of_its_images_not_the_best():
    truth = _truth()
    recon = truth.images.clone()
    recon[1] = 0.7 * recon[1] + 0.15  # client 0: one exact image, one failure (about 21 dB)
    clients, per_image, _ = score(recon, None, truth)
    c0 = clients[0]
    assert (c0.client, c0.images, c0.recovered) == (0, 2, 1)
    expected = (300.0 + psnr(recon[1], truth.images[1])) / 2  # median of two: their mean (an exact match caps at 300)
    assert c0.psnr == pytest.approx(expected) and c0.psnr < 300
    assert math.isnan(c0.label_acc)  # no labels returned
    assert [row["matched"] for row in per_image] == [True, True, True]


def test_images_without_a_reconstruction_count_as_not_recovered():
    truth = _truth()
    recon = truth.images[[2]].clone()  # the attack estimated one image for three
    clients, per_image, ordered = score(recon, torch.tensor([6]), truth)
    assert [row["matched"] for row in per_image] == [False, False, True]
    assert clients[1].recovered == 1 and clients[1].label_acc == 1.0
    assert clients[0].recovered == 0 and clients[0].psnr < 15 and clients[0].label_acc == 0.0
    assert torch.equal(ordered[0], torch.full_like(ordered[0], 0.5))


def test_the_referee_rebuilds_each_targets_batch():
    plan = ExperimentPlan.from_mapping({"attack": "rgap", "batch-size": 2, "out-dir": "unused"})
    from experiments.observe import RefereeKey
    from fl_sim.task import client_batch

    truth = true_batch(plan.fed, RefereeKey((3, 1), "post-hoc"), server_round=2)
    x3, _ = client_batch(plan.fed, 3, 4, 2)
    x1, _ = client_batch(plan.fed, 1, 4, 2)
    assert truth.owners == (3, 3, 1, 1) and torch.equal(truth.images, torch.cat([x3, x1]))


def _agg_and_updates():
    gen = torch.Generator().manual_seed(1)
    before = {"w": torch.randn(4, generator=gen)}
    grads = [{"w": torch.randn(4, generator=gen)} for _ in range(4)]
    mean = sum(g["w"] for g in grads) / 4
    after = {"w": before["w"] - 0.5 * mean}
    ups = [InterceptedUpdate(1, 100 + i, i, before, g, "gradient", 3, {"local-steps": 1}) for i, g in enumerate(grads)]
    agg = RoundAggregate(1, before, after, tuple((i, 3) for i in range(4)))
    return before, grads, agg, ups


@pytest.mark.parametrize(
    "policy,server,client,secagg",
    [
        ("observed", (3, "reply"), (None, "none"), (12, "clear-counts")),
        ("all", (3, "reply"), (9, "granted"), (12, "granted")),
        ("none", (None, "none"), (None, "none"), (None, "none")),
    ],
)
def test_what_each_observer_is_told_of_the_batch_size(policy, server, client, secagg):
    plan = ExperimentPlan.from_mapping({"attack": "rgap", "server-lr": 0.5, "batch-size": 3})
    _, grads, agg, ups = _agg_and_updates()
    kw = {"grant_batch_size": policy, "grant_labels": False}
    s = observe_server(ups[2], plan.fed, ["w"], **kw)
    c = observe_curious_client(agg, ups[0], plan.fed, ["w"], curious_client=0, **kw)
    g = observe_secagg(agg, plan.fed, ["w"], **kw)
    assert (s.grants.batch_size, s.grants.batch_size_source) == server
    assert (c.grants.batch_size, c.grants.batch_size_source) == client
    assert (g.grants.batch_size, g.grants.batch_size_source) == secagg
    assert (s.key.attribution, c.key.attribution, g.key.attribution) == ("direct", "post-hoc", "post-hoc")
    assert c.key.targets == (1, 2, 3) and g.key.targets == (0, 1, 2, 3)
    # the server sees client 2's own gradient; the curious client the others' mean
    assert torch.equal(s.update.tensors[0], grads[2]["w"])
    torch.testing.assert_close(c.update.tensors[0], sum(grads[i]["w"] for i in (1, 2, 3)) / 3)


def test_the_curious_client_without_its_own_update_has_nothing_to_attack():
    plan = ExperimentPlan.from_mapping({"attack": "rgap", "server-lr": 0.5})
    _, _, agg, _ = _agg_and_updates()
    why = observe_curious_client(
        agg, None, plan.fed, ["w"], curious_client=0, grant_batch_size="observed", grant_labels=False
    )
    assert isinstance(why, str) and "no update of its own" in why
