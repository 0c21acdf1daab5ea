"""The audit's D-SNR check (fl_sim.mods.dsnr, SEER's disaggregation signal-to-noise ratio).

Both forms against autograd, one sample at a time; the per-unit D-SNR on the trap and on the
imprints against the honest model on the same client batches (and the tampering check that
catches the imprints); the policy's options; and a real in-process federation where ``block``
at the default threshold refuses the trap's round.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch.nn import functional as F

from attacks import construct
from experiments.run import main as run_main
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset, to_float
from fl_sim.models import build_model
from fl_sim.mods.audit import Audit, tampering
from fl_sim.mods.dsnr import KAPPA, dsnr, isolated_share, linear_weights, per_sample_norms, per_sample_unit_norms
from fl_sim.settings import DSNR_MIN_BATCH, DSNR_THRESHOLD, AuditError, AuditPolicy
from fl_sim.task import client_batch


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_per_sample_norms_equal_autograd_one_sample_at_a_time_and_dsnr_is_the_papers_ratio():
    data = load_dataset("mnist5k", "data")
    model = build_model("lenet", data.input_shape, data.num_classes, init="paper", seed=0)
    x, y = to_float(data.train_x[:5]), data.train_y[:5]
    names = linear_weights(model)
    assert names == ["0.weight", "2.weight", "4.weight", "7.weight"]  # three convolutions and the head
    table = per_sample_norms(model, x, y)
    params = dict(model.named_parameters())
    for i in range(5):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        expected = torch.stack([g.double().norm() for g in grads])
        torch.testing.assert_close(table[i], expected, rtol=1e-4, atol=1e-7)
    got = dsnr(model, x, y)
    ratios = table.max(0).values / (table.sum(0) - table.max(0).values)
    assert got.value == pytest.approx(float(ratios.max()), rel=1e-9) and got.layer == names[int(ratios.argmax())]
    assert math.isinf(dsnr(model, x[:1], y[:1]).value)  # one sample: nothing to disaggregate, always "dominant"


def test_per_unit_norms_match_autograd_per_row_with_the_bias_and_isolated_share_counts_lone_units():
    data = load_dataset("mnist5k", "data")
    model = build_model("mlp", data.input_shape, data.num_classes, init="torch", seed=0)
    x, y = to_float(data.train_x[:3]), data.train_y[:3]
    table = per_sample_unit_norms(model, x, y)
    assert list(table) == ["1.weight", "3.weight"]
    params = dict(model.named_parameters())
    for i in range(3):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [params["1.weight"], params["1.bias"]])
        torch.testing.assert_close(table["1.weight"][0][i], gw.double().pow(2).sum(1), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(table["1.weight"][1][i], gb.double().pow(2), rtol=1e-4, atol=1e-10)
    # two samples, three units: unit 0 is sample 0's alone, unit 1 shared evenly, unit 2 sample 1's by 20 to 1
    units = torch.tensor([[3.0, 4.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    units[1, 2], units[0, 2] = 2.0, 0.1
    n0, n1 = units[0] / units[0].norm(), units[1] / units[1].norm()
    assert n1[2] > KAPPA * n0[2]  # unit 2 is isolated by sample 1 after normalisation
    expected = (float(n0[0] ** 2) + float(n1[2] ** 2)) / 2
    assert isolated_share(units) == pytest.approx(expected, rel=1e-9)
    assert isolated_share(units, kappa=1e6) == pytest.approx(float(n0[0] ** 2) / 2, rel=1e-9)  # unit 0 stays alone


@pytest.fixture(scope="module")
def client_batches():
    """Four clients' own batches of 16 (round 1 of the active preset) and the honest mlp."""
    data = load_dataset("mnist5k", "data")
    honest = build_model("mlp", data.input_shape, data.num_classes, init="torch", seed=0)
    cfg = RunConfig(mode="fedsgd", batch_size=16, num_clients=4, model="mlp")
    return data, honest, [client_batch(cfg, pid, 4, 1) for pid in range(4)]


def test_per_unit_dsnr_flags_the_trap_on_each_clients_batch_where_seers_layer_level_dsnr_does_not(client_batches):
    """The trap built for the round's 64 images: each unit fires for one image in 64, so most of
    each sample's first-layer gradient sits in units it alone drives (measured 0.76-0.83 of it,
    against 0.006-0.008 under the honest model); SEER's layer-level ratio barely moves (0.11-0.18
    against 0.09-0.10), far under its threshold."""
    data, honest, batches = client_batches
    built = construct("trap", honest, data.input_shape, to_float(data.test_x[:1000]), 500, seed=0, images=64)
    for images, labels in batches:
        h, m = dsnr(honest, images, labels), dsnr(built, images, labels)
        assert h.unit < DSNR_THRESHOLD < m.unit and m.unit_layer == "1.weight", (h, m)
        assert m.value < 4.0  # the layer-level D-SNR's threshold before this check (docs/results/audit.md)


@pytest.mark.parametrize("name", ["imprint", "imprint-block"])
def test_per_unit_dsnr_does_not_see_the_imprints_and_the_copied_rows_or_entries_check_does(client_batches, name):
    """An imprint's bins are fired by every image above a threshold: no unit is one image's alone
    (its images come from differences of rows), so the per-unit D-SNR stays at the honest
    model's level; the tampering checks catch both (copied rows; the block's entries)."""
    data, honest, batches = client_batches
    base = honest if name == "imprint" else build_model("cnn6", data.input_shape, data.num_classes, init="kaiming")
    built = construct(name, base, data.input_shape, to_float(data.test_x[:1000]), 500, seed=0)
    for images, labels in batches[:2]:
        assert dsnr(built, images, labels).unit < DSNR_THRESHOLD
    reason = tampering(base.state_dict(), built.state_dict())
    assert ("rows are copies" if name == "imprint" else "not this ClientApp's model") in reason


def test_policy_takes_a_dsnr_threshold_off_and_the_copied_rows_switch():
    p = AuditPolicy.parse("block:probe=false,dsnr=0.5,rows=false")
    assert (p.dsnr, p.rows, p.checks_dsnr) == (0.5, False, True)
    assert AuditPolicy.parse(p.spec()) == p
    off = AuditPolicy.parse("log:dsnr=off")
    assert not off.checks_dsnr and AuditPolicy.parse(off.spec()) == off
    assert AuditPolicy.parse("log").dsnr == DSNR_THRESHOLD
    for bad, says in (
        ("block:dsnr=-1", "dsnr must be"),
        ("block:dsnr=x", "dsnr must be a number"),
        ("log:rows=2", "rows"),
    ):
        with pytest.raises(AuditError, match=says):
            AuditPolicy.parse(bad)


@pytest.mark.parametrize("batch", [1, DSNR_MIN_BATCH - 1])
def test_batches_below_the_minimum_are_not_judged_by_dsnr(batch):
    cfg = RunConfig(mode="fedsgd", batch_size=batch, num_clients=4, model="mlp", audit="block:probe=false,dsnr=0.01")
    audit = Audit(None, cfg, 0, 1, {})
    assert audit.check_model(audit.own.state_dict()) is None  # not refused, although the D-SNR is above 0.01
    assert audit.row["dsnr_flagged"] == ""
    assert audit.row["dsnr_unit"] == "" if batch == 1 else audit.row["dsnr_unit"] > 0.01  # recorded from 2 images
    judged = Audit(None, cfg.replace(batch_size=DSNR_MIN_BATCH), 0, 1, {})  # the same model, judged from the minimum
    assert judged.check_model(judged.own.state_dict()).action == "refused" and judged.row["dsnr_flagged"] is True


@pytest.mark.slow
def test_block_on_dsnr_at_the_default_threshold_refuses_exactly_the_trap_round_and_training_goes_on(tmp_path):
    """The trap passes the copied-rows and entries checks; the per-unit D-SNR at its default
    threshold makes both clients refuse its round, and only it."""
    out = tmp_path / "dsnr-block"
    args = ["--attack", "none", "--observers", "active", "--active-attack", "trap", "--clients", "2"]
    code = run_main(args + ["--batch-size", "16", "--rounds", "2", "--audit", "block:probe=false", "--out", str(out)])
    assert code == 0
    rounds = _rows(out / "rounds.csv")
    assert (rounds[1]["aggregated"], rounds[1]["dropped"]) == ("0", "2")  # the trap's round: both refuse
    assert (rounds[2]["aggregated"], rounds[2]["dropped"]) == ("2", "0")  # the honest model again: trained on
    audit = {(int(r["round"]), int(r["client"])): r for r in _rows(out / "audit.csv")}
    assert sorted(audit) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for c in (0, 1):
        refused, sent = audit[(1, c)], audit[(2, c)]
        assert refused["action"] == "refused" and refused["tampered"] == "False" and refused["dsnr_flagged"] == "True"
        assert "D-SNR" in refused["reason"] and float(refused["dsnr_unit"]) > DSNR_THRESHOLD
        assert float(refused["dsnr"]) < 4.0  # SEER's layer-level value, recorded beside it, would have passed it
        assert (
            sent["action"] == "sent" and sent["dsnr_flagged"] == "False" and float(sent["dsnr_unit"]) < DSNR_THRESHOLD
        )
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "invalid" and "D-SNR" in r["reason"] for r in rows)


def test_the_benchmark_prints_each_checks_cost_and_flags_the_trap_not_the_imprint(tmp_path, capsys):
    from experiments.bench.dsnr import main as bench_main

    assert bench_main(["--parts", "1,4", "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    assert "mlp   batch 16:" in out and "cnn6  batch 16:" in out  # part 1: the cost per check
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["trap"], ["imprint"])}
    assert rows["trap"][4] == "8/8" and rows["imprint"][4] == "0/8", out  # per-unit: flagged of 8 batches
    assert rows["trap"][7] == "0/8" and rows["imprint"][7] == "0/8", out  # layer-level at 4: neither
