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
        ({"attack": "rgap", "mode": "fedavg"}, "attack"),  # R-GAP inverts one sample's gradient, not local steps
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
    assert every.fed.model == "cnn6" and set(every.attack.attacks) == {"dlg", "idlg", "rgap", "ig"}
    paper = ExperimentPlan.from_mapping({"attack": "dlg"})
    assert (paper.fed.model, paper.fed.num_clients, paper.attack.rounds) == ("lenet", 4, {1})
    for preset in (None, "demo"):
        plain = ExperimentPlan.from_mapping({"attack": "none"}, preset=preset)
        assert plain.attack is None and plain.fed.mode == "fedavg" and plain.fed.num_server_rounds == 5
    with pytest.raises(ConfigError, match="unknown preset"):
        ExperimentPlan.from_mapping({}, preset="nope")


def test_fedavg_attacks_and_what_applies():
    """Several local steps (or epochs): ig, dlg and idlg apply, R-GAP does not (named: refused;
    in all: left out); one local step is a gradient, so R-GAP applies."""
    many = ExperimentPlan.from_mapping({"attack": "all", "mode": "fedavg", "local-epochs": 2})
    assert set(many.attack.attacks) == {"dlg", "idlg", "ig"}
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
