"""The demo (``python -m experiments.run`` with no attack named), shortened to 20 rounds: the
federation trains while the server reconstructs its clients' images in the first, middle and
last round, and the curious client does not."""

from __future__ import annotations

import csv
import json

import pytest

from experiments.run import main as run_main

pytestmark = pytest.mark.slow


def test_the_demo_trains_while_the_server_reconstructs(tmp_path):
    out = tmp_path / "demo"
    assert run_main(["--rounds", "20", "--max-attacks-per-round", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["attack"], config["mode"], config["model"], config["attack-rounds"]) == (
        "rgap",
        "fedsgd",
        "cnn6",
        "1,10,20",
    )
    with open(out / "rounds.csv") as f:
        accuracy = [float(r["test_accuracy"]) for r in csv.DictReader(f)]
    assert len(accuracy) == 21 and accuracy[-1] > accuracy[0] + 0.2, accuracy  # it learns
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    server = [r for r in rows if r["observer"] == "server"]
    client = [r for r in rows if r["observer"] == "client"]
    assert sorted({int(r["round"]) for r in server}) == [1, 10, 20] and len(server) == 6
    for r in (1, 10, 20):  # every attacked round: each image the server attacked is reconstructed
        psnr = sorted(float(x["psnr"]) for x in server if int(x["round"]) == r)
        assert len(psnr) == 2 and psnr[0] > 30, (r, psnr)
    assert len(client) == 27 and all(float(r["psnr"]) < 20 for r in client), client  # 9 others x 3 rounds
    assert (out / "psnr_per_round.png").stat().st_size > 20_000
