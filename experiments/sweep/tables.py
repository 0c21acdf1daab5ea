"""A sweep's tables (cells.csv, results.csv: read from the run folders and each run's record
in the sweep folder), and its figures and summary.md (pure functions of the tables: the same
tables give the same report).

- ``privacy_utility.png``: x the defended federation's test accuracy (after its training
  run's rounds), y the median PSNR of an attack; one curve per defence family, one panel per
  (attack, observer); the undefended cell a star.
- ``psnr_vs_epsilon.png``: the DP families against their epsilon (log scale).
- ``psnr_vs_strength.png``: each family against its own strength setting.
- ``summary.md``: the cell table, the attack-by-cell table, and where each attack stops
  (the weakest setting of each family at which it recovers no image).
- ``report.html`` (:func:`experiments.sweep.page.write_sweep_page`): the same figures and
  tables on one self-contained page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from attacks.rgap import ra_index, rank_analysis  # noqa: E402
from fl_sim.data import load_dataset  # noqa: E402
from fl_sim.models import MODELS, build_model  # noqa: E402

from ..plan import ExperimentPlan, default_mapping  # noqa: E402
from ..report.folder import load_jobs, tile  # noqa: E402
from ..scoring import SUCCESS_PSNR  # noqa: E402
from .spec import Cell, read_record  # noqa: E402

__all__ = [
    "CELL_FIELDS",
    "tables",
    "leakage",
    "leakage_table",
    "stops_at",
    "rank_table",
    "write_figures",
    "write_summary",
]

# cells.csv's own columns (not grid axes)
CELL_FIELDS = (
    "cell",
    "family",
    "strength",
    "strength_key",
    "epsilon",
    "delta",
    "epsilon_level",
    "epsilon_train",
    "test_accuracy",
    "accuracy_of",
    "train_rounds",
    "attack_accuracy",
    "seconds",
    "status",
    "reason",
    "attack_run",
)
DP_FAMILIES = ("dpsgd", "ldp", "central-dp (server)", "central-dp (client)")
PSNR_CAP = 150.0  # an exact reconstruction is inf dB: drawn at the cap


def leakage(results: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, observer, attack): the median PSNR over the attacked updates, the images
    recovered (>= SUCCESS_PSNR) of those attacked, and the rows that were not 'ok'."""
    if results.empty:
        return pd.DataFrame(columns=["cell", "observer", "attack", "psnr", "recovered", "images", "rows"])
    r = results.copy()
    r["psnr"] = pd.to_numeric(r["psnr"], errors="coerce").clip(upper=PSNR_CAP)
    return (
        r.groupby(["cell", "observer", "attack"], sort=False)
        .agg(psnr=("psnr", "median"), recovered=("recovered", "sum"), images=("images", "sum"), rows=("psnr", "size"))
        .reset_index()
    )


def _joined(cells: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    leak = leakage(results)
    keep = [c for c in cells.columns if c not in leak.columns or c == "cell"]
    return leak.merge(cells[keep], on="cell", how="inner")


def stops_at(cells: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Per (family, attack, observer): the weakest strength at which the attack recovers no
    image and every stronger setting does too (ldp's strength is epsilon: smaller is
    stronger), or '' if it is never stopped in the grid."""
    j = _joined(cells, results)
    rows = []
    if j.empty:
        return pd.DataFrame(columns=["family", "attack", "observer", "undefended", "stops_at", "psnr_there"])
    base = j[j["family"] == "none"].groupby(["attack", "observer"])["psnr"].median()
    for (family, attack, observer), g in j[j["family"] != "none"].groupby(["family", "attack", "observer"]):
        per = g.groupby("strength").agg(recovered=("recovered", "sum"), psnr=("psnr", "median")).reset_index()
        per = per.sort_values("strength", ascending=family != "ldp")
        stop, psnr = "", math.nan
        for i in range(len(per)):
            if (per["recovered"].iloc[i:] == 0).all():
                stop, psnr = per["strength"].iloc[i], per["psnr"].iloc[i]
                break
        rows.append(
            {
                "family": family,
                "attack": attack,
                "observer": observer,
                "undefended": base.get((attack, observer), math.nan),
                "stops_at": stop,
                "psnr_there": psnr,
            }
        )
    return pd.DataFrame(rows)


def _panels(j: pd.DataFrame):
    keys = sorted({(a, o) for a, o in zip(j["attack"], j["observer"])}, key=lambda t: (t[1] != "server", t))
    return keys


def _grid(n: int):
    cols = min(4, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _plot(out: Path, j: pd.DataFrame, x: str, name: str, xlabel: str, families, logx: bool, title: str) -> Path | None:
    j = j[j[x].notna() & j["psnr"].notna()]
    if families is not None:
        j = j[j["family"].isin(families) | (j["family"] == "none")]
    if j.empty or not (j["family"] != "none").any():
        return None
    panels = _panels(j)
    fig, axes = _grid(len(panels))
    colours = {f: f"C{i}" for i, f in enumerate(sorted(set(j["family"]) - {"none"}))}
    for ax, (attack, observer) in zip(axes, panels):
        g = j[(j["attack"] == attack) & (j["observer"] == observer)]
        none = g[g["family"] == "none"]
        for family, fg in g[g["family"] != "none"].groupby("family"):
            # in order of strength, from the undefended point where x has one (accuracy)
            pts = fg.groupby("strength").agg(x=(x, "median"), y=("psnr", "median"))
            pts = pts.sort_index(ascending=family != "ldp")
            if x == "test_accuracy" and not none.empty:
                pts = pd.concat([pd.DataFrame({"x": [none[x].median()], "y": [none["psnr"].median()]}), pts])
            ax.plot(pts["x"], pts["y"], "o-", color=colours[family], label=family, ms=4)
        if not none.empty and x != "epsilon" and x != "strength":
            ax.plot(none[x].median(), none["psnr"].median(), "*", color="k", ms=12, label="undefended")
        elif not none.empty:
            ax.axhline(none["psnr"].median(), color="k", ls=":", lw=1, label="undefended")
        ax.axhline(SUCCESS_PSNR, color="grey", ls="--", lw=0.8)
        if logx:
            ax.set_xscale("log")
        ax.set_title(f"{attack}, {observer}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("median PSNR (dB)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.text(0.5, 0.0, title, ha="center", va="top", fontsize=8, wrap=True)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _strength_plot(out: Path, j: pd.DataFrame) -> Path | None:
    j = j[j["psnr"].notna()]
    if j.empty:
        return None
    families = sorted(set(j["family"]) - {"none"})
    if not families:
        return None
    undefended = j[j["family"] == "none"].groupby(["attack", "observer"])["psnr"].median()
    fig, axes = _grid(len(families))
    for ax, family in zip(axes, families):
        g = j[j["family"] == family]
        for i, ((attack, observer), ag) in enumerate(g.groupby(["attack", "observer"])):
            pts = ag.groupby("strength")["psnr"].median().sort_index()
            ax.plot(
                pts.index,
                pts.values,
                "o-" if observer == "server" else "s--",
                color=f"C{i}",
                ms=4,
                label=f"{attack}, {observer}",
            )
            if (attack, observer) in undefended:  # the undefended level, dotted
                ax.axhline(undefended[(attack, observer)], color=f"C{i}", ls=":", lw=1)
        ax.axhline(SUCCESS_PSNR, color="grey", ls="--", lw=0.8)
        key = g["strength_key"].iloc[0]
        positive = g["strength"] > 0
        if positive.all() and g["strength"].max() / g["strength"].min() > 20:
            ax.set_xscale("log")
        strengths = sorted(set(g["strength"]))
        if len(strengths) <= 6:  # ticks at the settings swept, not at fractions around a single one
            ax.set_xticks(strengths, [f"{v:g}" for v in strengths])
            ax.minorticks_off()
        ax.set_title(f"{family} (dotted: undefended)", fontsize=9)
        ax.set_xlabel(key + (" (smaller is stronger)" if family == "ldp" else ""), fontsize=8)
        ax.set_ylabel("median PSNR (dB)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[len(families) :]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "psnr_vs_strength.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _axis_plot(out: Path, j: pd.DataFrame, axis: str) -> Path | None:
    """Median PSNR of each attack and observer for each value of a grid key (bars), with the
    images recovered of those attacked on top."""
    j = j.copy()
    j[axis] = j[axis].astype(str)
    values = list(dict.fromkeys(j[axis]))
    series = sorted({(a, o) for a, o in zip(j["attack"], j["observer"])}, key=lambda t: (t[1], t[0]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(values) * max(len(series), 1) / 3), 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (attack, observer) in enumerate(series):
        g = j[(j["attack"] == attack) & (j["observer"] == observer)].groupby(axis)
        ys = [g["psnr"].median().get(v, math.nan) for v in values]
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(values))]
        ax.bar(xs, [0 if math.isnan(y) else y for y in ys], width, color=f"C{i}", label=f"{attack}, {observer}")
        for x, v, y in zip(xs, values, ys):
            rec, n = g["recovered"].sum().get(v, 0), g["images"].sum().get(v, 0)
            ax.text(
                x,
                0 if math.isnan(y) else y,
                "x" if math.isnan(y) else f"{int(rec)}/{int(n)}",
                ha="center",
                va="bottom",
                fontsize=6,
            )
    ax.axhline(SUCCESS_PSNR, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(values)), values, fontsize=8)
    ax.set_ylabel("median PSNR (dB)", fontsize=8)
    ax.set_title(f"median PSNR by {axis} (x: the attack refused the update; n/m: images recovered)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / f"psnr_by_{axis.replace('-', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reconstruction_sheet(out: Path, cells: pd.DataFrame) -> Path | None:
    """One image per cell and (observer, attack): what each attacker made of one client's
    image (the lowest client every observer attacked), beside the true image; a row per cell."""
    rows = []
    for _, cell in cells.iterrows():
        jobs = load_jobs(out / "runs" / str(cell["attack_run"]))
        if jobs:
            rows.append((cell, jobs))
    if not rows:
        return None
    columns = sorted(
        {(j["observer"], j["attack"]) for _, jobs in rows for j in jobs}, key=lambda t: (t[0] != "server", t)
    )
    owners = [
        set.intersection(
            *[
                {int(o) for j in jobs if (j["observer"], j["attack"]) == c for o in j["owners"].tolist()}
                for c in columns
                if any((j["observer"], j["attack"]) == c for j in jobs)
            ]
        )
        for _, jobs in rows
    ]
    common = set.intersection(*owners) if owners else set()
    pid = min(common) if common else None
    if pid is None:
        return None
    fig, axes = plt.subplots(
        len(rows), 1 + len(columns), figsize=(1.25 * (1 + len(columns)), 1.3 * len(rows)), squeeze=False
    )
    for i, (cell, jobs) in enumerate(rows):
        label = (
            cell["defences"] if "defences" in cell and isinstance(cell["defences"], str) and cell["defences"] else ""
        )
        label = label or ("; ".join(f"{k}={cell[k]}" for k in _other_axes(cells)) or "undefended")
        for k, c in enumerate(columns):
            ax = axes[i][k + 1]
            ax.axis("off")
            match = [j for j in jobs if (j["observer"], j["attack"]) == c and pid in j["owners"].tolist()]
            if i == 0:
                ax.set_title(f"{c[1]}\n{c[0]}", fontsize=6)
            if not match:
                continue
            sel = match[0]["owners"] == pid
            ax.imshow(tile(match[0]["recon"][sel][:1]), cmap="gray")
            ax.text(
                0.5,
                -0.02,
                f"{match[0]['psnr'][sel][0].clamp(max=300).item():.0f} dB",
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=5,
            )
            truth = match[0]["truth"][sel][:1]
        ax = axes[i][0]
        ax.axis("off")
        ax.imshow(tile(truth), cmap="gray")
        ax.text(
            -0.1,
            0.5,
            label.replace(",", ",\n").replace(";", ";\n"),
            transform=ax.transAxes,
            ha="right",
            va="center",
            fontsize=5,
        )
        if i == 0:
            ax.set_title(f"client {pid}\ntrue", fontsize=6)
    fig.tight_layout(h_pad=0.6, w_pad=0.2)
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_figures(out: Path, cells: pd.DataFrame, results: pd.DataFrame) -> list[Path]:
    if cells.empty or results.empty:
        return []
    j = _joined(cells, results)  # a cell whose training run failed still has its attacks (no accuracy)
    if j.empty:
        return []
    of = cells["accuracy_of"].dropna().iloc[0] if cells["accuracy_of"].notna().any() else ""
    made = [
        _plot(
            out,
            j,
            "test_accuracy",
            "privacy_utility.png",
            f"test accuracy ({of})",
            None,
            False,
            f"x: accuracy of the {of}; y: the attacked run's reconstructions; dashed: {SUCCESS_PSNR:g} dB",
        ),
        _plot(
            out,
            j,
            "epsilon",
            "psnr_vs_epsilon.png",
            "epsilon of the attacked run",
            DP_FAMILIES,
            True,
            "epsilon from Opacus's / Flower's accountants (ldp: per-round epsilon x rounds)",
        ),
        _strength_plot(out, j),
        *(_axis_plot(out, j, axis) for axis in _other_axes(cells)),
        reconstruction_sheet(out, cells),
    ]
    return [p for p in made if p is not None]


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _md(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return ["(none)"]
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return lines


def _other_axes(cells: pd.DataFrame) -> list[str]:
    """The grid's keys other than the defences that take more than one value."""
    skip = {"defences", "dataset", *CELL_FIELDS}
    return [k for k in cells.columns if k not in skip and cells[k].astype(str).nunique() > 1]


def rank_table(cells: pd.DataFrame) -> pd.DataFrame:
    """R-GAP's rank analysis of each model of the sweep, on the attacked runs' data shape."""
    rows = []
    for model in sorted(set(cells["model"].dropna())):
        dataset = cells.loc[cells["model"] == model, "dataset"].iloc[0] if "dataset" in cells else None
        try:
            data = load_dataset(dataset or default_mapping()["dataset"])
            net = build_model(model, data.input_shape, data.num_classes, seed=0)
            table = rank_analysis(net, data.input_shape)
            deficits = [f"{r['layer']}: {r['deficit']}" for r in table if r["deficit"] > 0]
            rows.append(
                {
                    "model": model,
                    "layers": len(table),
                    "unknowns": sum(r["unknowns"] for r in table),
                    "deficit": sum(max(r["deficit"], 0) for r in table),
                    "ra_index": ra_index(table),
                    "rank-deficient layers": ", ".join(deficits) or "none",
                    "about": MODELS[model].summary,
                }
            )
        except Exception as exc:  # noqa: BLE001 - a layer R-GAP cannot invert: say which
            rows.append(
                {
                    "model": model,
                    "layers": "",
                    "unknowns": "",
                    "deficit": "",
                    "ra_index": "",
                    "rank-deficient layers": f"R-GAP refuses: {' '.join(str(exc).split())[:120]}",
                    "about": MODELS[model].summary if model in MODELS else "",
                }
            )
    return pd.DataFrame(rows)


def leakage_table(cells: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """A row per (family, strength, other grid keys): the accuracy and epsilon, then per
    (observer, attack) the median PSNR and the images recovered of those attacked."""
    j = _joined(cells, results) if not cells.empty else pd.DataFrame()
    if j.empty:
        return pd.DataFrame()
    j["value"] = [
        f"{p:.1f} ({int(r)}/{int(n)})" if not math.isnan(p) else "no reconstruction"
        for p, r, n in zip(j["psnr"], j["recovered"], j["images"])
    ]
    index = ["family", "strength", *_other_axes(cells)]
    for k in index:
        j[k] = j[k].fillna("")
    table = j.pivot_table(index=index, columns=["observer", "attack"], values="value", aggfunc="first")
    table.columns = [f"{o}/{a}" for o, a in table.columns]
    table = table.reset_index()
    c = cells.copy()
    for k in index:
        c[k] = c[k].fillna("")
    acc = c.groupby(index).agg(accuracy=("test_accuracy", "median"), epsilon=("epsilon", "median")).reset_index()
    return acc.merge(table, on=index, how="right")


def write_summary(
    out: Path, spec, cells: pd.DataFrame, results: pd.DataFrame, figures: list[Path], *, total: int
) -> Path:
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        spec.description.strip(),
        "",
        f"Spec: `{spec.source}`. {len(cells)} of {total} cells finished"
        + (f" ({int((cells['status'] != 'done').sum())} failed or refused)." if not cells.empty else "."),
    ]
    for note in spec.notes:
        lines += ["", note]
    for fig in figures:
        lines += ["", f"![{fig.stem}]({fig.name})"]
    if not cells.empty:
        shown = cells.drop(columns=[c for c in ("cell", "attack_run", "delta", "strength_key") if c in cells.columns])
        lines += ["", "## Cells", ""] + _md(shown)
        table = leakage_table(cells, results)
        if not table.empty:
            lines += ["", f"## Leakage: median PSNR in dB (images recovered at >= {SUCCESS_PSNR:g} dB)", ""] + _md(
                table
            )
            stops = stops_at(cells, results)
            lines += [
                "",
                "## Where each attack stops",
                "",
                "The weakest setting of each family from which on the attack recovers no image "
                "(empty: not stopped in this grid).",
                "",
            ] + _md(stops)
        errors = results[results["status"] == "error"] if "status" in results else results.iloc[:0]
        if not errors.empty:
            lines += ["", "## Attacks that refused an update", ""] + [
                f"- {k[0]} on {k[1]}: {k[2]}"
                for k, _ in errors.fillna("").groupby(
                    ["attack", *(["model"] if "model" in errors else ["cell"]), "reason"]
                )
            ]
        if "model" in cells and cells["model"].nunique() > 1:
            lines += [
                "",
                "## R-GAP's rank analysis of each model",
                "",
                "From the weights alone (`attacks.rgap.rank_analysis`): per layer, the unknowns and the "
                "rank of R-GAP's system; a deficit leaves part of the input undetermined.",
                "",
            ]
            lines += _md(rank_table(cells))
        failed = cells[cells["status"] != "done"]
        if not failed.empty:
            lines += ["", "## Failed or refused cells", ""] + [
                f"- `{r['cell']}`: {r['status']}: {r['reason']}" for _, r in failed.iterrows()
            ]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _final_accuracy(folder: Path) -> float:
    rounds = _csv(folder / "rounds.csv")
    if rounds.empty or "test_accuracy" not in rounds:
        return math.nan
    return float(rounds["test_accuracy"].dropna().iloc[-1]) if rounds["test_accuracy"].notna().any() else math.nan


def _privacy(folder: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((folder / "privacy.json").read_text()).get("guarantees", [])
    except (OSError, ValueError):
        return []


def _cell_row(out: Path, cell: Cell) -> dict[str, Any] | None:
    recs = {n: read_record(out, n) for n in (cell.attack_run, cell.train_run) if n}
    if any(r is None for r in recs.values()):
        return None
    runs = out / "runs"
    attack, train = recs[cell.attack_run], recs.get(cell.train_run) if cell.train_run else None
    bad = [r for r in (attack, train) if r is not None and r.status != "done"]
    guarantees = _privacy(runs / cell.attack_run)
    train_guarantees = _privacy(runs / cell.train_run) if cell.train_run else []
    g = guarantees[0] if guarantees else {}
    attacked = ExperimentPlan.from_mapping(cell.attack).fed if attack.status != "refused" else None
    row = {
        "cell": cell.id,
        "attack_run": cell.attack_run,
        **cell.params,
        "model": cell.attack.get("model", attacked.model if attacked else ""),
        "dataset": cell.attack.get("dataset", attacked.dataset if attacked else ""),
        **cell.defence_columns(),
        "epsilon": g.get("epsilon", math.nan),
        "delta": g.get("delta", math.nan),
        "epsilon_level": g.get("level", ""),
        "epsilon_train": train_guarantees[0]["epsilon"] if train_guarantees else math.nan,
        "attack_accuracy": _final_accuracy(runs / cell.attack_run),
    }
    if train is not None:
        row.update(
            test_accuracy=_final_accuracy(runs / cell.train_run),
            accuracy_of="training run",
            train_rounds=(cell.train or {}).get("num-server-rounds", default_mapping()["num-server-rounds"]),
        )
    else:
        row.update(
            test_accuracy=row["attack_accuracy"],
            accuracy_of="attacked run",
            train_rounds=attacked.num_server_rounds if attacked else math.nan,
        )
    row.update(
        seconds=round(sum(r.seconds for r in recs.values()), 1),
        status="done" if not bad else bad[0].status,
        reason="; ".join(f"{'training' if r is train else 'attacked'} run {r.status}: {r.reason}" for r in bad),
    )
    return row


def tables(out: Path, cells: list[Cell]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cells.csv and results.csv of what has finished of ``cells`` in the sweep folder ``out``."""
    rows, results = [], []
    for cell in cells:
        row = _cell_row(out, cell)
        if row is None:
            continue
        rows.append(row)
        res = _csv(out / "runs" / cell.attack_run / "results.csv")
        if not res.empty:
            tags = {
                k: row[k]
                for k in ["cell", *cell.params, "family", "strength", "strength_key", "epsilon", "test_accuracy"]
            }
            results.append(res.assign(**{k: [v] * len(res) for k, v in tags.items()}))
    params = list(dict.fromkeys(k for c in cells for k in c.params))
    table = pd.DataFrame(
        rows, columns=["cell", *params, *[c for c in ("model", "dataset") if c not in params], *CELL_FIELDS[1:]]
    )
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame()
    return table, res
