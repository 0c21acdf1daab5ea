"""The ServerApp: honest aggregation, central evaluation each round, and a run folder.

The run folder (``out-dir``) gets ``config.json`` at the start, a row of ``rounds.csv``
(round, train_loss, test_loss, test_accuracy, seconds) as each round ends, so a killed run
keeps every finished round, and ``final_model.pt`` at the end.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from .config import RunConfig
from .data import load_dataset
from .models import build_model
from .strategy import FedSGD, HonestFedAvg
from .task import evaluate

__all__ = ["app", "make_server_app", "run_server", "build_strategy", "ROUND_FIELDS"]

ROUND_FIELDS = ["round", "train_loss", "test_loss", "test_accuracy", "seconds"]


def build_strategy(cfg: RunConfig) -> HonestFedAvg:
    """The honest strategy for ``cfg.mode``."""
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=min(cfg.min_clients, cfg.num_clients),
        min_evaluate_nodes=min(cfg.min_clients, cfg.num_clients),
        min_available_nodes=min(cfg.min_clients, cfg.num_clients),
    )
    if cfg.mode == "fedsgd":
        return FedSGD(server_lr=cfg.server_lr, **common)
    return HonestFedAvg(**common)


class RoundLog:
    """Appends one CSV row per round as it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(ROUND_FIELDS)
        self.rows: list[dict[str, Any]] = []
        self._last = time.perf_counter()

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        row = {**row, "seconds": round(now - self._last, 3)}
        self._last = now
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, ROUND_FIELDS).writerow(row)
        self.rows.append(row)
        return row


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    wrap_strategy: Callable[[HonestFedAvg], Strategy] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Result:
    """Run ``cfg.num_server_rounds`` rounds on ``grid``. ``wrap_strategy`` lets a caller put a
    strategy around the honest one (e.g. one that intercepts replies); ``on_round`` is called
    with each round's row (for progress display)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_flower(), indent=2) + "\n")

    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    honest = build_strategy(cfg)
    strategy = wrap_strategy(honest) if wrap_strategy else honest
    rounds = RoundLog(out / "rounds.csv")

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, data.test_x, data.test_y)
        train_loss = honest.train_history.get(server_round, {}).get("train_loss", float("nan"))
        row = rounds.append({"round": server_round, "train_loss": train_loss, "test_loss": loss, "test_accuracy": acc})
        if on_round:
            on_round(row)
        return MetricRecord({"test_loss": loss, "test_accuracy": acc})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(cfg.to_flower()),
        evaluate_config=ConfigRecord(cfg.to_flower()),
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "final_model.pt")
    return result


def make_server_app(overrides: Mapping[str, Any] | None = None, **run_kwargs: Any) -> ServerApp:
    """A ServerApp whose settings are Flower's run config updated by ``overrides``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, cfg, **run_kwargs)

    return server_app


app = make_server_app()
