"""The referee and the observers' entitlements (no Flower runtime)."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.metrics import psnr
from experiments.observe import RefereeKey, observe_curious_client, observe_secagg, observe_server
from experiments.plan import ExperimentPlan
from experiments.results import IMAGE_FIELDS, RESULT_FIELDS
from experiments.scoring import Truth, score, true_batch
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate
from fl_sim.task import client_indices


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


def test_iip_is_the_share_of_a_clients_images_whose_nearest_neighbour_in_its_partition_is_itself():
    """The referee's truth carries each target's partition (the images the client holds); a
    reconstruction equal to the true image is identified, one that is another image of the
    same partition is not; the client's ``iip`` is the share, per image in ``iip``."""
    plan = ExperimentPlan.from_mapping({"attack": "rgap", "batch-size": 2, "num-clients": 4, "out-dir": "unused"})
    truth = true_batch(plan.fed, RefereeKey((3, 1), "post-hoc"), server_round=1)
    data = load_dataset(plan.fed.dataset)
    for pid in (3, 1):
        assert torch.equal(truth.partitions[pid], data.train_x[torch.as_tensor(client_indices(plan.fed, pid, 4))])
    clients, per_image, _ = score(truth.images, None, truth)
    assert [c.iip for c in clients] == [1.0, 1.0] and [r["iip"] for r in per_image] == [True] * 4
    # client 3's first image reconstructed as another image of client 3's partition
    pool = truth.partitions[3].float() / 255
    other = next(x for x in pool if not torch.equal(x, truth.images[0]) and not torch.equal(x, truth.images[1]))
    recon = truth.images.clone()
    recon[0] = other
    clients, per_image, _ = score(recon, None, truth)
    assert [c.iip for c in clients] == [0.5, 1.0] and [r["iip"] for r in per_image] == [False, True, True, True]
    assert set(clients[0].columns()) <= set(RESULT_FIELDS) and {"iip", "rpsnr", "lpips"} <= set(clients[0].columns())


def test_the_new_score_columns_come_after_the_columns_issue_22_fixed():
    old_results = ["round", "client", "observer", "attack", "psnr", "ssim", "mse", "label_acc", "images", "recovered"]
    old_results += ["batch_size_used", "labels_granted", "batch_size_granted", "batch_size_source", "local_steps"]
    old_results += ["order_granted", "attribution", "bins", "seconds", "status", "reason"]
    old_images = ["round", "client", "observer", "attack", "index", "psnr", "ssim", "label_true", "label_recovered"]
    assert RESULT_FIELDS == [*old_results, "iip", "rpsnr", "lpips"]
    assert IMAGE_FIELDS == [*old_images, "status", "iip", "rpsnr", "lpips"]


def test_a_truth_without_partitions_leaves_iip_empty():
    clients, per_image, _ = score(_truth().images, None, _truth())
    assert all(math.isnan(c.iip) for c in clients) and all(r["iip"] == "" for r in per_image)
