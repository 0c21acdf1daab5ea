"""Figures and tables of an attacked run: image grids, PSNR per round, summary.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from attacks import SUCCESS_PSNR  # noqa: E402

__all__ = ["summarise", "save_grids", "plot_per_round", "write_summary", "finish"]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per (observer, attack): rows, median PSNR / SSIM / label accuracy, success rate
    (PSNR >= 30 dB), errors. Medians, not means: a mean hides failures."""
    if results.empty:
        return pd.DataFrame(columns=["observer", "attack", "n", "median_psnr", "median_ssim", "label_acc", "success", "errors"])
    df = results.copy()
    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=300.0)
    g = df.groupby(["observer", "attack"], sort=False)
    out = g.agg(
        n=("psnr", "size"),
        median_psnr=("psnr", "median"),
        median_ssim=("ssim", "median"),
        label_acc=("label_acc", "mean"),
        success=("psnr", lambda p: float((p >= SUCCESS_PSNR).mean())),
        errors=("status", lambda s: int((s == "error").sum())),
    ).reset_index()
    order = {"server": 0, "client": 1, "secagg": 2}
    return out.sort_values(by=["attack", "observer"], key=lambda c: c.map(order) if c.name == "observer" else c).reset_index(drop=True)


def _tile(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> one (H', W', 3) array for imshow."""
    grid = make_grid(images.clamp(0, 1), nrow=min(len(images), 8), padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def save_grids(images: Sequence[tuple[Any, dict[str, torch.Tensor]]], results: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per attacked round: a row per client, its true batch, then what each
    (observer, attack) reconstructed of it, titled with the PSNR."""
    out_dir = Path(out_dir)
    paths = []
    rounds = sorted({job.server_round for job, _ in images})
    for r in rounds:
        jobs = [(job, im) for job, im in images if job.server_round == r]
        clients = sorted({int(o) for _, im in jobs for o in im["owners"].tolist()})
        columns = sorted({(job.observer, job.attack) for job, _ in jobs}, key=lambda c: ({"server": 0, "client": 1, "secagg": 2}.get(c[0], 9), c[1]))
        fig, axes = plt.subplots(len(clients), 1 + len(columns), figsize=(1.9 * (1 + len(columns)), 2.0 * len(clients)), squeeze=False)
        for i, pid in enumerate(clients):
            truth = None
            for j, (observer, attack) in enumerate(columns):
                ax = axes[i][j + 1]
                ax.axis("off")
                match = [im for job, im in jobs if (job.observer, job.attack) == (observer, attack) and pid in im["owners"].tolist()]
                if not match:
                    ax.set_title(f"{observer}/{attack}\n" + ("(its own data)" if observer == "client" else "(not attacked)"), fontsize=7)
                    continue
                mine = match[0]["owners"] == pid
                truth = match[0]["truth"][mine]
                ax.imshow(_tile(match[0]["recon"][mine]), cmap="gray")
                sel = results[(results["round"] == r) & (results["client"] == pid) & (results["observer"] == observer) & (results["attack"] == attack)]
                psnr = float(sel["psnr"].iloc[0]) if len(sel) else math.nan
                ax.set_title(f"{observer}/{attack}\n{psnr:.1f} dB", fontsize=7)
            ax = axes[i][0]
            ax.axis("off")
            if truth is not None:
                ax.imshow(_tile(truth), cmap="gray")
            ax.set_title(f"client {pid}\ntrue batch", fontsize=7)
        fig.suptitle(f"Round {r}: what each observer reconstructs", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"reconstructions_round{r}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_round(results: pd.DataFrame, out_dir: Path) -> Path | None:
    """Median PSNR per round for each (observer, attack)."""
    if results.empty:
        return None
    df = results.copy()
    df["psnr"] = pd.to_numeric(df["psnr"], errors="coerce").clip(upper=150.0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (observer, attack), g in df.groupby(["observer", "attack"]):
        med = g.groupby("round")["psnr"].median()
        ax.plot(med.index, med.values, marker="o", label=f"{observer} / {attack}")
    ax.axhline(SUCCESS_PSNR, color="grey", linestyle="--", linewidth=0.8, label=f"{SUCCESS_PSNR:.0f} dB")
    ax.set_xlabel("round")
    ax.set_ylabel("median PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "psnr_per_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(results: pd.DataFrame, summary: pd.DataFrame, cfg: Any, out_dir: Path, figures: Sequence[Path]) -> Path:
    lines = [
        "# Attacked run",
        "",
        f"{cfg.mode} on {cfg.dataset}, model {cfg.model} (init {cfg.init}), {cfg.num_clients} clients, "
        f"batch size {cfg.batch_size}, {cfg.num_server_rounds} rounds, seed {cfg.seed}.",
        "",
        f"Median over (round, client) rows; success = PSNR >= {SUCCESS_PSNR:.0f} dB.",
        "",
        "| observer | attack | rows | median PSNR (dB) | median SSIM | label acc | success | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(f"| {r.observer} | {r.attack} | {r.n} | {r.median_psnr:.2f} | {r.median_ssim:.3f} | "
                     f"{r.label_acc:.2f} | {100 * r.success:.0f}% | {r.errors} |")
    errs = results[results["status"] == "error"]
    if len(errs):
        lines += ["", "## Failed attacks", ""]
        lines += [f"- round {e.round}, client {e.client}, {e.observer}/{e.attack}: {e.reason}" for e in errs.itertuples()]
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path = Path(out_dir) / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def finish(runner: Any, cfg: Any, out_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """After a run: read results.csv, draw the figures, write summary.md. Returns the summary
    table and the figure paths."""
    results = pd.read_csv(runner.csv_path)
    summary = summarise(results)
    figures = save_grids(runner.images, results, out_dir)
    per_round = plot_per_round(results, out_dir)
    figures += [per_round] if per_round else []
    write_summary(results, summary, cfg, out_dir, figures)
    return summary, figures
