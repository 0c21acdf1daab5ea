"""The end of a run: summary.md, summary.json and report.html from the files in its folder.

``finish`` (called at the end of every run and deployment) records how each phase ended in
``outcome.json``, so a report made again later says the same; without one (a killed run) the
page says how many rounds finished.

summary.json (:func:`write_summary_json`) is summary.md's observer x attack table for
programs: the same numbers (:func:`experiments.report.folder.summarise`), one object per
(observer, attack), NaN as null, with the success bar and how each phase ended.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from attacks import SUCCESS_PSNR

from ..results import UNSCORED, read_results
from .folder import (
    OUTCOME,
    attacked,
    csv_rows,
    num,
    plot_per_round,
    plot_training,
    save_grids,
    setting,
    summarise,
)
from .html import write_run_page

__all__ = ["write_summary", "write_summary_json", "outcomes_of", "finish", "report_run", "SUMMARY_JSON"]

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"


def write_summary(
    folder: Path,
    config: Mapping[str, Any],
    outcomes: Mapping[str, Mapping[str, str]],
    results: pd.DataFrame,
    summary: pd.DataFrame,
    figures: list[Path],
) -> Path:
    """summary.md; ``outcomes``: phase -> {"status", "reason"} (:func:`outcomes_of`)."""
    folder = Path(folder)
    lines = ["# Run summary", "", setting(config), ""]
    for phase, o in outcomes.items():
        lines.append(f"- {phase} federation: **{o['status']}**" + (f" ({o['reason']})" if o.get("reason") else ""))
    privacy = json.loads((folder / "privacy.json").read_text()) if (folder / "privacy.json").exists() else {}
    if privacy.get("defences"):
        lines += [
            "",
            "## Defences",
            "",
            "Applied in this order: " + "; ".join(f"`{d}`" for d in privacy["defences"]) + ".",
        ]
        for g in privacy.get("guarantees", []):
            lines.append(
                f"- `{g['defence']}`: epsilon {g['epsilon']:.4g} at delta {g['delta']:.2g} ({g['level']} level; "
                f"{g['accountant']}; {g['note']})"
            )
        if not privacy.get("guarantees"):
            lines.append("- no formal guarantee (pruning and plain noise are not differential privacy)")
    for name, sub in (("federation", folder), ("SecAgg+ federation", folder / "secagg")):
        rows = csv_rows(sub / "rounds.csv")
        if not rows:
            continue
        lines += [
            "",
            f"## Central evaluation of the {name}",
            "",
            "| round | test accuracy | test loss | replies aggregated | dropped |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['round']} | {num(r['test_accuracy'], '.3f')} | {num(r['test_loss'], '.4f')} | "
            f"{r.get('aggregated') or '-'} | {r.get('dropped') or '-'} |"
            for r in rows
        ]
        dropped = csv_rows(sub / "dropped.csv")
        if dropped:
            lines += ["", f"Replies of the {name} that were not aggregated:", ""]
            lines += [
                f"- round {d['round']}, client {d['client']} (node {d['node_id']}): {d['status']}: {d['reason']}"
                for d in dropped
            ]
    if attacked(config, folder):
        lines += [
            "",
            "## What each observer reconstructs",
            "",
            f"Median over the scored (round, client) rows; success = images at >= {SUCCESS_PSNR:.0f} dB. "
            "Batch size: what the attacker was told (reply: the reply's num-examples; clear-counts: SecAgg+'s "
            "clear-text counts; granted: beyond what it sees; none: estimated). Attribution post-hoc: matched to "
            "clients afterwards.",
            "",
            "| observer | attack | rows | median PSNR (dB) | median SSIM | label acc | recovered | batch size "
            "| labels | attribution | errors | unscored |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary.itertuples():
            lines.append(
                f"| {r.observer} | {r.attack} | {r.n} | {r.median_psnr:.2f} | {r.median_ssim:.3f} | "
                f"{r.label_acc:.2f} | {r.recovered}/{r.images} | {r.batch_size} | {r.labels} | "
                f"{r.attribution} | {r.errors} | {r.unscored} |"
            )
        unscored = results[results["status"].isin(UNSCORED)] if not results.empty else results
        if len(unscored):
            lines += ["", "## Rows with no score", ""]
            lines += [
                f"- round {e.round}, client {e.client}, {e.observer}/{e.attack}: {e.status}: {e.reason}"
                for e in unscored.itertuples()
            ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path = folder / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plain(v: Any) -> Any:
    """A JSON value of a table cell: numpy numbers as Python's, NaN as None."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def write_summary_json(folder: Path, outcomes: Mapping[str, Mapping[str, str]], summary: pd.DataFrame) -> Path:
    """summary.json: ``table``, the observer x attack table (``summary``, from
    :func:`~experiments.report.folder.summarise`; empty for a run without attacks) as a list
    of objects with its columns (``n``: scored rows; ``median_psnr`` in dB; ``recovered`` of
    ``images`` at >= ``success_psnr`` dB, ``success`` their share; ``label_acc`` over the
    rows whose labels were not granted; ``errors`` and ``unscored`` rows), and ``phases``: how
    each federation ended (:func:`outcomes_of`)."""
    path = Path(folder) / SUMMARY_JSON
    table = [{k: _plain(v) for k, v in row.items()} for row in summary.to_dict(orient="records")]
    body = {"success_psnr": SUCCESS_PSNR, "phases": dict(outcomes), "table": table}
    path.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")
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
    rounds = [int(r["round"]) for r in csv_rows(path) if str(r.get("round", "")).isdigit()]
    return max(rounds) if rounds else None


def finish(
    folder: str | Path, plan: Any, outcomes: Mapping[str, Any] | None = None, *, strict: bool = False
) -> pd.DataFrame:
    """Draw the figures and write summary.md, summary.json and report.html from the files in ``folder``;
    returns the observer x attack table (empty for a run without attacks). ``plan``: the
    run's :class:`~experiments.plan.ExperimentPlan` or its run config (config.json's
    mapping); ``outcomes``: how each phase ended (phase -> an object or mapping with
    ``status`` and ``reason``), None when a report is made after the run. A failure to write
    report.html is logged at a run's end, and raised when ``strict`` (the command line)."""
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
    write_summary_json(folder, ended, summary)
    try:
        write_run_page(folder, config, ended, results, summary)
    except Exception as exc:  # noqa: BLE001 - the tables and summary.md are on disk; the page must not take them down
        if strict:
            raise
        log.warning("report.html not written: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:200])
    return summary


def report_run(folder: str | Path) -> Path:
    """Write the report of a finished, stopped or killed run folder from its files; returns
    report.html. Raises FileNotFoundError for a folder with no config.json."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no run (no config.json)")
    finish(folder, json.loads((folder / "config.json").read_text()), strict=True)
    return folder / "report.html"
