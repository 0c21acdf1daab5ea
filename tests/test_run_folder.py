"""A run folder belongs to one run (no Flower runtime needed)."""

from __future__ import annotations

import json

import pytest

from experiments.run import main as run_main
from experiments.run_folder import RunFolder, RunFolderError, default_run_dir


def _a_run(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": 0, "num-server-rounds": 3, **config}))
    (folder / "rounds.csv").write_text("round,test_loss\n0,2.3\n1,2.1\n")
    return folder


def test_a_new_run_refuses_a_folder_that_is_not_empty(tmp_path):
    with pytest.raises(RunFolderError, match="is not empty: pass --resume"):
        RunFolder.claim(_a_run(tmp_path / "r"), "new", {})
    RunFolder.claim(tmp_path / "fresh", "new", {}).release()  # a missing or empty folder is fine


def test_overwrite_empties_a_run_folder_and_nothing_else(tmp_path):
    run = _a_run(tmp_path / "r")
    with RunFolder.claim(run, "overwrite", {}):
        assert [p.name for p in run.iterdir()] == ["run.lock"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="holds no run"):
        RunFolder.claim(other, "overwrite", {})
    assert (other / "thesis.tex").read_text() == "precious"


def test_resume_needs_the_same_settings_and_may_add_rounds(tmp_path):
    run = _a_run(tmp_path / "r")
    with pytest.raises(RunFolderError, match="its run has seed=0, this one 1"):
        RunFolder.claim(run, "resume", {"seed": 1, "num-server-rounds": 3})
    with pytest.raises(RunFolderError, match="with fewer rounds"):
        RunFolder.claim(run, "resume", {"seed": 0, "num-server-rounds": 0})
    RunFolder.claim(run, "resume", {"seed": 0, "num-server-rounds": 9, "attack-workers": 3}).release()
    with pytest.raises(RunFolderError, match="nothing to resume"):
        RunFolder.claim(tmp_path / "empty", "resume", {})


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    with RunFolder.claim(tmp_path / "busy", "new", {}):
        with pytest.raises(RunFolderError, match=r"is in use by another run \(pid \d+\)"):
            RunFolder.claim(tmp_path / "busy", "overwrite", {})
        assert run_main(["--out", str(tmp_path / "busy")]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    RunFolder.claim(tmp_path / "busy", "new", {}).release()  # free again once released


def test_default_folders_never_collide(tmp_path):
    folders = {default_run_dir(tmp_path) for _ in range(5)}
    assert len(folders) == 5 and all(f.is_dir() for f in folders)
