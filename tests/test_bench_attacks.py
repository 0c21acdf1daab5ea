"""The attack benchmark's command line: one row per image and seed, options passed through,
summaries per seed, labels reported only where not granted, and bad input refused with one
line and exit code 2 (offline: mnist5k's real digits, and small archives written here)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.bench.attacks import BenchError, _targets, load_images, main, parse_seeds
from fl_sim.models import build_model

BASE = ["--model", "lenet", "--data", "mnist5k", "--images", "1"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _truncated(path: Path) -> str:
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"npz:{path}"


def _not_a_directory(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file" / "rows.csv")


# (id, argv after the attack, a function of tmp_path giving the bad value, text of the message)
BAD_INPUT = [
    ("unknown-dataset", ["--data"], lambda t: "no-such-set", "unknown dataset 'no-such-set'"),
    ("missing-file", ["--data"], lambda t: f"npz:{t / 'absent.npz'}", "npz dataset not found"),
    (
        "images-of-rank-2",
        ["--data"],
        lambda t: _npz(t / "r2.npz", images=np.zeros((4, 8), np.uint8), labels=np.arange(4)),
        "images must be N x H x W, N x H x W x C or N x C x H x W",
    ),
    (
        "images-of-rank-5",
        ["--data"],
        lambda t: _npz(t / "r5.npz", images=np.zeros((2, 1, 8, 8, 3), np.uint8), labels=np.arange(2)),
        "images must be N x H x W, N x H x W x C or N x C x H x W",
    ),
    (
        "pixels-out-of-range",
        ["--data"],
        lambda t: _npz(t / "f.npz", images=np.full((4, 8, 8), 300.5), labels=np.arange(4)),
        "float pixels must lie in [0, 1]",
    ),
    (
        "labels-of-other-length",
        ["--data"],
        lambda t: _npz(t / "l.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(3)),
        "4 images but 3 labels",
    ),
    (
        "no-labels-array",
        ["--data"],
        lambda t: _npz(t / "n.npz", images=np.zeros((4, 8, 8), np.uint8)),
        "must hold arrays 'images' and 'labels'",
    ),
    ("truncated-npz", ["--data"], lambda t: _truncated(t / "cut.npz"), "is not a readable .npz archive"),
    (
        "not-an-npz",
        ["--data"],
        lambda t: (t / "text.npz").write_text("hello") and f"npz:{t / 'text.npz'}",
        "is not a readable .npz archive",
    ),
    ("out-is-a-folder", ["--out"], lambda t: str(t), "is a folder"),
    ("out-in-a-missing-folder", ["--out"], lambda t: str(t / "missing" / "rows.csv"), "cannot write"),
    ("out-under-a-file", ["--out"], _not_a_directory, "cannot write"),
    ("bad-seeds", ["--seeds"], lambda t: "0-x", "--seeds takes numbers and ranges"),
    ("empty-seed-range", ["--seeds"], lambda t: "3-1", "is not a range"),
    ("label-rule-on-softmax", ["--label"], lambda t: "random", "--label applies to a single-logit head"),
]


@pytest.mark.parametrize("flags,make,message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(flags, make, message, tmp_path, capsys):
    code, out, err = _run(["--attack", "dlg", *BASE, *flags, make(tmp_path)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def test_unwritable_out_exits_2_with_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = _run(["--attack", "dlg", *BASE, "--out", str(folder / "rows.csv")], capsys)
    finally:
        folder.chmod(0o700)
    assert code == 2 and "cannot write" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--option", "no_such=1"], "dlg has no option no_such"),
        (["--option", "image_std"], "--option takes KEY=VALUE"),
        (["--option", "image_std=wide"], "is not a Python literal"),
        (["--option", "seed=3"], "dlg has no option seed"),
        (["--option", "max_steps=2.5"], "option max_steps must be an integer"),
        (["--option", "optimizer='adam'"], "option optimizer must be one of"),
    ],
)
def test_bad_options_exit_2_with_one_line(extra, message, capsys):
    code, _, err = _run(["--attack", "dlg", *BASE, *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--attack", "rgap", "--model", "cnn6", "--faithful"], "--faithful applies to dlg and idlg only"),
        (["--attack", "dlg", "--model", "lenet", "--fresh-solver"], "--fresh-solver applies to rgap only"),
        (["--attack", "rgap", "--model", "cnn6", "--option", "nope=1"], "rgap has no option nope"),
        (["--attack", "rgap", "--model", "cnn6", "--versus", "nope=1"], "rgap has no option nope"),
        (["--attack", "dlg", "--model", "lenet", "--versus", "fresh-solver"], "--fresh-solver applies to rgap only"),
        (["--attack", "dlg", "--model", "lenet", "--versus", "tol"], "--versus takes KEY=VALUE"),
    ],
)
def test_flags_for_other_attacks_are_refused(argv, message, capsys):
    code, _, err = _run([*argv, "--data", "mnist5k", "--images", "1"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_seed_specs():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    with pytest.raises(BenchError):
        parse_seeds("")


def test_rows_and_options_reach_the_attack(tmp_path, capsys):
    out = tmp_path / "idlg.csv"
    # two L-BFGS steps from the paper's N(0, 1) start: a real run, far from converged
    code, stdout, _ = _run(
        [
            "--attack",
            "idlg",
            "--model",
            "lenet",
            "--data",
            "mnist5k",
            "--images",
            "2",
            "--option",
            "image_mean=0.0",
            "--option",
            "image_std=1.0",
            "--max-steps",
            "2",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "options max_steps=2, image_mean=0.0, image_std=1.0" in stdout
    rows = list(csv.DictReader(out.open()))
    assert [int(r["index"]) for r in rows] == [0, 1] and {r["seed"] for r in rows} == {"0"}
    # every start stops after 2 steps (and too little progress by then triggers restarts)
    assert all(int(r["steps"]) % 2 == 0 and r["status"] == "not_converged" for r in rows)
    assert all(int(float(r["evaluations"])) > 2 for r in rows)
    assert all(float(r["label_correct"]) == 1.0 for r in rows)  # iDLG's label rule
    assert all(float(r["psnr"]) < 30 for r in rows)  # two steps are not enough
    assert "seed 0: success (>= 30 dB) 0/2 | median PSNR" in stdout and "labels 100%" in stdout


def test_seeds_give_one_summary_line_each_and_an_overall_line(tmp_path, capsys):
    out = tmp_path / "dlg.csv"
    code, stdout, _ = _run(
        [
            "--attack",
            "dlg",
            *BASE,
            "--seeds",
            "0,3",
            "--max-steps",
            "1",
            "--option",
            "max_restarts=0",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["seed"] for r in rows] == ["0", "3"]
    assert rows[0]["psnr"] != rows[1]["psnr"]  # another model and another start
    lines = stdout.splitlines()
    assert sum(line.startswith("seed 0: success") for line in lines) == 1
    assert sum(line.startswith("seed 3: success") for line in lines) == 1
    overall = [line for line in lines if line.startswith("all 2 seeds: success (>= 30 dB) 0/2")]
    assert len(overall) == 1 and "lowest seed median" in overall[0] and "evaluations/image" in overall[0]


def test_versus_attacks_each_image_twice_and_prints_b_against_a(tmp_path, capsys):
    out = tmp_path / "ab.csv"
    code, stdout, _ = _run(
        [
            "--attack",
            "dlg",
            *BASE,
            "--max-steps",
            "1",
            "--option",
            "max_restarts=0",
            "--versus",
            "max_iter=5",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "A: max_steps=1, max_restarts=0; B: max_steps=1, max_restarts=0, max_iter=5" in stdout
    rows = {r["variant"]: r for r in csv.DictReader(out.open())}
    # one L-BFGS step of at most 5 iterations (B) against one of at most 20 (A), same start
    assert int(float(rows["B"]["evaluations"])) < int(float(rows["A"]["evaluations"]))
    ratio = float(rows["B"]["evaluations"]) / float(rows["A"]["evaluations"])
    assert "seed 0: B/A seconds" in stdout and f"B/A evaluations {ratio:.2f}" in stdout
    assert sum(line.startswith(("A seed 0: success", "B seed 0: success")) for line in stdout.splitlines()) == 2


@pytest.mark.parametrize("grant,expected", [([], "labels granted"), (["--no-labels"], "labels 100%")])
def test_rgap_label_accuracy_is_reported_only_where_not_granted(grant, expected, tmp_path, capsys):
    out = tmp_path / "rgap.csv"
    code, stdout, _ = _run(
        [
            "--attack",
            "rgap",
            "--model",
            "cnn6",
            "--data",
            "mnist5k",
            "--images",
            "1",
            "--option",
            "rank=False",
            *grant,
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and expected in stdout.splitlines()[-2]
    rows = list(csv.DictReader(out.open()))
    assert all(float(r["psnr"]) > 60 for r in rows)
    assert all((r["label_correct"] == "nan") == (grant == []) for r in rows)


def test_logit_labels_demo_is_opposite_to_the_prediction_and_random_is_seeded():
    data = load_images("mnist5k", 16)
    model = build_model("cnn6", (1, 28, 28), 10, head="logit", init="paper", seed=0).eval()
    with torch.no_grad():
        predicted = (model(data.images).squeeze(-1) > 0).long()
    demo = _targets(model, data.images, data.labels, "logit", "demo", torch.Generator().manual_seed(0))
    assert torch.equal(demo, 1 - predicted)
    first = _targets(model, data.images, data.labels, "logit", "random", torch.Generator().manual_seed(0))
    again = _targets(model, data.images, data.labels, "logit", "random", torch.Generator().manual_seed(0))
    other = _targets(model, data.images, data.labels, "logit", "random", torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0 < int((first == predicted).sum()) < 16  # some agree with the prediction: the two-root case
    assert torch.equal(_targets(model, data.images, data.labels, "multiclass", "random", None), data.labels)


def test_rgap_with_a_random_label_not_granted_recovers_image_and_label(tmp_path, capsys):
    # image 0's random label (seed 0) is the one the model predicts: the head's equation has
    # two roots and, the label not granted, two labels (four candidates)
    out = tmp_path / "rgap.csv"
    code, stdout, _ = _run(
        [
            "--attack",
            "rgap",
            "--model",
            "cnn6",
            "--data",
            "mnist5k",
            "--images",
            "1",
            "--option",
            "rank=False",
            "--label",
            "random",
            "--no-labels",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "label random, labels not granted" in stdout.splitlines()[0]
    (row,) = list(csv.DictReader(out.open()))
    data = load_images("mnist5k", 1)
    model = build_model("cnn6", (1, 28, 28), 10, head="logit", init="paper", seed=0).eval()
    with torch.no_grad():
        predicted = int(model(data.images).squeeze(-1) > 0)
    assert int(row["label"]) == predicted
    assert float(row["psnr"]) > 60 and float(row["label_correct"]) == 1.0, row
