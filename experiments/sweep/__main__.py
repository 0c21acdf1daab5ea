"""``python -m experiments.sweep SPEC``: run a sweep (see :mod:`experiments.sweep`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import HELP_NAMES, Parser

__all__ = ["build_parser", "main"]

# The presets' folder (experiments.sweep.spec.PRESETS, a test checks), named here so that --help
# loads neither the plan nor torch: the sweep's modules are imported after parsing.
PRESETS = Path(__file__).resolve().parent / "presets"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m experiments.sweep",
        description="Run a grid of Flower federations, attacked and trained under defences, and write a sweep "
        "folder (cells.csv, results.csv, figures, summary.md).",
    )
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
    p.add_argument("spec", help=f"a preset ({names}) or a TOML file")
    p.add_argument("--out", default=None, help="sweep folder (default: sweeps/<name>); the same folder again resumes")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once (default: 1; with --ray-address, every run, as the cluster's CPUs allow)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="run each run as a Ray task on the existing Ray cluster at ADDRESS (HOST:PORT of its head, "
        "ray://HOST:10001 through Ray Client, or auto: the cluster this machine belongs to); its federation "
        "on the in-process engine, its folder sent back to this machine (docs/sweeps.md)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="empty --out first (otherwise the runs it holds with unchanged settings are kept)",
    )
    p.add_argument(
        "--engine",
        choices=HELP_NAMES["engine"],
        default=None,
        help="each run's engine: ray, or inprocess for small cells (no Ray start per run; same results for "
        "the same seed); default: $FL_SIM_ENGINE, else ray",
    )
    p.add_argument(
        "--device",
        default=None,
        help=f"each run's device: {', '.join(HELP_NAMES['device'])} (auto: cuda when torch sees a GPU); "
        "default: the spec's, else auto",
    )
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    # the sweep's modules (the plan, torch, pandas) load after parsing, so that --help answers at once
    from fl_sim.device import DeviceError, resolve_device

    from .runner import run_sweep  # after parsing, as above
    from .spec import SweepError, load_spec  # after parsing, as above

    if args.device is not None:
        try:
            resolve_device(args.device)
        except DeviceError as exc:
            parser.error(f"--device: {exc}")
    try:
        spec = load_spec(args.spec)
        if args.list:
            for c in spec.cells():
                print(c.id, json.dumps(c.params))
            return 0
        out = Path(args.out) if args.out else Path("sweeps") / spec.name
        return run_sweep(
            spec,
            out,
            jobs=args.jobs,
            overwrite=args.overwrite,
            engine=args.engine,
            device=args.device,
            ray_address=args.ray_address,
        )
    except SweepError as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
