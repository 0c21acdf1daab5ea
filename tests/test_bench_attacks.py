"""The attack benchmark's command line: one row per image, options passed through, bad options
refused with one line (offline: mnist5k's real digits)."""

from __future__ import annotations

import csv

import pytest

from experiments.bench_attacks import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--option", "no_such=1"], "dlg has no option no_such"),
        (["--option", "image_std"], "--option takes KEY=VALUE"),
        (["--option", "image_std=wide"], "is not a Python literal"),
        (["--option", "seed=3"], "dlg has no option seed"),
    ],
)
def test_bad_options_exit_2_with_one_line(extra, message, capsys):
    code, _, err = _run(["--attack", "dlg", "--model", "lenet", "--data", "mnist5k", "--images", "1", *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_faithful_is_for_dlg_only(capsys):
    code, _, err = _run(["--attack", "rgap", "--model", "cnn6", "--data", "mnist5k", "--images", "1", "--faithful"], capsys)
    assert code == 2 and "--faithful applies to dlg and idlg only" in err


def test_rows_and_options_reach_the_attack(tmp_path, capsys):
    out = tmp_path / "idlg.csv"
    # two L-BFGS steps from the paper's N(0, 1) start: a real run, far from converged
    code, stdout, _ = _run(["--attack", "idlg", "--model", "lenet", "--data", "mnist5k", "--images", "2",
                            "--option", "image_mean=0.0", "--option", "image_std=1.0", "--max-steps", "2",
                            "--out", str(out)], capsys)
    assert code == 0
    assert "options max_steps=2, image_mean=0.0, image_std=1.0" in stdout
    rows = list(csv.DictReader(out.open()))
    assert [int(r["index"]) for r in rows] == [0, 1]
    # every start stops after 2 steps (and too little progress by then triggers restarts)
    assert all(int(r["steps"]) % 2 == 0 and r["status"] == "not_converged" for r in rows)
    assert all(float(r["label_correct"]) == 1.0 for r in rows)  # iDLG's label rule
    assert all(float(r["psnr"]) < 30 for r in rows)  # two steps are not enough
    assert "median PSNR" in stdout and "success (>= 30 dB) 0/2" in stdout
