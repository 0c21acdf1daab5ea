"""Sweeps: what stops each attack, for which observer, and what that costs in accuracy.

    python -m experiments.sweep dlg-defences          # a preset (experiments/sweeps/*.toml)
    python -m experiments.sweep my-grid.toml --jobs 2 # a grid of your own
    python -m experiments.sweep dp --out sweeps/dp    # again with the same folder: resumes

A SPEC is a TOML file (or the name of one in ``experiments/sweeps/``)::

    name = "dlg-defences"
    description = "..."
    [attack]            # the attack setting: run-config keys of every cell's attacked run
    attack = "dlg,idlg,rgap,ig"
    [train]             # optional, the training setting: the cell's utility run (no attack)
    mode = "fedsgd"
    num-server-rounds = 30
    [[grid]]            # a product over the lists of a block; blocks are concatenated
    defences = ["", "prune:ratio=0.1", "prune:ratio=0.5"]
    seed = [0, 1]

A grid key is any run-config key (``defences``, ``model``, ``batch-size``, ``mode``,
``attack-rounds``, ``observers``, ``attack``, ``seed``, ...). Its value goes into the cell's
attacked run and, unless ``[train]`` fixes the key or it is an attack setting, into the
training run too, so utility and privacy come from the same defence settings. A cell is one
attacked Flower run (``python -m experiments.run`` in a process of its own) and, with a
``[train]`` table, one training run (shared by the cells whose training settings coincide).

The sweep folder holds ``sweep.json`` (the spec and its cells), ``runs/`` (each run's own
folder), ``cells.csv`` (a row per cell: its parameters, the defence family and strength, final
test accuracy, epsilon where defined, seconds, status, reason), ``results.csv`` (every attack
row of every cell, tagged with the cell's parameters), the figures ``privacy_utility.png``,
``psnr_vs_epsilon.png`` and ``psnr_vs_strength.png``, ``summary.md`` and ``report.html`` (one
self-contained page; ``python -m experiments.report FOLDER`` writes them again from the runs).

Resumable: started again on the same folder, a sweep runs only what has not finished (a run
that was killed half-way starts over). Runs are named by a digest of their settings, so an
edited spec on the same folder runs only the runs whose settings changed (``--overwrite``
starts afresh, e.g. after a change to the code). A run that fails is a row with its reason (the last
line its process printed) and the sweep goes on. Ctrl-C or SIGTERM stops the runs in flight
(their rows are left out, to be run next time), writes the tables of what finished and exits
130 / 143. Exit 2: a bad spec (unknown key, defence or value; one line naming it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fl_sim.config import ConfigError
from fl_sim.defences import DefenceError, parse_defences

from .cli import Parser, argv_for
from .plan import ATTACK_KEYS, ExperimentPlan, default_mapping
from .sweep_report import CELL_FIELDS

__all__ = ["SweepSpec", "Cell", "SweepError", "PRESETS", "load_spec", "run_sweep", "report_sweep", "main"]

PRESETS = Path(__file__).resolve().parent / "sweeps"



class SweepError(ValueError):
    """A spec that cannot be swept; the message is one line."""


def _key(k: str) -> str:
    return str(k).replace("_", "-")


def _digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its parameters and the run configs of its two runs."""

    params: dict[str, Any]  # the grid's values for this cell (run-config keys)
    attack: dict[str, Any]  # the attacked run's run config
    train: dict[str, Any] | None  # the training run's, or None

    @property
    def id(self) -> str:
        return _digest(self.params)

    @property
    def attack_run(self) -> str:
        return "attack-" + _digest(self.attack)

    @property
    def train_run(self) -> str | None:
        return None if self.train is None else "train-" + _digest(self.train)

    def defence_columns(self) -> dict[str, Any]:
        """The cell's defence family and strength (the first defence with a strength; "none"
        for an undefended cell)."""
        defences = parse_defences(self.attack.get("defences", ""))
        if not defences:
            return {"family": "none", "strength": 0.0, "strength_key": ""}
        d = defences[0]
        return {"family": "+".join(x.family for x in defences), "strength": d.strength, "strength_key": d.strength_key}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    attack: dict[str, Any]
    train: dict[str, Any] | None
    grid: list[dict[str, list[Any]]]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        seen: set[str] = set()
        for block in self.grid:
            keys = list(block)
            for values in itertools.product(*(block[k] for k in keys)):
                params = dict(zip(keys, values))
                attack = {**self.attack, **params}
                train = None
                if self.train is not None:
                    train = {**{k: v for k, v in params.items() if k not in ATTACK_KEYS and k not in self.train},
                             **self.train}
                    # the training run carries no attack: keep only keys that mean something without one
                    train = {k: v for k, v in train.items() if k not in ATTACK_KEYS}
                cell = Cell(params, attack, train)
                if cell.id not in seen:
                    seen.add(cell.id)
                    out.append(cell)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "attack": self.attack, "train": self.train,
                "grid": self.grid, "source": self.source, "notes": self.notes}


def load_spec(spec: str) -> SweepSpec:
    """The spec ``spec`` names: a preset's name or a TOML path. Raises SweepError (one line)."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = PRESETS / f"{spec}.toml"
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
            raise SweepError(f"unknown preset {spec!r}: choose one of {names}, or give a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SweepError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML: {exc}") from None
    known = {"name", "description", "attack", "train", "grid", "notes"}
    extra = sorted(set(raw) - known)
    if extra:
        raise SweepError(f"{path.name}: unknown entry {extra[0]!r} (expected {', '.join(sorted(known))})")
    keys = set(default_mapping()) - {"out-dir"}

    def table(name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SweepError(f"{path.name}: [{name}] must be a table of run-config keys")
        out = {}
        for k, v in value.items():
            if _key(k) not in keys:
                raise SweepError(f"{path.name}: [{name}] {k}: not a setting of this app (see [tool.flwr.app.config])")
            out[_key(k)] = v
        return out

    attack = table("attack", raw.get("attack", {}))
    train = table("train", raw["train"]) if "train" in raw else None
    blocks = raw.get("grid", [])
    if isinstance(blocks, dict):
        blocks = [blocks]
    if not blocks:
        raise SweepError(f"{path.name}: no [[grid]] block")
    grid = []
    for i, block in enumerate(blocks):
        block = table(f"grid {i + 1}", block)
        for k, v in block.items():
            if not isinstance(v, list) or not v:
                raise SweepError(f"{path.name}: [[grid]] {k}: expected a non-empty list of values")
        grid.append(block)
    spec_ = SweepSpec(str(raw.get("name", path.stem)), str(raw.get("description", "")), attack, train, grid,
                      source=str(path), notes=list(raw.get("notes", [])))
    _check_values(spec_)
    return spec_


def _check_values(spec: SweepSpec) -> None:
    """Every value of the spec on its own: defence specs parse, values have the key's type.
    (A cell whose valid values conflict under the plan's rules is a refused row, not an error.)"""
    for source, values in [("attack", spec.attack), ("train", spec.train or {})] + [
            (f"grid {k}", {k: v}) for block in spec.grid for k, vs in block.items() for v in vs]:
        for k, v in values.items():
            if k == "defences":
                try:
                    parse_defences(v)
                except DefenceError as exc:
                    raise SweepError(f"[{source.split()[0]}] defences: {exc}") from None
                continue
            try:
                # an attack key in the setting where every attack key means something (FedAvg)
                context = {"attack": "ig", "mode": "fedavg"} if k in ATTACK_KEYS and k != "attack" else {}
                ExperimentPlan.from_mapping({**context, k: v})
            except ConfigError as exc:
                if exc.key == _key(k):
                    raise SweepError(f"[{source.split()[0]}] {k}: {exc.problem}") from None


# ---- running ---------------------------------------------------------------------------------


@dataclass
class RunRecord:
    name: str
    status: str  # done | failed | refused
    reason: str
    seconds: float


class Sweep:
    """A sweep folder and the runs in it (state on the instance; the folder is the record)."""

    def __init__(self, spec: SweepSpec, out: Path, jobs: int, console) -> None:
        self.spec, self.out, self.jobs, self.console = spec, out, jobs, console
        self.cells = spec.cells()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # the folder
    def claim(self, overwrite: bool) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise SweepError(f"{self.out} exists and is not a folder")
        state = self.out / "sweep.json"
        record = {**self.spec.to_json(), "cells": [c.id for c in self.cells]}
        if state.exists():
            # runs are named by a digest of their settings: those a changed spec shares with the
            # old one are the same runs, kept; --overwrite starts afresh (e.g. after a code change)
            old = json.loads(state.read_text())
            if overwrite:
                shutil.rmtree(self.out)
            elif {k: old.get(k) for k in ("attack", "train", "grid")} != {k: record[k] for k in ("attack", "train", "grid")}:
                self.console.print(f"note: {self.out} held another version of the spec; its runs with unchanged settings "
                                   "are kept (--overwrite to start afresh)")
        elif self.out.exists() and any(self.out.iterdir()):
            if not overwrite:
                raise SweepError(f"{self.out} is not empty and holds no sweep: pass --overwrite or another --out")
            shutil.rmtree(self.out)
        try:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            (self.out / "done").mkdir(exist_ok=True)
        except OSError as exc:
            raise SweepError(f"cannot write the sweep folder {self.out}: {exc.strerror}") from None
        import fcntl

        self._lock = open(self.out / "sweep.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"{self.out} is in use by another sweep") from None
        state.write_text(json.dumps(record, indent=2, default=str) + "\n")

    def record(self, name: str) -> RunRecord | None:
        path = self.out / "done" / f"{name}.json"
        return RunRecord(**json.loads(path.read_text())) if path.exists() else None

    # one run
    def _run(self, name: str, config: dict[str, Any]) -> RunRecord | None:
        try:
            plan = ExperimentPlan.from_mapping(config)
            plan.check_data()
        except Exception as exc:  # noqa: BLE001 - the plan's rules: a refused cell, with the reason
            text = f"{exc.key}: {exc.problem}" if isinstance(exc, ConfigError) else str(exc)
            return self._save(RunRecord(name, "refused", " ".join(text.split()), 0.0))
        folder = self.out / "runs" / name
        # the attack always named (none for a training run): experiments.run's own default is the demo
        argv = [sys.executable, "-m", "experiments.run", *argv_for({"attack": "none", **config}), "--out", str(folder),
                "--overwrite"]
        log = self.out / "runs" / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as f:
            # the user's working directory: relative data paths mean the same to the run as to the spec
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "COLUMNS": "120"})
            with self.lock:
                self.procs[name] = proc
            if self.stop.is_set():
                proc.send_signal(signal.SIGTERM)
            code = proc.wait()
            with self.lock:
                self.procs.pop(name, None)
        seconds = time.monotonic() - start
        if self.stop.is_set() and code != 0:
            return None  # we stopped it (however it died: 143, or Ray aborting on SIGTERM): run it next time
        if code == 0:
            return self._save(RunRecord(name, "done", "", seconds))
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {code}"
        return self._save(RunRecord(name, "failed", f"exit {code}: {reason}"[:300], seconds))

    def _save(self, rec: RunRecord) -> RunRecord:
        tmp = self.out / "done" / f".{rec.name}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(rec)))
        tmp.replace(self.out / "done" / f"{rec.name}.json")
        return rec

    def interrupt(self, signum: int) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the run stops its own Ray and attack workers
            except OSError:
                pass

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

    def run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        runs: dict[str, dict[str, Any]] = {}
        for c in self.cells:
            if c.train_run:
                runs.setdefault(c.train_run, c.train)
            runs.setdefault(c.attack_run, c.attack)
        todo = [n for n in runs if self.record(n) is None]

        def cells_done() -> int:
            return sum(all(self.record(n) is not None for n in (c.attack_run, c.train_run) if n) for c in self.cells)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn(), console=self.console) as progress:
            task = progress.add_task("cells", total=len(self.cells), completed=cells_done(),
                                     status=f"{len(runs) - len(todo)} of {len(runs)} runs done before")
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                pending: dict[Future, str] = {}
                queue = list(todo)
                while (queue or pending) and not self.stop.is_set():
                    while queue and len(pending) < self.jobs:
                        name = queue.pop(0)
                        pending[pool.submit(self._run, name, runs[name])] = name
                    finished, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        name = pending.pop(fut)
                        rec = fut.result()
                        status = f"{name}: {rec.status if rec else 'interrupted'}" + (
                            f" ({rec.reason[:60]})" if rec and rec.reason else "")
                        progress.update(task, completed=cells_done(), status=status)
                wait(list(pending))


# ---- the tables --------------------------------------------------------------------------------


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


def _cell_row(sweep: Sweep, cell: Cell) -> dict[str, Any] | None:
    recs = {n: sweep.record(n) for n in (cell.attack_run, cell.train_run) if n}
    if any(r is None for r in recs.values()):
        return None
    runs = sweep.out / "runs"
    attack, train = recs[cell.attack_run], recs.get(cell.train_run) if cell.train_run else None
    bad = [r for r in (attack, train) if r is not None and r.status != "done"]
    guarantees = _privacy(runs / cell.attack_run)
    train_guarantees = _privacy(runs / cell.train_run) if cell.train_run else []
    g = guarantees[0] if guarantees else {}
    attacked = ExperimentPlan.from_mapping(cell.attack).fed if attack.status != "refused" else None
    row = {"cell": cell.id, "attack_run": cell.attack_run, **cell.params, "model": cell.attack.get("model", attacked.model if attacked else ""),
           "dataset": cell.attack.get("dataset", attacked.dataset if attacked else ""), **cell.defence_columns(),
           "epsilon": g.get("epsilon", math.nan), "delta": g.get("delta", math.nan),
           "epsilon_level": g.get("level", ""),
           "epsilon_train": train_guarantees[0]["epsilon"] if train_guarantees else math.nan,
           "attack_accuracy": _final_accuracy(runs / cell.attack_run)}
    if train is not None:
        row.update(test_accuracy=_final_accuracy(runs / cell.train_run), accuracy_of="training run",
                   train_rounds=(cell.train or {}).get("num-server-rounds", default_mapping()["num-server-rounds"]))
    else:
        row.update(test_accuracy=row["attack_accuracy"], accuracy_of="attacked run",
                   train_rounds=attacked.num_server_rounds if attacked else math.nan)
    row.update(seconds=round(sum(r.seconds for r in recs.values()), 1),
               status="done" if not bad else bad[0].status,
               reason="; ".join(f"{'training' if r is train else 'attacked'} run {r.status}: {r.reason}" for r in bad))
    return row


def tables(sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cells.csv and results.csv of what has finished."""
    rows, results = [], []
    for cell in sweep.cells:
        row = _cell_row(sweep, cell)
        if row is None:
            continue
        rows.append(row)
        res = _csv(sweep.out / "runs" / cell.attack_run / "results.csv")
        if not res.empty:
            tags = {k: row[k] for k in ["cell", *cell.params, "family", "strength", "strength_key", "epsilon",
                                        "test_accuracy"]}
            results.append(res.assign(**{k: [v] * len(res) for k, v in tags.items()}))
    params = list(dict.fromkeys(k for c in sweep.cells for k in c.params))
    cells = pd.DataFrame(rows, columns=["cell", *params, *[c for c in ("model", "dataset") if c not in params],
                                        *CELL_FIELDS[1:]])
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame()
    return cells, res


def write_outputs(sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    from .html_report import write_sweep_page
    from .sweep_report import leakage_table, stops_at, write_figures, write_summary

    cells, results = tables(sweep)
    cells.to_csv(sweep.out / "cells.csv", index=False)
    results.to_csv(sweep.out / "results.csv", index=False)
    try:
        figures = write_figures(sweep.out, cells, results)
    except Exception as exc:  # noqa: BLE001 - the tables are on disk; a figure must not take them down
        sweep.console.print(f"[red]figures not drawn[/]: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        figures = []
    write_summary(sweep.out, sweep.spec, cells, results, figures, total=len(sweep.cells))
    write_sweep_page(sweep.out, sweep.spec, cells, results, figures, total=len(sweep.cells),
                     leakage=leakage_table(cells, results), stops=stops_at(cells, results))
    return cells, results


def report_sweep(out: Path) -> Path:
    """Write the tables, figures, summary.md and report.html of the sweep folder ``out`` again
    from sweep.json and the runs it holds (a sweep that was killed gets its report too)."""
    from rich.console import Console

    record = json.loads((Path(out) / "sweep.json").read_text())
    spec = SweepSpec(**{k: record.get(k, d) for k, d in (("name", ""), ("description", ""), ("attack", {}),
                                                         ("train", None), ("grid", []), ("source", ""),
                                                         ("notes", []))})
    write_outputs(Sweep(spec, Path(out), 1, Console(stderr=True)))
    return Path(out) / "report.html"


# ---- the command -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m experiments.sweep",
               description="Run a grid of Flower federations, attacked and trained under defences, and write a sweep "
                           "folder (cells.csv, results.csv, figures, summary.md).")
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
    p.add_argument("spec", help=f"a preset ({names}) or a TOML file")
    p.add_argument("--out", default=None, help="sweep folder (default: sweeps/<name>); the same folder again resumes")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="empty --out first (otherwise the runs it holds with unchanged settings are kept)")
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    return p


def run_sweep(spec: SweepSpec, out: Path, *, jobs: int = 1, overwrite: bool = False, console=None) -> int:
    from rich.console import Console

    from .stopping import StopOnSignal

    console = console or Console(stderr=True)
    sweep = Sweep(spec, out, jobs, console)
    sweep.claim(overwrite)
    console.print(f"sweep [bold]{spec.name}[/]: {len(sweep.cells)} cells -> {out}")
    stopper = StopOnSignal(on_signal=lambda s: (console.print(
        "[yellow]stopping[/]: the runs in flight are stopped; what finished stays (again to kill at once)"),
        sweep.interrupt(s)))
    with stopper:
        try:
            sweep.run()
        finally:
            if stopper.event.is_set():
                sweep.kill_all()
    cells, _ = write_outputs(sweep)
    done = int((cells["status"] == "done").sum()) if not cells.empty else 0
    console.print(f"{done} of {len(sweep.cells)} cells done, {len(cells) - done} failed or refused; "
                  f"{out / 'summary.md'}")
    return stopper.exit_code if stopper.event.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    try:
        spec = load_spec(args.spec)
        if args.list:
            for c in spec.cells():
                print(c.id, json.dumps(c.params))
            return 0
        out = Path(args.out) if args.out else Path("sweeps") / spec.name
        return run_sweep(spec, out, jobs=args.jobs, overwrite=args.overwrite)
    except SweepError as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
