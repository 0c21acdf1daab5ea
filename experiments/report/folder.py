"""Reading a run folder, and the figures drawn from it: the observer x attack table, image
grids, PSNR per round, training curves.

Everything comes from the files in the folder (config.json, rounds.csv, dropped.csv,
results.csv and the per-job image files under ``reconstructions/``), so a run that stopped
early, or was killed, is read from what finished. :mod:`experiments.report.summary` writes
summary.md and report.html from these; ``python -m experiments.report FOLDER`` does it again
for any folder.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator

from attacks import SUCCESS_PSNR  # noqa: E402

from ..results import UNSCORED  # noqa: E402

__all__ = [
    "summarise",
    "save_grids",
    "plot_per_round",
    "draw_per_round",
    "plot_training",
    "setting",
    "attacked",
    "observer_rank",
    "tile",
    "load_jobs",
    "csv_rows",
    "as_float",
    "num",
    "accuracy_by_round",
    "OUTCOME",
]

_ORDER = {"server": 0, "client": 1, "secagg": 2}  # the observers this testbed knows; any other comes after
OUTCOME = "outcome.json"
FEW_ROUNDS = 5  # up to this many attacked rounds, PSNR per round is drawn as bars, not lines


def observer_rank(observer: str) -> tuple[int, str]:
    """The order observers are shown in: the known ones first, then any other by name."""
    return _ORDER.get(str(observer), len(_ORDER)), str(observer)


_COLUMNS = [
    "observer",
    "attack",
    "n",
    "median_psnr",
    "median_ssim",
    "label_acc",
    "recovered",
    "images",
    "success",
    "batch_size",
    "labels",
    "attribution",
    "errors",
    "unscored",
]


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
        out.append(
            {
                "observer": observer,
                "attack": attack,
                "n": len(scored),
                "median_psnr": float(scored["psnr"].median()) if len(scored) else math.nan,
                "median_ssim": float(pd.to_numeric(scored["ssim"], errors="coerce").median())
                if len(scored)
                else math.nan,
                "label_acc": float(free_acc.mean()) if len(free) else math.nan,
                "recovered": recovered,
                "images": images,
                "success": recovered / images if images else math.nan,
                "batch_size": ", ".join(sorted({str(v) for v in scored["batch_size_source"].dropna()})) or "-",
                # an attack that returns no labels (the imprint reads images only) recovers none
                "labels": "granted"
                if len(scored) and len(free) == 0
                else "recovered"
                if free_acc.notna().any()
                else "none",
                "attribution": ", ".join(sorted({str(v) for v in scored["attribution"].dropna()})) or "-",
                "errors": int((g["status"] == "error").sum()),
                "unscored": int(g["status"].isin([s for s in UNSCORED if s != "error"]).sum()),
            }
        )
    table = pd.DataFrame(out, columns=_COLUMNS)
    return table.sort_values(
        by=["attack", "observer"],
        ignore_index=True,
        key=lambda c: c.map(lambda o: "%03d %s" % observer_rank(o)) if c.name == "observer" else c,
    )


def tile(images: torch.Tensor) -> Any:
    """(B, C, H, W) in [0, 1] -> one (H', W', 3) array for imshow: up to 8 images a row, one
    white pixel between them and around (torchvision's ``make_grid`` layout, without importing
    torchvision, which costs a run's process seconds of start-up; one image: no border)."""
    x = images.detach().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    if b == 1:  # make_grid's single image: no border
        return x[0].permute(1, 2, 0).numpy()
    ncol = min(b, 8)
    nrow = -(-b // ncol)
    grid = torch.ones(3, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def load_jobs(folder: Path) -> list[dict[str, Any]]:
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
    jobs = load_jobs(folder)
    paths = []
    for r in sorted({int(j["round"]) for j in jobs}):
        mine = [j for j in jobs if int(j["round"]) == r]
        clients = sorted({int(o) for j in mine for o in j["owners"].tolist()})
        columns = sorted({(j["observer"], j["attack"]) for j in mine}, key=lambda c: (observer_rank(c[0]), c[1]))
        fig, axes = plt.subplots(
            len(clients), 1 + len(columns), figsize=(1.9 * (1 + len(columns)), 2.0 * len(clients)), squeeze=False
        )
        for i, pid in enumerate(clients):
            truth = None
            for k, (observer, attack) in enumerate(columns):
                ax = axes[i][k + 1]
                ax.axis("off")
                match = [
                    j
                    for j in mine
                    if (j["observer"], j["attack"]) == (observer, attack) and pid in j["owners"].tolist()
                ]
                if not match:
                    ax.set_title(
                        f"{observer}/{attack}\n" + ("(its own data)" if observer == "client" else "(not attacked)"),
                        fontsize=7,
                    )
                    continue
                sel = match[0]["owners"] == pid
                truth = match[0]["truth"][sel]
                ax.imshow(tile(match[0]["recon"][sel]), cmap="gray")
                psnr = match[0]["psnr"][sel].clamp(max=300).median().item()
                ax.set_title(f"{observer}/{attack}\n{psnr:.1f} dB", fontsize=7)
            ax = axes[i][0]
            ax.axis("off")
            if truth is not None:
                ax.imshow(tile(truth), cmap="gray")
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
    fig = draw_per_round(results, accuracy_by_round(Path(out_dir) / "rounds.csv"))
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

    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=150.0)
    df["round"] = pd.to_numeric(df["round"], errors="coerce").astype(int)
    hit_rounds = sorted(set(df["round"]))
    series = sorted({(o, a) for o, a in zip(df["observer"], df["attack"])}, key=lambda t: (observer_rank(t[0]), t[1]))
    few = len(hit_rounds) <= FEW_ROUNDS
    fig, (top, ax) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=not few, height_ratios=(1, 1.6))
    if accuracy:
        top.plot(
            list(accuracy),
            list(accuracy.values()),
            color="black",
            linewidth=1.2,
            marker="o" if len(accuracy) <= 30 else None,
            markersize=3,
        )
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
    folder = Path(folder)
    runs = [
        (name, csv_rows(sub / "rounds.csv")) for name, sub in (("federation", folder), ("SecAgg+", folder / "secagg"))
    ]
    runs = [(name, rows) for name, rows in runs if rows]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    for (name, rows), style in zip(runs, ("o-", "s--")):
        for ax, key in zip(axes, ("test_accuracy", "test_loss")):
            pts = [(int(r["round"]), as_float(r.get(key))) for r in rows if as_float(r.get(key)) is not None]
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


def accuracy_by_round(path: Path) -> dict[int, float]:
    """Central test accuracy by round from a rounds.csv (empty when there is none)."""
    out = {}
    for row in csv_rows(path):
        try:
            out[int(row["round"])] = float(row["test_accuracy"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def as_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def num(text: Any, fmt: str) -> str:
    value = as_float(text)
    return "-" if value is None else format(value, fmt)


def setting(config: Mapping[str, Any]) -> str:
    """The run's setting in one sentence, from its run config (config.json's keys)."""
    c = config
    return (
        f"{c.get('mode')} on {c.get('dataset')}, model {c.get('model')} (init {c.get('init')}), "
        f"{c.get('num-clients')} clients, batch size {c.get('batch-size')}, {c.get('num-server-rounds')} rounds, "
        f"{c.get('partition')} partition, seed {c.get('seed')}"
        + (f", faulty clients {c['faulty-clients']}" if c.get("faulty-clients") else "")
        + (f", on {c['resolved-device']}" if c.get("resolved-device") else "")
        + "."
    )


def attacked(config: Mapping[str, Any], folder: Path) -> bool:
    """Whether the run attacks: it names an attack, or it has attack rows (an observer that
    brings its own attack, such as the active server, may run with ``attack = "none"``)."""
    return (
        str(config.get("attack", "none")).strip().lower() not in ("", "none")
        or (Path(folder) / "results.csv").is_file()
    )
