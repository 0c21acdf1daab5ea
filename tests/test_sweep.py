"""Sweeps: the presets parse and every cell is a valid plan; a bad SPEC is one line and exit 2;
a small grid of each preset is a valid sweep, and those of three presets (dlg-defences, dp,
pooling) run real Flower federations (attacked and trained) and write their tables, figures and
summary; a sweep killed mid-way resumes with only what was left."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.plan import ExperimentPlan
from experiments.report.__main__ import main as report_main
from experiments.sweep.__main__ import main as sweep_main
from experiments.sweep.runner import run_sweep
from experiments.sweep.spec import PRESETS, load_spec

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_test150.npz"


def test_every_preset_parses_and_each_cell_is_a_valid_plan():
    counts = {}
    for path in sorted(PRESETS.glob("*.toml")):
        spec = load_spec(path.stem)
        cells = spec.cells()
        counts[spec.name] = len(cells)
        for cell in cells:
            ExperimentPlan.from_mapping(cell.attack)  # raises on a rule the preset breaks
            if cell.train is not None:
                assert ExperimentPlan.from_mapping(cell.train).attack is None
    assert counts == {"dlg-defences": 11, "dp": 22, "fedavg": 22, "pooling": 5, "quickstart": 5, "smoke": 2}


def test_cells_share_a_training_run_when_only_the_attack_setting_differs(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[attack]\nattack = "rgap"\n[train]\nnum-server-rounds = 3\n'
        '[[grid]]\nattack = ["rgap", "dlg"]\ndefences = ["", "prune:ratio=0.5"]\n'
    )
    cells = load_spec(str(spec)).cells()
    assert len(cells) == 4 and len({c.attack_run for c in cells}) == 4
    assert len({c.train_run for c in cells}) == 2  # one per defence: the attack is not a training setting
    assert all(c.train["num-server-rounds"] == 3 and "attack" not in c.train for c in cells)


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[grid]]\ndefences = ["magic"]', "[grid] defences: unknown defence 'magic': choose one of prune, noise"),
        ('[[grid]]\ndefences = ["prune:ratio=2"]', "[grid] defences: prune: ratio must lie in [0, 1), got 2.0"),
        ('[[grid]]\ndefences = ["noise:std=1"]', "[grid] defences: noise: expected KEY=VALUE with KEY one of sigma"),
        (
            '[attack]\ndefences = "dpsgd:noise=x,clip=1"\n[[grid]]\nseed = [0]',
            "[attack] defences: dpsgd: noise must be float",
        ),
        ("[[grid]]\nbogus = [1]", "[grid 1] bogus: not a setting of this app"),
        ('[[grid]]\nnum-clients = ["many"]', "[grid] num-clients: must be int, got 'many'"),
        ('[[grid]]\nmodel = ["resnet"]', "[grid] model: unknown model 'resnet'"),
        ("[[grid]]\nseed = 3", "[[grid]] seed: expected a non-empty list of values"),
        ("[train]\nbatch-size = 0\n[[grid]]\nseed = [0]", "[train] batch-size: must be >= 1, got 0"),
        ('[attack]\nattack = "rgap"', "no [[grid]] block"),
        ('[attack]\nattack = "nope"\n[[grid]]\nseed = [0]', "[attack] attack: unknown attack 'nope'"),
        ("[[grid]\n", "not valid TOML"),
        ("extra = 1\n[[grid]]\nseed = [0]", "unknown entry 'extra'"),
    ],
)
def test_a_bad_spec_is_one_line_and_exit_2(text, message, tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert sweep_main([str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize(
    "where,message", [("file", "exists and is not a folder"), ("file/sub", "cannot write the sweep folder")]
)
def test_a_bad_sweep_folder_is_one_line_and_exit_2(where, message, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert sweep_main(["pooling", "--out", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_an_unknown_preset_names_the_presets(capsys):
    assert sweep_main(["dlg-defense"]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown preset 'dlg-defense': choose one of dlg-defences, dp, fedavg, pooling, quickstart, smoke" in err
        and err.count("\n") == 1
    )


def _small(name: str, tmp_path: Path, *, attack: dict, train: dict | None, grid: list[dict]) -> Path:
    """A small grid of preset ``name``: its settings, fewer clients, rounds and values."""
    spec = load_spec(name)
    small = dataclasses.replace(
        spec,
        attack={**spec.attack, **attack},
        train=None if spec.train is None else {**spec.train, **(train or {})},
        grid=grid,
    )
    path = tmp_path / f"{name}-small.toml"
    path.write_text(_toml(small))
    return path


def _toml(spec) -> str:
    def value(v):
        return json.dumps(v)

    lines = [f"name = {value(spec.name)}", f"description = {value(spec.description)}", "[attack]"]
    lines += [f"{k} = {value(v)}" for k, v in spec.attack.items()]
    if spec.train is not None:
        lines += ["[train]"] + [f"{k} = {value(v)}" for k, v in spec.train.items()]
    for block in spec.grid:
        lines += ["[[grid]]"] + [f"{k} = {value(v)}" for k, v in block.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_a_small_grid_of_each_preset_is_a_valid_sweep(name, tmp_path, capsys):
    """What the federation tests below run for three presets, built for every preset without
    running it: the preset's settings with 3 clients, 1 round and the first value of each
    grid key, written and read back, each cell a valid plan, listed by the command."""
    spec = load_spec(name)
    grid = [{k: v[:1] for k, v in block.items()} for block in spec.grid]
    path = _small(
        name,
        tmp_path,
        attack={"num-clients": 3, "num-server-rounds": 1},
        train={"num-clients": 4, "num-server-rounds": 1},
        grid=grid,
    )
    small = load_spec(str(path))
    assert (small.name, small.attack["num-clients"], small.grid) == (name, 3, grid)
    assert (small.train is None) == (spec.train is None) and set(spec.attack) <= set(small.attack)
    cells = small.cells()
    assert 1 <= len(cells) <= len(grid)
    for cell in cells:
        assert ExperimentPlan.from_mapping(cell.attack).fed.num_clients == 3
        if cell.train is not None:
            assert ExperimentPlan.from_mapping(cell.train).attack is None
    assert sweep_main([str(path), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{c.id} {json.dumps(c.params)}" for c in cells]


def _sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dlg_defences_small_grid_is_killed_and_resumes_with_only_what_was_left(tmp_path):
    spec = _small(
        "dlg-defences",
        tmp_path,
        # DLG recovers an undefended image in about 5 s; on the 90%-pruned gradient it spends
        # its every restart (about 40 s of CPU a job) and fails all the same: 20 s bound that.
        # One attacked client a cell, attacks in the cell's process (as in dp's below)
        attack={
            "attack": "rgap,dlg",
            "num-clients": 2,
            "attack-clients": "0",
            "attack-workers": 0,
            "attack-time-limit": 20.0,
        },
        train={"num-clients": 4, "num-server-rounds": 2},
        grid=[{"defences": ["", "prune:ratio=0.9"]}],
    )
    out = tmp_path / "sweep"
    proc = _sweep([str(spec), "--out", str(out), "--jobs", "2"])
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list((out / "done").glob("*.json")):
        time.sleep(0.2)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}
    assert first, "no run finished in time"
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, text
    left = pd.read_csv(out / "cells.csv")
    assert len(left) < 2  # not all cells had finished: the tables hold what did

    again = _sweep([str(spec), "--out", str(out), "--jobs", "2"])
    text, _ = again.communicate(timeout=240)
    assert again.returncode == 0, text
    done = {p.name: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}
    assert len(done) == 4  # two attacked runs and two training runs
    assert all(done[n] == t for n, t in first.items())  # what had finished was not run again
    for train in (out / "runs").glob("train-*/config.json"):  # plain training, not experiments.run's demo
        config = json.loads(train.read_text())
        assert config["attack"] == "none" and config["num-server-rounds"] == 2, config

    cells = pd.read_csv(out / "cells.csv").fillna({"defences": ""})
    assert list(cells["status"]) == ["done", "done"] and cells["test_accuracy"].between(0.3, 1).all()
    results = pd.read_csv(out / "results.csv").fillna({"defences": ""})
    assert {"defences", "family", "strength", "test_accuracy", "cell"} <= set(results.columns)
    med = results.groupby(["defences", "attack"])["psnr"].median()
    assert med[("", "rgap")] > 60 and med[("", "dlg")] > 30  # undefended: both recover
    assert med[("prune:ratio=0.9", "rgap")] < 20 and med[("prune:ratio=0.9", "dlg")] < 30  # 90% pruning stops both
    for fig in ("privacy_utility.png", "psnr_vs_strength.png"):
        assert (out / fig).stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "## Where each attack stops" in summary and "| prune | rgap | server |" in summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp_small_grid_client_side_central_dp_hinders_the_curious_client_not_the_server(tmp_path):
    spec = _small(
        "dp",
        tmp_path,
        # attacks in the cell's own process: the preset's two attack workers would each import
        # torch and the project again (seconds of CPU apiece) for R-GAP's 1-second jobs
        attack={"attack": "rgap", "num-clients": 3, "attack-workers": 0},
        train={"num-clients": 4, "num-server-rounds": 1},
        grid=[{"defences": ["", "central-dp:noise=1,clip=1,side=client"]}],
    )
    out = tmp_path / "sweep"
    assert run_sweep(load_spec(str(spec)), out, jobs=2) == 0
    cells = pd.read_csv(out / "cells.csv").fillna({"defences": ""}).set_index("defences")
    central = cells.loc["central-dp:noise=1,clip=1,side=client"]
    assert central["epsilon_level"] == "client" and 0 < central["epsilon"] < 100  # Flower's accountant
    assert central["family"] == "central-dp (client)"
    results = pd.read_csv(out / "results.csv").fillna({"defences": ""})
    defended = results[results["defences"] != ""].groupby("observer")["psnr"].median()
    assert defended["server"] > 60  # the server sees the clipped, un-noised update
    assert defended["client"] < 20  # the curious client sees the noised aggregate
    assert (out / "psnr_vs_epsilon.png").exists()
    page = (out / "report.html").read_text()  # the sweep's page: its figures and tables, each run's page linked
    for shown in ('id="cells-table"', 'id="leakage-table"', "privacy_utility.png", "psnr_vs_epsilon.png"):
        assert shown in page
    runs = set(re.findall(r'href="runs/([\w-]+)/report.html"', page))
    assert len(runs) == 2 and all((out / "runs" / r / "report.html").exists() for r in runs)
    (out / "report.html").unlink()  # made again from the sweep folder alone
    assert report_main([str(out)]) == 0 and 'id="leakage-table"' in (out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not CIFAR.exists(), reason=f"needs the shared CIFAR-10 images ({CIFAR})")
def test_pooling_small_grid_in_parallel_max_pool_refused_by_rgap_with_its_rank_table(tmp_path):
    spec = _small(
        "pooling",
        tmp_path,
        attack={"attack": "rgap", "num-clients": 2, "dataset": f"npz:{CIFAR}", "attack-workers": 0},  # as in dp's
        train=None,
        grid=[{"model": ["cnn6", "cnn6_maxpool3"]}],
    )
    out = tmp_path / "sweep"
    proc = _sweep([str(spec), "--out", str(out), "--jobs", "2"])
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, text
    results = pd.read_csv(out / "results.csv")
    plain, pooled = results[results["model"] == "cnn6"], results[results["model"] == "cnn6_maxpool3"]
    assert (plain["psnr"] > 60).all() and len(plain) == 2
    assert (pooled["status"] == "error").all() and pooled["reason"].str.contains("MaxPool2d").all()
    summary = (out / "summary.md").read_text()
    assert "## R-GAP's rank analysis of each model" in summary and "| cnn6 | 6 |" in summary
    assert (out / "psnr_by_model.png").exists()


def test_a_fedavg_sim_spec_parses_and_its_cells_are_valid_plans(tmp_path):
    """An attack that applies to one mode only (fedavg-sim: FedAvg) is a valid spec value; the
    cells carry --samples-per-client into both runs."""
    spec = tmp_path / "fedavg-sim.toml"
    spec.write_text(
        '[attack]\nattack = "fedavg-sim"\nmode = "fedavg"\nnum-clients = 2\n[train]\nmode = "fedavg"\n'
        "[[grid]]\nsamples-per-client = [10, 20]\nlocal-epochs = [1, 2]\n"
    )
    cells = load_spec(str(spec)).cells()
    assert len(cells) == 4
    for cell in cells:
        plan = ExperimentPlan.from_mapping(cell.attack)
        assert plan.attack.attacks == ("fedavg-sim",) and plan.attack.observers == ("server",)
        assert cell.train["samples-per-client"] == plan.fed.samples_per_client
