"""A large federation: partitions are index arrays into one dataset, clients keep no state, and
attack jobs placed on Ray give the rows of the local pool."""

from __future__ import annotations

import csv
import gc

import numpy as np
import pytest
import torch

from experiments.plan import ConfigError, ExperimentPlan
from experiments.run import main as run_main
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.models import build_model
from fl_sim.simulation import simulate
from fl_sim.task import client_batch, client_indices

CLIENTS = 1000


def test_a_thousand_clients_partitions_are_index_arrays_into_one_dataset():
    cfg = RunConfig(num_clients=CLIENTS, mode="fedsgd", batch_size=1)
    data = load_dataset(cfg.dataset, cfg.data_root)
    parts = [client_indices(cfg, pid, CLIENTS) for pid in range(CLIENTS)]
    # index arrays, disjoint and covering: 8 bytes per training image in all, no pixel copied
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert sum(p.nbytes for p in parts) == 8 * len(data.train_y)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(data.train_y)))
    # the same arrays and the same dataset for every client's every call: nothing is rebuilt per client
    assert all(client_indices(cfg, pid, CLIENTS) is parts[pid] for pid in (0, 499, 999))
    assert load_dataset(cfg.dataset, cfg.data_root) is data
    # a client's batch is materialised when asked, its batch only
    images, labels = client_batch(cfg, 999, CLIENTS, server_round=1)
    assert images.shape == (1, *data.input_shape) and labels.shape == (1,)
    assert images.untyped_storage().nbytes() == 4 * images.numel()


def _live_tensor_bytes() -> int:
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def test_a_thousand_client_federation_keeps_no_client_model_or_data_alive(tmp_path):
    cfg = RunConfig(
        num_clients=CLIENTS,
        fraction_train=0.01,
        num_server_rounds=2,
        mode="fedsgd",
        batch_size=1,
        model="lenet",
        out_dir=str(tmp_path),
    )
    data = load_dataset(cfg.dataset, cfg.data_root)
    client_indices(cfg, 0, CLIENTS)  # the partitions: computed once, index arrays (above)
    gc.collect()
    before = _live_tensor_bytes()
    simulate(cfg, engine="inprocess")
    gc.collect()
    grown = _live_tensor_bytes() - before
    rounds = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert [int(r["aggregated"]) for r in rounds[1:]] == [10, 10]  # 1% of 1,000 clients a round
    # the 20 clients that trained left nothing behind, not even one model's weights
    one_model = sum(p.numel() * p.element_size() for p in build_model(cfg.model, data.input_shape, 10).parameters())
    assert grown < one_model, (grown, one_model)


@pytest.mark.slow
def test_attack_workers_ray_gives_the_rows_of_the_local_pool(tmp_path):
    common = ["--attack", "rgap", "--observers", "server", "--clients", "2", "--rounds", "1"]
    common += ["--engine", "inprocess", "--quiet"]
    rows = {}
    for name, extra in (
        ("pool", ["--attack-workers", "1"]),
        ("ray", ["--attack-workers", "ray", "--defer-attacks"]),
    ):
        assert run_main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        got = list(csv.DictReader(open(tmp_path / name / "results.csv")))
        rows[name] = sorted(({k: v for k, v in r.items() if k != "seconds"} for r in got), key=lambda r: r["client"])
    assert len(rows["pool"]) == 2 and all(r["status"] == "ok" and float(r["psnr"]) > 60 for r in rows["pool"])
    assert rows["ray"] == rows["pool"]


def test_attack_workers_take_ray_and_a_ray_address_implies_it():
    base = {"attack": "rgap", "num-clients": 3}
    assert ExperimentPlan.from_mapping({**base, "attack-workers": "ray"}).attack.workers == "ray"
    plan = ExperimentPlan.from_mapping({**base, "ray-address": "127.0.0.1:6379"})
    assert (plan.attack.workers, plan.attack.ray_address) == ("ray", "127.0.0.1:6379")
    assert plan.to_mapping()["ray-address"] == "127.0.0.1:6379"
    with pytest.raises(ConfigError, match="set --attack-workers ray or leave it out"):
        ExperimentPlan.from_mapping({**base, "attack-workers": 2, "ray-address": "auto"})
    with pytest.raises(ConfigError, match="number of worker processes .* or ray"):
        ExperimentPlan.from_mapping({**base, "attack-workers": "many"})


def test_the_scale_benchmark_writes_time_cpu_and_peak_memory_of_a_run(tmp_path):
    from experiments.bench.scale import main as bench_main

    table = tmp_path / "scale.csv"
    assert bench_main(["--clients", "20", "--fractions", "0.1", "--engine", "inprocess", "--csv", str(table)]) == 0
    (row,) = list(csv.DictReader(open(table)))
    assert int(row["clients"]) == 20 and float(row["fraction"]) == 0.1, row
    assert float(row["wall_s"]) > 0 and float(row["cpu_s"]) > 0 and float(row["peak_rss_gib"]) > 0.1, row
    assert int(row["attacks"]) == 2 and float(row["median_psnr_db"]) > 60, row  # the 2 sampled, by R-GAP
