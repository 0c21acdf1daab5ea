import subprocess
import sys

import pytest

from experiments.run import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--mode", "fedprox"], "unknown mode 'fedprox'"),
        (["--partition", "zipf"], "unknown partition 'zipf'"),
        (["--clients", "0"], "must be >= 1"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--dataset", "npz:/no/such/file.npz"], "npz dataset not found"),
        (["--attack", "magic"], "invalid choice: 'magic'"),
        (["--observer", "god"], "unknown observer 'god'"),
        (["--attack", "rgap", "--mode", "fedavg"], "attacks run on FedSGD updates"),
        (["--attack", "rgap", "--clients", "2"], "needs >= 3 clients"),
        (["--rounds", "three"], "invalid int value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--dataset", "--model", "--clients", "--rounds", "--mode", "--batch-size", "--partition", "--seed", "--out", "--attack"):
        assert flag in out
