"""The command line as a Flower user types it: Flower's key names as flags, ``--run-config`` in
Flower's syntax or a TOML file, ``--quiet`` and ``--log-level``, whole tables when the output is
not a terminal, ``--help`` without torch, and the first FedAvg attack command running with no
other flag."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from attacks import ACTIVE, ATTACKS
from experiments.cli import HELP_NAMES, given, help_defaults, plan_from_args, run_config
from experiments.deploy import build_parser as deploy_parser
from experiments.plan import default_mapping
from experiments.run import build_parser as run_parser
from experiments.run import main as run_main
from fl_sim.config import FAULTS
from fl_sim.device import DEVICES
from fl_sim.models import model_names
from fl_sim.settings import DEFENCES
from fl_sim.simulation import ENGINES

ROOT = Path(__file__).resolve().parents[1]
FLOWER_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_names_help_lists_are_the_registries():
    """--help lists names from plain data (no torch): each list is still its registry's."""
    assert HELP_NAMES == {
        "model": tuple(model_names()),
        "defences": tuple(DEFENCES),
        "faulty-clients": tuple(FAULTS),
        "attack": tuple(ATTACKS),
        "active-attack": tuple(ACTIVE),
        "device": tuple(DEVICES),
        "engine": tuple(ENGINES),
    }


def test_the_defaults_help_shows_are_the_plans():
    shown = help_defaults()
    assert shown == default_mapping()
    assert all(type(shown[k]) is type(v) for k, v in default_mapping().items())


def test_the_sweeps_preset_folder_is_the_specs():
    from experiments.sweep import __main__ as sweep_cli
    from experiments.sweep.spec import PRESETS

    assert sweep_cli.PRESETS == PRESETS and any(PRESETS.glob("*.toml"))


@pytest.mark.parametrize("module", ["run", "deploy", "sweep", "report"])
def test_help_imports_neither_torch_nor_flower_nor_pandas(module):
    """``python -m experiments.MODULE --help`` prints its usage and exits 0 having imported
    none of the heavy modules (they take seconds to import; --help must answer in under 1 s)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['x', '--help']\n"
        "try:\n"
        f"    runpy.run_module('experiments.{module}', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = ('torch', 'flwr', 'ray', 'pandas', 'matplotlib', 'numpy', 'rich')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m experiments." in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED []", done.stdout[-500:]


@pytest.mark.parametrize("build", [run_parser, deploy_parser], ids=["run", "deploy"])
def test_every_flower_run_config_key_is_a_flag(build):
    """Each key of [tool.flwr.app.config] is accepted as ``--KEY``, as an alias of its flag."""
    parser = build()
    options = {o for action in parser._actions for o in action.option_strings}
    assert {f"--{key}" for key in FLOWER_CONFIG} <= options


@pytest.mark.parametrize("build", [run_parser, deploy_parser], ids=["run", "deploy"])
def test_flowers_key_names_make_the_same_plan_as_the_flags(build):
    flower = ["--num-server-rounds", "3", "--num-clients", "5", "--fraction-train", "0.8"]
    flower += ["--defences", "prune:ratio=0.3", "--faulty-clients", "1:nan", "--attack", "dlg", "--observers", "server"]
    ours = ["--rounds", "3", "--clients", "5", "--fraction-train", "0.8"]
    ours += ["--defence", "prune:ratio=0.3", "--faulty-client", "1:nan", "--attack", "dlg", "--observer", "server"]
    a = plan_from_args(build().parse_args(flower), engine="simulation")
    b = plan_from_args(build().parse_args(ours), engine="simulation")
    assert a == b
    assert (a.fed.num_server_rounds, a.fed.num_clients, a.fed.faulty_clients) == (3, 5, "1:nan")


@pytest.mark.parametrize("build", [run_parser, deploy_parser], ids=["run", "deploy"])
def test_run_config_takes_flowers_syntax_and_a_toml_file(build, tmp_path):
    toml = tmp_path / "overrides.toml"
    toml.write_text('num-server-rounds = 3\nseed = 1\ndataset = "mnist5k"\n')
    for argv in (
        ["--run-config", "num-server-rounds=3 seed=1 dataset='mnist5k'"],
        ["--run-config", "num-server-rounds=3", "--run-config", "seed=1"],
        ["--run-config", str(toml)],
    ):
        parser = build()
        args = parser.parse_args(argv)
        extra = run_config(args, parser)
        assert given(args) == ({"num-clients": 3} if build is deploy_parser else {})  # deploy's own default
        plan = plan_from_args(args, engine="deployment", extra=extra)
        assert (plan.fed.num_server_rounds, plan.fed.seed, plan.fed.dataset) == (3, 1, "mnist5k"), argv


def test_log_level_is_case_blind_and_quiet_has_a_short_form():
    args = run_parser().parse_args(["--log-level", "debug", "-q"])
    assert args.log_level == "DEBUG" and args.quiet


def _errs(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_fedavg_attack_runs_with_no_other_flag_and_says_its_local_steps(tmp_path, capsys, monkeypatch):
    """``--mode fedavg --attack ig`` (shortened: 2 clients of 8 images, 1 round, the server
    only, 2 s per attack, inline) runs, says the preset's local steps in one line, attacks updates of
    2 local steps, and prints its tables whole although the output is no terminal."""
    monkeypatch.delenv("COLUMNS", raising=False)
    out = tmp_path / "run"
    argv = ["--mode", "fedavg", "--attack", "ig", "--clients", "2", "--samples-per-client", "8", "--rounds", "1"]
    argv += ["--observers", "server", "--attack-time-limit", "2", "--attack-workers", "0"]
    code = run_main([*argv, "--engine", "inprocess", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: FedAvg attack preset: 2 local steps of batch 1 per round, so an update holds 2 images, not a "
        "whole epoch's (--local-steps or --local-epochs to choose)"
    ]
    config = json.loads((out / "config.json").read_text())
    assert (config["mode"], config["local-steps"], config["batch-size"]) == ("fedavg", 2, 1)
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 2 and set(rows["local_steps"]) == {2} and set(rows["images"]) == {2}
    header = next(line for line in err.splitlines() if "observer" in line and "batch size told" in line)
    assert "…" not in header and "errors" in header  # rich cuts at 80 columns off a terminal unless told


def test_a_batch_larger_than_a_clients_images_is_said_in_one_line(tmp_path, capsys):
    """FedSGD with batch 2000 on clients of 1,000 images: the run says the batch is all of a
    client's images (the one batch_indices rebuilds: 1,000 images)."""
    from fl_sim.task import client_batch_indices

    out = tmp_path / "run"
    argv = ["--mode", "fedsgd", "--batch-size", "2000", "--clients", "4", "--rounds", "1", "--attack", "none"]
    code = run_main([*argv, "--engine", "inprocess", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: batch size 2000: each client holds 1000 images, so its batch is all of them"]
    plan = plan_from_args(run_parser().parse_args(argv), engine="simulation")
    assert len(client_batch_indices(plan.fed, 0, 4, 1)) == 1000


def test_quiet_prints_only_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--mode", "fedsgd", "--batch-size", "2000", "--clients", "2", "--rounds", "1", "--attack", "none"]
    code = run_main([*argv, "--samples-per-client", "10", "--engine", "inprocess", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert _errs(captured.err) == [f"run folder: {out}"] and captured.out == ""
    assert (out / "rounds.csv").is_file()
