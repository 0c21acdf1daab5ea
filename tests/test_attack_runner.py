"""The attack runner on its own: intercepted updates in, scored rows out (no Flower runtime)."""

import csv

import torch

from experiments.plan import ExperimentPlan
from experiments.runner import AttackRunner
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate
from fl_sim.models import build_model
from fl_sim.replies import DroppedReply
from fl_sim.task import batch_gradient, client_batch, parameter_names


def _plan(tmp_path, **values):
    return ExperimentPlan.from_mapping(
        {"attack": "rgap", "num-clients": 3, "out-dir": str(tmp_path), "attack-workers": 0, **values}
    )


def _update(cfg, pid, server_round=1, model=None):
    data = load_dataset(cfg.dataset)
    model = model or build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    grads, _ = batch_gradient(model, *client_batch(cfg, pid, cfg.num_clients, server_round))
    return InterceptedUpdate(
        server_round,
        node_id=100 + pid,
        partition_id=pid,
        sent=model.state_dict(),
        reply=dict(zip(parameter_names(model), grads)),
        kind="gradient",
        num_examples=cfg.batch_size,
        metrics={"partition-id": pid, "num-examples": cfg.batch_size},
    )


def test_deferred_attacks_run_at_close_and_score_against_the_rebuilt_batch(tmp_path):
    plan = _plan(tmp_path, **{"observers": "server", "defer-attacks": True, "attack-rounds": "all"})
    runner = AttackRunner(plan, tmp_path)
    runner.on_update(_update(plan.fed, 1))
    runner.on_update(_update(plan.fed, 2, server_round=2))
    assert runner.rows == [] and runner.submitted == 2  # deferred: nothing ran yet
    runner.close()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["round"], r["client"], r["observer"], r["attack"]) for r in rows] == [
        ("1", "1", "server", "rgap"),
        ("2", "2", "server", "rgap"),
    ]
    assert all(float(r["psnr"]) > 60 and float(r["label_acc"]) == 1.0 for r in rows)
    # what the server's attacker was told, in every row
    assert all(
        (r["labels_granted"], r["batch_size_granted"], r["batch_size_source"], r["attribution"])
        == ("False", "True", "reply", "direct")
        for r in rows
    )
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == [
        "round001-server-rgap-c1.pt",
        "round002-server-rgap-c2.pt",
    ]


def test_rounds_and_clients_knobs_select_updates(tmp_path):
    plan = _plan(
        tmp_path, **{"observers": "server", "defer-attacks": True, "attack-rounds": "2", "attack-clients": "0"}
    )
    runner = AttackRunner(plan, tmp_path)
    for pid in range(3):
        runner.on_update(_update(plan.fed, pid, server_round=1))
        runner.on_update(_update(plan.fed, pid, server_round=2))
    assert runner.submitted == 1
    assert runner._deferred[0].observation.key.targets == (0,) and runner._deferred[0].observation.server_round == 2
    runner.stop()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["round"], r["client"], r["status"]) for r in rows] == [("2", "0", "interrupted")]


def test_dropped_reply_in_an_attacked_round_is_a_row(tmp_path):
    plan = _plan(tmp_path, **{"observers": "server"})
    runner = AttackRunner(plan, tmp_path)
    runner.on_dropped(DroppedReply(1, 77, 2, "invalid", "array '0.weight' holds 1 NaN or Inf value(s)"))
    runner.on_dropped(DroppedReply(2, 77, 2, "missing", "no reply"))  # round 2 is not attacked
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["round"], r["client"], r["status"]) for r in rows] == [("1", "2", "invalid")]
    assert "node 77" in rows[0]["reason"] and "NaN" in rows[0]["reason"]


def test_curious_client_attacks_the_others_mean_with_no_batch_size(tmp_path):
    """The curious client estimates the others' mean from global models and its own update,
    with the participant count from the config; it is told no batch size, and its rows are
    attributed after the fact."""
    plan = _plan(tmp_path, **{"observers": "client", "batch-size": 1})
    cfg = plan.fed
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    ups = [_update(cfg, pid, model=model) for pid in range(3)]
    mean = {n: sum(u.reply[n] for u in ups) / 3 for n in ups[0].reply}
    after = {k: v - cfg.server_lr * mean[k] for k, v in model.state_dict().items()}
    runner = AttackRunner(plan, tmp_path)
    for u in ups:
        runner.on_update(u)  # the server observer is off: only the curious client's own is kept
    assert runner.submitted == 0
    runner.on_aggregate(RoundAggregate(1, model.state_dict(), after, ((0, 1), (1, 1), (2, 1))), observer="client")
    runner.close()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted(int(r["client"]) for r in rows) == [1, 2]  # the others, not itself
    assert all(r["batch_size_granted"] == "False" and r["attribution"] == "post-hoc" for r in rows)
    # R-GAP on a mean of two images: nothing recovered
    assert all(float(r["psnr"]) < 20 and r["recovered"] == "0" for r in rows)
    job = torch.load(next((tmp_path / "reconstructions").iterdir()))
    assert job["owners"].tolist() == [1, 2]


def test_workers_are_stopped_even_when_no_job_ever_came(tmp_path):
    """Workers start with the runner (so that a Ctrl-C cannot break them while they import);
    one that never got a job must still be gone after close(), or the process cannot exit."""
    runner = AttackRunner(_plan(tmp_path, **{"attack-workers": 1}), tmp_path)
    workers = list(runner._pool._processes.values())
    assert len(workers) == 1 and workers[0].is_alive()
    runner.close()
    assert not workers[0].is_alive()
