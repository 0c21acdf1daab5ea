"""The Python entry point, for notebooks: a plan in, a run folder and pandas tables out.

    from experiments import api

    run = api.run(mode="fedsgd", num_clients=2, num_server_rounds=1, attack="rgap")
    run.results      # results.csv: a row per (round, client, observer, attack)
    run.images       # images.csv: a row per true image of each scored attack
    run.rounds       # rounds.csv: a row per round of the federation
    run.summary      # summary.json's observer x attack table
    run.folder       # the run folder, with config.json, summary.md, report.html, the figures
    api.load("runs/20250131-120000")   # the same object for any run folder

The keys are the run config's (pyproject's ``[tool.flwr.app.config]``, as in ``flwr run
--run-config``), given as a dict (``{"num-clients": 2}``) or as keyword arguments
(``num_clients=2``); the plan's rules are those of every other entry point
(:meth:`experiments.plan.ExperimentPlan.from_mapping`): keys left out take their defaults,
and a named attack brings the papers' FedSGD setting under the keys given. A bad key or value
raises ValueError before anything runs.

:func:`run` runs the plan as ``python -m experiments.run`` in a process of its own, with the
flags that set those keys (the way a sweep runs its cells): the same run as from a shell, and
config.json records that command, which reproduces the run. The notebook's kernel keeps none
of the run's state (Flower's logging, signal handlers, Ray, torch's threads). Its engine is the
in-process one by default: no Ray start (about 10 s a phase), nothing left running, and the
same model and results as Ray's for the same seed (``tests/test_engine.py``); ``engine="ray"``
for scale. Interrupting the kernel stops the run the way Ctrl-C does (what finished stays in
the folder; ``resume=True`` continues it).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fl_sim.data import DatasetError
from fl_sim.server_app import ROUND_FIELDS
from fl_sim.simulation import ENGINES

from .cli import argv_for
from .experiment import SECAGG_DIR
from .plan import PRESETS, ExperimentPlan
from .report.summary import SUMMARY_JSON
from .results import read_images, read_results
from .run_folder import PROVENANCE, SOURCE_ROOT, default_run_dir

__all__ = ["Run", "RunFailed", "run", "load"]

PR_SET_PDEATHSIG = 1  # Linux's prctl option: a signal for the process when its parent dies
STOP_WAIT = 120.0  # seconds an interrupted run has to write what finished before it is killed
TAIL = 20  # lines of the run's output kept for an error message


@dataclass(frozen=True)
class Run:
    """A run folder, and its tables as pandas DataFrames (read from the folder at each access,
    so a folder resumed since shows its new rows)."""

    folder: Path

    @property
    def config(self) -> dict[str, Any]:
        """config.json: the plan, the device it ran on and its provenance (a run of the SecAgg+
        observer alone keeps it in ``secagg/``)."""
        for path in (self.folder / "config.json", self.folder / SECAGG_DIR / "config.json"):
            if path.is_file():
                return json.loads(path.read_text())
        return {}

    @property
    def provenance(self) -> list[dict[str, Any]]:
        """What made the run: one entry per session (the run, then each resume)."""
        return list(self.config.get(PROVENANCE, []))

    @property
    def results(self) -> pd.DataFrame:
        """results.csv: a row per (round, client, observer, attack) (empty without attacks)."""
        return read_results(self.folder / "results.csv")

    @property
    def images(self) -> pd.DataFrame:
        """images.csv: a row per true image behind each scored results row."""
        return read_images(self.folder)

    @property
    def rounds(self) -> pd.DataFrame:
        """rounds.csv: a row per finished round of the federation (round 0: the initial model)."""
        return _rounds(self.folder / "rounds.csv")

    @property
    def secagg_rounds(self) -> pd.DataFrame:
        """The SecAgg+ federation's rounds.csv (empty when the run had no SecAgg+ observer)."""
        return _rounds(self.folder / SECAGG_DIR / "rounds.csv")

    @property
    def summary(self) -> pd.DataFrame:
        """summary.json's observer x attack table: medians over the scored rows, images
        recovered, what each attacker was told (:mod:`experiments.report.summary`)."""
        path = self.folder / SUMMARY_JSON
        table = json.loads(path.read_text())["table"] if path.is_file() else []
        return pd.DataFrame(table)


class RunFailed(RuntimeError):
    """The run ended without finishing (a failed round, a crash, a stop); ``run`` is what it
    left in its folder."""

    def __init__(self, message: str, run: Run) -> None:
        super().__init__(message)
        self.run = run


def load(folder: str | Path) -> Run:
    """The :class:`Run` of an existing run folder; ValueError if it holds no run."""
    path = Path(folder).expanduser().absolute()
    if not ((path / "config.json").is_file() or (path / SECAGG_DIR / "config.json").is_file()):
        raise ValueError(f"{path} holds no run (no config.json)")
    return Run(path)


def _rounds(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=ROUND_FIELDS)


def _values(config: Mapping[str, Any] | None, keys: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config keys of ``config`` and ``keys``, Flower's spelling (``num_clients`` ->
    ``num-clients``); a list or tuple value becomes a comma-separated one."""
    out: dict[str, Any] = {}
    for key, value in {**(config or {}), **keys}.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[str(key).replace("_", "-")] = value
    return out


def _argv(values: dict[str, Any], *, engine: str, preset: str | None, overwrite: bool, resume: bool) -> list[str]:
    """The ``python -m experiments.run`` command line of ``values``, without ``--out``."""
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not an engine: choose one of {', '.join(ENGINES)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if overwrite and resume:
        raise ValueError("overwrite and resume: choose one")
    if preset is None and "attack" not in values and not resume:
        # the plan's rule (no attack: plain training); experiments.run's default without one is the demo
        values = {"attack": "none", **values}
    return [
        sys.executable,
        "-m",
        "experiments.run",
        *argv_for(values),
        *(["--preset", preset] if preset else []),
        "--engine",
        engine,
        *(["--overwrite"] if overwrite else ["--resume"] if resume else []),
    ]


def run(
    config: Mapping[str, Any] | None = None,
    /,
    *,
    out: str | Path | None = None,
    engine: str = "inprocess",
    preset: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    **keys: Any,
) -> Run:
    """Run the plan of run-config ``config`` and ``keys`` (see the module docstring) and
    return its :class:`Run`.

    ``out``: the run folder (default: a new ``runs/<date>-<time>``); ``overwrite`` empties
    an existing run folder first, ``resume`` continues the run in it (``config`` and ``keys``
    may then change only what a resume may, such as ``num_server_rounds``). ``preset``:
    :data:`experiments.plan.PRESETS` under the keys given. ``engine``: ``inprocess`` or
    ``ray``. ``quiet``: do not print the run's output (its progress, tables and notes).

    Raises ValueError for a bad key, value, dataset or run folder (nothing runs), and
    :class:`RunFailed` for a run that did not finish (its ``run`` holds what finished)."""
    values = _values(config, keys)
    out = out or values.pop("out-dir", None)
    values.pop("out-dir", None)
    argv = _argv(values, engine=engine, preset=preset, overwrite=overwrite, resume=resume)
    if not resume:  # a resume's plan is its folder's, with these keys on top: the run checks it
        try:  # the plan's rules and its data, here, so that a mistake is a ValueError before anything starts
            ExperimentPlan.from_mapping(values, preset=preset).check_data()
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
    folder = Path(out).expanduser().absolute() if out else default_run_dir().absolute()
    code, tail = _follow([*argv, "--out", str(folder)], quiet)
    last = tail[-1] if tail else f"exit code {code}"
    if code == 2:  # bad input that only the run could see (a folder in use, a resume's settings)
        raise ValueError(last.split(": error: ", 1)[-1])
    if code != 0:
        raise RunFailed(f"the run in {folder} did not finish (exit code {code}): {last}", Run(folder))
    return Run(folder)


def _stop_with_parent() -> None:
    """In the run's process before it starts (Linux): SIGTERM, the run's clean stop, when the
    process that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _follow(argv: list[str], quiet: bool) -> tuple[int, list[str]]:
    """Run ``argv``, printing its output as it comes unless ``quiet``; returns its exit code
    and its last lines. An interrupt (the kernel's, Ctrl-C) stops it as Ctrl-C stops a run,
    waits for it to write what finished, and is raised again."""
    # the run imports the code this process imported (a notebook started elsewhere, a path
    # added by hand), and sees the user's working directory: relative paths mean the same to it
    path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # a session of its own: a terminal's Ctrl-C reaches this process alone, which passes on
    # one SIGINT (a second would kill the run at once); and where this process dies (a kernel
    # restarted), the run is told to stop rather than left running
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "PYTHONPATH": path, "COLUMNS": "120"},
        start_new_session=True,
        preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
    )
    tail: deque[str] = deque(maxlen=TAIL)
    try:
        for line in proc.stdout or ():
            if line.strip():
                tail.append(line.rstrip())
            if not quiet:
                print(line, end="", flush=True)
        return proc.wait(), list(tail)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if proc.poll() is None:  # an error in this process while the run goes on: end it
            proc.kill()
            proc.wait()
