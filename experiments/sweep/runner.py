"""Running a sweep: each run of its cells as ``python -m experiments.run`` in a process of its
own, on this machine (``--jobs`` at once) or as a Ray task on a cluster (:mod:`.cluster`), each
run's record kept in the sweep folder as it ends, and the tables, figures, summary.md and
report.html written from what finished."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fl_sim.config import ConfigError

from ..cli import argv_for
from ..plan import ExperimentPlan
from ..stopping import StopOnSignal
from .cluster import ClusterError, LocalRuns, RayRuns
from .page import write_sweep_page
from .spec import RunRecord, SweepError, SweepSpec, read_record
from .tables import leakage_table, stops_at, tables, write_figures, write_summary

__all__ = ["Sweep", "run_sweep", "write_outputs", "report_sweep"]


class Sweep:
    """A sweep folder and the runs in it (state on the instance; the folder is the record)."""

    def __init__(
        self,
        spec: SweepSpec,
        out: Path,
        jobs: int,
        console,
        engine: str | None = None,
        device: str | None = None,
        where: LocalRuns | RayRuns | None = None,
    ) -> None:
        self.spec, self.out, self.jobs, self.console = spec, out, jobs, console
        self.device = device  # each run's --device (None: the cell's, default auto); not part of a run's digest
        # where the runs run: local processes on ``engine`` (None: the run's default), or Ray tasks
        self.where = where or LocalRuns(engine, device)
        self.cells = spec.cells()
        self.stop = threading.Event()

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
            elif {k: old.get(k) for k in ("attack", "train", "grid")} != {
                k: record[k] for k in ("attack", "train", "grid")
            }:
                self.console.print(
                    f"note: {self.out} held another version of the spec; its runs with unchanged settings "
                    "are kept (--overwrite to start afresh)"
                )
        elif self.out.exists() and any(self.out.iterdir()):
            if not overwrite:
                raise SweepError(f"{self.out} is not empty and holds no sweep: pass --overwrite or another --out")
            shutil.rmtree(self.out)
        try:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            (self.out / "done").mkdir(exist_ok=True)
        except OSError as exc:
            raise SweepError(f"cannot write the sweep folder {self.out}: {exc.strerror}") from None
        self._lock = open(self.out / "sweep.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"{self.out} is in use by another sweep") from None
        state.write_text(json.dumps(record, indent=2, default=str) + "\n")

    def record(self, name: str) -> RunRecord | None:
        return read_record(self.out, name)

    # one run
    def _run(self, name: str, config: dict[str, Any]) -> RunRecord | None:
        try:
            plan = ExperimentPlan.from_mapping({**config, **({"device": self.device} if self.device else {})})
            plan.check_data()
        except Exception as exc:  # noqa: BLE001 - the plan's rules: a refused cell, with the reason
            text = f"{exc.key}: {exc.problem}" if isinstance(exc, ConfigError) else str(exc)
            return self._save(RunRecord(name, "refused", " ".join(text.split()), 0.0))
        folder = self.out / "runs" / name
        # the attack always named (none for a training run): experiments.run's own default is the demo
        args = argv_for({"attack": "none", **config})
        # the processes the run keeps busy: its own, and its attack workers
        cpus = 1 + (plan.attack.workers if plan.attack is not None else 0)
        outcome = self.where.run(name, args, folder, self.out / "runs" / f"{name}.log", cpus)
        if self.stop.is_set() and outcome.code != 0:
            return None  # we stopped it (however it died: 143, or Ray aborting on SIGTERM): run it next time
        if outcome.code == 0:
            return self._save(RunRecord(name, "done", "", outcome.seconds))
        if outcome.code is None:  # it never exited: Ray's reason
            return self._save(RunRecord(name, "failed", outcome.reason[:300], outcome.seconds))
        log = self.out / "runs" / f"{name}.log"
        lines = (
            [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
        )
        reason = lines[-1] if lines else f"exit code {outcome.code}"
        return self._save(RunRecord(name, "failed", f"exit {outcome.code}: {reason}"[:300], outcome.seconds))

    def _save(self, rec: RunRecord) -> RunRecord:
        tmp = self.out / "done" / f".{rec.name}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(rec)))
        tmp.replace(self.out / "done" / f"{rec.name}.json")
        return rec

    def interrupt(self, signum: int) -> None:
        self.stop.set()
        self.where.stop()  # local runs get SIGTERM; Ray tasks are cancelled

    def kill_all(self) -> None:
        self.where.kill()

    def run(self) -> None:
        runs: dict[str, dict[str, Any]] = {}
        for c in self.cells:
            if c.train_run:
                runs.setdefault(c.train_run, c.train)
            runs.setdefault(c.attack_run, c.attack)
        todo = [n for n in runs if self.record(n) is None]

        def cells_done() -> int:
            return sum(all(self.record(n) is not None for n in (c.attack_run, c.train_run) if n) for c in self.cells)

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            task = progress.add_task(
                "cells",
                total=len(self.cells),
                completed=cells_done(),
                status=f"{len(runs) - len(todo)} of {len(runs)} runs done before",
            )
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
                            f" ({rec.reason[:60]})" if rec and rec.reason else ""
                        )
                        progress.update(task, completed=cells_done(), status=status)
                wait(list(pending))


def write_outputs(sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cells.csv, results.csv, the figures, summary.md and report.html of what has finished."""
    cells, results = tables(sweep.out, sweep.cells)
    cells.to_csv(sweep.out / "cells.csv", index=False)
    results.to_csv(sweep.out / "results.csv", index=False)
    try:
        figures = write_figures(sweep.out, cells, results)
    except Exception as exc:  # noqa: BLE001 - the tables are on disk; a figure must not take them down
        sweep.console.print(f"[red]figures not drawn[/]: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        figures = []
    write_summary(sweep.out, sweep.spec, cells, results, figures, total=len(sweep.cells))
    write_sweep_page(
        sweep.out,
        sweep.spec,
        cells,
        results,
        figures,
        total=len(sweep.cells),
        leakage=leakage_table(cells, results),
        stops=stops_at(cells, results),
    )
    return cells, results


def report_sweep(out: Path) -> Path:
    """Write the tables, figures, summary.md and report.html of the sweep folder ``out`` again
    from sweep.json and the runs it holds (a sweep that was killed gets its report too)."""
    record = json.loads((Path(out) / "sweep.json").read_text())
    spec = SweepSpec(
        **{
            k: record.get(k, d)
            for k, d in (
                ("name", ""),
                ("description", ""),
                ("attack", {}),
                ("train", None),
                ("grid", []),
                ("source", ""),
                ("notes", []),
            )
        }
    )
    write_outputs(Sweep(spec, Path(out), 1, Console(stderr=True)))
    return Path(out) / "report.html"


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    jobs: int | None = None,
    overwrite: bool = False,
    console=None,
    engine: str | None = None,
    device: str | None = None,
    ray_address: str | None = None,
) -> int:
    """Run ``spec`` into the sweep folder ``out`` (resuming what it holds) with each run on
    ``engine`` (``experiments.run --engine``) and ``device`` (``experiments.run --device``),
    ``jobs`` at once (default 1); or, with ``ray_address``, each run a Ray task on that cluster
    (:mod:`.cluster`; ``jobs`` at once, default all). The exit code."""
    console = console or Console(stderr=True)
    if ray_address is not None and engine == "ray":
        raise SweepError(
            "--engine ray with --ray-address: a cell on the cluster runs its federation on the in-process "
            "engine (a Ray simulation inside a Ray task would start a Ray of its own)"
        )
    try:
        where = RayRuns(ray_address, device) if ray_address is not None else LocalRuns(engine, device)
    except ClusterError as exc:
        raise SweepError(str(exc)) from None
    try:
        sweep = Sweep(spec, out, jobs or (len(spec.cells()) * 2 if ray_address else 1), console, engine, device, where)
        sweep.claim(overwrite)
        on = f" on the Ray cluster at {ray_address}" if ray_address is not None else ""
        console.print(f"sweep [bold]{spec.name}[/]: {len(sweep.cells)} cells -> {out}{on}")
        stopper = StopOnSignal(
            on_signal=lambda s: (
                console.print(
                    "[yellow]stopping[/]: the runs in flight are stopped; what finished stays (again to kill at once)"
                ),
                sweep.interrupt(s),
            )
        )
        with stopper:
            try:
                sweep.run()
            finally:
                if stopper.event.is_set():
                    sweep.kill_all()
    finally:
        where.close()
    cells, _ = write_outputs(sweep)
    done = int((cells["status"] == "done").sum()) if not cells.empty else 0
    console.print(
        f"{done} of {len(sweep.cells)} cells done, {len(cells) - done} failed or refused; {out / 'summary.md'}"
    )
    return stopper.exit_code if stopper.event.is_set() else 0
