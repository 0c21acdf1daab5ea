"""What made a run: config.json's provenance on every path that writes a run folder, and
summary.json beside summary.md."""

from __future__ import annotations

import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
from flwr.serverapp import ServerApp

from experiments import run_folder
from experiments.apps.client_app import app as client_app
from experiments.apps.server_app import app as deploy_server_app
from experiments.experiment import Experiment
from experiments.plan import ExperimentPlan
from experiments.run import main as run_main
from experiments.run_folder import HIDDEN, PACKAGES, PROVENANCE, RunFolder, command_line, provenance
from fl_sim.engine import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
# a federation small enough for seconds: 2 clients, one round, one digit each, R-GAP by the server
TINY = ["--mode", "fedsgd", "--attack", "rgap", "--observers", "server", "--clients", "2", "--rounds", "1"]
TINY += ["--samples-per-client", "20", "--attack-workers", "0"]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _assert_session(session: dict, command: str) -> None:
    assert session["command"] == command
    assert session["python"] == platform.python_version()
    assert session["packages"] == {name: metadata.version(name) for name in PACKAGES}
    assert ISO_UTC.match(session["started"]) and ISO_UTC.match(session["ended"])
    assert session["started"] <= session["ended"]
    if shutil.which("git") and (ROOT / ".git").exists():  # the suite runs from a checkout
        assert session["git"]["commit"] == _git("rev-parse", "HEAD")
        assert session["git"]["dirty"] == bool(_git("status", "--porcelain"))


def _summary_md_rows(folder: Path) -> list[list[str]]:
    """The cells of summary.md's observer x attack table."""
    lines = (folder / "summary.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| observer | attack |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow  # experiments.run in a process of its own: its command line is the one recorded
def test_a_run_records_its_command_versions_commit_and_times_and_a_resume_adds_its_own(tmp_path):
    """A new run from the command line records that command line; resumed in this process for a
    second round, the first session's record stays as it was and the resume's is added (with
    this process's command line); the resume is not refused for the different provenance."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "experiments.run", *TINY, "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    first = config[PROVENANCE]
    assert len(first) == 1
    _assert_session(first[0], shlex.join(argv))
    assert first[0]["cwd"] == str(ROOT)
    assert config["resolved-device"] == "cpu"  # the device, recorded beside it as before

    assert run_main(["--out", str(out), "--resume", "--rounds", "2"]) == 0
    again = json.loads((out / "config.json").read_text())[PROVENANCE]
    assert again[0] == first[0] and len(again) == 2
    _assert_session(again[1], shlex.join(sys.orig_argv))
    assert again[0]["ended"] <= again[1]["started"]


def test_summary_json_holds_summary_mds_observer_attack_table(tmp_path):
    out = tmp_path / "run"
    assert run_main([*TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"] == {"main": {"status": "completed", "reason": ""}}
    assert summary["success_psnr"] == 30.0
    md = _summary_md_rows(out)
    assert len(summary["table"]) == len(md) == 1
    for row, cells in zip(summary["table"], md):
        assert [row["observer"], row["attack"], str(row["n"])] == cells[:3] == ["server", "rgap", "2"]
        assert f"{row['median_psnr']:.2f}" == cells[3] and f"{row['median_ssim']:.3f}" == cells[4]
        assert f"{row['recovered']}/{row['images']}" == cells[6] == "2/2"
        assert row["median_psnr"] > 30 and row["success"] == 1.0


def test_a_run_without_attacks_writes_an_empty_table(tmp_path):
    out = tmp_path / "run"
    flags = ["--mode", "fedsgd", "--attack", "none", "--clients", "2", "--rounds", "1", "--samples-per-client", "10"]
    assert run_main([*flags, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["table"] == []
    assert json.loads((out / "config.json").read_text())[PROVENANCE][0]["ended"] is not None


def test_the_deployments_server_app_records_the_provenance_of_its_process(tmp_path):
    """The ServerApp that a deployment loads (here on the in-process engine, with the run
    config a deployment submits) writes the run folder and its provenance."""
    out = tmp_path / "deployed"
    plan = ExperimentPlan.from_mapping(
        {"mode": "fedsgd", "num-clients": 2, "num-server-rounds": 1, "samples-per-client": 10, "out-dir": str(out)},
        engine="deployment",
    )
    run_inprocess(deploy_server_app, client_app, 2, run_config=plan.to_mapping())
    sessions = json.loads((out / "config.json").read_text())[PROVENANCE]
    assert len(sessions) == 1
    _assert_session(sessions[0], shlex.join(sys.orig_argv))
    assert (out / "summary.json").is_file()


class _SubmittedGrid:
    """A grid whose run came from a submitted app bundle, as a deployment's does (the
    in-process engine's run has none): everything else is the real grid's."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    @property
    def run(self):
        return replace(self._grid.run, fab_id="flwrlabs/testbed", fab_version="0.1.0", fab_hash="ab" * 32)


def test_a_run_from_a_submitted_app_bundle_records_the_bundle(tmp_path):
    """In a deployment the ServerApp runs the code of the installed bundle, not of a checkout:
    the bundle's hash names that code."""
    plan = ExperimentPlan.from_mapping(
        {"mode": "fedsgd", "num-clients": 2, "num-server-rounds": 1, "samples-per-client": 10, "out-dir": str(tmp_path)}
    )
    app = ServerApp()
    seen = {}

    @app.main()
    def main(grid, context):
        seen["run-id"] = grid.run.run_id
        experiment = Experiment(plan)
        experiment.serve(_SubmittedGrid(grid))
        experiment.finish()

    run_inprocess(app, client_app, 2)
    session = json.loads((tmp_path / "config.json").read_text())[PROVENANCE][0]
    assert session["flower-run"] == {
        "run-id": seen["run-id"],
        "fab-id": "flwrlabs/testbed",
        "fab-version": "0.1.0",
        "fab-hash": "ab" * 32,
    }


def test_a_command_line_keeps_no_secret():
    """flwr-serverapp is started with the SuperLink's token on its command line."""
    argv = ["flwr-serverapp", "--runtime-api-address", "127.0.0.1:9091", "--token", "e60c2d", "--insecure"]
    assert command_line(argv) == f"flwr-serverapp --runtime-api-address 127.0.0.1:9091 --token '{HIDDEN}' --insecure"
    assert command_line(["x", "--api-key=s3cret", "--auth-supernode-private-key", "k.pem", "--seed", "1"]) == (
        f"x '--api-key={HIDDEN}' --auth-supernode-private-key '{HIDDEN}' --seed 1"
    )
    assert command_line() == shlex.join(sys.orig_argv)  # pytest's own has no secret


def test_the_provenance_is_a_record_not_a_setting():
    """config.json's provenance goes back into a plan (a resume's base) without complaint, and
    a resume with other provenance is not a different run."""
    record = [provenance("python -m experiments.run")]
    plan = ExperimentPlan.from_mapping({"num-clients": 3, PROVENANCE: record})
    assert plan.fed.num_clients == 3 and PROVENANCE not in plan.to_mapping()
    assert run_folder.RUNTIME_KEYS >= {PROVENANCE, "resolved-device"}


def test_a_resume_with_other_provenance_is_accepted(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"seed": 0, "num-server-rounds": 2, PROVENANCE: ["old"]}))
    RunFolder.claim(folder, "resume", {"seed": 0, "num-server-rounds": 2}).release()


def test_the_project_is_recorded_by_its_pyproject_name():
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert PACKAGES[0] == name
    assert provenance()["packages"][name] == metadata.version(name)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_and_dirt_of_a_checkout_and_nothing_elsewhere(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    (repo / "a.py").write_text("x = 1\n")
    _git("add", "a.py", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    (repo / ".gitignore").write_text("runs/\n")
    _git("add", ".gitignore", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two", cwd=repo)
    (repo / "runs").mkdir()
    (repo / "runs" / "config.json").write_text("{}")  # ignored: not dirt
    monkeypatch.setattr(run_folder, "SOURCE_ROOT", repo)
    assert provenance()["git"] == {"commit": _git("rev-parse", "HEAD", cwd=repo), "dirty": False}
    (repo / "b.py").write_text("y = 1\n")  # a new module, not committed
    assert provenance()["git"]["dirty"] is True
    (repo / "b.py").unlink()
    (repo / "a.py").write_text("x = 2\n")
    assert provenance()["git"]["dirty"] is True
    # a package installed inside some other repository (site-packages in a venv in a checkout)
    (repo / "site").mkdir()
    monkeypatch.setattr(run_folder, "SOURCE_ROOT", repo / "site")
    assert provenance()["git"] is None
    # no git at all: recorded as unknown, no error
    monkeypatch.setattr(run_folder, "SOURCE_ROOT", repo)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance()["git"] is None
