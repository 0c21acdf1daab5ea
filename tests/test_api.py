"""The Python API for notebooks (experiments.api): docs/notebook.md's code runs as written and
returns the run's tables; mistakes are ValueErrors before anything runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from experiments import api
from experiments.results import IMAGE_FIELDS, RESULT_FIELDS
from fl_sim.server_app import ROUND_FIELDS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow  # a run in a process of its own, and a resume refused by another
def test_the_notebook_pages_code_runs_and_returns_the_runs_tables(tmp_path, monkeypatch, capsys):
    """Every python block of docs/notebook.md, in order, in one namespace, from a fresh folder
    (its run goes to runs/notebook there): R-GAP on 2 clients' gradients, one round."""
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(PAGE)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    out = capsys.readouterr().out
    run = namespace["run"]
    assert run.folder == tmp_path / "runs" / "notebook"

    results = run.results
    assert list(results.columns) == RESULT_FIELDS and len(results) == 2
    assert set(results["observer"]) == {"server"} and set(results["attack"]) == {"rgap"}
    assert sorted(results["client"]) == [0, 1] and (results["psnr"] > 30).all()

    images = run.images
    assert list(images.columns) == IMAGE_FIELDS and len(images) == 2
    assert (images["label_true"] == images["label_recovered"]).all() and (images["psnr"] > 30).all()

    rounds = run.rounds
    assert list(rounds.columns) == ROUND_FIELDS and list(rounds["round"]) == [0, 1]
    assert run.secagg_rounds.empty  # no SecAgg+ observer in this plan

    summary = run.summary
    assert summary.to_dict("records") == json.loads((run.folder / "summary.json").read_text())["table"]
    assert (summary["recovered"] == summary["images"]).all() and list(summary["images"]) == [2]

    # what the page prints: the command that made the run, and the bad key's one line
    session = namespace["session"]
    assert session["command"].split(" -m ", 1)[1].startswith("experiments.run --mode fedsgd --clients 2 --rounds 1")
    assert session["command"] in out and session["ended"] is not None
    assert "num-clientz: not a setting of this app" in out
    assert pd.testing.assert_frame_equal(namespace["again"].images, images) is None
    assert not (tmp_path / "runs").exists() or sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["notebook"]

    # a resume that would change the plan: refused by the run, a ValueError here
    with pytest.raises(ValueError, match="cannot resume .* its run has num-clients=2, this one 3"):
        api.run(out=run.folder, resume=True, num_clients=3, quiet=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_clientz": 2}, "num-clientz: not a setting of this app"),
        ({"batch_size": 0}, "batch-size: "),
        ({"attack": ["rgap", "nope"]}, "unknown attack 'nope'"),
        ({"dataset": "npz:missing.npz"}, "missing.npz"),
        ({"engine": "spark"}, "engine: 'spark' is not an engine"),
        ({"preset": "fast"}, "unknown preset 'fast'"),
        ({"overwrite": True, "resume": True}, "choose one"),
    ],
)
def test_a_bad_key_value_or_option_is_a_value_error_before_anything_runs(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        api.run(quiet=True, **kwargs)
    assert list(tmp_path.iterdir()) == []  # no run folder made


@pytest.mark.slow  # a run in a process of its own
def test_a_run_that_fails_raises_with_what_it_left(tmp_path):
    """Both clients send NaN: the round has no valid reply, the run fails (exit code 1)."""
    with pytest.raises(api.RunFailed, match="did not finish \\(exit code 1\\)") as failed:
        api.run(
            mode="fedsgd",
            num_clients=2,
            num_server_rounds=1,
            samples_per_client=10,
            faulty_clients="0:nan,1:nan",
            out=tmp_path / "run",
            quiet=True,
        )
    left = failed.value.run
    assert left.folder == tmp_path / "run" and list(left.rounds["round"]) == [0]
    assert set(pd.read_csv(left.folder / "dropped.csv")["status"]) == {"invalid"}


def test_load_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(ValueError, match="holds no run"):
        api.load(tmp_path)
