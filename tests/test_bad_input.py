"""Bad input, as a new user types it: every case is one line on stderr and exit code 2, before
any Flower or Ray process starts (a table; each row a command line and the line it must print)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.deploy import main as deploy_main
from experiments.run import main as run_main


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _images(n=20, dtype=np.uint8, scale=255):
    rng = np.random.default_rng(0)
    return (rng.random((n, 16, 16, 3)) * scale).astype(dtype)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    labels = np.arange(20) % 2
    nan = _images(dtype=np.float64, scale=1.0)
    nan[0, 0, 0, 0] = np.nan
    trunc = d / "truncated.npz"
    np.savez(trunc, images=_images(), labels=labels)
    trunc.write_bytes(trunc.read_bytes()[:300])
    return {
        "nan": _npz(d / "nan.npz", images=nan, labels=labels),
        "range": _npz(d / "range.npz", images=_images(dtype=np.float64, scale=3.0), labels=labels),
        "labels2d": _npz(d / "labels2d.npz", images=_images(), labels=np.zeros((20, 2))),
        "negative": _npz(d / "negative.npz", images=_images(), labels=labels - 1),
        "fraclabels": _npz(d / "fraclabels.npz", images=_images(), labels=labels + 0.5),
        "rank": _npz(d / "rank.npz", images=np.zeros((20, 16)), labels=labels),
        "nolabels": _npz(d / "nolabels.npz", images=_images()),
        "count": _npz(d / "count.npz", images=_images(), labels=labels[:5]),
        "truncated": f"npz:{trunc}",
        "full": str(_full(d / "full")),
        "file": str(_plainfile(d / "a-file")),
        "readonly": str(_readonly(d / "ro")),
        "missing_toml": str(d / "missing.toml"),
        "bad_toml": str(_plainfile(d / "bad.toml")),
    }


def _full(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "rounds.csv").write_text("round\n0\n")
    return path


def _plainfile(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _readonly(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o500)
    return path


CASES = [
    # names and values
    (["--model", "resnet"], "--model: unknown model 'resnet'"),
    (["--dataset", "imagenet"], "--dataset: unknown dataset 'imagenet'"),
    (["--mode", "fedprox"], "--mode: unknown mode 'fedprox'"),
    (["--partition", "zipf"], "--partition: unknown partition 'zipf'"),
    (["--attack", "magic"], "--attack: unknown attack 'magic'"),
    (["--attack", "rgap,none"], "--attack: unknown attack 'none'"),
    (["--attack", "rgap", "--observers", "god"], "--observers: unknown observer 'god'"),
    (["--attack", "rgap", "--grant-batch-size", "some"], "--grant-batch-size: unknown policy 'some'"),
    (["--clients", "0"], "--clients: must be >= 1, got 0"),
    (["--rounds", "three"], "--rounds: must be int, got 'three'"),
    (["--batch-size", "1.5"], "--batch-size: must be int, got '1.5'"),
    (["--lr", "-1"], "--lr: must be a finite number > 0, got -1.0"),
    (["--server-lr", "inf"], "--server-lr: must be a finite number > 0, got inf"),
    (["--alpha", "nan"], "--alpha: must be a finite number > 0, got nan"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--fraction-train", "1.5"], "--fraction-train: must be in (0, 1]"),
    (["--faulty-client", "1:boom"], "--faulty-client: expected ID:KIND"),
    (["--faulty-client", "12:nan"], "--faulty-client: client 12 is not a partition id (0..9)"),
    (["--faulty-client", "1:nan", "--faulty-client", "1:inf"], "--faulty-client: client 1 is listed twice"),
    # the plan's rules
    (["--attack", "rgap", "--mode", "fedavg", "--local-steps", "2"], "--attack: rgap inverts one sample's gradient"),
    (["--attack", "ig", "--grant-batch-order"], "--grant-batch-order: a FedSGD update is one batch"),
    (["--attack", "ig", "--attack-time-limit", "-1"], "--attack-time-limit: must be a number of seconds >= 0"),
    (["--attack", "ig", "--attack-time-limit", "soon"], "--attack-time-limit: must be a number of seconds"),
    (["--attack", "none", "--attack-time-limit", "10"], "--attack-time-limit: has no effect without an attack"),
    (["--audit", "protect:defence=blur"], "--audit: protect: unknown defence 'blur'"),
    # the active server
    (["--observers", "active", "--active-attack", "fishing"], "--active-attack: unknown active attack 'fishing'"),
    (
        ["--observers", "active", "--active-attack", "trap", "--model", "lenet"],
        "--model: the active server's trap: trap weights need a model whose first layer is linear on the image",
    ),
    (
        ["--observers", "active", "--active-attack", "trap", "--active-bins", "100"],
        "--active-bins: trap weights use every unit of the layer",
    ),
    (
        ["--observers", "active", "--model", "lenet"],
        "--model: the active server's imprint: the weights-only imprint needs",
    ),
    (
        ["--observers", "active", "--active-bins", "5000"],
        "--active-bins: the active server's imprint: 5000 bins do not fit",
    ),
    (["--observers", "active", "--active-bins", "0"], "--active-bins: must be >= 1, got 0"),
    (["--attack", "rgap", "--observers", "active"], "--attack: rgap attacks what a passive observer sees"),
    (["--attack", "rgap", "--active-bins", "100"], "--active-bins: has no effect without the active observer"),
    (
        ["--attack", "ig", "--mode", "fedavg", "--local-epochs", "1"],
        "--local-epochs: a client's FedAvg update would hold 1000 images (1000 local",
    ),
    (
        ["--attack", "ig", "--mode", "fedavg", "--local-steps", "20", "--batch-size", "4"],
        "--local-steps: a client's FedAvg update would hold 80 images",
    ),
    (["--preset", "demo", "--attack-rounds", "200"], "--attack-rounds: round 200 is not in 1..150"),
    (["--attack", "rgap", "--clients", "2"], "--observers: the curious-client observer needs >= 3 clients per round"),
    (["--attack", "rgap", "--attack-rounds", "3"], "--attack-rounds: round 3 is not in 1..2"),
    (
        ["--attack", "rgap", "--attack-rounds", "x"],
        "--attack-rounds: expected comma-separated integers, 'all' or 'spread'",
    ),
    (["--attack", "rgap", "--attack-clients", "7"], "--attack-clients: 7 is not a partition id (0..3)"),
    (["--attack", "rgap", "--curious-client", "9"], "--curious-client: 9 is not a partition id (0..3)"),
    (["--attack", "rgap", "--attack-workers", "-1"], "--attack-workers: must be >= 0, got -1"),
    # what the data allows, checked before Ray starts
    (["--partition", "pathological", "--clients", "3"], "--classes-per-client: 3 clients x 2 classes cannot cover 10"),
    (["--partition", "pathological", "--classes-per-client", "0"], "--classes-per-client: must be >= 1, got 0"),
    (
        ["--partition", "dirichlet", "--alpha", "1e-4", "--clients", "40"],
        "--alpha: Dirichlet(alpha=0.0001) left a client empty",
    ),
    (["--clients", "5000"], "--clients: 5000 clients for 4000 training images"),
    (["--dataset", "npz:/no/such/file.npz"], "npz dataset not found: /no/such/file.npz"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "offline choices: mnist5k, npz:PATH"),
    (["--dataset", "{nan}"], "1 pixel value(s) are NaN or Inf"),
    (["--dataset", "{range}"], "float pixels must lie in [0, 1]"),
    (["--dataset", "{labels2d}"], "labels must be one class id per image (shape (N,)), got shape (20, 2)"),
    (["--dataset", "{negative}"], "labels must be >= 0, found -1"),
    (["--dataset", "{fraclabels}"], "labels must be integer class ids"),
    (["--dataset", "{rank}"], "images must be N x H x W"),
    (["--dataset", "{nolabels}"], "must hold arrays 'images' and 'labels'"),
    (["--dataset", "{count}"], "20 images but 5 labels"),
    (["--dataset", "{truncated}"], "is not a readable .npz archive"),
    # fedavg-sim and --samples-per-client
    (["--attack", "fedavg-sim"], "--attack: fedavg-sim simulates a FedAvg client's local training"),
    (
        ["--attack", "fedavg-sim", "--mode", "fedavg", "--observers", "server,secagg"],
        "--observers: the secagg observer sees an aggregate of several clients' updates",
    ),
    (["--samples-per-client", "-1"], "--samples-per-client: must be >= 1 (or 0: all of the partition), got -1"),
    (
        ["--attack", "none", "--clients", "2", "--samples-per-client", "3000"],
        "--samples-per-client: client 0 holds 2000 training images under this partition, fewer than 3000",
    ),
    # the run folder
    (["--out", "{full}"], "is not empty: pass --resume to continue the run in it, --overwrite to replace it"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "{file}/run"], "cannot write the run folder"),
    (["--resume"], "--resume needs --out"),
    (["--out", "{readonly}", "--resume"], "nothing to resume"),
    # --run-config, as deploy takes it
    (["--run-config", "no-such-key=1"], "--run-config no-such-key: not a setting of this app"),
    (["--run-config", "num-server-rounds=3", "--rounds", "2"], "--run-config: 'num-server-rounds' is set by a flag"),
    (["--run-config", "{missing_toml}"], "--run-config: cannot read"),
    (["--run-config", "{bad_toml}"], "--run-config: cannot parse"),
    (["--run-config", "out-dir='x'"], "--run-config: use --out / --resume for the run folder"),
    (["--run-config", "num-server-rounds=0"], "--run-config num-server-rounds: must be >= 1, got 0"),
    # argparse's own
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--resume", "--overwrite"], "not allowed with argument"),
]


def _call(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_run_refuses_with_one_line(argv, message, files, capsys):
    argv = [a.format(**files) for a in argv]
    code = _call(run_main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err


# The deployment shares the plan, its flags and its checks: the same lines, before any process starts.
DEPLOY_CASES = [c for c in CASES if c[0][:1] != ["--dataset"] or "{" not in c[0][1]][:20] + [
    (
        ["--attack", "rgap", "--observers", "secagg"],
        "--observers: the secagg observer runs only under python -m experiments.run",
    ),
    (
        ["--observers", "active", "--active-attack", "imprint-block", "--model", "cnn6"],
        "--active-attack: imprint-block changes the model's architecture, so the clients must run the server's "
        "ClientApp",
    ),
    (["--kill-node", "1"], "--kill-node and --kill-node-after-round go together"),
    (["--kill-node", "5", "--kill-node-after-round", "1"], "--kill-node: partition id must lie in 0..2"),
    (["--run-config", "no-such-key=1"], "no-such-key: not a setting of this app"),
    (["--run-config", "seed=1", "--seed", "2"], "--run-config: 'seed' is set by a flag too"),
]


@pytest.mark.parametrize("argv,message", DEPLOY_CASES, ids=[" ".join(a)[:60] for a, _ in DEPLOY_CASES])
def test_deploy_refuses_with_one_line(argv, message, files, capsys):
    code = _call(deploy_main, [a.format(**files) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    message = message.replace("0..3)", "0..2)").replace("0..9)", "0..2)")  # the deployment's default: 3 SuperNodes
    assert message in err and err.count("\n") == 1, err


def test_float_images_in_unit_range_are_repaired_with_a_note(tmp_path):
    """Float pixels in [0, 1] are unambiguous: scaled to 0..255, and the run says so."""
    from fl_sim.data import load_dataset

    images = np.random.default_rng(0).random((40, 16, 16, 3))
    name = _npz(tmp_path / "unit.npz", images=images, labels=np.arange(40) % 4)
    data = load_dataset(name)
    assert data.notes and "float pixels in [0, 1] scaled to 0..255" in data.notes[0]
    restored = np.concatenate([data.train_x.numpy(), data.test_x.numpy()]).astype(np.float64) / 255
    assert restored.mean() == pytest.approx(images.mean(), abs=0.01)  # not rounded to 0/1 of 255


def _help_entries(out: str) -> dict[str, str]:
    """Each option's entry of an argparse --help (its first flag -> the entry's text on one line)."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = [line]
        elif current and line.startswith("   "):
            entries[current].append(line)
        else:
            current = None
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


def test_help_shows_each_default_once(monkeypatch, capsys):
    """Every option that takes a value states its default exactly once, in its own entry: as
    "(default: X)", or with the presets' values as "(the demo: ...; otherwise X)"; a switch
    states none. main(["--help"]) in-process, wide enough that no entry is wrapped."""
    from experiments.cli import PLAN_FLAGS
    from experiments.plan import default_mapping

    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as done:
        run_main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    entries = _help_entries(out)
    for flag in (
        "--dataset",
        "--model",
        "--clients",
        "--rounds",
        "--mode",
        "--batch-size",
        "--partition",
        "--seed",
        "--out",
        "--attack",
        "--faulty-client",
        "--resume",
        "--overwrite",
        "--grant-batch-size",
    ):
        assert flag in entries
    assert "(default: None)" not in out
    defaults = default_mapping()
    stores = {f.flags[0]: defaults[f.key] for f in PLAN_FLAGS if f.action == "store"}
    assert set(stores) <= set(entries)
    for flag, entry in entries.items():
        stated = entry.count("(default: ") + entry.count("; otherwise ")
        if flag in stores:
            value = stores[flag]
            assert stated == 1 and ((f"(default: {value})" in entry) != (f"; otherwise {value})" in entry)), entry
        elif flag == "--out":
            assert stated == 1 and "(default: a new runs/<date>-<time>)" in entry, entry
        else:  # switches, repeatable flags, --preset, --help
            assert stated == 0, entry
    assert "number of server rounds (the demo: 150; with --attack: 2; otherwise 5)" in entries["--rounds"]
    assert "--preset" in entries
