"""report.html of a sweep folder, made of :mod:`experiments.report.html`'s building blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from attacks import SUCCESS_PSNR

from ..report.html import PAGE, Cell, esc, figure, frame, table, write_page

__all__ = ["write_sweep_page"]

_SWEEP_FIGURES = {
    "privacy_utility.png": "Privacy against utility: the defended federation's test accuracy (x) and the median PSNR "
    "of each attack (y); the undefended cell a star.",
    "psnr_vs_epsilon.png": "PSNR against epsilon for the differential-privacy families (log scale).",
    "psnr_vs_strength.png": "Each defence family against its own strength setting (dotted: undefended).",
    "reconstructions.png": "What each attack made of one client's image, cell by cell.",
}


def write_sweep_page(
    out: Path,
    spec: Any,
    cells: pd.DataFrame,
    results: pd.DataFrame,
    figures: Sequence[Path],
    *,
    total: int,
    leakage: pd.DataFrame,
    stops: pd.DataFrame,
) -> Path:
    """report.html of a sweep folder: its figures, the cells table, the leakage table
    (:func:`experiments.sweep.tables.leakage_table`) and where each attack stops."""
    out = Path(out)
    failed = cells[cells["status"] != "done"] if not cells.empty else cells
    subtitle = (
        f"<p>{esc(spec.description.strip())}</p><p>{len(cells)} of {total} cells finished"
        + (f", {len(failed)} failed or refused" if len(failed) else "")
        + f". Spec: <code>{esc(spec.source)}</code>.</p>"
        + "".join(f"<p>{esc(n)}</p>" for n in spec.notes)
    )
    figs = "\n".join(
        figure(p, _SWEEP_FIGURES.get(p.name, f"Median PSNR by {p.stem.removeprefix('psnr_by_')}.")) for p in figures
    )
    shown = (
        cells.drop(columns=[c for c in ("delta", "strength_key") if c in cells.columns]) if not cells.empty else cells
    )
    if "attack_run" in shown:  # each cell's attacked run has its own page
        shown = shown.assign(
            attack_run=[
                Cell(f'<a href="runs/{esc(r)}/{PAGE}">{esc(r)}</a>', r)
                if isinstance(r, str) and (out / "runs" / r / PAGE).exists()
                else r
                for r in shown["attack_run"]
            ]
        )
    sections = [
        ("figures", "Figures", figs or '<p class="mute">No figure yet.</p>'),
        (
            "cells",
            "Cells",
            "<p>A row per cell; the attacked run links to its own report.</p>" + frame(shown, id_="cells-table")
            if not cells.empty
            else '<p class="mute">No cell finished yet.</p>',
        ),
        (
            "leakage",
            "Leakage",
            f"<p>Median PSNR in dB (images recovered at >= {SUCCESS_PSNR:g} dB of those attacked), "
            "per cell and (observer, attack).</p>" + frame(leakage, id_="leakage-table"),
        ),
        (
            "stops",
            "Where each attack stops",
            "<p>The weakest setting of each family from which on the attack recovers "
            "no image (empty: not stopped in this grid).</p>" + frame(stops),
        ),
    ]
    if not failed.empty:
        sections.append(
            (
                "failed",
                "Failed or refused cells",
                table(
                    ["cell", "status", "reason"],
                    failed[["cell", "status", "reason"]].itertuples(index=False, name=None),
                ),
            )
        )
    errors = results[results["status"] == "error"] if "status" in results else results.iloc[:0]
    if not errors.empty:
        keys = ["attack", *(["model"] if "model" in errors else ["cell"]), "reason"]
        sections.append(
            ("refusals", "Attacks that refused an update", table(keys, [k for k, _ in errors.fillna("").groupby(keys)]))
        )
    return write_page(out, f"Sweep {spec.name}", subtitle, sections)
