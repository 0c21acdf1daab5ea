"""Figures and tables of a run folder: image grids, PSNR per round, summary.md.

Everything is drawn from the files in the folder (rounds.csv, dropped.csv, results.csv and
the per-job image files under ``reconstructions/``), so a run that stopped early gets its
report from what finished.
"""

from __future__ import annotations

import csv
import json
import math
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

__all__ = ["summarise", "save_grids", "plot_per_round", "write_summary", "finish"]

_ORDER = {"server": 0, "client": 1, "secagg": 2}
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
        out.append({
            "observer": observer, "attack": attack, "n": len(scored),
            "median_psnr": float(scored["psnr"].median()) if len(scored) else math.nan,
            "median_ssim": float(pd.to_numeric(scored["ssim"], errors="coerce").median()) if len(scored) else math.nan,
            "label_acc": float(pd.to_numeric(free["label_acc"], errors="coerce").mean()) if len(free) else math.nan,
            "recovered": recovered, "images": images, "success": recovered / images if images else math.nan,
            "batch_size": ", ".join(sorted({str(v) for v in scored["batch_size_source"].dropna()})) or "-",
            "labels": "granted" if len(scored) and len(free) == 0 else "recovered",
            "attribution": ", ".join(sorted({str(v) for v in scored["attribution"].dropna()})) or "-",
            "errors": int((g["status"] == "error").sum()),
            "unscored": int(g["status"].isin([s for s in UNSCORED if s != "error"]).sum()),
        })
    table = pd.DataFrame(out, columns=_COLUMNS)
    return table.sort_values(by=["attack", "observer"], key=lambda c: c.map(_ORDER) if c.name == "observer" else c,
                             ignore_index=True)


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
        columns = sorted({(j["observer"], j["attack"]) for j in mine}, key=lambda c: (_ORDER.get(c[0], 9), c[1]))
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
    """Two panels over the rounds: the global model's central test accuracy (rounds.csv) and,
    for each (observer, attack), the median PSNR of the attacked rounds (line) and each
    attacked update's (dots)."""
    df = results[~results["status"].isin(UNSCORED)].copy() if not results.empty else results
    if df.empty:
        return None
    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=150.0)
    accuracy = _accuracy(Path(out_dir) / "rounds.csv")
    fig, (top, ax) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True, height_ratios=(1, 1.6))
    if accuracy:
        top.plot(list(accuracy), list(accuracy.values()), color="black", linewidth=1.2)
    top.set_ylabel("test accuracy")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    for (observer, attack), g in df.groupby(["observer", "attack"]):
        med = g.groupby("round")["psnr"].median()
        line = ax.plot(med.index, med.values, marker="o", label=f"{observer} / {attack}")[0]
        ax.scatter(g["round"], g["psnr"], color=line.get_color(), alpha=0.35, s=10, linewidths=0)
        for r in sorted(set(med.index) & set(accuracy)):
            top.plot([r], [accuracy[r]], marker="o", color="tab:red", markersize=4)
    ax.axhline(SUCCESS_PSNR, color="grey", linestyle="--", linewidth=0.8, label=f"{SUCCESS_PSNR:.0f} dB")
    ax.set_xlabel("round (red: attacked)")
    ax.set_ylabel("PSNR (dB): median, each update")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "psnr_per_round.png"
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


def _num(text: str, fmt: str) -> str:
    try:
        return format(float(text), fmt)
    except (TypeError, ValueError):
        return "-"


def write_summary(folder: Path, plan: Any, outcomes: Mapping[str, Any], results: pd.DataFrame, summary: pd.DataFrame,
                  figures: list[Path]) -> Path:
    folder = Path(folder)
    c = plan.fed
    lines = [
        "# Run summary",
        "",
        f"{c.mode} on {c.dataset}, model {c.model} (init {c.init}), {c.num_clients} clients, batch size {c.batch_size}, "
        f"{c.num_server_rounds} rounds, {c.partition} partition, seed {c.seed}"
        + (f", faulty clients {c.faulty_clients}" if c.faulty_clients else "") + ".",
        "",
    ]
    for phase, o in outcomes.items():
        lines.append(f"- {phase} federation: **{o.status}**" + (f" ({o.reason})" if o.reason else ""))
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
    if plan.attack is not None:
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


def finish(folder: str | Path, plan: Any, outcomes: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Draw the figures and write summary.md from the files in ``folder``; returns the
    observer x attack table (empty for a run without attacks)."""
    folder = Path(folder)
    results = read_results(folder / "results.csv")
    summary = summarise(results)
    figures = save_grids(folder) if plan.attack is not None else []
    per_round = plot_per_round(results, folder) if plan.attack is not None else None
    figures += [per_round] if per_round else []
    write_summary(folder, plan, outcomes or {}, results, summary, figures)
    return summary
