"""Figures and tables of a run folder: image grids, PSNR per round, training curves,
summary.md and report.html (:mod:`experiments.html_report`).

Everything is drawn from the files in the folder (config.json, rounds.csv, dropped.csv,
results.csv and the per-job image files under ``reconstructions/``), so a run that stopped
early, or was killed, gets its report from what finished::

    python -m experiments.report FOLDER                 # a run folder or a sweep folder
    python -m experiments.report FOLDER --screenshot report.png   # and a picture of the page

``finish`` (called at the end of every run and deployment) records how each phase ended in
``outcome.json``, so a report made again later says the same; without one (a killed run) the
page says how many rounds finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from attacks import SUCCESS_PSNR  # noqa: E402

from .results import UNSCORED, read_results  # noqa: E402

__all__ = ["summarise", "save_grids", "plot_per_round", "draw_per_round", "plot_training", "write_summary", "finish", "setting",
           "observer_rank", "main"]

log = logging.getLogger(__name__)

_ORDER = {"server": 0, "client": 1, "secagg": 2}  # the observers this testbed knows; any other comes after
OUTCOME = "outcome.json"
FEW_ROUNDS = 5  # up to this many attacked rounds, PSNR per round is drawn as bars, not lines


def observer_rank(observer: str) -> tuple[int, str]:
    """The order observers are shown in: the known ones first, then any other by name."""
    return _ORDER.get(str(observer), len(_ORDER)), str(observer)
_COLUMNS = ["observer", "attack", "n", "median_psnr", "median_ssim", "label_acc", "recovered", "images", "success",
            "batch_size", "labels", "attribution", "errors", "unscored"]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per (observer, attack): scored rows, median PSNR / SSIM, label accuracy (where labels
    were not granted), images recovered at >= 30 dB out of all images scored (``success``),
    what the attacker was granted, and the rows with no score (attack errors; replies that
    never arrived or were refused, skipped or interrupted attacks). Medians, not means: a
    mean hides failures."""
    if results.empty:
        return pd.DataFrame(columns=_COLUMNS)
    df = results.copy()
    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=300.0)
    out = []
    for (observer, attack), g in df.groupby(["observer", "attack"], sort=False):
        scored = g[~g["status"].isin(UNSCORED)]
        images = int(pd.to_numeric(scored["images"], errors="coerce").fillna(0).sum())
        recovered = int(pd.to_numeric(scored["recovered"], errors="coerce").fillna(0).sum())
        free = scored[~scored["labels_granted"].astype(str).isin(["True", "true", "1"])]
        free_acc = pd.to_numeric(free["label_acc"], errors="coerce")
        out.append({
            "observer": observer, "attack": attack, "n": len(scored),
            "median_psnr": float(scored["psnr"].median()) if len(scored) else math.nan,
            "median_ssim": float(pd.to_numeric(scored["ssim"], errors="coerce").median()) if len(scored) else math.nan,
            "label_acc": float(free_acc.mean()) if len(free) else math.nan,
            "recovered": recovered, "images": images, "success": recovered / images if images else math.nan,
            "batch_size": ", ".join(sorted({str(v) for v in scored["batch_size_source"].dropna()})) or "-",
            # an attack that returns no labels (the imprint reads images only) recovers none
            "labels": "granted" if len(scored) and len(free) == 0 else "recovered" if free_acc.notna().any() else "none",
            "attribution": ", ".join(sorted({str(v) for v in scored["attribution"].dropna()})) or "-",
            "errors": int((g["status"] == "error").sum()),
            "unscored": int(g["status"].isin([s for s in UNSCORED if s != "error"]).sum()),
        })
    table = pd.DataFrame(out, columns=_COLUMNS)
    return table.sort_values(by=["attack", "observer"], ignore_index=True,
                             key=lambda c: c.map(lambda o: "%03d %s" % observer_rank(o)) if c.name == "observer" else c)


def _tile(images: torch.Tensor) -> Any:
    """(B, C, H, W) in [0, 1] -> one (H', W', 3) array for imshow."""
    grid = make_grid(images.clamp(0, 1), nrow=min(len(images), 8), padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def _load_jobs(folder: Path) -> list[dict[str, Any]]:
    jobs = []
    for path in sorted((folder / "reconstructions").glob("*.pt")):
        try:
            job = torch.load(path)
        except Exception:  # noqa: BLE001 - a file cut short by a kill: skip it
            continue
        job["truth"] = job["truth"].float() / 255
        job["recon"] = job["recon"].float() / 255
        jobs.append(job)
    return jobs


def save_grids(folder: Path) -> list[Path]:
    """One PNG per attacked round: a row per client, its true batch, then what each
    (observer, attack) reconstructed of it, titled with the median PSNR of its images."""
    folder = Path(folder)
    jobs = _load_jobs(folder)
    paths = []
    for r in sorted({int(j["round"]) for j in jobs}):
        mine = [j for j in jobs if int(j["round"]) == r]
        clients = sorted({int(o) for j in mine for o in j["owners"].tolist()})
        columns = sorted({(j["observer"], j["attack"]) for j in mine}, key=lambda c: (observer_rank(c[0]), c[1]))
        fig, axes = plt.subplots(len(clients), 1 + len(columns), figsize=(1.9 * (1 + len(columns)), 2.0 * len(clients)),
                                 squeeze=False)
        for i, pid in enumerate(clients):
            truth = None
            for k, (observer, attack) in enumerate(columns):
                ax = axes[i][k + 1]
                ax.axis("off")
                match = [j for j in mine if (j["observer"], j["attack"]) == (observer, attack) and pid in j["owners"].tolist()]
                if not match:
                    ax.set_title(f"{observer}/{attack}\n" + ("(its own data)" if observer == "client" else "(not attacked)"),
                                 fontsize=7)
                    continue
                sel = match[0]["owners"] == pid
                truth = match[0]["truth"][sel]
                ax.imshow(_tile(match[0]["recon"][sel]), cmap="gray")
                psnr = match[0]["psnr"][sel].clamp(max=300).median().item()
                ax.set_title(f"{observer}/{attack}\n{psnr:.1f} dB", fontsize=7)
            ax = axes[i][0]
            ax.axis("off")
            if truth is not None:
                ax.imshow(_tile(truth), cmap="gray")
            ax.set_title(f"client {pid}\ntrue batch", fontsize=7)
        fig.suptitle(f"Round {r}: what each observer reconstructs", fontsize=9)
        fig.tight_layout()
        path = folder / f"reconstructions_round{r}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_round(results: pd.DataFrame, out_dir: Path) -> Path | None:
    """psnr_per_round.png (:func:`draw_per_round`), or None when no row has a score."""
    fig = draw_per_round(results, _accuracy(Path(out_dir) / "rounds.csv"))
    if fig is None:
        return None
    path = Path(out_dir) / "psnr_per_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_per_round(results: pd.DataFrame, accuracy: Mapping[int, float]):
    """Two panels: the global model's central test accuracy per round (attacked rounds in
    red) and, for each (observer, attack), the PSNR of the attacked rounds: with up to
    :data:`FEW_ROUNDS` attacked rounds a bar per round at the median with each attacked
    update as a dot (one round is one group of bars, not a dot on an axis of fractions);
    with more, a line through the medians over the round axis, each update a dot. None when
    no row has a score."""
    df = results[~results["status"].isin(UNSCORED)].copy() if not results.empty else results
    if df.empty:
        return None
    from matplotlib.ticker import MaxNLocator

    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=150.0)
    df["round"] = pd.to_numeric(df["round"], errors="coerce").astype(int)
    hit_rounds = sorted(set(df["round"]))
    series = sorted({(o, a) for o, a in zip(df["observer"], df["attack"])}, key=lambda t: (observer_rank(t[0]), t[1]))
    few = len(hit_rounds) <= FEW_ROUNDS
    fig, (top, ax) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=not few, height_ratios=(1, 1.6))
    if accuracy:
        top.plot(list(accuracy), list(accuracy.values()), color="black", linewidth=1.2,
                 marker="o" if len(accuracy) <= 30 else None, markersize=3)
        hit = [r for r in hit_rounds if r in accuracy]
        top.plot(hit, [accuracy[r] for r in hit], "o", color="tab:red", markersize=5, label="attacked round")
        top.legend(fontsize=7, loc="best")
    top.set_ylabel("test accuracy")
    top.set_ylim(0, 1)
    top.set_xlabel("round" if few else "")
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.grid(alpha=0.3)
    width = 0.8 / max(len(series), 1)
    for i, (observer, attack) in enumerate(series):
        g = df[(df["observer"] == observer) & (df["attack"] == attack)]
        med = g.groupby("round")["psnr"].median()
        colour = f"C{i}"
        if few:  # bars at categorical positions, one group per attacked round
            pos = {r: k + (i - (len(series) - 1) / 2) * width for k, r in enumerate(hit_rounds)}
            xs = [pos[r] for r in med.index]
            ax.bar(xs, med.values, width * 0.9, color=colour, alpha=0.75, label=f"{observer} / {attack}")
            for x, y in zip(xs, med.values):
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
            ax.scatter([pos[r] for r in g["round"]], g["psnr"], color="black", s=9, zorder=3, linewidths=0)
        else:
            ax.plot(med.index, med.values, marker="o", color=colour, label=f"{observer} / {attack}")
            ax.scatter(g["round"], g["psnr"], color=colour, alpha=0.35, s=10, linewidths=0)
    ax.axhline(SUCCESS_PSNR, color="grey", linestyle="--", linewidth=0.8, label=f"{SUCCESS_PSNR:.0f} dB")
    top_db = max(float(df["psnr"].max()) if df["psnr"].notna().any() else 0.0, SUCCESS_PSNR)
    ax.set_ylim(0, top_db * 1.4)  # room above the bars for the legend
    if few:
        ax.set_xticks(range(len(hit_rounds)), [f"round {r}" for r in hit_rounds])
        ax.set_xlabel("attacked round (bars: median over its updates; dots: each update)")
    else:
        ax.set_xlabel("round (red: attacked)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("PSNR (dB)" + ("" if few else ": median, each update"))
    ax.legend(fontsize=7, ncol=min(4, len(series) + 1), loc="upper center")
    ax.grid(alpha=0.3, axis="y" if few else "both")
    fig.tight_layout()
    return fig


def plot_training(folder: Path) -> Path | None:
    """``training.png``: the central test accuracy and loss per round of the federation and,
    where it ran, of the SecAgg+ federation (rounds.csv, secagg/rounds.csv)."""
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    runs = [(name, _csv(sub / "rounds.csv")) for name, sub in (("federation", folder), ("SecAgg+", folder / "secagg"))]
    runs = [(name, rows) for name, rows in runs if rows]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    for (name, rows), style in zip(runs, ("o-", "s--")):
        for ax, key in zip(axes, ("test_accuracy", "test_loss")):
            pts = [(int(r["round"]), _float(r.get(key))) for r in rows if _float(r.get(key)) is not None]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3 if len(pts) <= 30 else 0, linewidth=1.2, label=name)
    for ax, label in zip(axes, ("test accuracy", "test loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    if len(runs) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle("Central evaluation of the global model", fontsize=9)
    fig.tight_layout()
    path = folder / "training.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy(path: Path) -> dict[int, float]:
    """Central test accuracy by round from a rounds.csv (empty when there is none)."""
    out = {}
    for row in _csv(path):
        try:
            out[int(row["round"])] = float(row["test_accuracy"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _num(text: Any, fmt: str) -> str:
    value = _float(text)
    return "-" if value is None else format(value, fmt)


def setting(config: Mapping[str, Any]) -> str:
    """The run's setting in one sentence, from its run config (config.json's keys)."""
    c = config
    return (f"{c.get('mode')} on {c.get('dataset')}, model {c.get('model')} (init {c.get('init')}), "
            f"{c.get('num-clients')} clients, batch size {c.get('batch-size')}, {c.get('num-server-rounds')} rounds, "
            f"{c.get('partition')} partition, seed {c.get('seed')}"
            + (f", faulty clients {c['faulty-clients']}" if c.get("faulty-clients") else "") + ".")


def attacked(config: Mapping[str, Any], folder: Path) -> bool:
    """Whether the run attacks: it names an attack, or it has attack rows (an observer that
    brings its own attack, such as the active server, may run with ``attack = "none"``)."""
    return (str(config.get("attack", "none")).strip().lower() not in ("", "none")
            or (Path(folder) / "results.csv").is_file())


def write_summary(folder: Path, config: Mapping[str, Any], outcomes: Mapping[str, Mapping[str, str]],
                  results: pd.DataFrame, summary: pd.DataFrame, figures: list[Path]) -> Path:
    """summary.md; ``outcomes``: phase -> {"status", "reason"} (:func:`outcomes_of`)."""
    folder = Path(folder)
    lines = ["# Run summary", "", setting(config), ""]
    for phase, o in outcomes.items():
        lines.append(f"- {phase} federation: **{o['status']}**" + (f" ({o['reason']})" if o.get("reason") else ""))
    privacy = json.loads((folder / "privacy.json").read_text()) if (folder / "privacy.json").exists() else {}
    if privacy.get("defences"):
        lines += ["", "## Defences", "", "Applied in this order: " + "; ".join(f"`{d}`" for d in privacy["defences"]) + "."]
        for g in privacy.get("guarantees", []):
            lines.append(f"- `{g['defence']}`: epsilon {g['epsilon']:.4g} at delta {g['delta']:.2g} ({g['level']} level; "
                         f"{g['accountant']}; {g['note']})")
        if not privacy.get("guarantees"):
            lines.append("- no formal guarantee (pruning and plain noise are not differential privacy)")
    for name, sub in (("federation", folder), ("SecAgg+ federation", folder / "secagg")):
        rows = _csv(sub / "rounds.csv")
        if not rows:
            continue
        lines += ["", f"## Central evaluation of the {name}", "",
                  "| round | test accuracy | test loss | replies aggregated | dropped |", "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {_num(r['test_accuracy'], '.3f')} | {_num(r['test_loss'], '.4f')} | "
                  f"{r.get('aggregated') or '-'} | {r.get('dropped') or '-'} |" for r in rows]
        dropped = _csv(sub / "dropped.csv")
        if dropped:
            lines += ["", f"Replies of the {name} that were not aggregated:", ""]
            lines += [f"- round {d['round']}, client {d['client']} (node {d['node_id']}): {d['status']}: {d['reason']}"
                      for d in dropped]
    if attacked(config, folder):
        lines += [
            "", "## What each observer reconstructs", "",
            f"Median over the scored (round, client) rows; success = images at >= {SUCCESS_PSNR:.0f} dB. "
            "Batch size: what the attacker was told (reply: the reply's num-examples; clear-counts: SecAgg+'s clear-text "
            "counts; granted: beyond what it sees; none: estimated). Attribution post-hoc: matched to clients afterwards.",
            "",
            "| observer | attack | rows | median PSNR (dB) | median SSIM | label acc | recovered | batch size | labels | "
            "attribution | errors | unscored |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary.itertuples():
            lines.append(f"| {r.observer} | {r.attack} | {r.n} | {r.median_psnr:.2f} | {r.median_ssim:.3f} | "
                         f"{r.label_acc:.2f} | {r.recovered}/{r.images} | {r.batch_size} | {r.labels} | "
                         f"{r.attribution} | {r.errors} | {r.unscored} |")
        unscored = results[results["status"].isin(UNSCORED)] if not results.empty else results
        if len(unscored):
            lines += ["", "## Rows with no score", ""]
            lines += [f"- round {e.round}, client {e.client}, {e.observer}/{e.attack}: {e.status}: {e.reason}"
                      for e in unscored.itertuples()]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path = folder / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def outcomes_of(folder: Path, outcomes: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """How each phase ended: from ``outcomes`` (the run's own, which are then kept in
    outcome.json), else from outcome.json if it belongs to the rounds on disk (a run resumed
    and killed since has more rounds than it names), else nothing (a killed run)."""
    folder = Path(folder)
    last = _last_round(folder / "rounds.csv")
    if outcomes:
        out = {k: _ending(o) for k, o in outcomes.items()}
        (folder / OUTCOME).write_text(json.dumps({"phases": out, "last_round": last}, indent=2) + "\n")
        return out
    try:
        saved = json.loads((folder / OUTCOME).read_text())
    except (OSError, ValueError):
        return {}
    return saved.get("phases", {}) if saved.get("last_round") == last else {}


def _ending(o: Any) -> dict[str, str]:
    if isinstance(o, Mapping):
        return {"status": str(o["status"]), "reason": str(o.get("reason") or "")}
    return {"status": str(o.status), "reason": str(o.reason or "")}


def _last_round(path: Path) -> int | None:
    rounds = [int(r["round"]) for r in _csv(path) if str(r.get("round", "")).isdigit()]
    return max(rounds) if rounds else None


def finish(folder: str | Path, plan: Any, outcomes: Mapping[str, Any] | None = None, *,
           strict: bool = False) -> pd.DataFrame:
    """Draw the figures and write summary.md and report.html from the files in ``folder``;
    returns the observer x attack table (empty for a run without attacks). ``plan``: the
    run's :class:`~experiments.plan.ExperimentPlan` or its run config (config.json's
    mapping); ``outcomes``: how each phase ended (phase -> an object or mapping with
    ``status`` and ``reason``), None when a report is made after the run. A failure to write
    report.html is logged at a run's end, and raised when ``strict`` (the command line)."""
    from .html_report import write_run_page

    folder = Path(folder)
    config = plan.to_mapping() if hasattr(plan, "to_mapping") else dict(plan)
    results = read_results(folder / "results.csv")
    results = results[results["status"].notna()]  # a row cut short by a kill has no status: not a row
    summary = summarise(results)
    ended = outcomes_of(folder, outcomes)
    training = plot_training(folder)
    figures = save_grids(folder) if attacked(config, folder) else []
    per_round = plot_per_round(results, folder) if attacked(config, folder) else None
    figures += [p for p in (per_round, training) if p]
    write_summary(folder, config, ended, results, summary, figures)
    try:
        write_run_page(folder, config, ended, results, summary)
    except Exception as exc:  # noqa: BLE001 - the tables and summary.md are on disk; the page must not take them down
        if strict:
            raise
        log.warning("report.html not written: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:200])
    return summary


def report_folder(folder: str | Path) -> Path:
    """Write the report of a finished, stopped or killed run folder, or of a sweep folder,
    from its files; returns report.html. Raises FileNotFoundError for a folder that holds
    neither (no config.json, no sweep.json)."""
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        from .sweep import report_sweep

        return report_sweep(folder)
    if (folder / "config.json").is_file():
        finish(folder, json.loads((folder / "config.json").read_text()), strict=True)
        return folder / "report.html"
    raise FileNotFoundError(f"{folder} holds no run (no config.json) and no sweep (no sweep.json)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report",
                                description="Write report.html (and summary.md, the figures) of a run folder or a sweep "
                                            "folder from its files: finished, stopped or killed.")
    p.add_argument("folder", help="a run folder (config.json) or a sweep folder (sweep.json)")
    p.add_argument("--screenshot", metavar="PNG", help="also load the page in headless Chromium and save a screenshot")
    p.add_argument("--width", type=int, default=1280, help="the screenshot's width in CSS pixels (default: 1280)")
    p.add_argument("--height", type=int, default=0,
                   help="the screenshot's height (default 0: the whole page, at most 12,000 pixels)")
    p.add_argument("--scale", type=float, default=1.0, help="the screenshot's size relative to the page (default: 1)")
    args = p.parse_args(argv)
    try:
        page = report_folder(args.folder)
    except FileNotFoundError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(page)
    if args.screenshot:
        from .browser import BrowserError, check_page

        try:
            check = check_page(page, screenshot=args.screenshot, width=args.width, height=args.height or 900,
                               full_page=not args.height, scale=args.scale)
        except BrowserError as exc:
            print(f"{p.prog}: error: {exc}", file=sys.stderr)
            return 1
        for problem in check.errors + [f"image not decoded: {alt}" for alt in check.broken_images]:
            print(f"{p.prog}: {problem}", file=sys.stderr)
        print(args.screenshot)
        return 1 if check.errors or check.broken_images else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
