"""The experiment plan: one source of defaults, one set of rules for every entry point."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from experiments import deploy, run
from experiments.cli import PLAN_FLAGS, plan_from_args
from experiments.plan import ATTACK_PRESET, ConfigError, ExperimentPlan, default_mapping

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_holds_the_plans_defaults():
    """[tool.flwr.app.config] (what a deployment's ServerApp reads) has every plan key, with the
    plan's default and type, and nothing else but the invocation key ``resume``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = default_mapping()
    assert set(config) == set(defaults) | {"resume"}
    for key, value in defaults.items():
        assert config[key] == value and type(config[key]) is type(value), key


def test_every_plan_key_has_one_flag():
    keys = [f.key for f in PLAN_FLAGS]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(default_mapping()) - {"out-dir"}


def test_mapping_round_trip():
    plan = ExperimentPlan.from_mapping(
        {
            "attack": "dlg,rgap",
            "observers": "server,client",
            "attack-rounds": "1,2",
            "grant-labels": True,
            "faulty-clients": "1:nan",
        }
    )
    again = ExperimentPlan.from_mapping(plan.to_mapping())
    assert again == plan
    assert plan.attack.attacks == ("dlg", "rgap") and plan.attack.rounds == {1, 2} and plan.attack.grant_labels


def test_an_attack_takes_the_papers_fedsgd_setting_unless_told_otherwise():
    plan = ExperimentPlan.from_mapping({"attack": "rgap"})
    assert {k: plan.to_mapping()[k] for k in ATTACK_PRESET} == ATTACK_PRESET
    assert plan.attack.observers == ("server", "client", "secagg")
    told = ExperimentPlan.from_mapping({"attack": "rgap", "model": "cnn6", "num-clients": 5})
    assert (told.fed.model, told.fed.num_clients, told.fed.batch_size) == ("cnn6", 5, 1)
    honest = ExperimentPlan.from_mapping({})
    assert honest.attack is None and honest.fed.mode == "fedavg" and honest.fed.num_clients == 10


def test_all_observers_means_what_the_engine_can_run():
    sim = ExperimentPlan.from_mapping({"attack": "rgap"}, engine="simulation")
    dep = ExperimentPlan.from_mapping({"attack": "rgap"}, engine="deployment")
    assert sim.attack.observers == ("server", "client", "secagg") and dep.attack.observers == ("server", "client")
    with pytest.raises(ConfigError) as err:
        ExperimentPlan.from_mapping({"attack": "rgap", "observers": "secagg"}, engine="deployment")
    assert err.value.key == "observers"


@pytest.mark.parametrize(
    "values,key",
    [
        ({"attack": "rgap", "num-clients": 2}, "observers"),
        ({"attack": "rgap", "num-clients": 4, "fraction-train": 0.5}, "observers"),  # 2 clients per round
        # R-GAP inverts one sample's gradient, not local steps (the steps given: the preset takes 1)
        ({"attack": "rgap", "mode": "fedavg", "local-steps": 2}, "attack"),
        ({"attack": "rgap", "mode": "fedavg", "local-epochs": 1}, "attack"),
        ({"attack": "ig", "grant-batch-order": True}, "grant-batch-order"),  # FedSGD has no local batches
        ({"attack": "rgap", "observers": "secagg", "num-clients": 1, "min-clients": 1}, "observers"),
        ({"attack": "rgap", "attack-rounds": "0"}, "attack-rounds"),
        ({"no-such-key": 1}, "no-such-key"),
        ({"seed": -1}, "seed"),
        ({"faulty-clients": "3:melt"}, "faulty-clients"),
    ],
)
def test_rules_name_the_key_at_fault(values, key):
    with pytest.raises(ConfigError) as err:
        ExperimentPlan.from_mapping(values)
    assert err.value.key == key


def test_a_silent_client_shortens_the_round_timeout_unless_told():
    assert ExperimentPlan.from_mapping({"faulty-clients": "1:silent"}).fed.round_timeout == 30.0
    assert ExperimentPlan.from_mapping({"faulty-clients": "1:silent", "round-timeout": 9}).fed.round_timeout == 9.0


def test_run_and_deploy_build_the_same_plan_from_the_same_flags():
    """Both command lines go through one flag table and one plan: the same flags give the
    same plan (the deployment differs only in what its engine can run)."""
    argv = [
        "--attack",
        "rgap,dlg",
        "--clients",
        "4",
        "--rounds",
        "3",
        "--observers",
        "server,client",
        "--attack-rounds",
        "1,3",
        "--batch-size",
        "2",
        "--faulty-client",
        "2:nan",
        "--grant-batch-size",
        "none",
    ]
    simulated = plan_from_args(run.build_parser().parse_args(argv), engine="simulation")
    deployed = plan_from_args(deploy.build_parser().parse_args(argv), engine="deployment")
    assert simulated == deployed
    assert simulated.fed.faulty_clients == "2:nan" and simulated.attack.grant_batch_size == "none"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--attack", "rgap", "--clients", "2", "--observers", "server,client"], "needs >= 3 clients per round"),
        (
            ["--attack", "none", "--clients", "2", "--observers", "server,client"],
            "--observers: has no effect without an attack",
        ),
    ],
)
def test_run_and_deploy_refuse_alike(argv, message, capsys):
    lines = []
    for main in (run.main, deploy.main):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        lines.append(capsys.readouterr().err.split("error: ", 1)[1])
        assert code == 2
    assert lines[0] == lines[1] and message in lines[0]


def test_presets_fill_what_the_command_line_leaves_out():
    """Without an attack, experiments.run runs the demo; a named attack brings the papers'
    setting unless the demo preset is chosen; attack none is plain training either way."""
    demo = plan_from_args(run.build_parser().parse_args([]), engine="simulation", preset="demo")
    assert demo.attack.attacks == ("rgap",) and demo.attack.observers == ("server", "client")
    assert (demo.fed.mode, demo.fed.model, demo.fed.num_clients, demo.fed.num_server_rounds) == (
        "fedsgd",
        "cnn6",
        10,
        150,
    )
    assert demo.attack.rounds == {1, 75, 150}
    shorter = ExperimentPlan.from_mapping({"num-server-rounds": 20}, preset="demo")
    assert shorter.attack.rounds == {1, 10, 20}  # spread: first, middle, last
    every = ExperimentPlan.from_mapping({"attack": "all", "observers": "server"}, preset="demo")
    assert every.fed.model == "cnn6" and set(every.attack.attacks) == {"dlg", "idlg", "rgap", "ig", "gradinversion"}
    paper = ExperimentPlan.from_mapping({"attack": "dlg"})
    assert (paper.fed.model, paper.fed.num_clients, paper.attack.rounds) == ("lenet", 4, {1})
    for preset in (None, "demo"):
        plain = ExperimentPlan.from_mapping({"attack": "none"}, preset=preset)
        assert plain.attack is None and plain.fed.mode == "fedavg" and plain.fed.num_server_rounds == 5
    with pytest.raises(ConfigError, match="unknown preset"):
        ExperimentPlan.from_mapping({}, preset="nope")


def test_fedavg_attacks_and_what_applies():
    """Several local steps (or epochs): ig, dlg, idlg, gradinversion and fedavg-sim apply, R-GAP does not
    (named: refused; in all: left out); one local step is a gradient, so R-GAP applies."""
    many = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedavg", "local-epochs": 2})
    assert set(many.attack.attacks) == {"dlg", "idlg", "ig", "gradinversion", "fedavg-sim"}
    one = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedavg", "local-steps": 1})
    assert "rgap" in one.attack.attacks
    with pytest.raises(ConfigError, match="rgap inverts one sample's gradient") as err:
        ExperimentPlan.from_mapping({"attack": "ig,rgap", "mode": "fedavg", "local-steps": 5})
    assert err.value.key == "attack"
    granted = ExperimentPlan.from_mapping(
        {"attack": "ig", "mode": "fedavg", "local-steps": 5, "grant-batch-order": True}
    )
    assert granted.attack.grant_order and granted.to_mapping()["grant-batch-order"] is True
    assert ExperimentPlan.from_mapping(granted.to_mapping()) == granted


def test_fedavg_sim_reads_fedavg_weight_deltas_and_only_the_servers_view():
    """fedavg-sim simulates one FedAvg client's local training: in "all" only for mode fedavg,
    named under FedSGD refused; among the observers only the server (one client's own update)
    runs it, "all" observers with fedavg-sim alone is the server, and a named aggregate
    observer left without any attack is refused."""
    fedsgd = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedsgd"})
    assert "fedavg-sim" not in fedsgd.attack.attacks
    with pytest.raises(ConfigError, match="fedavg-sim simulates a FedAvg client's local training") as err:
        ExperimentPlan.from_mapping({"attack": "fedavg-sim"})  # the papers' FedSGD preset
    assert err.value.key == "attack" and "\n" not in str(err.value)
    alone = ExperimentPlan.from_mapping({"attack": "fedavg-sim", "mode": "fedavg", "num-clients": 2})
    assert alone.attack.attacks == ("fedavg-sim",) and alone.attack.observers == ("server",)
    every = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedavg", "observers": "all"})
    assert every.attack.observers == ("server", "client", "secagg")
    assert every.attack.attacks_for("server") == ("dlg", "idlg", "ig", "gradinversion", "fedavg-sim")
    assert (
        every.attack.attacks_for("client")
        == every.attack.attacks_for("secagg")
        == ("dlg", "idlg", "ig", "gradinversion")
    )
    with pytest.raises(ConfigError, match="the client observer sees an aggregate") as err:
        ExperimentPlan.from_mapping({"attack": "fedavg-sim", "mode": "fedavg", "observers": "server,client"})
    assert err.value.key == "observers"
    mixed = ExperimentPlan.from_mapping({"attack": "fedavg-sim,ig", "mode": "fedavg", "observers": "server,secagg"})
    assert mixed.attack.attacks_for("secagg") == ("ig",) and ExperimentPlan.from_mapping(mixed.to_mapping()) == mixed


def test_samples_per_client_keeps_a_seeded_nested_choice_of_each_partition():
    """--samples-per-client N: each client trains on N images of its partition, a seeded
    choice (the first N of a seeded order: nested in N + 10, not one class of a dataset stored
    class by class); its FedAvg schedule and reply count use them; too many for a partition,
    or a negative N, is refused naming the key."""
    from fl_sim.task import client_indices, client_round, local_schedule

    plan = ExperimentPlan.from_mapping(
        {"attack": "fedavg-sim", "mode": "fedavg", "num-clients": 2, "local-epochs": 5, "batch-size": 5}
        | {"samples-per-client": 50, "model": "cnn6", "init": "kaiming", "lr": 0.004}
    )
    data = plan.check_data()
    c = plan.fed
    assert c.samples_per_client == 50 and ExperimentPlan.from_mapping(plan.to_mapping()) == plan
    full = client_indices(c.replace(samples_per_client=0), 0, 2)
    mine = client_indices(c, 0, 2)
    assert len(full) == 2000 and len(mine) == 50 and set(mine) <= set(full)
    assert set(mine) <= set(client_indices(c.replace(samples_per_client=60), 0, 2))
    assert len(set(mine) & set(client_indices(c, 1, 2))) == 0
    assert len(data.train_y[mine].unique()) >= 8  # a random choice, not the first class
    assert list(mine) == list(client_indices(c, 0, 2))  # seeded
    batches = local_schedule(c, 0, 2, 1)
    assert len(batches) == 50 and sorted({int(i) for b in batches for i in b}) == sorted(mine.tolist())
    from fl_sim.models import build_model

    model = build_model("cnn6", data.input_shape, data.num_classes, init="kaiming", seed=0)
    update = client_round(c, 0, 1, data, model)
    assert (update.num_examples, update.steps) == (50, 50)
    with pytest.raises(ConfigError, match=r"must be >= 1 \(or 0: all of the partition\), got -1") as err:
        ExperimentPlan.from_mapping({"samples-per-client": -1})
    assert err.value.key == "samples-per-client"
    with pytest.raises(ConfigError, match="client 0 holds 2000 training images under this partition, fewer than 3000"):
        ExperimentPlan.from_mapping({"num-clients": 2, "samples-per-client": 3000}).check_data()


def test_a_fedavg_attack_preset_takes_local_steps_an_attack_reads_and_says_so():
    """--mode fedavg with an attack and no local schedule: 2 local steps (1 for R-GAP), one
    note line; a schedule the user gives wins, and so does its refusal."""
    ig = ExperimentPlan.from_mapping({"attack": "ig", "mode": "fedavg"})
    assert (ig.fed.local_steps, ig.fed.batch_size) == (2, 1) and len(ig.notes) == 1
    assert ig.notes[0].startswith("FedAvg attack preset: 2 local steps of batch 1 per round")
    ig.check_data()  # 2 images per update: no refusal
    rgap = ExperimentPlan.from_mapping({"attack": "rgap", "mode": "fedavg"})
    assert rgap.fed.local_steps == 1 and rgap.attack.attacks == ("rgap",) and "R-GAP" in rgap.notes[0]
    every = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedavg"})
    assert every.fed.local_steps == 2 and "rgap" not in every.attack.attacks and "fedavg-sim" in every.attack.attacks
    wide = ExperimentPlan.from_mapping({"attack": "ig", "mode": "fedavg", "batch-size": 64})
    assert wide.fed.local_steps == 1  # 2 steps of 64 would be 128 images, over MAX_UPDATE_IMAGES
    told = ExperimentPlan.from_mapping({"attack": "ig", "mode": "fedavg", "local-steps": 5})
    assert told.fed.local_steps == 5 and told.notes == ()
    epochs = ExperimentPlan.from_mapping({"attack": "ig", "mode": "fedavg", "local-epochs": 1})
    assert epochs.fed.local_steps == 0 and epochs.notes == ()
    with pytest.raises(ConfigError) as err:
        epochs.check_data()
    assert err.value.key == "local-epochs" and "1000 images" in err.value.problem
    for plain in ({"mode": "fedavg"}, {"attack": "ig"}, {"attack": "none", "mode": "fedavg"}):
        plan = ExperimentPlan.from_mapping(plain)
        assert plan.notes == () and plan.fed.local_steps == 0, plain


def test_a_batch_above_a_clients_images_is_one_note_of_check_data():
    even = ExperimentPlan.from_mapping({"mode": "fedsgd", "batch-size": 2000, "num-clients": 4}).check_data()
    assert even.notes == ("batch size 2000: each client holds 1000 images, so its batch is all of them",)
    skewed = ExperimentPlan.from_mapping(
        {"mode": "fedsgd", "batch-size": 2000, "num-clients": 4, "partition": "dirichlet"}
    ).check_data()
    assert len(skewed.notes) == 1 and skewed.notes[0].startswith("batch size 2000: every client holds fewer images (")
    assert (
        ExperimentPlan.from_mapping({"mode": "fedsgd", "batch-size": 1000, "num-clients": 4}).check_data().notes == ()
    )
