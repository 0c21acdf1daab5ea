"""experiments.bench.fedavg: one line per update and attack on real FedAvg updates, its floor,
and bad input as one line with exit code 2."""

from __future__ import annotations

import csv

import pytest

from experiments.bench.fedavg import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attacks", "dlg"], "--attacks takes"),
        (["--images", "0"], "must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--option", "dummies=many"], "not a Python literal"),
        (["--option", "dummies='many'"], "bad attack option"),
        (["--seeds", "0-200"], "need"),
        (["--data", "npz:/nonexistent.npz"], "nonexistent"),
        (["--grant", "everything"], "--grant takes"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_one_row_per_update_and_attack_with_the_floor(tmp_path, capsys):
    """Two clients of 4 digits, 2 epochs of batch 2: each attack gives one CSV row per client,
    its fractions in [0, 1] and its label counts scored; the floor puts the true images' replay
    in another order far closer to the delta than random images."""
    out = tmp_path / "rows.csv"
    argv = ["--images", "4", "--epochs", "2", "--batch", "2", "--seeds", "0-1", "--floor", "--out", str(out)]
    argv += ["--option", "max_steps=2", "--ig-option", "max_steps=2", "--ig-option", "refine_steps=0"]
    assert main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["seed"], r["attack"]) for r in rows] == [
        ("0", "fedavg-sim"),
        ("0", "ig"),
        ("1", "fedavg-sim"),
        ("1", "ig"),
    ]
    for r in rows:
        assert 0 <= float(r["frac_20db"]) <= 1 and 0 <= float(r["paper_frac"]) <= 1
        assert 0 <= float(r["label_count_accuracy"]) <= 1 and r["steps"] == "2"
        assert r["grant"] == "none" and 0 <= float(r["frac_over_blank"]) <= 1
        assert 0 < float(r["median_blank_psnr"]) < 30  # a black page against a digit: 8-10 dB
    floors = [line for line in capsys.readouterr().out.splitlines() if "floor" in line]
    assert len(floors) == 2
    for line in floors:
        values = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
        assert float(values["another shuffle"]) < 0.5 * float(values["random images"])


def test_granted_labels_and_order_reach_the_attack(tmp_path):
    """``--grant labels+order``: fedavg-sim follows the client's shuffle with one dummy set and
    keeps the true labels (label counts exact); ``--grant labels`` keeps the labels, not the order."""
    for grant in ("labels+order", "labels"):
        out = tmp_path / f"{grant}.csv"
        argv = ["--images", "4", "--epochs", "2", "--batch", "2", "--attacks", "fedavg-sim", "--grant", grant]
        assert main(argv + ["--option", "max_steps=1", "--out", str(out)]) == 0
        (row,) = list(csv.DictReader(out.open()))
        assert row["grant"] == grant and float(row["label_count_accuracy"]) == 1.0
