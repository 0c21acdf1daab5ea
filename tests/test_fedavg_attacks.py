"""Attacks on FedAvg updates through a real Flower simulation: the server sees each client's
weights after its local steps and knows the schedule it configured (learning rate, steps,
batch size); the referee rebuilds the images of the client's local schedule."""

from __future__ import annotations

import csv

import pytest

from experiments.run import main as run_main

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_local_step_leaks_like_fedsgd(tmp_path):
    """FedAvg with one local step of one image: the weight delta is -lr times that image's
    gradient, and the server inverts it; the curious client, seeing only the global models,
    does not."""
    out = tmp_path / "run"
    code = run_main(["--attack", "rgap,idlg", "--observers", "server,client", "--mode", "fedavg", "--local-steps", "1",
                     "--batch-size", "1", "--lr", "0.1", "--clients", "4", "--rounds", "1", "--attack-workers", "0",
                     "--out", str(out)])
    assert code == 0
    rows = _rows(out / "results.csv")
    server = [r for r in rows if r["observer"] == "server"]
    client = [r for r in rows if r["observer"] == "client"]
    assert len(server) == 8 and len(client) == 6
    assert all(r["batch_size_source"] == "config" and r["batch_size_used"] == "1" for r in server)
    assert all(float(r["psnr"]) > 40 and r["recovered"] == "1" for r in server), server
    assert all(float(r["psnr"]) < 20 for r in client), client
