"""report.html: the page a person opens, from a run folder's files (finished or killed), and
checked in headless Chromium where one is installed (Debian: apt-get install chromium)."""

from __future__ import annotations

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

from experiments.report.__main__ import main as report_main
from experiments.report.browser import check_page, find_chromium
from experiments.report.folder import draw_per_round, tile
from experiments.results import RESULT_FIELDS, blank_row

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")


def _rows(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [{**blank_row(r["round"], r["client"], r["observer"], r["attack"]), **r} for r in rows], columns=RESULT_FIELDS
    )


def _scored(rnd: int, client: int, observer: str, psnr: float) -> dict:
    return dict(
        round=rnd,
        client=client,
        observer=observer,
        attack="rgap",
        psnr=psnr,
        ssim=0.9,
        mse=0.0,
        label_acc=1.0,
        images=1,
        recovered=int(psnr >= 30),
        labels_granted=False,
        batch_size_source="reply",
        local_steps=0,
        order_granted=False,
        attribution="direct",
        status="ok",
        reason="",
    )


def test_psnr_of_one_attacked_round_is_a_bar_per_observer_on_a_round_axis_from_zero():
    results = _rows(_scored(1, 0, "server", 108.7), _scored(1, 1, "server", 107.1), _scored(1, 1, "client", 5.4))
    fig = draw_per_round(results, {0: 0.1, 1: 0.1})
    _, ax = fig.axes
    assert len(ax.patches) == 2  # one bar for server/rgap, one for client/rgap
    assert [t.get_text() for t in ax.get_xticklabels()] == ["round 1"]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 108.7
    assert sorted(round(p.get_height(), 1) for p in ax.patches) == [5.4, 107.9]  # the medians


def test_psnr_over_many_attacked_rounds_is_a_line_per_observer():
    results = _rows(*[_scored(r, 0, "server", 100.0 + r) for r in range(1, 11)])
    fig = draw_per_round(results, {r: 0.1 * r for r in range(11)})
    _, ax = fig.axes
    assert not ax.patches
    line = next(ln for ln in ax.get_lines() if len(ln.get_xdata()) == 10)
    assert list(line.get_xdata()) == list(range(1, 11))


def _folder(tmp_path: Path) -> Path:
    """A run folder written by hand: a known and two unknown observers, a dropped reply; no
    attack named (an observer such as the active server brings its own)."""
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "attack": "none",
        "observers": "server,active",
        "mode": "fedsgd",
        "dataset": "mnist5k",
        "model": "lenet",
        "num-clients": 3,
        "num-server-rounds": 2,
        "batch-size": 1,
        "seed": 0,
        "attack-rounds": "1",
    }
    (run / "config.json").write_text(json.dumps(config))
    (run / "rounds.csv").write_text(
        "round,train_loss,test_loss,test_accuracy,aggregated,dropped,seconds\n0,,2.3,0.1,,,0.1\n1,2.2,2.1,0.2,2,1,1.0\n"
    )
    (run / "dropped.csv").write_text("round,node_id,client,status,reason\n1,77,2,invalid,update has NaN\n")
    rows = _rows(
        _scored(1, 0, "server", 110.0),
        _scored(1, 0, "active", 40.0),
        _scored(1, 0, "active-secagg", 20.0),
        dict(round=1, client=2, observer="server", attack="rgap", status="invalid", reason="update has NaN"),
    )
    rows.to_csv(run / "results.csv", index=False)
    return run


def test_report_of_a_folder_orders_known_observers_first_and_shows_new_ones_and_reasons(tmp_path, capsys):
    run = _folder(tmp_path)
    assert report_main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    table = page[page.index('id="observer-table"') :]
    table = table[: table.index("</table>")]
    assert re.findall(r"<tr><td>([\w-]+)</td>", table) == ["server", "active", "active-secagg"]
    assert "update has NaN" in page and "no ending recorded" in page and "1 of 2 rounds finished" in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert "<script src" not in page and "<link" not in page  # nothing to fetch
    for png in ("training.png", "psnr_per_round.png"):  # the figures keep their own files
        assert (run / png).stat().st_size > 5_000


def test_report_of_a_folder_with_no_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert report_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no run (no config.json) and no sweep (no sweep.json)" in err


# ---- real runs -------------------------------------------------------------------------------


def _run_argv(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.run", "--attack", "rgap", "--clients", "3", "--out", str(out), *flags]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """R-GAP by the server and a curious client on one round of 3 clients (about 25 s)."""
    out = tmp_path_factory.mktemp("report") / "run"
    done = subprocess.run(
        _run_argv(out, "--rounds", "1", "--observers", "server,client"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def _assert_loads(page: Path, shot: Path, *, images: int) -> None:
    check = check_page(page, selectors=["#observer-table", "#images table.grid", "#training img"], screenshot=shot)
    assert check.errors == []
    assert len(check.images) >= images and check.broken_images == []
    assert all(i["naturalWidth"] > 0 for i in check.images)
    assert check.found == {"#observer-table": True, "#images table.grid": True, "#training img": True}
    assert all(u.startswith(("file:", "data:")) for u in check.requests), check.requests
    assert shot.stat().st_size > 20_000


@pytest.mark.slow
@needs_chromium
def test_report_of_a_real_run_loads_in_headless_chromium_with_every_image_and_no_error(small_run, tmp_path):
    page = small_run / "report.html"
    text = page.read_text()
    assert 'main federation <span class="status completed">completed</span>' in text
    assert "3/3 (100%)" in text  # the server's R-GAP recovers the three clients' digits
    shot = tmp_path / "report.png"  # kept in the test's temp folder, for a person to look at
    # 2 figures, then per client: the true image, the server's and (clients 1 and 2) the curious client's
    _assert_loads(page, shot, images=2 + 3 + 3 + 2)
    print(f"screenshot: {shot}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_of_a_run_killed_mid_way_shows_the_rows_that_finished(tmp_path):
    out = tmp_path / "killed"
    # rounds enough that training is still on when the first attack row lands (on the in-process
    # engine a round of this setting takes a fraction of a second; the attack worker starts in seconds)
    proc = subprocess.Popen(
        _run_argv(out, "--rounds", "400", "--attack-rounds", "all", "--observers", "server"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = out / "results.csv"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and len(results.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed mid-way"
        assert results.exists(), "no attack row within 180 s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    rows = pd.read_csv(results)
    rounds = pd.read_csv(out / "rounds.csv")
    assert 1 <= len(rows) and rounds["round"].max() < 400  # killed mid-way

    assert report_main([str(out)]) == 0
    text = (out / "report.html").read_text()
    assert "no ending recorded" in text and f"{rounds['round'].max()} of 400 rounds finished" in text
    table = text[text.index('id="observer-table"') :]
    n = int(re.search(r"<tr><td>server</td><td>rgap</td><td class=\"n\">(\d+)</td>", table).group(1))
    assert n == len(rows[rows["status"].notna()])  # every row that finished, and only those
    if CHROMIUM is not None:
        _assert_loads(
            out / "report.html", tmp_path / "killed.png", images=2 + 2
        )  # 2 figures, a true image and its R-GAP


@pytest.mark.parametrize("batch,channels", [(1, 1), (3, 3), (9, 1), (20, 3)])
def test_tile_lays_images_out_as_torchvisions_make_grid(batch, channels):
    import torch
    from torchvision.utils import make_grid  # the layout tile reproduces without the import

    x = torch.rand(batch, channels, 7, 5, generator=torch.Generator().manual_seed(batch)) * 1.2 - 0.1
    want = make_grid(x.clamp(0, 1), nrow=min(batch, 8), padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
    got = tile(x)
    assert got.shape == want.shape and (got == want).all()
