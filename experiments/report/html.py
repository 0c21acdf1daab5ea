"""report.html: one self-contained page per run folder, and the building blocks of any page
(the sweep's page, :mod:`experiments.sweep.page`, is made of them).

The page a person opens to see a run: its setting and threat model in words (who observes
what, what each attacker was granted), the central accuracy and loss per round, the observer
x attack table, every attacked round's images (each client's true batch beside what each
observer reconstructed of it, PSNR under each), PSNR per round, and the updates that were
missing, refused or failed with their reasons.

It is drawn from the folder's files and the tables :mod:`experiments.report.folder`
computes from them, so a killed run's page shows what
finished. Everything it shows is inside it: the figures and images as base64 PNG data URIs,
the style inline, and a few lines of inline script that sort a table by the column clicked
(the page reads the same without script, and in print, where folded sections open). No
template engine and no network: ``html.escape`` and f-strings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from PIL import Image

from attacks import SUCCESS_PSNR

from ..results import UNSCORED
from .folder import attacked, csv_rows, load_jobs, observer_rank, setting, tile

__all__ = [
    "write_run_page",
    "write_page",
    "OBSERVER_VIEWS",
    "PAGE",
    "Cell",
    "esc",
    "figure",
    "fmt",
    "frame",
    "page",
    "section",
    "table",
]

PAGE = "report.html"

# What each observer this testbed knows sees (experiments.observe has the rules); an observer
# not named here is shown with what its rows say it was granted.
OBSERVER_VIEWS = {
    "server": "the parameter server: sees each client's own update, the weights it sent, and the reply's clear-text "
    "number of examples",
    "client": "a curious client (partition {curious}): sees only the successive global models and its own update; it "
    "subtracts its own and attacks its estimate of the others' mean, not knowing who took part",
    "secagg": "the server under SecAgg+: sees only the round's aggregate, and each client's number of examples, which "
    "Flower's SecAgg+ sends in the clear",
    "active": "a malicious server that chose the model it sent in the attacked round (a constructed imprint layer) and "
    "sees each client's own reply to it",
    "active-secagg": "the same malicious server under SecAgg+: it sent its constructed model and sees only the round's "
    "aggregate and the clear-text example counts",
}
_BATCH_SOURCE = {
    "reply": "from the reply's num-examples",
    "config": "from the local schedule it configured",
    "clear-counts": "from SecAgg+'s clear-text example counts",
    "granted": "granted beyond what it sees (an upper bound)",
    "none": "not known: estimated from the last layer",
}
_ATTRIBUTION = {
    "direct": "each row is one client's own update",
    "post-hoc": "its reconstructions are matched to the contributors' images afterwards: it cannot tell whose is whose",
}

_STYLE = """
:root { --ink: #1d2330; --mute: #5b6475; --line: #d8dce3; --band: #f4f6f9; --good: #1a7f37; --bad: #b42318; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); margin: 0;
       background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 32px 0 8px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 20px 0 6px; }
p, li { max-width: 90ch; } .mute { color: var(--mute); } code { font-size: 0.92em; background: var(--band);
     padding: 0 3px; border-radius: 3px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; font-size: 0.9em;
          background: var(--band); } .status.completed, .status.done { color: var(--good); }
.status.failed, .status.stopped, .status.killed { color: var(--bad); }
nav { margin: 10px 0 0; font-size: 0.92em; } nav a { margin-right: 12px; color: var(--mute); }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 0.9em; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 9px; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: var(--band); position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; }
table.sortable th[data-dir="desc"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafbfc; }
.ok { color: var(--good); font-weight: 600; } .no { color: var(--bad); }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--mute); font-size: 0.88em; }
.scroll { overflow-x: auto; }
table.grid td, table.grid th { border: none; text-align: center; padding: 4px 6px; }
table.grid img { image-rendering: pixelated; border: 1px solid var(--line); display: block; margin: 0 auto; }
table.grid .cap { font-size: 0.8em; color: var(--mute); white-space: nowrap; }
table.grid th { background: none; position: static; font-size: 0.8em; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 0.9em; }
dl.kv dt { color: var(--mute); } dl.kv dd { margin: 0; }
details > summary { cursor: pointer; color: var(--mute); margin: 6px 0; }
footer { margin-top: 40px; color: var(--mute); font-size: 0.85em; }
@media print {
  body { font-size: 11pt; } main { max-width: none; padding: 0; } nav { display: none; }
  thead th { position: static; } figure, tr, .round { break-inside: avoid; } h2 { break-after: avoid; }
  .scroll { overflow: visible; } table { font-size: 8pt; } th, td { padding: 2px 4px; }
  table.grid img { max-width: 0.75in; height: auto; } table.grid .cap { white-space: normal; }
  a { color: inherit; text-decoration: none; }
}
"""

# sort a table by the column clicked (numbers as numbers: a cell's data-v, else its text)
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(th => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], i = th.cellIndex;
  const dir = th.dataset.dir === "asc" ? "desc" : "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir;
  const key = td => { const v = td.dataset.v ?? td.textContent.trim(), n = Number(v);
                      return v !== "" && !isNaN(n) ? n : v; };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a.cells[i]), y = key(b.cells[i]);
    const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return dir === "asc" ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));
window.addEventListener("beforeprint", () => document.querySelectorAll("details").forEach(d => d.open = true));
"""


# ---- building blocks -----------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(path: Path, caption: str) -> str:
    """A PNG of the folder, embedded, with its caption and its file's name."""
    path = Path(path)
    if not path.is_file():
        return ""
    return (
        f'<figure><img src="{_png_uri(path.read_bytes())}" alt="{esc(path.name)}">'
        f"<figcaption>{caption} <span class=mute>({esc(path.name)})</span></figcaption></figure>"
    )


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt(v: Any, spec: str = ".3g") -> str:
    """A cell's text: numbers to ``spec``, NaN and None empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


@dataclass(frozen=True)
class Cell:
    """A table cell whose text is not its sort key (``html``: markup, already escaped);
    ``numeric``: right-aligned."""

    html: str
    sort: Any = None
    numeric: bool = False


def _td(v: Any) -> str:
    if isinstance(v, Cell):
        attrs = ' class="n"' if v.numeric else ""
        sort = "" if v.sort is None else f' data-v="{esc(fmt(v.sort, ".6g"))}"'
        return f"<td{attrs}{sort}>{v.html}</td>"
    n = _number(v) if not isinstance(v, (str, bool)) else None
    return f'<td class="n">{esc(fmt(v))}</td>' if n is not None else f"<td>{esc(fmt(v))}</td>"


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    id_: str = "",
    sortable: bool = True,
    numeric: Iterable[str] = (),
) -> str:
    rows = list(rows)
    if not rows:
        return '<p class="mute">(none)</p>'
    numeric = set(numeric)
    head = "".join(f"<th{' class=n' if c in numeric else ''}>{esc(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(_td(v) for v in r) + "</tr>" for r in rows)
    attrs = (f' id="{esc(id_)}"' if id_ else "") + (' class="sortable"' if sortable else "")
    return f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></div>'


def frame(df: pd.DataFrame, *, id_: str = "") -> str:
    """A DataFrame as a sortable table."""
    return table([str(c) for c in df.columns], df.itertuples(index=False, name=None), id_=id_)


def section(anchor: str, title: str, *body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n' + "\n".join(b for b in body if b) + "\n</section>"


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str], made_by: str) -> str:
    links = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in nav)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_STYLE}</style></head>
<body><main>
<header><h1>{esc(title)}</h1><div>{subtitle}</div><nav>{links}</nav></header>
{chr(10).join(s for s in sections if s)}
<footer>Made on {time.strftime("%Y-%m-%d %H:%M:%S")}; <code>{esc(made_by)}</code> makes it again from the folder's
files. Everything shown is inside this file (its figures are also in the folder as PNG files).</footer>
</main><script>{_SCRIPT}</script></body></html>
"""


def write_page(folder: Path, title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> Path:
    """report.html in ``folder``: ``sections`` as (anchor, title, body HTML), each in the page's
    navigation; the footer names the command that makes the page again. Written atomically."""
    text = page(
        title,
        subtitle,
        [(a, t) for a, t, _ in sections],
        [section(a, t, b) for a, t, b in sections],
        f"python -m experiments.report {folder}",
    )
    path = Path(folder) / PAGE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _tile_uri(images) -> tuple[str, int, int]:
    """(B, C, H, W) in [0, 1] -> a PNG data URI of their tile, its width and height."""
    arr = (tile(images) * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    if images.shape[1] == 1:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return _png_uri(buf.getvalue()), img.width, img.height


def _img(images, alt: str, title: str = "") -> str:
    uri, w, h = _tile_uri(images)
    scale = max(1, min(3, 84 // max(w, 1)))  # small images drawn larger, pixels kept sharp
    t = f' title="{esc(title)}"' if title else ""
    return f'<img src="{uri}" width="{w * scale}" height="{h * scale}" alt="{esc(alt)}"{t}>'


# ---- a run ---------------------------------------------------------------------------------


def _phases(folder: Path, config: Mapping[str, Any], outcomes: Mapping[str, Mapping[str, str]]) -> str:
    rounds = [r for r in csv_rows(folder / "rounds.csv") if str(r.get("round", "")).isdigit() and int(r["round"]) > 0]
    total = config.get("num-server-rounds")
    done = f"{len(rounds)} of {total} rounds finished"
    if outcomes:
        parts = [
            f'{esc(phase)} federation <span class="status {esc(o["status"])}">{esc(o["status"])}</span>'
            + (f" <span class=mute>({esc(o['reason'])})</span>" if o.get("reason") else "")
            for phase, o in outcomes.items()
        ]
        return "; ".join(parts) + f"; {done}."
    if _number(total) is not None and len(rounds) >= int(float(total)):
        return (
            f'<span class="status">ending not recorded</span> {done}; the run wrote no outcome.json (made '
            "before it existed, or stopped while its attacks ran): this page is drawn from its files."
        )
    return (
        f'<span class="status killed">no ending recorded</span> the run was killed or is still going: this page '
        f"shows what it wrote; {done}."
    )


def _grants(rows: pd.DataFrame) -> str:
    """What one observer's attackers were granted, in words, from its rows."""

    def values(col: str) -> list[str]:
        return sorted({str(v) for v in rows[col].dropna()}) if col in rows else []

    labels = values("labels_granted")
    said = [
        "the true labels <b>granted</b> (no observer sees them: an upper bound)"
        if labels == ["True"]
        else "labels <b>not granted</b>"
        if labels == ["False"]
        else f"labels granted: {esc(', '.join(labels))}"
    ]
    sources = values("batch_size_source")
    if sources:
        said.append("batch size " + "; ".join(esc(_BATCH_SOURCE.get(s, s)) for s in sources))
    steps = (
        sorted({int(v) for v in pd.to_numeric(rows.get("local_steps"), errors="coerce").dropna()})
        if "local_steps" in rows
        else []
    )
    if any(steps):
        said.append(
            f"the FedAvg update read as {', '.join(map(str, steps))} local step(s)"
            + (
                "; the order of the local batches <b>granted</b>"
                if values("order_granted") == ["True"]
                else "; the order of the local batches not granted"
            )
        )
    elif steps:
        said.append("the update is one gradient (FedSGD)")
    bins = sorted({int(v) for v in pd.to_numeric(rows["bins"], errors="coerce").dropna()}) if "bins" in rows else []
    if bins:  # an active server's constructed model (results.csv's bins)
        said.append(f"it sent a constructed model with {', '.join(map(str, bins))} imprint bins")
    said += [esc(_ATTRIBUTION.get(a, f"attribution {a}")) for a in values("attribution")]
    return "; ".join(said)


def _threat_model(folder: Path, config: Mapping[str, Any], results: pd.DataFrame) -> str:
    items = []
    if attacked(config, folder):
        rounds, clients = config.get("attack-rounds", ""), config.get("attack-clients", "")
        names = ", ".join(sorted({str(a) for a in results["attack"]})) if not results.empty else config.get("attack")
        items.append(
            f"Attacks <b>{esc(names)}</b> on round(s) {esc(rounds)}, clients {esc(clients)}"
            + (
                f", at most {esc(config.get('max-attacks-per-round'))} per round and observer"
                if _number(config.get("max-attacks-per-round"))
                else ""
            )
            + (
                f"; optimisation attacks stopped after {esc(config.get('attack-time-limit'))} s with their best "
                "image (status time_limit)"
                if _number(config.get("attack-time-limit"))
                else ""
            )
            + "."
        )
        observers = sorted(
            set(results["observer"].astype(str))
            if not results.empty
            else set(str(config.get("observers", "")).split(",")) - {""},
            key=observer_rank,
        )
        for o in observers:
            view = OBSERVER_VIEWS.get(
                o, "an observer this page does not describe; what it was granted is read from its rows"
            ).format(curious=esc(config.get("curious-client", 0)))
            mine = results[results["observer"].astype(str) == o] if not results.empty else results
            attacks = ", ".join(sorted({str(a) for a in mine["attack"]})) if len(mine) else ""
            items.append(
                f"<b>{esc(o)}</b> ({esc(attacks) or 'no row yet'}): {esc(view)}."
                + (f" Granted: {_grants(mine)}." if len(mine) else "")
            )
        items.append(
            f"Grant settings: batch size <code>{esc(config.get('grant-batch-size'))}</code>, labels "
            f"<code>{esc(config.get('grant-labels'))}</code>, batch order "
            f"<code>{esc(config.get('grant-batch-order'))}</code>. The referee rebuilds each client's true "
            "batch to score a reconstruction; no ground truth travels to an attacker."
        )
    else:
        items.append("No attack: plain training (the federation's files only).")
    privacy = _json(folder / "privacy.json")
    if privacy.get("defences"):
        g = "; ".join(
            f"<code>{esc(x['defence'])}</code>: epsilon {x['epsilon']:.4g} at delta {x['delta']:.2g} "
            f"({esc(x['level'])} level, {esc(x['accountant'])})"
            for x in privacy.get("guarantees", [])
        )
        items.append(
            "Defences, in this order: "
            + ", ".join(f"<code>{esc(d)}</code>" for d in privacy["defences"])
            + ". "
            + (
                f"Guarantees: {g}."
                if g
                else "No formal guarantee (pruning and plain noise are not differential privacy)."
            )
        )
    else:
        items.append("No defence.")
    if config.get("audit"):
        items.append(f"The clients' leakage audit: <code>{esc(config['audit'])}</code> (audit.csv).")
    if config.get("faulty-clients"):
        items.append(f"Injected faults: <code>{esc(config['faulty-clients'])}</code>.")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _config_table(config: Mapping[str, Any], folder: Path) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in sorted(config.items()))
    deploy = _json(folder / "deploy.json")
    extra = ""
    if deploy:
        keep = {k: v for k, v in deploy.items() if k != "commands"}
        extra = (
            "<h3>Deployment (deploy.json)</h3><dl class=kv>"
            + "".join(
                f"<dt>{esc(k)}</dt><dd>{esc(json.dumps(v) if isinstance(v, (dict, list)) else v)}</dd>"
                for k, v in keep.items()
            )
            + "</dl>"
        )
    return f"<details><summary>every setting (config.json)</summary><dl class=kv>{rows}</dl></details>{extra}"


def _training(folder: Path) -> str:
    parts = [
        figure(
            folder / "training.png",
            "Central test accuracy and loss of the global model after each round (round 0: before training).",
        )
    ]
    for name, sub in (("federation", folder), ("SecAgg+ federation", folder / "secagg")):
        rows = csv_rows(sub / "rounds.csv")
        if rows:
            body = [
                [
                    Cell(esc(r["round"]), int(r["round"]), True),
                    _number(r.get("test_accuracy")),
                    _number(r.get("test_loss")),
                    _number(r.get("train_loss")),
                    r.get("aggregated", ""),
                    r.get("dropped", ""),
                    _number(r.get("seconds")),
                ]
                for r in rows
            ]
            parts.append(
                f"<details><summary>rounds of the {name} (rounds.csv)</summary>"
                + table(
                    ["round", "test accuracy", "test loss", "train loss", "aggregated", "dropped", "seconds"],
                    body,
                    numeric={"round", "test accuracy", "test loss", "train loss", "seconds"},
                )
                + "</details>"
            )
    if len(parts) == 1 and not parts[0]:
        return '<p class="mute">No round finished yet.</p>'
    return "\n".join(parts)


def _observer_table(summary: pd.DataFrame) -> str:
    if summary.empty:
        return '<p class="mute">No attack row yet.</p>'
    rows = []
    for r in summary.itertuples():
        success = f"{r.recovered}/{r.images}" + (f" ({r.success:.0%})" if r.images else "")
        psnr = _number(r.median_psnr)
        rows.append(
            [
                r.observer,
                r.attack,
                r.n,
                Cell(
                    f'<span class="{"ok" if psnr is not None and psnr >= SUCCESS_PSNR else "no"}">'
                    f"{esc(fmt(psnr, '.1f'))}</span>",
                    psnr,
                    True,
                ),
                Cell(esc(fmt(_number(r.median_ssim), ".3f")), _number(r.median_ssim), True),
                Cell(esc(success), r.success if r.images else None, True),
                Cell(esc(fmt(_number(r.label_acc), ".2f")), _number(r.label_acc), True),
                r.batch_size,
                r.labels,
                r.attribution,
                r.errors,
                r.unscored,
            ]
        )
    head = [
        "observer",
        "attack",
        "rows",
        "median PSNR (dB)",
        "median SSIM",
        f"recovered (>= {SUCCESS_PSNR:g} dB)",
        "label accuracy",
        "batch size",
        "labels",
        "attribution",
        "errors",
        "unscored",
    ]
    return (
        f"<p>Medians over the scored (round, client) rows; recovered: images at >= {SUCCESS_PSNR:g} dB of those "
        "scored; label accuracy where labels were not granted. Click a column to sort.</p>"
        + table(head, rows, id_="observer-table", numeric={"rows", "errors", "unscored"})
    )


def _grids(folder: Path, config: Mapping[str, Any], results: pd.DataFrame) -> str:
    jobs = load_jobs(folder)
    if not jobs:
        return '<p class="mute">No reconstruction saved yet.</p>'
    status = {}  # (round, client, observer, attack) -> why there is no image
    for r in results[results["status"].isin(UNSCORED)].itertuples() if not results.empty else []:
        status[(int(r.round), int(r.client), str(r.observer), str(r.attack))] = f"{r.status}: {fmt(r.reason)}"
    curious = int(_number(config.get("curious-client")) or 0)
    out = []
    for rnd in sorted({int(j["round"]) for j in jobs}):
        mine = [j for j in jobs if int(j["round"]) == rnd]
        clients = sorted({int(o) for j in mine for o in j["owners"].tolist()})
        columns = sorted({(j["observer"], j["attack"]) for j in mine}, key=lambda c: (observer_rank(c[0]), c[1]))
        head = (
            "<tr><th>client</th><th>true batch</th>"
            + "".join(f"<th>{esc(o)}<br>{esc(a)}</th>" for o, a in columns)
            + "</tr>"
        )
        body = []
        for pid in clients:
            truth, cells = None, []
            for observer, attack in columns:
                match = [
                    j
                    for j in mine
                    if (j["observer"], j["attack"]) == (observer, attack) and pid in j["owners"].tolist()
                ]
                if not match:
                    why = status.get((rnd, pid, observer, attack)) or (
                        "its own data" if observer == "client" and pid == curious else "not attacked"
                    )
                    cells.append(f'<td><span class="cap">{esc(why)}</span></td>')
                    continue
                sel = match[0]["owners"] == pid
                truth = match[0]["truth"][sel]
                psnr = match[0]["psnr"][sel].clamp(max=300)
                med = psnr.median().item()
                each = ", ".join(f"{p:.1f}" for p in psnr.tolist())
                got = int((psnr >= SUCCESS_PSNR).sum())
                cap = f"{med:.1f} dB" + (f" ({got}/{len(psnr)})" if len(psnr) > 1 else "")
                alt = f"{observer}/{attack}, client {pid}, round {rnd}"
                cells.append(
                    f"<td>{_img(match[0]['recon'][sel], alt, f'PSNR of each image: {each} dB')}"
                    f'<span class="cap {"ok" if med >= SUCCESS_PSNR else ""}">{esc(observer)}/{esc(attack)}: '
                    f"{esc(cap)}</span></td>"
                )
            first = _img(truth, f"client {pid}, round {rnd}, true batch") if truth is not None else ""
            body.append(f"<tr><th>{pid}</th><td>{first}</td>{''.join(cells)}</tr>")
        out.append(
            f'<div class="round"><h3>Round {rnd}</h3><div class="scroll"><table class="grid">'
            f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table></div></div>"
        )
    return (
        f"<p>Each row: a client's true batch, then what each observer reconstructed of it, with the median PSNR "
        f"of its images (and how many reached {SUCCESS_PSNR:g} dB, for a batch); hover an image for each one's "
        "PSNR. An aggregate observer's images are matched to the clients after the fact.</p>" + "\n".join(out)
    )


def _no_score(folder: Path, results: pd.DataFrame) -> str:
    rows = []
    for name, sub in (("federation", folder), ("SecAgg+", folder / "secagg")):
        for d in csv_rows(sub / "dropped.csv"):
            rows.append(
                [
                    Cell(esc(d.get("round", "")), _number(d.get("round")), True),
                    d.get("client", ""),
                    f"{name}: reply not aggregated (node {d.get('node_id', '')})",
                    d.get("status", ""),
                    d.get("reason", ""),
                ]
            )
    if not results.empty:
        for e in results[results["status"].isin(UNSCORED)].itertuples():
            rows.append(
                [Cell(esc(e.round), e.round, True), e.client, f"{e.observer}/{e.attack}", e.status, fmt(e.reason)]
            )
    audit = csv_rows(folder / "audit.csv") + csv_rows(folder / "secagg" / "audit.csv")
    acted = {}
    for a in audit:
        acted[a.get("action", "")] = acted.get(a.get("action", ""), 0) + 1
    said = (
        (
            f"<p>The clients' audit: {len(audit)} replies checked; "
            + ", ".join(f"{esc(k or '?')} {v}" for k, v in sorted(acted.items()))
            + " (audit.csv).</p>"
        )
        if audit
        else ""
    )
    intro = (
        "<p>Replies the server did not aggregate (missing: never arrived; invalid: failed the server's checks; "
        "refused: the client's audit; error: its ClientApp raised) and attack rows with no score.</p>"
    )
    return intro + table(["round", "client", "where", "status", "reason"], rows, id_="no-score-table") + said


def _files(folder: Path) -> str:
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.suffix in (".csv", ".png", ".json", ".md", ".pt") and p.name != PAGE
    )
    subs = [p.name + "/" for p in sorted(folder.iterdir()) if p.is_dir()]
    return "<p>" + ", ".join(f'<a href="{esc(n)}">{esc(n)}</a>' for n in names + subs) + "</p>"


def write_run_page(
    folder: Path,
    config: Mapping[str, Any],
    outcomes: Mapping[str, Mapping[str, str]],
    results: pd.DataFrame,
    summary: pd.DataFrame,
) -> Path:
    """report.html of a run folder; ``summary``: :func:`experiments.report.summarise`."""
    folder = Path(folder)
    subtitle = (
        f"<p>{esc(setting(config))}</p><p>{_phases(folder, config, outcomes)}</p>"
        f'<p class="mute">{esc(folder.resolve())}</p>'
    )
    sections = [
        ("threat", "Setting and threat model", _threat_model(folder, config, results) + _config_table(config, folder)),
        ("training", "Central evaluation", _training(folder)),
    ]
    if attacked(config, folder):
        sections += [
            ("observers", "Who reconstructs what", _observer_table(summary)),
            (
                "per-round",
                "PSNR per round",
                figure(
                    folder / "psnr_per_round.png",
                    "Test accuracy per round (attacked rounds in red) above the PSNR of each attacked round's updates.",
                ),
            ),
            ("images", "Reconstructions, round by round", _grids(folder, config, results)),
        ]
    sections += [
        ("no-score", "Missing, refused and failed", _no_score(folder, results)),
        ("files", "Files", _files(folder)),
    ]
    return write_page(folder, f"Run {folder.name}", subtitle, sections)
