"""The malicious server's hooks, through real Flower simulations (Ray)."""

import csv

import pytest
import torch

import attacks
from experiments.plan import ExperimentPlan
from experiments.runner import AttackRunner
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.intercepting_strategy import InterceptingStrategy
from fl_sim.models import build_model
from fl_sim.simulation import simulate
from fl_sim.task import batch_gradient, client_batch

pytestmark = pytest.mark.slow


class Boom(attacks.Attack):
    """An attack that always fails."""

    name = "boom"

    def _reconstruct(self, *args, **kwargs):
        raise RuntimeError("this attack always fails")


def _gradients(cfg, weights, pid, server_round):
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(weights)
    images, labels = client_batch(cfg, pid, cfg.num_clients, server_round)
    grads, _ = batch_gradient(model, images, labels)
    return dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One honest and one intercepted FedSGD run, same seed: 3 clients, 2 rounds."""
    base = tmp_path_factory.mktemp("hooks")
    cfg = RunConfig(mode="fedsgd", num_clients=3, num_server_rounds=2, batch_size=1, seed=5)
    simulate(cfg.replace(out_dir=str(base / "honest")))

    attacks.ATTACKS["boom"] = Boom
    try:
        plan = ExperimentPlan.from_mapping(
            {
                **cfg.to_flower(),
                "out-dir": str(base / "spied"),
                "attack": "boom,rgap",
                "attack-rounds": "1",
                "observers": "server,client",
                "attack-workers": 0,
            }
        )
        spied = plan.fed
        runner = AttackRunner(plan, base / "spied")
        seen, aggregates, sent_messages = [], [], []

        def wrap(honest):
            strategy = InterceptingStrategy(
                honest,
                kind="gradient",
                on_update=lambda u: (seen.append(u), runner.on_update(u)),
                on_aggregate=lambda a: (aggregates.append(a), runner.on_aggregate(a, observer="client")),
            )
            configure = strategy.configure_train

            def configure_train(server_round, arrays, config, grid):
                msgs = list(configure(server_round, arrays, config, grid))
                sent_messages.append((server_round, arrays.to_torch_state_dict(), msgs))
                return msgs

            strategy.configure_train = configure_train
            return strategy

        simulate(spied, wrap_strategy=wrap)
        runner.close()
    finally:
        del attacks.ATTACKS["boom"]
    return cfg, base, seen, aggregates, sent_messages, runner


def test_hook_sees_one_update_per_client_per_round(runs):
    cfg, _, seen, _, _, _ = runs
    assert sorted((u.server_round, u.partition_id) for u in seen) == [(r, p) for r in (1, 2) for p in range(3)]
    assert len({u.node_id for u in seen}) == 3
    # Each intercepted reply is that client's true gradient on the weights the server sent.
    for u in seen:
        expected = _gradients(cfg, u.sent, u.partition_id, u.server_round)
        for name, g in expected.items():
            torch.testing.assert_close(u.reply[name], g, rtol=1e-5, atol=1e-7)


def test_clients_receive_only_the_global_model(runs):
    _, _, seen, _, sent_messages, _ = runs
    for _round, global_weights, msgs in sent_messages:
        assert len(msgs) == 3
        for msg in msgs:
            arrays = msg.content["arrays"].to_torch_state_dict()
            assert arrays.keys() == global_weights.keys()
            for name, w in global_weights.items():
                assert torch.equal(arrays[name], w)
            # and never a client's update
            for u in seen:
                assert not any(torch.equal(arrays[n], u.reply[n]) for n in u.reply)


def test_spying_does_not_change_training(runs):
    _, base, _, _, _, _ = runs
    honest = torch.load(base / "honest" / "final_model.pt")
    spied = torch.load(base / "spied" / "final_model.pt")
    for name in honest:
        assert torch.equal(honest[name], spied[name]), name
    rounds = lambda p: [r["test_loss"] for r in csv.DictReader(open(p / "rounds.csv"))]  # noqa: E731
    assert rounds(base / "honest") == rounds(base / "spied")


def test_curious_client_sees_only_the_average(runs):
    cfg, _, seen, aggregates, _, _ = runs
    assert [a.server_round for a in aggregates] == [1, 2]
    for agg in aggregates:
        mean = {n: sum(_gradients(cfg, agg.before, p, agg.server_round)[n] for p in range(3)) / 3 for n in agg.before}
        for name in agg.before:
            torch.testing.assert_close(
                (agg.before[name] - agg.after[name]) / cfg.server_lr, mean[name], rtol=1e-4, atol=1e-6
            )


def test_failing_attack_leaves_training_and_other_rows(runs):
    cfg, base, _, _, _, runner = runs
    rows = list(csv.DictReader(open(base / "spied" / "results.csv")))
    boom_rows = [r for r in rows if r["attack"] == "boom"]
    rgap_rows = [r for r in rows if r["attack"] == "rgap"]
    # round 1 only: 3 server rows + 2 curious-client rows (the other two clients) per attack
    assert len(boom_rows) == 5 and all(r["status"] == "error" and "always fails" in r["reason"] for r in boom_rows)
    assert len(rgap_rows) == 5
    server = [float(r["psnr"]) for r in rgap_rows if r["observer"] == "server"]
    client = [float(r["psnr"]) for r in rgap_rows if r["observer"] == "client"]
    assert min(server) > 60, server  # the server recovers every client's image
    assert max(client) < 20, client  # the curious client recovers none
    assert all(
        r["attribution"] == "post-hoc" and r["batch_size_granted"] == "False"
        for r in rgap_rows
        if r["observer"] == "client"
    )
    assert len(list(csv.DictReader(open(base / "spied" / "rounds.csv")))) == 3


def test_the_servers_reconstructions_are_images_of_each_clients_own_partition(runs):
    """Independent of client_batch (which the clients and the referee share): the image R-GAP
    recovers from each intercepted gradient is, pixel for pixel, a training image of that
    client's own partition (computed here from the partition function alone)."""
    from fl_sim.data import partition

    cfg, base, _, _, _, _ = runs
    data = load_dataset(cfg.dataset)
    parts = partition(data.train_y, cfg.num_clients, cfg.partition, seed=cfg.seed)
    owner = {int(i): pid for pid, idx in enumerate(parts) for i in idx}
    flat = data.train_x.reshape(len(data.train_x), -1).float()
    checked = 0
    for path in sorted((base / "spied" / "reconstructions").glob("*-server-rgap-*.pt")):
        job = torch.load(path)
        (pid,) = job["owners"].tolist()
        recon = job["recon"][0].reshape(-1).float()  # uint8 as saved
        nearest = int(((flat - recon) ** 2).mean(dim=1).argmin())
        assert float(((flat[nearest] - recon) ** 2).mean()) < 1.0  # the same image (within rounding)
        assert owner[nearest] == pid
        checked += 1
    assert checked == cfg.num_clients
