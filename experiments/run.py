"""Run an experiment plan on Flower's simulation engine: the federation, with or without a
spying server.

    python -m experiments.run                       # the demo: a federation that trains while its server spies
    python -m experiments.run --attack all          # DLG, iDLG, R-GAP and Inverting Gradients, the papers' setting
    python -m experiments.run --preset demo --attack all --observers server   # every attack in the demo's setting
    python -m experiments.run --mode fedavg --attack ig   # FedAvg: 2 local steps of 1 image (the preset's)
    python -m experiments.run --mode fedavg --local-steps 5 --attack ig       # a FedAvg update of 5 local steps
    python -m experiments.run --attack dlg --run-config "num-server-rounds=3 seed=1"   # Flower's syntax (or a .toml)
    python -m experiments.run --attack none         # plain training: 10 clients, FedAvg
    python -m experiments.run --attack none --observers active,secagg   # the active server, through SecAgg+ too
    python -m experiments.run --faulty-client 1:nan --faulty-client 2:shape   # what a run survives
    python -m experiments.run --out runs/x --resume # continue a run that was stopped

Presets (:data:`experiments.plan.PRESETS`) fill the keys a command line leaves out: without
``--attack`` the demo (CNN6 trained by FedSGD for 150 rounds, one image per client and round,
R-GAP by the server and a curious client in the first, middle and last round); with an
attack, the papers' FedSGD setting (DLG's LeNet, 4 clients, 2 rounds; under ``--mode fedavg``,
2 local steps unless ``--local-steps`` or ``--local-epochs`` is given, said in one line);
``--preset`` chooses. Every plan flag also takes its run-config key (``--num-server-rounds``
for ``--rounds``), and ``--run-config`` takes Flower's ``'k=v ...'`` or a TOML file.

The run folder (``--out``, default ``runs/<date>-<time>``) holds config.json, rounds.csv (a
row per finished round), final_model.pt (the model after the last finished round),
dropped.csv (replies the server refused or never got), summary.md and, with an attack,
results.csv (a row per (round, client, observer, attack), written as each attack finishes),
the reconstruction grids and psnr_per_round.png. A folder holds one run: an existing one is
refused unless ``--resume`` or ``--overwrite`` says what to do.

Exit codes: 0 the run finished; 1 it failed (a round in which no client's reply could be
aggregated: the first reason is printed); 2 bad flags, data or run folder (one line on
stderr, before anything starts); 130 / 143 stopped by Ctrl-C / SIGTERM (what finished is in
the run folder; a second Ctrl-C kills every process of the run at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .cli import (
    HELP_NAMES,
    LOG_LEVELS,
    Parser,
    add_plan_arguments,
    add_run_config_argument,
    plan_from_args,
    run_config,
    say_error,
)
from .presets import PRESETS

# Everything a run needs beyond parsing (torch, Flower, Ray, rich) is imported in the functions
# that run it, after the command line is parsed: --help and a bad flag answer in well under a
# second instead of the seconds those imports take.


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m experiments.run",
        description="Train a CNN across simulated Flower clients on real images, optionally with a spying server, "
        "and write a run folder. Each plan flag is also accepted under its run-config key (Flower's name, e.g. "
        "--num-server-rounds for --rounds).",
    )
    add_plan_arguments(p, demo=True)
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="the setting under the flags given: demo (the default without --attack) or paper (the "
        "default with --attack)",
    )
    add_run_config_argument(p)
    folder = p.add_argument_group("the run folder")
    folder.add_argument("--out", "--out-dir", default=None, help="run folder (default: a new runs/<date>-<time>)")
    how = folder.add_mutually_exclusive_group()
    how.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out after its last finished round (its settings, unless given)",
    )
    how.add_argument("--overwrite", action="store_true", help="empty the run folder --out first")
    p.add_argument(
        "--engine",
        choices=HELP_NAMES["engine"],
        default=None,
        help="where the simulated federation runs: ray (Flower's simulation engine) or inprocess (the real "
        "ServerApp and ClientApps in this process, no Ray start: for small runs); default: "
        "$FL_SIM_ENGINE, else ray. Same results for the same seed",
    )
    out = p.add_argument_group("what is printed")
    out.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no header, notes, progress bars or tables: only warnings, errors and the run folder's path",
    )
    out.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)}: the testbed's log lines at this level and above, and Flower's too "
        "(without it: the testbed's warnings; Flower's only with --verbose)",
    )
    out.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs and Python's warnings")
    return p


def _logging(verbose: bool, level: str | None, console) -> None:
    """Our log lines (a dropped reply, a skipped observer) in one line each above the progress
    bars, at ``level`` (default WARNING); Flower's console at ``level`` too when it is given,
    else only with --verbose; Ray's logs and Python's warnings only with --verbose."""
    # rich and Flower load after parsing (see the module's top)
    from flwr.supercore.logger import update_console_handler
    from rich.logging import RichHandler  # after parsing, as Flower above

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ours = getattr(logging, level or "WARNING")
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.setLevel(ours)
    for name in ("fl_sim", "experiments"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(ours)
        logger.propagate = False
    if level is not None:
        update_console_handler(level=ours)
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"  # reaches Ray's worker processes
    if level is None:
        # Flower logs every client failure with its traceback; the run reports each dropped
        # reply in one line of its own (and in dropped.csv), so Flower's console stays for
        # --verbose or --log-level.
        update_console_handler(level=logging.CRITICAL)


def _saved_config(out: str | None) -> dict:
    if not out:
        return {}
    path = Path(out).expanduser() / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # RunFolder.claim says what is wrong with the folder


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = run_config(args, parser)
    # the plan's modules load torch: after parsing (see the module's top)
    from fl_sim.data import DatasetError
    from fl_sim.simulation import resolve_engine  # after parsing: Flower and Ray

    from .plan import ConfigError  # after parsing: torch
    from .run_folder import RunFolder, RunFolderError  # after parsing, with the plan it records

    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    try:
        engine = resolve_engine(args.engine)
    except ValueError as exc:  # FL_SIM_ENGINE names no engine
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        base = _saved_config(args.out) if args.resume else {}
        observers = extra.get("observers", args.plan_observers)
        active = "active" in str(observers or "")
        attack = args.plan_attack or extra.get("attack")
        preset = args.preset or (None if args.resume or attack or active else "demo")
        plan = plan_from_args(args, engine="simulation", base=base, extra=extra, resume=args.resume, preset=preset)
        data = plan.check_data()  # before Ray starts
        folder = RunFolder.claim(args.out, mode, plan.to_mapping())
        plan = plan.replace(out_dir=str(folder.path))
    except (ConfigError, DatasetError, RunFolderError) as exc:
        return say_error(parser.prog, exc, run_config=extra)
    with folder:
        return _run(plan, data, args.verbose, engine, quiet=args.quiet, log_level=args.log_level)


def _run(plan, data, verbose: bool, engine: str, *, quiet: bool = False, log_level: str | None = None) -> int:
    # the run's modules: after parsing (see the module's top)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # as above

    from experiments.apps.client_app import app, imprint_app, imprint_secagg_app, secagg_app  # as above
    from fl_sim.device import resolve_device  # as above
    from fl_sim.simulation import run_apps  # as above

    from .experiment import Experiment  # as above
    from .stopping import StopOnSignal  # as above

    console = Console(stderr=True)
    _logging(verbose, log_level, console)
    say = (lambda *a, **k: None) if quiet else console.print
    for note in (*plan.notes, *data.notes):
        say(f"note: {note}", soft_wrap=True)
    c, a = plan.fed, plan.attack
    # an imprint block changes the architecture: the clients run the ClientApp the server ships
    client_app = imprint_app if a is not None and a.is_active and a.active == "imprint-block" else app
    say(
        f"[bold]{c.mode}[/] on [bold]{c.dataset}[/] ({len(data.train_y)} train / {len(data.test_y)} test images, "
        f"{data.input_shape}), model [bold]{c.model}[/], {c.num_clients} clients, batch size {c.batch_size}"
        + (f", {c.local_steps} local steps" if c.mode == "fedavg" and c.local_steps else "")
        + (f", {c.local_epochs} local epochs" if c.mode == "fedavg" and not c.local_steps else "")
        + f", {c.partition} partition, {c.num_server_rounds} rounds on {resolve_device(c.device)}"
        + (f"; attacks {', '.join(a.attacks)} for observers {', '.join(a.passive)}" if a and a.attacks else "")
        + (
            f"; an active server ({a.active}{'' if a.active == 'trap' else f', {a.active_bins} bins'}) in rounds "
            f"{'all' if a.rounds is None else ','.join(map(str, sorted(a.rounds)))}"
            if a and a.is_active
            else ""
        )
        + (f"; faulty clients {c.faulty_clients}" if c.faulty_clients else "")
        + (" (resumed)" if plan.resume else "")
        + f" -> {c.out_dir}"
    )
    with (
        Progress(
            TextColumn("[progress.description]{task.description:8s}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=quiet,
        ) as progress,
        StopOnSignal(
            on_signal=lambda s: console.print(
                "[yellow]stopping[/]: the round in flight is abandoned; what finished stays in the run folder "
                "(again to kill at once)"
            )
        ) as stopper,
    ):
        task = progress.add_task("rounds", total=c.num_server_rounds, status=f"starting the federation ({engine}) ...")
        attack_task = progress.add_task("attacks", total=None, status="") if a else None

        def on_row(row: dict) -> None:
            runner = experiment.runner
            progress.update(
                attack_task,
                total=runner.submitted,
                completed=runner.completed,
                status=f"last: {row['observer']}/{row['attack']} client {row['client']} "
                f"{float(row['psnr']):.1f} dB {row['status']}",
            )

        def on_round(phase: str, row: dict) -> None:
            label = "SecAgg+ " if phase == "secagg" else ""
            progress.update(
                task,
                completed=row["round"],
                description="secagg" if phase == "secagg" else "rounds",
                status=f"{label}test acc {float(row['test_accuracy']):.3f}  loss {float(row['test_loss']):.3f}",
            )
            if attack_task is not None:
                progress.update(attack_task, total=experiment.runner.submitted, completed=experiment.runner.completed)

        experiment = Experiment(plan, stop=stopper.event, on_round=on_round, on_row=on_row if a else None)
        crash = None
        try:
            if plan.runs_main:
                run_apps(
                    experiment.server_app(), client_app, c.num_clients, verbose=verbose, engine=engine, device=c.device
                )
            if plan.runs_secagg and not experiment.stopped and experiment.failure is None:
                secagg_client_app = imprint_secagg_app if client_app is imprint_app else secagg_app

                progress.update(task, completed=0, description="secagg", status="starting the SecAgg+ run ...")
                run_apps(
                    experiment.secagg_server_app(),
                    secagg_client_app,
                    c.num_clients,
                    verbose=verbose,
                    engine=engine,
                    device=c.device,
                )
        except Exception as exc:  # noqa: BLE001 - Flower or Ray failed: still write what finished
            crash = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if a:
            progress.update(
                task, status="waiting for the attacks in flight ..." if not experiment.stopped else "stopped"
            )
        summary = experiment.finish()
        if attack_task is not None:
            progress.update(attack_task, total=experiment.runner.submitted, completed=experiment.runner.completed)
    if not quiet:
        _print_tables(experiment, summary, console)
    if experiment.stopped:
        console.print(
            f"stopped: finished rounds and attacks are in {c.out_dir} (--resume continues the run)", soft_wrap=True
        )
        return stopper.exit_code
    if crash or experiment.failure:
        console.print(
            f"[red]the run failed[/]: {crash or experiment.failure}; see {c.out_dir} "
            "(rerun with --verbose for Flower's logs)",
            soft_wrap=True,
        )
        return 1
    console.print(f"run folder: {c.out_dir}", soft_wrap=True)
    return 0


def _print_table(console, table) -> None:
    """A table whole: a terminal gets it at its own width; a file or pipe gets it at the
    table's full width, where rich would cut its columns to 80 characters ("obser…")."""
    from rich.console import Console  # after parsing (see the module's top)

    if console.is_terminal:
        console.print(table)
        return
    width = Console(file=console.file, width=100_000).measure(table).maximum
    Console(file=console.file, width=max(width, console.width)).print(table)


def _print_tables(experiment, summary, console) -> None:
    from rich.table import Table  # after parsing (see the module's top)

    rows = experiment.logs["main"].rows if "main" in experiment.logs else []
    if rows:
        table = Table(title="Central evaluation per round")
        for col in ("round", "train_loss", "test_loss", "test_accuracy", "aggregated", "dropped", "seconds"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                *(
                    str(r.get(k, "")) if not isinstance(r.get(k), float) else f"{r[k]:.4f}"
                    for k in ("round", "train_loss", "test_loss", "test_accuracy", "aggregated", "dropped", "seconds")
                )
            )
        _print_table(console, table)
    if experiment.plan.attack is None or summary.empty:
        return
    table = Table(title="What each observer reconstructs (medians over the attacked updates)")
    for col in ("observer", "attack", "rows", "PSNR dB", "SSIM", "labels", "recovered", "batch size told", "errors"):
        table.add_column(col, justify="right")
    for r in summary.itertuples():
        table.add_row(
            r.observer,
            r.attack,
            str(r.n),
            f"{r.median_psnr:.1f}",
            f"{r.median_ssim:.3f}",
            "granted" if r.labels == "granted" else "-" if r.label_acc != r.label_acc else f"{r.label_acc:.2f}",
            f"{r.recovered}/{r.images}",
            r.batch_size,
            str(r.errors + r.unscored),
        )
    _print_table(console, table)
    console.print(f"results: {experiment.runner.csv_path}, summary: {experiment.out / 'summary.md'}")


if __name__ == "__main__":
    sys.exit(main())
