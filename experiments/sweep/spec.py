"""Sweeps: what stops each attack, for which observer, and what that costs in accuracy.

    python -m experiments.sweep dlg-defences          # a preset (experiments/sweep/presets/*.toml)
    python -m experiments.sweep my-grid.toml --jobs 2 # a grid of your own
    python -m experiments.sweep dp --out sweeps/dp    # again with the same folder: resumes

A SPEC is a TOML file (or the name of one in ``experiments/sweep/presets/``)::

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

import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fl_sim.config import ConfigError
from fl_sim.settings import DefenceError, parse_defences

from ..plan import ATTACK_KEYS, ExperimentPlan, default_mapping

__all__ = ["SweepSpec", "Cell", "SweepError", "RunRecord", "PRESETS", "load_spec", "read_record"]

PRESETS = Path(__file__).resolve().parent / "presets"


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
                    train = {
                        **{k: v for k, v in params.items() if k not in ATTACK_KEYS and k not in self.train},
                        **self.train,
                    }
                    # the training run carries no attack: keep only keys that mean something without one
                    train = {k: v for k, v in train.items() if k not in ATTACK_KEYS}
                cell = Cell(params, attack, train)
                if cell.id not in seen:
                    seen.add(cell.id)
                    out.append(cell)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "attack": self.attack,
            "train": self.train,
            "grid": self.grid,
            "source": self.source,
            "notes": self.notes,
        }


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
    spec_ = SweepSpec(
        str(raw.get("name", path.stem)),
        str(raw.get("description", "")),
        attack,
        train,
        grid,
        source=str(path),
        notes=list(raw.get("notes", [])),
    )
    _check_values(spec_)
    return spec_


def _check_values(spec: SweepSpec) -> None:
    """Every value of the spec on its own: defence specs parse, values have the key's type.
    (A cell whose valid values conflict under the plan's rules is a refused row, not an error.)"""
    for source, values in [("attack", spec.attack), ("train", spec.train or {})] + [
        (f"grid {k}", {k: v}) for block in spec.grid for k, vs in block.items() for v in vs
    ]:
        for k, v in values.items():
            if k == "defences":
                try:
                    parse_defences(v)
                except DefenceError as exc:
                    raise SweepError(f"[{source.split()[0]}] defences: {exc}") from None
                continue
            # an attack key in the setting where every attack key means something (FedAvg); an
            # attack in either mode (rgap applies to FedSGD's updates, fedavg-sim to FedAvg's)
            contexts = (
                [{"attack": "ig", "mode": "fedavg"}]
                if k in ATTACK_KEYS and k != "attack"
                else [{}, {"mode": "fedavg"}]
                if k == "attack"
                else [{}]
            )
            problems = []
            for context in contexts:
                try:
                    ExperimentPlan.from_mapping({**context, k: v})
                except ConfigError as exc:
                    if exc.key == _key(k):
                        problems.append(exc.problem)
            if len(problems) == len(contexts):
                raise SweepError(f"[{source.split()[0]}] {k}: {problems[0]}")


@dataclass
class RunRecord:
    """How one run of a sweep ended, kept as ``done/<run>.json`` in the sweep folder."""

    name: str
    status: str  # done | failed | refused
    reason: str
    seconds: float


def read_record(out: Path, name: str) -> RunRecord | None:
    """The record of run ``name`` in the sweep folder ``out`` (None: not finished)."""
    path = Path(out) / "done" / f"{name}.json"
    return RunRecord(**json.loads(path.read_text())) if path.exists() else None
