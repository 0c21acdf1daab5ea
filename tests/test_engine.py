"""The in-process engine (fl_sim.engine): the real apps in one process, as they run under Ray.

One test runs the same federation on Ray and in process and compares the end; the others run
in process only (seconds each, no Ray start).
"""

from __future__ import annotations

import csv
import threading
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fl_sim import secagg
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.engine import InProcessGrid, node_ids, run_inprocess
from fl_sim.models import build_model
from fl_sim.simulation import run_apps, simulate
from fl_sim.task import batch_gradient, client_batch


@pytest.fixture(autouse=True, scope="module")
def _dataset_loaded():
    """mnist5k loaded once (it is cached per process, and takes seconds to load): the tests'
    own times, and the silent client's bounds, are the federations'."""
    load_dataset(RunConfig().dataset, RunConfig().data_root)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _small(tmp_path, name: str = "run", **kwargs) -> RunConfig:
    """A small FedSGD federation: 3 clients, 1 round, unless ``kwargs`` say otherwise."""
    cfg = RunConfig(mode="fedsgd", num_clients=3, num_server_rounds=1, batch_size=16, out_dir=str(tmp_path / name))
    return cfg.replace(**kwargs)


@pytest.mark.slow
def test_inprocess_and_ray_end_at_the_same_model_and_accuracies(tmp_path):
    cfg = RunConfig(
        mode="fedavg", num_clients=3, num_server_rounds=2, batch_size=16, local_steps=3, fraction_evaluate=1.0, seed=3
    )
    ends = {}
    for engine in ("inprocess", "ray"):
        out = tmp_path / engine
        simulate(cfg.replace(out_dir=str(out)), engine=engine)
        ends[engine] = (torch.load(out / "final_model.pt"), _rows(out / "rounds.csv"))
    (model, rounds), (ray_model, ray_rounds) = ends["inprocess"], ends["ray"]
    assert list(model) == list(ray_model)
    # HonestFedAvg sums the replies in partition order, so the two agree bit for bit when a Ray
    # actor and a worker thread compute alike; the tolerance leaves room for the last bits only
    for name in model:
        assert torch.allclose(model[name], ray_model[name], rtol=1e-6, atol=1e-7), name
    assert [(r["round"], r["test_accuracy"], r["aggregated"], r["dropped"]) for r in rounds] == [
        (r["round"], r["test_accuracy"], r["aggregated"], r["dropped"]) for r in ray_rounds
    ]
    assert [r["round"] for r in rounds] == ["0", "1", "2"] and rounds[-1]["aggregated"] == "3"
    for mine, ray in zip(rounds, ray_rounds):
        assert float(mine["test_loss"]) == pytest.approx(float(ray["test_loss"]), rel=1e-5)


def _probe_apps(seen: dict) -> tuple[ServerApp, ClientApp]:
    """A ServerApp that sends two rounds of train messages to every node, and a ClientApp
    that reports what it got (its node config, its context, the message's metadata),
    counts its rounds in its context's state, and scribbles on the message it was handed."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        count = int(context.state["probe"]["count"]) + 1 if "probe" in context.state else 1
        context.state["probe"] = ConfigRecord({"count": count})
        msg.content["config"]["tag"] = "scribbled by the client"
        msg.content["arrays"]["w"] = ArrayRecord({"w": torch.full((2,), -1.0)})["w"]
        meta = msg.metadata
        metrics = MetricRecord(
            {
                "partition-id": int(context.node_config["partition-id"]),
                "num-partitions": int(context.node_config["num-partitions"]),
                "count": count,
                "node-id-matches": int(context.node_id == meta.dst_node_id),
                "delivered": int(meta.delivered_at != ""),
                "run-config": int(context.run_config["probe"]),
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        seen.update(
            run_config=dict(context.run_config), run_id=grid.run.run_id, nodes=list(grid.get_node_ids()), rounds=[]
        )
        for server_round in (1, 2):
            sent = [
                Message(
                    RecordDict(
                        {"config": ConfigRecord({"tag": "the server's"}), "arrays": ArrayRecord({"w": torch.ones(2)})}
                    ),
                    dst_node_id=nid,
                    message_type="train",
                    group_id=str(server_round),
                )
                for nid in seen["nodes"]
            ]
            replies = list(grid.send_and_receive(sent, timeout=30))
            seen["rounds"].append((sent, replies))
        seen["contexts"] = [grid.node_context(nid) for nid in seen["nodes"]] if isinstance(grid, InProcessGrid) else []

    return server_app, client_app


def test_grid_delivers_serialised_copies_with_superlink_metadata_and_keeps_each_nodes_context():
    seen: dict = {}
    server_context = run_inprocess(*_probe_apps(seen), 3, run_config={"probe": 7}, seed=5)

    assert seen["nodes"] == node_ids(3, seed=5) and len(set(seen["nodes"])) == 3
    assert all(nid not in (0, SUPERLINK_NODE_ID) and 0 < nid < 2**64 for nid in seen["nodes"])
    assert seen["run_config"] == {"probe": 7} and server_context.run_id == seen["run_id"]
    for server_round, (sent, replies) in enumerate(seen["rounds"], start=1):
        assert len(replies) == 3 and not any(r.has_error() for r in replies)
        by_id = {m.metadata.message_id: m for m in sent}
        assert len(by_id) == 3 and all(m.metadata.run_id == seen["run_id"] for m in sent)
        assert all(m.metadata.src_node_id == SUPERLINK_NODE_ID for m in sent)
        for reply in replies:
            meta = reply.metadata
            ins = by_id[meta.reply_to_message_id]
            assert meta.src_node_id == ins.metadata.dst_node_id and meta.dst_node_id == SUPERLINK_NODE_ID
            assert meta.run_id == seen["run_id"] and meta.message_id not in ("", ins.metadata.message_id)
            assert meta.group_id == str(server_round) and meta.delivered_at != ""
            m = reply.content["metrics"]
            assert (m["count"], m["num-partitions"], m["node-id-matches"], m["delivered"], m["run-config"]) == (
                server_round,
                3,
                1,
                1,
                7,
            )
        assert sorted(r.content["metrics"]["partition-id"] for r in replies) == [0, 1, 2]
        # what the client changed of its copy never reached the server's message
        assert all(m.content["config"]["tag"] == "the server's" for m in sent)
        assert all(torch.equal(m.content["arrays"].to_torch_state_dict()["w"], torch.ones(2)) for m in sent)
    assert [int(c.state["probe"]["count"]) for c in seen["contexts"]] == [2, 2, 2]
    assert {int(c.node_config["partition-id"]) for c in seen["contexts"]} == {0, 1, 2}

    again: dict = {}
    assert run_inprocess(*_probe_apps(again), 3, run_config={"probe": 7}, seed=5).run_id == server_context.run_id
    assert again["nodes"] == seen["nodes"]  # seeded: the same ids run after run


def test_a_client_that_raises_is_dropped_with_its_reason_as_a_flower_error_reply_and_the_run_finishes(tmp_path):
    cfg = _small(tmp_path, num_server_rounds=2, faulty_clients="1:error")
    errors = []

    def keep_errors(strategy):
        aggregate = strategy.aggregate_train

        def aggregate_train(server_round, msgs):
            msgs = list(msgs)
            errors.extend(m.error for m in msgs if m.has_error())
            return aggregate(server_round, msgs)

        strategy.aggregate_train = aggregate_train
        return strategy

    simulate(cfg, engine="inprocess", wrap_strategy=keep_errors)

    assert [(int(r["round"]), r["aggregated"], r["dropped"]) for r in _rows(tmp_path / "run" / "rounds.csv")] == [
        (0, "", ""),
        (1, "2", "1"),
        (2, "2", "1"),
    ]
    dropped = _rows(tmp_path / "run" / "dropped.csv")
    assert [(d["round"], d["status"]) for d in dropped] == [("1", "error"), ("2", "error")]
    assert all("injected fault: this client is configured to fail" in d["reason"] for d in dropped)
    # the reply Flower's simulation backend makes of a ClientApp's exception
    assert len(errors) == 2 and all(e.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for e in errors)
    assert all(
        e.reason.startswith(
            "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
            "ClientAppException occurred. Message: injected fault"
        )
        for e in errors
    )


def test_a_silent_client_is_missing_after_the_round_timeout_and_neither_the_run_nor_the_next_waits_for_it(tmp_path):
    timeout = 3.0  # the silent client sleeps timeout + 5 s
    cfg = _small(tmp_path, faulty_clients="2:silent", round_timeout=timeout)
    start = time.monotonic()
    simulate(cfg, engine="inprocess")
    took = time.monotonic() - start

    assert timeout <= took < timeout + 5.0  # it waited out the round, not the client sleeping timeout + 5 s
    assert [(r["round"], r["aggregated"], r["dropped"]) for r in _rows(tmp_path / "run" / "rounds.csv")] == [
        ("0", "", ""),
        ("1", "2", "1"),
    ]
    (dropped,) = _rows(tmp_path / "run" / "dropped.csv")
    assert (dropped["round"], dropped["status"], dropped["reason"]) == (
        "1",
        "missing",
        "no reply before the round timed out",
    )
    stragglers = [t for t in threading.enumerate() if t.name.startswith("fl-sim-node") and t.is_alive()]
    assert stragglers and all(t.daemon for t in stragglers)  # still asleep, and unable to hold the process

    start = time.monotonic()
    simulate(_small(tmp_path, "next"), engine="inprocess")  # a new run while the silent client sleeps
    assert time.monotonic() - start < timeout + 2.0  # its own workers: none of them is the sleeping one
    assert _rows(tmp_path / "next" / "rounds.csv")[-1]["aggregated"] == "3"


def test_secagg_on_the_inprocess_engine_aggregates_the_mean_gradient(tmp_path):
    cfg = RunConfig(
        mode="fedsgd", num_clients=4, num_server_rounds=1, batch_size=2, server_lr=0.05, out_dir=str(tmp_path)
    )
    aggregates = []
    secagg.simulate_secagg(cfg, on_aggregate=aggregates.append, engine="inprocess")

    (agg,) = aggregates
    data = load_dataset(cfg.dataset, cfg.data_root)
    assert agg.contributors == ((0, 2), (1, 2), (2, 2), (3, 2))
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(agg.before)
    names = [n for n, _ in model.named_parameters()]
    grads = [batch_gradient(model, *client_batch(cfg, pid, cfg.num_clients, 1))[0] for pid in range(4)]
    mean = torch.cat([sum(g[i] for g in grads).flatten().double() / 4 for i in range(len(names))])
    recovered = torch.cat([((agg.before[n] - agg.after[n]) / cfg.server_lr).flatten().double() for n in names])
    err, rel = (recovered - mean).abs().max().item(), ((recovered - mean).norm() / mean.norm()).item()
    assert err < 1e-3 and rel < 1e-3, (err, rel)  # test_secagg's tolerance
    rounds = _rows(tmp_path / "rounds.csv")
    assert [(r["round"], r["aggregated"], r["dropped"]) for r in rounds] == [("0", "", ""), ("1", "4", "0")]


def _new_thread_count() -> int:
    """torch's thread count in a thread started now (torch.set_num_threads in any thread sets it)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return out[0]


def test_an_inprocess_run_leaves_torch_threads_and_flowers_task_identity_as_they_were(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    during = []
    try:
        assert _new_thread_count() == 2
        simulate(
            _small(tmp_path, num_clients=2),
            engine="inprocess",
            on_round=lambda row: during.append((torch.get_num_threads(), _new_thread_count())),
        )
        assert during[-1] == (2, 1)  # the clients' torch.set_num_threads(1) reached the threads started after it
        assert (torch.get_num_threads(), _new_thread_count()) == (2, 2)
        assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == identity
    finally:
        torch.set_num_threads(before)


def test_an_exception_in_the_server_apps_main_reaches_the_caller_and_threads_are_restored():
    class Boom(RuntimeError):
        pass

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        raise Boom("the server gave up")

    threads = torch.get_num_threads()
    with pytest.raises(Boom, match="the server gave up"):
        run_inprocess(server_app, ClientApp(), 2)
    assert torch.get_num_threads() == threads


def test_fl_sim_engine_bogus_is_a_one_line_value_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_SIM_ENGINE", "bogus")
    with pytest.raises(ValueError, match="FL_SIM_ENGINE must be one of ray, inprocess, got 'bogus'") as raised:
        simulate(RunConfig(num_clients=2, out_dir=str(tmp_path)))
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="engine must be one of ray, inprocess, got 'spark'") as raised:
        run_apps(ServerApp(), ClientApp(), 2, engine="spark")
    assert "\n" not in str(raised.value)


def test_fl_sim_engine_inprocess_sends_run_apps_without_an_engine_to_the_inprocess_engine(monkeypatch):
    import fl_sim.simulation

    calls = []
    monkeypatch.setattr(fl_sim.simulation, "run_inprocess", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("FL_SIM_ENGINE", "inprocess")
    server_app, client_app = ServerApp(), ClientApp()
    run_apps(server_app, client_app, 4)
    assert calls == [((server_app, client_app, 4), {"verbose": False})]
