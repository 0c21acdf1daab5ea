"""The ServerApp: honest aggregation of screened replies, central evaluation each round, and
the federation's part of a run folder.

The run folder (``out-dir``) gets, from :class:`FederationLog`:

- ``config.json`` at the start (the settings of the run);
- ``rounds.csv``, a row per round as it ends (round, train_loss, test_loss, test_accuracy,
  aggregated, dropped, seconds; round 0 is the initial model), so a killed run keeps every
  finished round and never gets a round that did not happen;
- ``final_model.pt``, the global model after the last finished round (a plain state dict,
  replaced atomically as each round ends, with ``final_model.json`` naming its round): an
  interrupted run leaves its last good model, and ``resume`` continues from it;
- ``dropped.csv``, a row per train reply that was not aggregated (round, node_id, client,
  status, reason: missing, error, invalid or refused; see :mod:`fl_sim.replies`);
- ``audit.csv``, under the clients' leakage audit (:mod:`fl_sim.mods.audit`), a row per train
  reply the audit looked at (its checks, probe, action and cost), refused ones included.

A run stops cleanly when asked: :class:`StoppableGrid` raises :class:`RunStopped` while the
server waits for replies once its ``stop`` event is set, so the round in flight is abandoned
(not aggregated, not logged) and nothing is written after it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from .config import RunConfig
from .data import load_dataset
from .models import build_model
from .mods.audit import write_audit_row
from .privacy import dp_wrapper
from .replies import DROPPED_FIELDS, DroppedReply
from .strategy import FedSGD, HonestFedAvg, ModelSwap, ScreeningStrategy, WrappingStrategy
from .task import evaluate, parameter_names

__all__ = [
    "app",
    "make_server_app",
    "run_server",
    "build_strategy",
    "FederationLog",
    "StoppableGrid",
    "RunStopped",
    "ROUND_FIELDS",
    "ResumeError",
    "federation_size",
]

NODE_WAIT = 60.0  # seconds the server waits at the start for every node of the run to connect
NODE_SETTLE = 3.0  # seconds the count of connected nodes must stay unchanged to be the federation's size
ROUND_FIELDS = ["round", "train_loss", "test_loss", "test_accuracy", "aggregated", "dropped", "seconds"]


class RunStopped(RuntimeError):
    """The run was asked to stop (Ctrl-C, SIGTERM) while the server waited for replies."""


class ResumeError(ValueError):
    """A run folder that cannot be resumed; the message says why in one line."""


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class FederationLog:
    """The federation's files in a run folder (see the module docstring).

    ``resume=True`` opens a folder written before: ``rows`` are its finished rounds,
    ``last_round`` the last of them and ``checkpoint()`` the model after it."""

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any], *, resume: bool = False) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.out / "rounds.csv"
        self.dropped_path = self.out / "dropped.csv"
        self.audit_path = self.out / "audit.csv"
        self.model_path = self.out / "final_model.pt"
        self.rows: list[dict[str, Any]] = []
        self.dropped: list[DroppedReply] = []
        self._lock = threading.Lock()
        if resume and self.rounds_path.exists():
            with self.rounds_path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("round", "").isdigit()]
            stamp = self.out / "final_model.json"
            model_round = json.loads(stamp.read_text()).get("round") if stamp.exists() else None
            if self.rows and model_round != self.last_round:
                raise ResumeError(
                    f"{self.model_path} is from round {model_round} but rounds.csv ends at round "
                    f"{self.last_round}: cannot resume this folder"
                )
        else:
            (self.out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
            with self.rounds_path.open("w", newline="") as f:
                csv.writer(f).writerow(ROUND_FIELDS)
        self._last = time.perf_counter()

    @property
    def last_round(self) -> int:
        """The last finished round (0: only the initial evaluation; -1: nothing yet)."""
        return max((int(r["round"]) for r in self.rows), default=-1)

    def checkpoint(self) -> dict[str, torch.Tensor] | None:
        """The global model after ``last_round`` (None before round 0 is logged)."""
        return torch.load(self.model_path) if self.rows and self.model_path.exists() else None

    def end_round(self, server_round: int, state: Mapping[str, torch.Tensor], **values: Any) -> dict[str, Any]:
        """Log a finished round: the model first (atomically, with its round), then its row."""
        now = time.perf_counter()
        row = {k: values.get(k, "") for k in ROUND_FIELDS}
        row.update(round=server_round, seconds=round(now - self._last, 3))
        self._last = now
        state = {k: v.detach().clone() for k, v in state.items()}
        with self._lock:
            _write_atomic(self.model_path, lambda p: torch.save(state, p))
            _write_atomic(
                self.out / "final_model.json", lambda p: p.write_text(json.dumps({"round": server_round}) + "\n")
            )
            with self.rounds_path.open("a", newline="") as f:
                csv.DictWriter(f, ROUND_FIELDS).writerow(row)
            self.rows.append(row)
        return row

    def drop(self, reply: DroppedReply) -> None:
        """Log a train reply that was not aggregated (a row of dropped.csv)."""
        with self._lock:
            new = not self.dropped_path.exists()
            with self.dropped_path.open("a", newline="") as f:
                w = csv.DictWriter(f, DROPPED_FIELDS)
                if new:
                    w.writeheader()
                w.writerow(reply.row())
            self.dropped.append(reply)

    def audit(self, row: Mapping[str, Any]) -> None:
        """Log a client's audit of its reply (a row of audit.csv)."""
        with self._lock:
            write_audit_row(self.audit_path, row)


class StoppableGrid(Grid):
    """A grid that gives up waiting for replies once ``stop`` is set (raising
    :class:`RunStopped`); everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, stop: threading.Event, poll: float = 0.1) -> None:
        self._grid = grid
        self._stop = stop
        self._poll = poll

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def _check(self) -> None:
        if self._stop.is_set():
            raise RunStopped("the run was asked to stop")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            self._check()
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            self._stop.wait(self._poll)
        self._check()
        return replies


class _Resumed(WrappingStrategy):
    """``inner`` shifted by ``offset`` rounds: Flower's loop counts 1, 2, ... and the inner
    strategy sees offset + 1, offset + 2, ... (a resumed run continues its numbering)."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def build_strategy(
    cfg: RunConfig,
    param_names: list[str],
    on_dropped: Callable[[DroppedReply], None] | None = None,
    on_audit: Callable[[dict], None] | None = None,
    replace_model: ModelSwap | None = None,
) -> ScreeningStrategy:
    """The honest strategy for ``cfg.mode`` behind the server's checks of every reply, which
    compare it with the model whose parameters are ``param_names`` (FedSGD replies carry
    exactly these; FedAvg replies the whole state dict)."""
    least = min(cfg.min_clients, cfg.num_clients)
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=least,
        min_evaluate_nodes=least,
        min_available_nodes=least,
    )
    if cfg.mode == "fedsgd":
        honest: HonestFedAvg = FedSGD(server_lr=cfg.server_lr, **common)
        return ScreeningStrategy(
            honest,
            honest,
            reply_names=param_names,
            max_examples=cfg.batch_size,
            num_partitions=cfg.num_clients,
            on_dropped=on_dropped,
            on_audit=on_audit,
            replace_model=replace_model,
        )
    honest = HonestFedAvg(**common)
    # central DP (Flower's wrapper) between the checks and FedAvg: it never sees a bad reply
    defended = dp_wrapper(honest, cfg.defence_list, cfg.clients_per_round())
    return ScreeningStrategy(
        defended,
        honest,
        num_partitions=cfg.num_clients,
        on_dropped=on_dropped,
        on_audit=on_audit,
        replace_model=replace_model,
    )


def run_server(
    grid: Grid,
    cfg: RunConfig,
    log: FederationLog,
    *,
    wrap_strategy: Callable[[ScreeningStrategy], Strategy] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_dropped: Callable[[DroppedReply], None] | None = None,
    replace_model: ModelSwap | None = None,
    stop: threading.Event | None = None,
) -> Result | None:
    """Run ``cfg.num_server_rounds`` rounds on ``grid``, logging to ``log`` (continuing after
    ``log.last_round`` when it was opened to resume). ``wrap_strategy`` lets a caller put a
    strategy around the honest one (e.g. one that intercepts replies); ``on_round`` is called
    with each round's row, ``on_dropped`` with each dropped reply; ``replace_model`` may replace
    the model a round sends (:data:`fl_sim.strategy.ModelSwap`). With ``stop`` set, the run
    raises :class:`RunStopped` at the next wait for replies. Raises
    :class:`fl_sim.strategy.RoundFailed` when a round has no valid reply."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    start_state = log.checkpoint()
    done = max(log.last_round, 0)
    if start_state is not None:
        model.load_state_dict(start_state)
    if done >= cfg.num_server_rounds:
        return None

    def dropped(d: DroppedReply) -> None:
        log.drop(d)
        if on_dropped:
            on_dropped(d)

    screening = build_strategy(
        cfg, parameter_names(model), on_dropped=dropped, on_audit=log.audit, replace_model=replace_model
    )
    strategy: Strategy = wrap_strategy(screening) if wrap_strategy else screening
    if done:
        strategy = _Resumed(strategy, done)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += done
        if server_round <= log.last_round:  # round 0 of a resumed run: logged before
            return None
        state = arrays.to_torch_state_dict()
        model.load_state_dict(state)
        loss, acc = evaluate(model, data.test_x, data.test_y)
        last = screening.last_screened
        screened = last if last is not None and last.server_round == server_round else None
        train_loss = screening.train_history.get(server_round, {}).get("train_loss", math.nan)
        row = log.end_round(
            server_round,
            state,
            train_loss=train_loss if server_round else "",
            test_loss=loss,
            test_accuracy=acc,
            aggregated=len(screened.accepted) if screened else "",
            dropped=len(screened.dropped) if screened else "",
        )
        if on_round:
            on_round(row)
        return MetricRecord({"test_loss": loss, "test_accuracy": acc})

    _wait_for_nodes(grid, cfg.num_clients, min(cfg.round_timeout, NODE_WAIT), stop)
    return strategy.start(
        grid=StoppableGrid(grid, stop) if stop is not None else grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds - done,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(cfg.to_flower()),
        evaluate_config=ConfigRecord(cfg.to_flower()),
        evaluate_fn=central_evaluate,
    )


def _wait_for_nodes(grid: Grid, expected: int, timeout: float, stop: threading.Event | None) -> None:
    """Wait (at most ``timeout`` seconds) until the run's ``expected`` nodes are connected:
    Flower samples among the nodes connected when a round starts, so a round that starts while
    one is still connecting leaves it out without a trace (seen when a resumed simulation's first
    round sampled 2 of 3 nodes). A node that never comes is the rounds' business (missing)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        if len(list(grid.get_node_ids())) >= expected:
            return
        time.sleep(0.2)


def federation_size(
    grid: Grid, timeout: float = NODE_WAIT, settle: float = NODE_SETTLE, stop: threading.Event | None = None
) -> int:
    """The number of nodes connected to the run, once the count has stayed the same for
    ``settle`` seconds (at most ``timeout`` seconds in all; 0 if none came). Flower's simulation
    runtime registers all of its nodes just after the ServerApp starts, so this is its
    federation size (each node's ``num-partitions``); a deployment's SuperNodes connect when
    they are started, so there the run config should name ``num-clients``."""
    end = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        now, n = time.monotonic(), len(list(grid.get_node_ids()))
        if n != count:
            count, since = n, now
        elif n > 0 and now - since >= settle:
            break
        time.sleep(0.2)
    return max(count, 0)


def make_server_app(overrides: Mapping[str, Any] | None = None, **run_kwargs: Any) -> ServerApp:
    """The honest ServerApp: Flower's run config updated by ``overrides``, logged to its
    ``out-dir``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        if not cfg.out_dir:  # no folder named: a new one, never an old run's
            cfg = cfg.replace(out_dir=str(Path("runs") / f"honest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
        run_server(grid, cfg, FederationLog(cfg.out_dir, cfg.to_flower()), **run_kwargs)

    return server_app


app = make_server_app()
