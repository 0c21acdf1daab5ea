"""The attack runner: between the federation (``fl_sim``) and the attacks (``attacks``).

It turns what an observer saw into attack jobs, runs them (inline, or in worker processes so
that a slow attack does not stall the rounds), scores each reconstruction against the true
batch, which it rebuilds from (partition, round, seed) with ``fl_sim.task.client_batch``, so
no ground truth ever travels in a client's message, and appends one row per (round, client,
observer, attack) to ``results.csv`` as each job finishes.

Observers:
- ``server``: the parameter server; sees each client's individual update.
- ``client``: a curious client (partition ``curious_client``); sees only the global model
  before and after each round, i.e. the aggregate. It knows its own update, so it subtracts
  it and attacks the mean update of the others.
- ``secagg``: the server under SecAgg+; receives only the aggregate of all clients.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import torch

from fl_sim.config import RunConfig

__all__ = ["OBSERVERS", "RESULT_FIELDS", "AttackJob", "AttackRunner", "run_job"]

log = logging.getLogger(__name__)

OBSERVERS = ("server", "client", "secagg")
# R-GAP's weights-only rank analysis costs seconds per model and the rows keep only scores.
RUN_OPTIONS: dict[str, dict[str, Any]] = {"rgap": {"rank": False}}
RESULT_FIELDS = ["round", "client", "observer", "attack", "psnr", "ssim", "mse", "label_acc", "seconds", "status", "reason"]


@dataclass(frozen=True)
class AttackJob:
    """One attack on one observed update."""

    server_round: int
    observer: str
    attack: str
    targets: tuple[int, ...]  # partition ids whose batches the update mixes
    weights: dict[str, torch.Tensor]  # the model the update was computed on
    update: tuple[torch.Tensor, ...]  # in model.parameters() order
    kind: str  # "gradient" or "weight_delta"
    lr: float | None
    local_steps: int
    batch_size: int  # images in the update, granted to the attacker
    seed: int


def _true_batch(cfg: RunConfig, targets: Sequence[int], server_round: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    from fl_sim.task import client_batch

    xs, ys, owners = [], [], []
    for pid in targets:
        x, y = client_batch(cfg, pid, cfg.num_clients, server_round)
        xs.append(x)
        ys.append(y)
        owners += [pid] * len(y)
    return torch.cat(xs), torch.cat(ys), owners


def _row(job: AttackJob, client: int, **values: Any) -> dict[str, Any]:
    row = {"round": job.server_round, "client": client, "observer": job.observer, "attack": job.attack,
           "psnr": math.nan, "ssim": math.nan, "mse": math.nan, "label_acc": math.nan, "seconds": 0.0,
           "status": "ok", "reason": ""}
    row.update(values)
    return row


def run_job(job: AttackJob, cfg: RunConfig) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Run one job; never raises. Returns the rows (one per target client) and the images
    (``truth``, ``recon`` matched to the truth's order, ``owners``) for the figures."""
    from attacks import ThreatModel, Update, get_attack, match_batch, score_batch
    from fl_sim.data import load_dataset
    from fl_sim.models import build_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        truth, labels, owners = _true_batch(cfg, job.targets, job.server_round)
        data = load_dataset(cfg.dataset, cfg.data_root)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(job.weights)
        update = Update(tensors=job.update, kind=job.kind, lr=job.lr, local_steps=job.local_steps)
        attack = get_attack(job.attack)
        res = attack(model, update, data.input_shape, ThreatModel(batch_size=job.batch_size), seed=job.seed,
                     **RUN_OPTIONS.get(job.attack, {}))
        recon = torch.nan_to_num(res.images.detach().to(torch.float32), nan=0.5).clamp(0, 1)
        if recon.shape[0] != truth.shape[0]:
            raise ValueError(f"attack returned {recon.shape[0]} images for a batch of {truth.shape[0]}")
        perm = match_batch(recon, truth)
        scores = score_batch(recon, truth, res.labels, labels, perm=perm)
        seconds = time.perf_counter() - start
        rows = []
        for pid in job.targets:
            mine = [s for s, o in zip(scores, owners) if o == pid]

            def mean(key: str, mine=mine) -> float:
                return float(sum(s[key] for s in mine) / len(mine)) if all(key in s for s in mine) else math.nan

            psnr = mean("psnr") if all(math.isfinite(s["psnr"]) for s in mine) else max(s["psnr"] for s in mine)
            rows.append(_row(job, pid, psnr=psnr, ssim=mean("ssim"), mse=mean("mse"), label_acc=mean("label_correct"),
                             seconds=round(seconds, 3), status=res.status))
        return rows, {"truth": truth, "recon": recon[torch.as_tensor(perm)], "owners": torch.as_tensor(owners)}
    except Exception as exc:  # noqa: BLE001 - a failed attack is a row, and training goes on
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        log.debug("attack %s failed: %s", job.attack, traceback.format_exc())
        seconds = round(time.perf_counter() - start, 3)
        return [_row(job, pid, status="error", reason=reason, seconds=seconds) for pid in job.targets], {}


class AttackRunner:
    """Collects intercepted updates, runs the attacks, writes ``results.csv`` and keeps the
    images for the figures.

    ``workers=0`` runs each job inline, in the hook (the round waits); ``workers>=1`` runs
    them in that many spawned processes, off the round's critical path.
    """

    def __init__(
        self,
        cfg: RunConfig,
        attacks: Sequence[str],
        out_dir: Path,
        *,
        rounds: Sequence[int] | None = None,
        clients: Sequence[int] | None = None,
        max_per_round: int | None = None,
        observers: Sequence[str] = OBSERVERS,
        curious_client: int = 0,
        workers: int = 0,
        defer: bool = False,
    ) -> None:
        unknown = set(observers) - set(OBSERVERS)
        if unknown:
            raise ValueError(f"unknown observer {sorted(unknown)[0]!r}: choose from {', '.join(OBSERVERS)}")
        self.cfg = cfg
        self.observers = set(observers)
        self.attacks = list(attacks)
        self.rounds = set(rounds) if rounds else None
        self.clients = set(clients) if clients else None
        self.max_per_round = max_per_round
        self.curious_client = curious_client
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "results.csv"
        if not self.csv_path.exists():
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(RESULT_FIELDS)
        self.rows: list[dict[str, Any]] = []
        self.images: list[tuple[AttackJob, dict[str, torch.Tensor]]] = []
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._per_round: dict[tuple[int, str], int] = {}
        self._own: dict[int, tuple[torch.Tensor, ...]] = {}  # the curious client's own updates
        # Workers run at the lowest CPU priority so that training keeps the cores it needs.
        self._pool = (
            ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=os.nice, initargs=(19,))
            if workers > 0 else None
        )
        # Deferred: jobs wait in memory until training ends (close), so no attack shares the
        # cores with a round; what a killed run had not attacked yet is lost.
        self._deferred: list[AttackJob] | None = [] if defer else None
        self.submitted = 0  # jobs
        self.completed = 0
        self.on_row = None  # optional callback for progress display

    # ---- hooks for the strategies --------------------------------------------------------

    def on_update(self, update) -> None:
        """Server observer: one client's individual update (``InterceptedUpdate``)."""
        if update.partition_id == self.curious_client:
            self._own[update.server_round] = self._as_update(update.sent, update.reply, update.kind)[0]
        if "server" not in self.observers or not self._wanted(update.server_round, update.partition_id, "server"):
            return
        tensors, kind = self._as_update(update.sent, update.reply, update.kind)
        self._submit(update.server_round, "server", (update.partition_id,), update.sent, tensors, kind,
                     batch_size=update.num_examples if kind == "gradient" else self.cfg.batch_size,
                     steps=int(update.metrics.get("local-steps", 1)))

    def on_aggregate(self, agg, observer: str = "client") -> None:
        """Observers that see only the global model before and after a round
        (``RoundAggregate``): the curious client, or the server under SecAgg+."""
        if observer not in self.observers or (self.rounds is not None and agg.server_round not in self.rounds):
            return
        names = list(agg.before)
        # The aggregate as a mean update: FedSGD's mean gradient, or FedAvg's mean weight delta.
        if self.cfg.mode == "fedsgd":
            mean = tuple((agg.before[k] - agg.after[k]) / self.cfg.server_lr for k in names)
            kind = "gradient"
        else:
            mean = tuple(agg.after[k] - agg.before[k] for k in names)
            kind = "weight_delta"
        parts = list(agg.partition_ids) or list(range(self.cfg.num_clients))
        weights = list(agg.num_examples) if agg.num_examples else [1] * len(parts)
        targets = parts
        if observer == "client":
            own = self._own.get(agg.server_round)
            if self.curious_client not in parts or own is None:
                log.warning("round %s: the curious client took no part; nothing to subtract", agg.server_round)
            else:
                i = parts.index(self.curious_client)
                total, mine = float(sum(weights)), float(weights[i])
                # mean of the others = (total * mean - mine * own) / (total - mine)
                mean = tuple((total * m - mine * o) / (total - mine) for m, o in zip(mean, own))
                targets = [p for p in parts if p != self.curious_client]
        if self.clients is not None:
            if not set(targets) & self.clients:
                return
        images = len(targets) * self.cfg.batch_size
        steps = self.cfg.local_steps or 1
        self._submit(agg.server_round, observer, tuple(targets), agg.before, mean, kind, batch_size=images, steps=steps)

    # ---- internals ----------------------------------------------------------------------

    def _as_update(self, sent, reply, kind):
        names = list(sent)
        if kind == "gradient":
            return tuple(reply[k] for k in names), "gradient"
        return tuple(reply[k] - sent[k] for k in names), "weight_delta"

    def _wanted(self, server_round: int, partition_id: int, observer: str) -> bool:
        if self.rounds is not None and server_round not in self.rounds:
            return False
        if self.clients is not None and partition_id not in self.clients:
            return False
        if self.max_per_round is not None and self._per_round.get((server_round, observer), 0) >= self.max_per_round:
            return False
        return True

    def _submit(self, server_round, observer, targets, weights, tensors, kind, *, batch_size, steps) -> None:
        key = (server_round, observer)
        self._per_round[key] = self._per_round.get(key, 0) + 1
        self.submitted += len(self.attacks)
        for attack in self.attacks:
            job = AttackJob(server_round, observer, attack, tuple(int(t) for t in targets),
                            {k: v.clone() for k, v in weights.items()}, tuple(t.clone() for t in tensors), kind,
                            self.cfg.lr if kind == "weight_delta" else None, steps, int(batch_size),
                            seed=self.cfg.seed * 1000 + server_round)
            if self._deferred is not None:
                self._deferred.append(job)
            else:
                self._run(job)

    def _run(self, job: AttackJob) -> None:
        if self._pool is None:
            self._record(job, *run_job(job, self.cfg))
        else:
            fut = self._pool.submit(run_job, job, self.cfg)
            fut.add_done_callback(lambda f, job=job: self._done(job, f))
            self._futures.append(fut)

    def _done(self, job: AttackJob, fut: Future) -> None:
        try:
            rows, images = fut.result()
        except Exception as exc:  # noqa: BLE001 - the worker died: still a row
            rows = [_row(job, pid, status="error", reason=f"worker failed: {type(exc).__name__}: {exc}"[:300]) for pid in job.targets]
            images = {}
        self._record(job, rows, images)

    def _record(self, job: AttackJob, rows: list[dict[str, Any]], images: dict[str, torch.Tensor]) -> None:
        with self._lock:
            with self.csv_path.open("a", newline="") as f:
                w = csv.DictWriter(f, RESULT_FIELDS)
                for row in rows:
                    w.writerow(row)
            self.rows += rows
            self.completed += 1
            if images:
                self.images.append((job, images))
        if self.on_row:
            for row in rows:
                self.on_row(row)

    def pending(self) -> int:
        return sum(not f.done() for f in self._futures)

    def close(self, wait: bool = True) -> None:
        """Run the deferred jobs, wait for the jobs in flight (each one's rows land as it
        finishes), then stop. ``wait=False`` drops what has not started."""
        if self._deferred and wait:
            jobs, self._deferred = self._deferred, []
            for job in jobs:
                self._run(job)
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None
