"""A server that survives its clients: faulty clients through real Flower simulations (Ray).

A client that replies with NaN, Inf, an array of the wrong shape, an error or nothing at all
is dropped from the aggregate, logged with its node and reason (dropped.csv, and a row of
results.csv in attacked rounds), and the round goes on with the others: the global model
stays finite and trains as if those clients had not been there.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from experiments.run import main as run_main

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _final_accuracy(out):
    return float(_rows(out / "rounds.csv")[-1]["test_accuracy"])


def test_fedavg_with_nan_and_shape_clients_trains_like_a_run_without_them(tmp_path):
    common = ["--attack", "none", "--clients", "4", "--rounds", "3", "--seed", "2"]
    faulty, without = tmp_path / "faulty", tmp_path / "without"
    assert run_main(common + ["--faulty-client", "1:nan", "--faulty-client", "2:shape", "--out", str(faulty)]) == 0
    # the same federation in which clients 1 and 2 never contribute (their ClientApps fail)
    assert run_main(common + ["--faulty-client", "1:error", "--faulty-client", "2:error", "--out", str(without)]) == 0

    rounds = _rows(faulty / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [0, 1, 2, 3]
    assert all(math.isfinite(float(r["test_loss"])) for r in rounds)
    assert [(r["aggregated"], r["dropped"]) for r in rounds[1:]] == [("2", "2")] * 3
    model = torch.load(faulty / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in model.values())
    dropped = _rows(faulty / "dropped.csv")
    assert sorted((int(d["round"]), int(d["client"])) for d in dropped) == [(r, c) for r in (1, 2, 3) for c in (1, 2)]
    reasons = {int(d["client"]): d["reason"] for d in dropped}
    assert "NaN or Inf" in reasons[1] and "has shape" in reasons[2]
    assert all(d["status"] == "invalid" and int(d["node_id"]) > 0 for d in dropped)
    assert {d["status"] for d in _rows(without / "dropped.csv")} == {"error"}
    # dropping a bad reply leaves nothing of it behind: the run trains exactly as without them
    # (the same two clients' updates aggregated in every round, so the same final weights)
    reference = torch.load(without / "final_model.pt")
    assert model.keys() == reference.keys()
    assert all(torch.equal(model[k], reference[k]) for k in model), {
        k: float((model[k] - reference[k]).abs().max()) for k in model
    }
    assert _final_accuracy(faulty) == _final_accuracy(without)
    first = float(_rows(faulty / "rounds.csv")[0]["test_accuracy"])
    assert _final_accuracy(faulty) > 0.5 > first  # and it does train (chance is 0.1)
    assert "Replies of the federation that were not aggregated" in (faulty / "summary.md").read_text()


def test_attacked_fedsgd_run_with_nan_shape_and_silent_clients(tmp_path):
    out = tmp_path / "run"
    # one round: the silent client makes it wait out the timeout, which must also cover Ray
    # starting its actors in round 1
    code = run_main(
        [
            "--attack",
            "rgap",
            "--observers",
            "server",
            "--clients",
            "4",
            "--rounds",
            "1",
            "--faulty-client",
            "1:nan",
            "--faulty-client",
            "2:shape",
            "--faulty-client",
            "3:silent",
            "--round-timeout",
            "20",
            "--attack-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert [(r["aggregated"], r["dropped"]) for r in _rows(out / "rounds.csv")[1:]] == [("1", "3")]
    statuses = {
        (int(d["round"]), int(d["client"]) if d["client"] != "-1" else None): d["status"]
        for d in _rows(out / "dropped.csv")
    }
    assert statuses[(1, 1)] == statuses[(1, 2)] == "invalid"
    assert "missing" in statuses.values()  # the silent client: no reply before the round timed out
    results = {int(r["client"]): r for r in _rows(out / "results.csv")}
    assert results[0]["status"] == "ok" and float(results[0]["psnr"]) > 60  # the honest client is still attacked
    assert results[1]["status"] == "invalid" and "NaN" in results[1]["reason"]
    assert results[2]["status"] == "invalid" and "shape" in results[2]["reason"]
    # the silent node never replied, so the server cannot tell its partition: client -1, with its node id
    assert results[-1]["status"] == "missing" and "node " in results[-1]["reason"]
    assert json.loads((out / "final_model.json").read_text()) == {"round": 1}
    for name in ("summary.md", "reconstructions_round1.png", "psnr_per_round.png", "config.json", "dropped.csv"):
        assert (out / name).exists(), name
    assert (out / "reconstructions" / "round001-server-rgap-c0.pt").exists()
    assert all(torch.isfinite(v).all() for v in torch.load(out / "final_model.pt").values())


def test_a_run_whose_clients_all_fail_exits_1_with_the_first_reason(tmp_path, capsys):
    out = tmp_path / "run"
    faults = [a for i in range(3) for a in ("--faulty-client", f"{i}:error")]
    code = run_main(["--attack", "none", "--clients", "3", "--rounds", "5", *faults, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "round 1: no reply could be aggregated (3 dropped)" in err and "injected fault" in err
    assert [int(r["round"]) for r in _rows(out / "rounds.csv")] == [0]  # no round was invented


def test_under_secagg_a_bad_update_fails_the_round_without_naming_the_client(tmp_path, capsys):
    """SecAgg+ hides which client sent what: a vector of the wrong shape breaks the masked sum,
    and the server can only say that the round failed."""
    out = tmp_path / "run"
    code = run_main(
        ["--attack", "rgap", "--observers", "secagg", "--clients", "4", "--faulty-client", "1:shape", "--out", str(out)]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "round 1: secure aggregation failed" in err and "does not say which client" in err
    (dropped,) = _rows(out / "secagg" / "dropped.csv")
    assert (dropped["round"], dropped["node_id"], dropped["client"]) == ("1", "-1", "-1")
    assert [int(r["round"]) for r in _rows(out / "secagg" / "rounds.csv")] == [0]
