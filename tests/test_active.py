"""The active malicious server: its imprint (attacks.imprint), and in a federation, with and
without SecAgg+."""

import csv
import json

import pytest
import torch
from torch.nn import functional as F

from attacks import SUCCESS_PSNR, Update, construct, score_batch
from attacks.imprint import expected_recovery, imprint, imprint_block_model, plan_imprint, plant_imprint
from fl_sim.data import load_dataset, to_float
from fl_sim.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist5k", "")


def _batch(data, n, seed):
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:n]
    return to_float(data.train_x[idx]), data.train_y[idx]


def _psnrs(recon, truth):
    return torch.tensor([s["psnr"] for s in score_batch(recon, truth)])


def test_weights_only_imprint_keeps_the_model_and_reads_back_a_batch(digits):
    honest = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    public = to_float(digits.test_x)
    mal = plant_imprint(honest, digits.input_shape, plan_imprint(public, 500, seed=0))
    # same entries, shapes and dtypes: an unmodified ClientApp loads it
    assert {k: (v.shape, v.dtype) for k, v in mal.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in honest.state_dict().items()
    }
    assert not torch.equal(mal[1].weight, honest[1].weight)
    x, y = _batch(digits, 16, seed=3)
    grads = torch.autograd.grad(F.cross_entropy(mal(x), y), list(mal.parameters()))
    res = imprint(mal, Update(tuple(grads)), digits.input_shape)
    psnr = _psnrs(res.images, x)
    assert res.diagnostics["bins"] == 500
    assert (psnr >= SUCCESS_PSNR).sum() >= 14  # 16 images in 500 bins: about 0.5 collisions expected
    assert psnr.median() > 100
    # a one-step FedAvg delta (-lr x the gradient) reads the same
    delta = Update(tuple(-0.1 * g for g in grads), "weight_delta", lr=0.1)
    assert torch.allclose(imprint(mal, delta, digits.input_shape).images, res.images, atol=1e-4)


def test_imprint_reads_an_aggregate_of_64_images(digits):
    """The SecAgg+ case without the protocol: the example-weighted mean of 4 clients' batch
    gradients is the gradient of their 64 images, and the imprint separates them."""
    model = construct(
        "imprint",
        build_model("mlp", digits.input_shape, digits.num_classes, seed=1),
        digits.input_shape,
        to_float(digits.test_x),
        500,
        seed=1,
    )
    batches = [_batch(digits, 16, seed=10 + k) for k in range(4)]
    mean = None
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        mean = [gi / 4 for gi in g] if mean is None else [m + gi / 4 for m, gi in zip(mean, g)]
    truth = torch.cat([x for x, _ in batches])
    psnr = _psnrs(imprint(model, Update(tuple(mean)), digits.input_shape).images, truth)
    assert (psnr >= SUCCESS_PSNR).float().mean() >= 0.8
    assert expected_recovery(500, 64) == pytest.approx((500 / 501) ** 64, rel=1e-12)


def test_imprint_block_in_front_of_a_cnn(digits):
    base = build_model("cnn6", digits.input_shape, digits.num_classes, init="kaiming", seed=0)
    model = imprint_block_model(base, digits.input_shape, plan_imprint(to_float(digits.test_x), 200, seed=0))
    assert list(model.state_dict())[:3] == ["0.enc.weight", "0.enc.bias", "0.dec.weight"]
    x, y = _batch(digits, 8, seed=5)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    psnr = _psnrs(imprint(model, Update(tuple(grads)), digits.input_shape).images, x)
    assert (psnr >= SUCCESS_PSNR).sum() >= 7


@pytest.mark.parametrize(
    "name, bins, message",
    [
        ("lenet", 100, "first layer is linear"),
        ("mlp", 5000, "do not fit"),
    ],
)
def test_construction_refuses_what_it_cannot_build(digits, name, bins, message):
    model = build_model(name, digits.input_shape, digits.num_classes)
    with pytest.raises(ValueError, match=message):
        construct("imprint", model, digits.input_shape, to_float(digits.test_x[:50]), bins)


# ---- in a federation ---------------------------------------------------------------------


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_active_round_is_accepted_seen_by_the_audit_and_training_continues_from_the_honest_model(tmp_path):
    """Round 2 of 3 sends the imprinted mlp: the unmodified ClientApp trains on it (every reply
    accepted), the server reads each client's batch back, the clients' own tampering check
    flags that round only, and the final model is the honest run's with round 2 left out."""
    from experiments.plan import ExperimentPlan
    from experiments.run import main
    from fl_sim.simulation import simulate

    out = tmp_path / "active"
    code = main(
        [
            "--attack",
            "none",
            "--observers",
            "active",
            "--clients",
            "3",
            "--batch-size",
            "4",
            "--rounds",
            "3",
            "--attack-rounds",
            "2",
            "--audit",
            "log:probe=false",
            "--attack-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rounds = _rows(out / "rounds.csv")
    assert [int(r["aggregated"]) for r in rounds[1:]] == [3, 3, 3] and all(r["dropped"] == "0" for r in rounds[1:])
    assert rounds[2]["test_accuracy"] == rounds[1]["test_accuracy"]  # round 2 left the global model as it was
    rows = _rows(out / "results.csv")
    assert sorted(int(r["client"]) for r in rows) == [0, 1, 2]
    assert all(
        r["observer"] == "active" and r["attack"] == "imprint" and r["round"] == "2" and r["bins"] == "500"
        for r in rows
    )
    assert all(float(r["psnr"]) > 60 and r["recovered"] == "4" for r in rows)
    audit = _rows(out / "audit.csv")
    flagged = {(int(a["round"]), int(a["client"])) for a in audit if a["tampered"] in ("True", "true")}
    assert flagged == {(2, 0), (2, 1), (2, 2)}

    # the reference: the honest federation whose round 2 is sent the honest model and not aggregated
    plan = ExperimentPlan.from_mapping(json.loads((out / "config.json").read_text()))
    final = torch.load(out / "final_model.pt")
    skipped, plain = tmp_path / "skipped", tmp_path / "plain"
    simulate(
        plan.fed.replace(out_dir=str(skipped), audit=""), replace_model=lambda r, honest: honest if r == 2 else None
    )
    simulate(plan.fed.replace(out_dir=str(plain), audit=""))
    reference = torch.load(skipped / "final_model.pt")
    assert all(torch.equal(final[k], reference[k]) for k in final)
    unattacked = torch.load(plain / "final_model.pt")
    assert not all(torch.equal(final[k], unattacked[k]) for k in final)


@pytest.mark.slow
def test_active_server_reads_images_through_secagg(tmp_path):
    from experiments.run import main

    out = tmp_path / "secagg"
    code = main(
        [
            "--attack",
            "none",
            "--observers",
            "active,secagg",
            "--clients",
            "2",
            "--batch-size",
            "4",
            "--rounds",
            "1",
            "--attack-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = _rows(out / "results.csv")
    through = [r for r in rows if r["observer"] == "active-secagg"]
    assert sorted(int(r["client"]) for r in through) == [0, 1]
    assert all(r["attribution"] == "post-hoc" and r["batch_size_source"] == "clear-counts" for r in through)
    assert sum(int(r["recovered"]) for r in through) >= 7  # of 8 images
    assert min(float(r["psnr"]) for r in through) > SUCCESS_PSNR
    assert _rows(out / "secagg" / "rounds.csv")[1]["aggregated"] == "2"


@pytest.mark.slow
def test_imprint_block_needs_and_gets_the_servers_clientapp(tmp_path):
    """The block changes the architecture: the run ships the server's ClientApp (plain and
    SecAgg+), which builds it; the honest ClientApp's model cannot hold those weights; the
    clients' tampering check names the foreign entries."""
    from experiments.plan import ExperimentPlan
    from experiments.run import main
    from fl_sim.task import model_with

    out = tmp_path / "block"
    code = main(
        [
            "--attack",
            "none",
            "--observers",
            "active,secagg",
            "--active-attack",
            "imprint-block",
            "--model",
            "cnn6",
            "--init",
            "kaiming",
            "--active-bins",
            "200",
            "--clients",
            "2",
            "--batch-size",
            "4",
            "--rounds",
            "2",
            "--audit",
            "log:probe=false",
            "--attack-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = _rows(out / "results.csv")
    assert (
        sorted((r["observer"], r["attack"]) for r in rows)
        == [("active", "imprint-block")] * 2 + [("active-secagg", "imprint-block")] * 2
    )
    assert all(r["recovered"] == "4" and float(r["psnr"]) > 60 for r in rows if r["observer"] == "active")
    assert sum(int(r["recovered"]) for r in rows if r["observer"] == "active-secagg") >= 7  # of 8, through SecAgg+
    assert _rows(out / "rounds.csv")[2]["aggregated"] == "2"  # round 2: the honest model again, trained on
    audit = {(int(a["round"]), a["tampered"]): a["tamper_reason"] for a in _rows(out / "audit.csv")}
    assert "unexpected 0.enc.weight" in audit[(1, "True")] and (2, "False") in audit
    plan = ExperimentPlan.from_mapping(json.loads((out / "config.json").read_text()))
    data = load_dataset("mnist5k", "")
    block = construct(
        "imprint-block", build_model("cnn6", data.input_shape, 10), data.input_shape, to_float(data.test_x), 200
    )
    with pytest.raises(RuntimeError, match="0.enc.weight"):
        model_with(plan.fed, block.state_dict())


@pytest.mark.slow
def test_clients_that_block_the_constructed_model_leave_the_server_nothing(tmp_path):
    from experiments.run import main

    out = tmp_path / "blocked"
    # batch 16: the honest round-2 update is not one the analytic checks flag (batches of 8 or fewer are)
    code = main(
        [
            "--attack",
            "none",
            "--observers",
            "active",
            "--clients",
            "2",
            "--batch-size",
            "16",
            "--rounds",
            "2",
            "--audit",
            "block:probe=false",
            "--attack-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0  # a refused active round is not a failed federation: nothing was to be aggregated
    rounds = _rows(out / "rounds.csv")
    assert (rounds[1]["aggregated"], rounds[1]["dropped"]) == ("0", "2")
    assert (rounds[2]["aggregated"], rounds[2]["dropped"]) == ("2", "0")
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "invalid" and "constructed layer" in r["reason"] for r in rows)
