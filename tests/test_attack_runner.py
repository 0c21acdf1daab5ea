"""The attack runner on its own: an intercepted update in, a scored row out."""

import csv

from experiments.attack_runner import AttackRunner
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptedUpdate
from fl_sim.models import build_model
from fl_sim.task import batch_gradient, client_batch


def _update(cfg, pid, server_round=1):
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    grads, _ = batch_gradient(model, *client_batch(cfg, pid, cfg.num_clients, server_round))
    names = [n for n, _ in model.named_parameters()]
    return InterceptedUpdate(server_round, node_id=100 + pid, partition_id=pid, sent=model.state_dict(),
                             reply=dict(zip(names, grads)), kind="gradient", num_examples=cfg.batch_size,
                             metrics={"partition-id": pid, "num-examples": cfg.batch_size})


def test_deferred_attacks_run_at_close_and_score_against_the_rebuilt_batch(tmp_path):
    cfg = RunConfig(mode="fedsgd", num_clients=3, batch_size=1, model="lenet", init="paper")
    runner = AttackRunner(cfg, ["rgap"], tmp_path, observers=["server"], workers=0, defer=True)
    runner.on_update(_update(cfg, 1))
    runner.on_update(_update(cfg, 2, server_round=2))  # not an attacked round (default: all)
    assert runner.rows == [] and runner.submitted == 2
    runner.close()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["round"], r["client"], r["observer"], r["attack"]) for r in rows] == [
        ("1", "1", "server", "rgap"), ("2", "2", "server", "rgap")]
    assert all(float(r["psnr"]) > 60 and float(r["label_acc"]) == 1.0 for r in rows)


def test_rounds_and_clients_knobs_select_updates(tmp_path):
    cfg = RunConfig(mode="fedsgd", num_clients=3, batch_size=1, model="lenet", init="paper")
    runner = AttackRunner(cfg, ["rgap"], tmp_path, rounds=[2], clients=[0], observers=["server"], defer=True)
    for pid in range(3):
        runner.on_update(_update(cfg, pid, server_round=1))
        runner.on_update(_update(cfg, pid, server_round=2))
    assert runner.submitted == 1
    runner.close(wait=False)
