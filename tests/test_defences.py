"""Each defence changes the update as its settings say, through the real component: our
pruning and noise mod, Flower's LocalDpMod, fixedclipping_mod and central-DP strategy
wrappers, Opacus's DP-SGD; and the accountants' epsilon is the accountants' own."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message_type import MessageType

from experiments.run import main as run_main
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset
from fl_sim.models import build_model
from fl_sim.mods.defences import defence_mod, defend_update
from fl_sim.privacy import dp_wrapper, privacy_spent
from fl_sim.settings import DPSGD, CentralDP, DefenceError, LocalDP, parse_defences
from fl_sim.task import batch_gradient, dp_batch_gradient, to_float


def _update(seed=0, n=20000):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(100, n // 100, generator=g), "b.bias": torch.randn(37, generator=g)}


def _norm(arrays) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in arrays.values()))


# ---- the specs ---------------------------------------------------------------------------


def test_specs_parse_to_typed_defences_in_order():
    ds = parse_defences("prune:ratio=0.3; noise:sigma=0.01 ;dpsgd:noise=1.1,clip=0.5")
    assert [d.name for d in ds] == ["prune", "noise", "dpsgd"]
    assert ds[2] == DPSGD(noise=1.1, clip=0.5)
    assert parse_defences("") == ()
    assert parse_defences(";".join(d.spec() for d in ds)) == ds  # spec() round-trips


@pytest.mark.parametrize(
    "spec,message",
    [
        ("magic", "unknown defence 'magic': choose one of prune, noise, ldp, central-dp, dpsgd"),
        ("prune", "prune: needs ratio=..."),
        ("prune:ratio=1.5", "prune: ratio must lie in [0, 1), got 1.5"),
        ("prune:ratio=x", "prune: ratio must be float, got 'x'"),
        ("prune:level=0.3", "prune: expected KEY=VALUE with KEY one of ratio, got 'level=0.3'"),
        ("prune:ratio=0.1,ratio=0.2", "prune: ratio given twice"),
        ("noise:sigma=-1", "noise: sigma must be a finite number >= 0, got -1.0"),
        ("ldp:clip=1,epsilon=0", "ldp: epsilon must be a finite number > 0, got 0.0"),
        ("central-dp:noise=1,clip=1,side=middle", "central-dp: side must be server or client, got 'middle'"),
        ("dpsgd:noise=1,clip=1,delta=2", "dpsgd: delta must lie in (0, 1), got 2.0"),
        ("dpsgd:noise=1,clip=1;dpsgd:noise=2,clip=1", "dpsgd is named twice"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(DefenceError) as exc:
        parse_defences(spec)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--defence", "magic"], "--defence: unknown defence 'magic'"),
        (["--defence", "prune:ratio=2"], "--defence: prune: ratio must lie in [0, 1), got 2.0"),
        (["--defence", "noise:std=1"], "--defence: noise: expected KEY=VALUE with KEY one of sigma"),
        (["--mode", "fedsgd", "--defence", "ldp:clip=1,epsilon=8"], "--defence: ldp clips the weight update"),
        (
            ["--attack", "rgap", "--defence", "central-dp:noise=1,clip=1"],
            "--defence: central-dp clips the weight update",
        ),
    ],
)
def test_the_run_refuses_a_bad_defence_with_one_line(argv, message, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ---- the client's own: pruning and noise -------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_pruning_zeroes_the_smallest_fraction_of_each_tensor(ratio):
    update = _update()
    out = defend_update(update, parse_defences(f"prune:ratio={ratio}"), seed=0, partition_id=0, server_round=1)
    for k, v in update.items():
        zero = out[k] == 0
        assert abs(zero.float().mean().item() - int(ratio * v.numel()) / v.numel()) < 1e-6
        assert v.abs()[zero].max() <= v.abs()[~zero].min()  # the smallest ones went
        assert torch.equal(out[k][~zero], v[~zero])  # the others are untouched


def test_noise_has_the_standard_deviation_asked_for_and_repeats_with_the_seed():
    update = _update()
    spec = parse_defences("noise:sigma=0.03")
    out = defend_update(update, spec, seed=4, partition_id=2, server_round=1)
    diff = torch.cat([(out[k] - update[k]).reshape(-1) for k in update])
    assert diff.std().item() == pytest.approx(0.03, rel=0.02) and abs(diff.mean().item()) < 0.03 * 0.02
    again = defend_update(update, spec, seed=4, partition_id=2, server_round=1)
    other = defend_update(update, spec, seed=4, partition_id=3, server_round=1)
    assert all(torch.equal(out[k], again[k]) for k in update)
    assert not torch.equal(out["a.weight"], other["a.weight"])  # each client its own noise


# ---- through Flower's mod chain ------------------------------------------------------------------


def _round_trip(defences: str, sent, returned, *, mode="fedavg", extra=None):
    """A real train Message through the ClientApp's defence mod; the reply that would leave."""
    cfg = RunConfig(mode=mode, local_steps=1, num_clients=4, defences=defences).validated()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in sent.items()}),
            "config": ConfigRecord({**cfg.to_flower(), "server-round": 1, **(extra or {})}),
        }
    )
    # as a SuperNode receives it: a delivered message, with its run and ids
    msg = Message(
        content,
        metadata=Metadata(
            run_id=1,
            message_id="m1",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600,
            message_type=MessageType.TRAIN,
        ),
    )
    ctx = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={}
    )

    def train(m, c):
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: v.clone() for k, v in returned.items()}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=m,
        )

    reply = defence_mod(msg, ctx, train)
    return reply.content["arrays"].to_torch_state_dict()


def test_fedavg_prune_mod_prunes_the_delta_not_the_weights():
    sent, delta = _update(1), _update(2)
    out = _round_trip("prune:ratio=0.5", sent, {k: sent[k] + delta[k] for k in sent})
    got = {k: out[k] - sent[k] for k in sent}
    frac = sum(int((v.abs() < 1e-6).sum()) for v in got.values()) / sum(v.numel() for v in got.values())
    assert frac == pytest.approx(0.5, abs=0.01)


def test_flowers_local_dp_mod_clips_and_adds_the_gaussian_mechanisms_noise():
    sent = _update(1)
    big = {k: sent[k] + 10 * v for k, v in _update(2).items()}  # delta norm ~ 1400, clipped to 0.5
    ldp = LocalDP(clip=0.5, epsilon=50.0)
    out = _round_trip(ldp.spec(), sent, big)
    noise = torch.cat([(out[k] - sent[k]).reshape(-1) for k in sent])  # clipped delta + noise
    # the clipped delta (norm 0.5 over 20,037 entries, ~0.0035 each) is small beside the noise
    assert ldp.noise_std == pytest.approx(0.5 * math.sqrt(2 * math.log(1.25e5)) / 50)
    assert noise.std().item() == pytest.approx(math.hypot(ldp.noise_std, 0.5 / math.sqrt(noise.numel())), rel=0.03)
    again = _round_trip(ldp.spec(), sent, big)  # seeded by (seed, client, round): the run repeats
    assert all(torch.equal(out[k], again[k]) for k in sent)


def test_flowers_fixedclipping_mod_clips_the_update_to_the_norm_under_client_side_central_dp():
    sent, spec = _update(1), "central-dp:noise=1,clip=0.25,side=client"
    # the norm comes from the server: Flower's client-side wrapper puts it in the train config
    norm = {"clipping_norm": 0.25}
    out = _round_trip(spec, sent, {k: sent[k] + v for k, v in _update(2).items()}, extra=norm)
    assert _norm({k: out[k] - sent[k] for k in sent}) == pytest.approx(0.25, rel=1e-5)
    small = {k: sent[k] + 1e-6 * v for k, v in _update(2).items()}  # below the norm: unchanged
    out = _round_trip(spec, sent, small, extra=norm)
    assert all(torch.allclose(out[k], small[k]) for k in sent)


def test_central_dp_wraps_the_strategy_in_flowers_own_classes():
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvg,
    )

    inner = FedAvg()
    server = dp_wrapper(inner, (CentralDP(noise=0.7, clip=2.0),), 5)
    client = dp_wrapper(inner, (CentralDP(noise=0.7, clip=2.0, side="client"),), 5)
    assert type(server) is DifferentialPrivacyServerSideFixedClipping and server.strategy is inner
    assert type(client) is DifferentialPrivacyClientSideFixedClipping
    assert (server.noise_multiplier, server.clipping_norm, server.num_sampled_clients) == (0.7, 2.0, 5)
    assert dp_wrapper(inner, parse_defences("prune:ratio=0.2"), 5) is inner


# ---- Opacus's DP-SGD --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    data = load_dataset("mnist5k")
    return to_float(data.train_x[:8]), data.train_y[:8], data


def test_dpsgd_clips_each_sample_and_adds_noise_of_std_noise_times_clip_over_batch(mnist):
    images, labels, data = mnist
    model = build_model("lenet", data.input_shape, data.num_classes, seed=0)
    plain, _ = batch_gradient(model, images[:1], labels[:1])
    clipped, _ = dp_batch_gradient(
        model, images[:1], labels[:1], noise=0.0, clip=1e-3, generator=torch.Generator().manual_seed(0)
    )
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert flat(plain).norm().item() > 1e-2  # so the clip binds
    assert flat(clipped).norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert torch.allclose(flat(clipped) / flat(clipped).norm(), flat(plain) / flat(plain).norm(), atol=1e-5)

    quiet, _ = dp_batch_gradient(model, images, labels, noise=0.0, clip=0.5, generator=torch.Generator().manual_seed(1))
    noisy, _ = dp_batch_gradient(model, images, labels, noise=2.0, clip=0.5, generator=torch.Generator().manual_seed(1))
    noise = flat(noisy) - flat(quiet)
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.03)
    # Opacus's hooks are gone: the model's plain gradient is what it was
    again, _ = batch_gradient(model, images[:1], labels[:1])
    assert torch.equal(flat(again), flat(plain))


def test_epsilon_comes_from_the_accountants():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    sizes = [1000, 1250]
    [g] = privacy_spent(
        (DPSGD(noise=1.1, clip=1.0),),
        rounds=5,
        num_clients=4,
        clients_per_round=4,
        partition_sizes=sizes,
        batch_size=10,
        steps_per_round=20,
    )
    # the worst client (the smallest partition) at 100 steps; Opacus's inverse gives the noise back
    acc = RDPAccountant()
    acc.history = [(1.1, 10 / 1000, 100)]
    assert g["epsilon"] == pytest.approx(acc.get_epsilon(1e-5)) and g["level"] == "sample"
    assert get_noise_multiplier(
        target_epsilon=g["epsilon"], target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp"
    ) == pytest.approx(1.1, abs=0.02)

    [c1] = privacy_spent(
        (CentralDP(noise=1.0, clip=1.0),),
        rounds=2,
        num_clients=4,
        clients_per_round=4,
        partition_sizes=sizes,
        batch_size=1,
        steps_per_round=1,
    )
    [c2] = privacy_spent(
        (CentralDP(noise=2.0, clip=1.0),),
        rounds=2,
        num_clients=4,
        clients_per_round=4,
        partition_sizes=sizes,
        batch_size=1,
        steps_per_round=1,
    )
    assert c1["accountant"] == "flwr RdpAccountant" and c2["epsilon"] < c1["epsilon"]
    [none] = privacy_spent(
        parse_defences("prune:ratio=0.2;noise:sigma=0.1"),
        rounds=2,
        num_clients=4,
        clients_per_round=4,
        partition_sizes=sizes,
        batch_size=1,
        steps_per_round=1,
    ) or [None]
    assert none is None  # pruning and plain noise are not DP: no epsilon


# ---- in a federation: whom each defence stops ------------------------------------------------------


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_central_dp_noise_is_added_at_aggregation_after_the_server_saw_the_updates(tmp_path):
    """Server-side central DP, one FedAvg round: the server's R-GAP still recovers every
    client's image from the raw replies, and the global model moved by the noise Flower's
    wrapper adds (std noise * clip / clients), not by the clipped updates."""
    out = tmp_path / "run"
    assert (
        run_main(
            [
                "--attack",
                "rgap",
                "--observers",
                "server",
                "--mode",
                "fedavg",
                "--local-steps",
                "1",
                "--rounds",
                "1",
                "--defence",
                "central-dp:noise=1,clip=1e-4,side=server",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out / "results.csv")
    assert len(rows) == 4 and all(float(r["psnr"]) > 40 for r in rows)
    cfg = RunConfig.from_mapping(json.loads((out / "config.json").read_text()))
    data = load_dataset(cfg.dataset)
    start = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed).state_dict()
    final = torch.load(out / "final_model.pt")
    moved = torch.cat([(final[k] - start[k]).reshape(-1) for k in start])
    assert moved.std().item() == pytest.approx(1.0 * 1e-4 / 4, rel=0.05)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["guarantees"][0]["accountant"] == "flwr RdpAccountant"


def test_a_local_dp_federation_repeats_on_the_inprocess_engine(tmp_path):
    """Flower's LocalDpMod draws its noise from numpy's global generator; on the in-process
    engine three clients train at once in one process, and the run must still repeat: the same
    final model twice, and not the model of a run without the noise."""
    common = [
        "--attack",
        "none",
        "--mode",
        "fedavg",
        "--local-steps",
        "1",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--engine",
        "inprocess",
    ]
    models = []
    for name, defence in (
        ("a", ["--defence", "ldp:clip=1,epsilon=8"]),
        ("b", ["--defence", "ldp:clip=1,epsilon=8"]),
        ("plain", []),
    ):
        assert run_main([*common, *defence, "--out", str(tmp_path / name)]) == 0
        models.append(torch.load(tmp_path / name / "final_model.pt"))
    a, b, plain = models
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)
