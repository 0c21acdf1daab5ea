"""The attack runner: between the federation (``fl_sim``) and the attacks (``attacks``).

It receives what the server's hooks intercept, turns it into observations with the pure
functions of :mod:`experiments.observe` (which decide what each observer has and is
granted), runs one attack job per (observation, attack) inline, in worker processes or as Ray
tasks (so a slow attack does not stall the rounds), has the referee (:mod:`experiments.scoring`) score
each reconstruction, and writes the rows with the one writer of results.csv and images.csv
(:mod:`experiments.results`) and the images under ``reconstructions/`` as each job finishes.
A reply the server dropped becomes a row too (status ``missing`` or ``invalid``), and so does
a job that an interrupted run never finished (``interrupted``): what finished is on disk,
what did not says so.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from attacks import ATTACKS, construct, get_attack
from attacks.metrics import lpips_unavailable
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset, to_float
from fl_sim.device import resolve_device
from fl_sim.intercepting_strategy import InterceptedUpdate, RoundAggregate
from fl_sim.models import build_model
from fl_sim.replies import DroppedReply
from fl_sim.task import model_with, parameter_names

from .observe import (
    Observation,
    observe_active,
    observe_active_secagg,
    observe_curious_client,
    observe_secagg,
    observe_server,
    with_imprint_block,
)
from .plan import ExperimentPlan
from .results import ResultsWriter, blank_row, image_rows
from .scoring import score, true_batch

__all__ = ["AttackJob", "AttackRunner", "RayPool", "run_job", "RECONSTRUCTIONS"]

log = logging.getLogger(__name__)

RECONSTRUCTIONS = "reconstructions"  # the run folder's subfolder of per-job image files
# R-GAP's weights-only rank analysis costs seconds per model and the rows keep only scores.
RUN_OPTIONS: dict[str, dict[str, Any]] = {"rgap": {"rank": False}}
# the optimisation attacks, which take a time limit (R-GAP is analytic): those with the option
TIMED = tuple(name for name, cls in ATTACKS.items() if "time_limit" in cls.Options.names())


@dataclass(frozen=True)
class AttackJob:
    """One attack on one observation."""

    observation: Observation
    attack: str
    seed: int
    time_limit: float = 0.0  # seconds (0: none), for the attacks in TIMED

    @property
    def name(self) -> str:
        o = self.observation
        return f"round{o.server_round:03d}-{o.observer}-{self.attack}-c{'_'.join(map(str, o.key.targets))}"


def _rows(job: AttackJob, **values: Any) -> list[dict[str, Any]]:
    o = job.observation
    g = o.grants
    common = dict(
        labels_granted=g.labels,
        batch_size_granted=g.batch_size is not None,
        batch_size_source=g.batch_size_source,
        attribution=o.key.attribution,
        local_steps=o.update.local_steps if o.update.kind == "weight_delta" else 0,
        order_granted=g.order,
    )
    return [blank_row(o.server_round, pid, o.observer, job.attack, **common, **values) for pid in o.key.targets]


def _model(cfg: RunConfig, o: Observation):
    """The dataset and the model an observation's update was computed on: the run's model, or
    for the active server the one it built (which may carry an imprint block)."""
    if not o.observer.startswith("active"):
        return model_with(cfg, o.weights)

    return with_imprint_block(cfg, o.weights)


def run_job(
    job: AttackJob, cfg: RunConfig
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run one job; never raises. Returns one row per target client, the images for the
    figures (``truth``, ``recon`` in the truth's order, ``owners``, ``psnr`` per image) and
    one images.csv row per true image (none when the attack failed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    o = job.observation
    start = time.perf_counter()
    try:
        truth = true_batch(cfg, o.key, o.server_round)
        data, model = _model(cfg, o)
        model = model.to(resolve_device(cfg.device))  # the attack computes where its model lives
        threat = o.grants.threat(truth)
        options = dict(RUN_OPTIONS.get(job.attack, {}))
        if job.time_limit and job.attack in TIMED:
            options["time_limit"] = job.time_limit
        res = get_attack(job.attack)(model, o.update, data.input_shape, threat, seed=job.seed, **options)
        clients, per_image, ordered = score(res.images, res.labels, truth)
        seconds = round(time.perf_counter() - start, 3)
        by_client = {c.client: c for c in clients}
        rows = []
        for row in _rows(
            job,
            seconds=seconds,
            status=res.status,
            batch_size_used=int(res.images.shape[0]),
            bins=res.diagnostics.get("bins", ""),
        ):
            c = by_client[row["client"]]
            row.update(c.columns())
            rows.append(row)
        images = {
            "truth": truth.images,
            "recon": ordered,
            "owners": torch.tensor(truth.owners),
            "psnr": torch.tensor([r["psnr"] for r in per_image], dtype=torch.float64),
        }
        return rows, images, image_rows(o.server_round, o.observer, job.attack, res.status, per_image)
    except Exception as exc:  # noqa: BLE001 - a failed attack is a row, and training goes on
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.debug("attack %s failed: %s", job.attack, traceback.format_exc())
        return _rows(job, status="error", reason=reason, seconds=round(time.perf_counter() - start, 3)), {}, []
    finally:
        torch.set_num_threads(threads)  # run in-process (no workers, tests): the caller's count back


def attack_nice() -> int:
    """The attack workers' CPU priority (a nice level, 0-19): ``FL_SIM_ATTACK_NICE``, else 19,
    the lowest, so that training keeps the cores it needs. The test suite sets 0: its parallel
    workers keep the cores busy, and attacks at 19 waited behind them (the demo's test 33 s at
    one pytest worker per core, 253 s at two)."""
    text = os.environ.get("FL_SIM_ATTACK_NICE", "19")
    try:
        level = int(text)
    except ValueError:
        level = -1
    if not 0 <= level <= 19:
        log.warning("FL_SIM_ATTACK_NICE=%r is not a nice level 0-19: 19 it is", text)
        return 19
    return level


def _worker_init() -> None:
    # Low CPU priority (attack_nice), so that training keeps the cores it needs; Ctrl-C is the
    # main process's to handle (it stops the workers itself).
    os.nice(max(0, attack_nice() - os.nice(0)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _without_sigint(start: Callable[[], Any]) -> None:
    """``start()`` (which spawns processes) with SIGINT ignored when called from the main
    thread: a spawned Python keeps an ignored SIGINT, so a Ctrl-C to the process group cannot
    kill a worker while it is still importing, before it sets its own handling."""
    if threading.current_thread() is not threading.main_thread():
        start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_pool(workers: int | str, ray_address: str = "") -> ProcessPoolExecutor | RayPool:
    """Attack workers, started now: ``workers`` spawned processes (see
    :func:`_without_sigint`), or for ``"ray"`` a :class:`RayPool`."""
    if workers == "ray":
        return RayPool(ray_address)
    pool = ProcessPoolExecutor(int(workers), mp_context=get_context("spawn"), initializer=_worker_init)
    launch = getattr(pool, "_launch_processes", None)  # CPython's own, used for fork pools
    if launch is not None:
        _without_sigint(launch)
    return pool


def _ray_task(job: AttackJob, cfg: RunConfig):
    """:func:`run_job` in a Ray worker, at the lowest CPU priority (as the local pool's
    workers): on a machine that also trains, the rounds keep the cores."""
    os.nice(max(0, attack_nice() - os.nice(0)))
    return run_job(job, cfg)


def _watch_parent(parent: int) -> None:
    """Exit this process (Ray shut down first, by the SIGTERM handler) when ``parent`` dies:
    a killed run leaves no Ray behind."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError unless a ``HOST:PORT`` address accepts a TCP connection within
    ``timeout`` seconds: ``ray.init`` waits minutes on an address where nothing listens."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "", auto, ray://: Ray's own rules
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from None


def _ray_dispatch(address: str, jobs, results, parent: int) -> None:
    """The dispatcher process of :class:`RayPool`: connects to Ray (or starts a local one),
    submits each ``(key, job, cfg)`` from ``jobs`` as a Ray task of :func:`_ray_task`, and puts
    ``(key, True, result)`` or ``(key, False, reason)`` on ``results`` as each finishes; a
    ``None`` job ends it. Ray is shut down on the way out, SIGTERM included."""
    import ray  # lazy: only the dispatcher process loads Ray

    def _term(signum, frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    os.nice(max(0, attack_nice() - os.nice(0)))  # and a local Ray it starts (its daemons, its workers)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    # Ray's workers import this project: the driver's import path (a checkout, not only the
    # installed package), as Flower's Ray backend passes it
    path = os.pathsep.join(p or os.getcwd() for p in sys.path)
    try:
        try:
            _check_reachable(address)
            ray.init(
                address=address or None,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
        except Exception as exc:  # noqa: BLE001 - a bad address, a cluster that is down: every job says so
            results.put((None, False, " ".join(f"Ray did not start: {type(exc).__name__}: {exc}".split())[:300]))
            return
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        pending: dict[Any, int] = {}
        lock = threading.Lock()
        done = threading.Event()

        def take() -> None:
            while (item := jobs.get()) is not None:
                key, job, cfg = item
                gpus = 1 if cfg.device == "cuda" else 0  # Ray hides the GPUs from a task that asks for none
                ref = task.options(num_gpus=gpus).remote(job, cfg)
                with lock:
                    pending[ref] = key
            done.set()

        threading.Thread(target=take, daemon=True).start()
        while not (done.is_set() and not pending):
            with lock:
                refs = list(pending)
            if not refs:
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in ready:
                with lock:
                    key = pending.pop(ref)
                try:
                    results.put((key, True, ray.get(ref)))
                except Exception as exc:  # noqa: BLE001 - a task that failed on its node is a row
                    results.put((key, False, " ".join(f"{type(exc).__name__}: {exc}".split())[:300]))
    finally:
        ray.shutdown()
        results.put(None)


class RayPool:
    """Attack jobs as Ray tasks, behind the part of ``ProcessPoolExecutor``'s interface that
    :class:`AttackRunner` uses (``submit``, ``shutdown``, ``_processes``).

    A dispatcher process (:func:`_ray_dispatch`) is Ray's driver, not the run's process: the
    federation may run on Flower's simulation engine, which starts and shuts down a Ray of its
    own in the run's process, and a process has one Ray. ``address`` is Ray's: ``""`` starts a
    local Ray for the attacks (same machine, lowest priority), ``auto`` or ``HOST:PORT`` joins
    a cluster. Each task asks for one CPU (and one GPU with ``device = "cuda"``); its result is
    :func:`run_job`'s, the rows a local pool gives.
    """

    def __init__(self, address: str = "") -> None:
        ctx = get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        self._futures: dict[int, Future] = {}
        self._keys = itertools.count()
        self._failure = "the Ray dispatcher stopped"
        proc = ctx.Process(
            target=_ray_dispatch, args=(address, self._jobs, self._results, os.getpid()), name="ray-attacks"
        )
        _without_sigint(proc.start)
        self._processes = {proc.pid: proc}
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def submit(self, fn: Callable, job: AttackJob, cfg: RunConfig) -> Future:
        if fn is not run_job:
            raise ValueError("a RayPool runs run_job only")
        fut: Future = Future()
        if self._proc.exitcode is not None:
            fut.set_exception(RuntimeError(self._failure))
            return fut
        key = next(self._keys)
        self._futures[key] = fut
        self._jobs.put((key, job, cfg))
        return fut

    def _read(self) -> None:
        while (item := self._results.get()) is not None:
            key, ok, value = item
            if key is None:
                self._failure = value
                continue
            fut = self._futures.pop(key, None)
            if fut is None or fut.cancelled():
                continue
            try:
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(RuntimeError(f"ray task failed: {value}"))
            except InvalidStateError:  # cancelled meanwhile (the run stopped)
                pass
        for fut in list(self._futures.values()):  # the dispatcher is gone: nothing more will come
            if fut.cancel():
                continue
            if not fut.done():
                fut.set_exception(RuntimeError(self._failure))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """``wait``: let the tasks in flight finish, then shut Ray down; else cancel what has
        not finished (``cancel_futures``) and shut Ray down now (cancelling its tasks)."""
        if cancel_futures or not wait:
            for fut in list(self._futures.values()):
                fut.cancel()
        if wait:
            for fut in list(self._futures.values()):
                try:
                    fut.exception()
                except BaseException:  # noqa: BLE001 - cancelled: nothing to wait for
                    pass
            self._jobs.put(None)
            self._proc.join(timeout=60)  # Ray's shutdown; _close_pool ends a dispatcher that hangs in it
        elif self._proc.is_alive():
            self._proc.terminate()  # its SIGTERM handler shuts Ray down
            self._proc.join(timeout=15)


class AttackRunner:
    """Observes a run for the plan's observers and attacks what they see.

    Hooks: ``on_update`` (every reply the server aggregated), ``on_aggregate`` (each round's
    aggregate, for the curious client and the SecAgg+ server), ``on_dropped`` (a reply the
    server did not aggregate), and for the active server ``swap``, the model it sends.
    ``workers=0`` in the plan runs each job inline, in the hook (the round waits); more runs
    them in that many spawned processes at the lowest priority.
    ``close()`` runs what was deferred and waits; ``stop()`` abandons what has not finished
    (rows with status ``interrupted``) and stops the workers.
    """

    def __init__(
        self,
        plan: ExperimentPlan,
        out_dir: str | Path,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if plan.attack is None:
            raise ValueError("an attack runner needs a plan with attacks")
        self.plan = plan
        self.cfg = plan.fed
        self.attack = plan.attack
        self.out_dir = Path(out_dir)
        self.recon_dir = self.out_dir / RECONSTRUCTIONS
        self.recon_dir.mkdir(parents=True, exist_ok=True)
        self.writer = ResultsWriter(self.out_dir / "results.csv")
        if (why := lpips_unavailable()) is not None:
            log.info(why)  # once per run: the lpips column stays empty
        self.on_row = on_row
        data = load_dataset(self.cfg.dataset, self.cfg.data_root)
        self.param_names = parameter_names(build_model(self.cfg.model, data.input_shape, data.num_classes))
        self._lock = threading.Lock()
        self._pending: dict[int, AttackJob] = {}  # id -> job submitted and not finished
        self._per_round: dict[tuple[int, str], int] = {}
        self._own: dict[int, InterceptedUpdate] = {}  # the curious client's own updates, by round
        self._stopping = False
        self._stop = stop or threading.Event()  # the run's: a job lost after it is set was interrupted, not failed
        # Deferred: jobs wait in memory until training ends (close), so no attack shares the
        # cores with a round (nor do the workers' start, which comes then); if the run stops
        # first they become "interrupted" rows.
        self._deferred: list[AttackJob] | None = [] if self.attack.defer else None
        self._pool: ProcessPoolExecutor | RayPool | None = None
        if self.attack.workers != 0 and not self.attack.defer:
            self._pool = _start_pool(self.attack.workers, self.attack.ray_address)
        self.submitted = 0  # jobs
        self.completed = 0

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.writer.rows

    @property
    def csv_path(self) -> Path:
        return self.writer.path

    # ---- hooks ---------------------------------------------------------------------------

    def _grants(self) -> dict[str, Any]:
        return {"grant_batch_size": self.attack.grant_batch_size, "grant_labels": self.attack.grant_labels}

    def swap(self, server_round: int, honest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The model the active server sends in ``server_round`` instead of the honest one
        (:data:`fl_sim.strategy.ModelSwap`): in an attacked round, the construction
        ``attack.active`` placed on the server's own held-out images (the imprint with
        ``attack.active_bins`` bins; trap weights tuned to the images of a round's aggregate,
        the batch size times the clients sampled, the most the server reads in one gradient);
        None otherwise."""
        if not self.attack.is_active or not self.attack.attacked(server_round):
            return None
        data = load_dataset(self.cfg.dataset, self.cfg.data_root)
        model = build_model(self.cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(honest)
        built = construct(
            self.attack.active,
            model,
            data.input_shape,
            to_float(data.test_x),
            self.attack.active_bins,
            seed=self.cfg.seed,
            images=self.cfg.batch_size * self.cfg.clients_per_round(),
        )
        return built.state_dict()

    def on_update(self, update: InterceptedUpdate) -> None:
        """The server aggregated this client's reply (or, in a round that sent the active
        server's model, received it)."""
        if update.replaced:
            if self.attack.is_active and self._wanted(update.server_round, update.partition_id, "active"):
                self._submit(
                    observe_active(update, self.cfg, self.param_names, grant_labels=self.attack.grant_labels),
                    (self.attack.active,),
                )
            return
        if update.partition_id == self.attack.curious_client:
            self._own = {update.server_round: update}
        if "server" in self.attack.observers and self._wanted(update.server_round, update.partition_id, "server"):
            self._submit(
                observe_server(
                    update, self.cfg, self.param_names, **self._grants(), grant_order=self.attack.grant_order
                )
            )

    def on_aggregate(self, agg: RoundAggregate, observer: str) -> None:
        """A round's aggregate, seen by ``observer`` (``client`` or ``secagg``); a SecAgg+ round
        that sent the active server's model goes to the active server (``active-secagg``)."""
        if agg.replaced:
            if observer == "secagg" and self.attack.is_active and self._count(agg.server_round, "active-secagg"):
                self._submit(
                    observe_active_secagg(agg, self.cfg, self.param_names, grant_labels=self.attack.grant_labels),
                    (self.attack.active,),
                )
            return
        if observer not in self.attack.observers or not self.attack.attacked(agg.server_round):
            return
        if observer == "client":
            obs = observe_curious_client(
                agg,
                self._own.get(agg.server_round),
                self.cfg,
                self.param_names,
                curious_client=self.attack.curious_client,
                **self._grants(),
            )
        else:
            obs = observe_secagg(agg, self.cfg, self.param_names, **self._grants())
        if isinstance(obs, str):
            log.warning("round %s: the %s observer has nothing to attack: %s", agg.server_round, observer, obs)
            others = [p for p in agg.partition_ids if p != self.attack.curious_client] or [-1]
            self._record(
                [
                    blank_row(agg.server_round, p, observer, a, status="skipped", reason=obs)
                    for p in others
                    for a in self.attack.attacks_for(observer)
                ]
            )
            return
        if self.attack.clients is not None and not set(obs.key.targets) & self.attack.clients:
            return
        if self._count(agg.server_round, observer):
            self._submit(obs)

    def on_dropped(self, d: DroppedReply) -> None:
        """A reply the server did not aggregate: in an attacked round, a row per server-side
        attack saying so (nothing to attack)."""
        if not self.attack.attacked(d.server_round, d.partition_id):
            return
        # an attacked round is the active server's when it is named (it sent its own model)
        observer, attacks = (
            ("active", (self.attack.active,)) if self.attack.is_active else ("server", self.attack.attacks)
        )
        if observer not in self.attack.observers:
            return
        status = "missing" if d.status == "missing" else "invalid"
        self._record(
            [
                blank_row(
                    d.server_round,
                    d.partition_id,
                    observer,
                    a,
                    status=status,
                    reason=f"node {d.node_id}: {d.status}: {d.reason}",
                )
                for a in attacks
            ]
        )

    # ---- jobs ----------------------------------------------------------------------------

    def _count(self, server_round: int, observer: str) -> bool:
        key = (server_round, observer)
        if self.attack.max_per_round and self._per_round.get(key, 0) >= self.attack.max_per_round:
            return False
        self._per_round[key] = self._per_round.get(key, 0) + 1
        return True

    def _wanted(self, server_round: int, partition_id: int, observer: str) -> bool:
        return self.attack.attacked(server_round, partition_id) and self._count(server_round, observer)

    def _submit(self, obs: Observation, attacks: tuple[str, ...] | None = None) -> None:
        for attack in self.attack.attacks_for(obs.observer) if attacks is None else attacks:
            job = AttackJob(
                obs, attack, seed=self.cfg.seed * 1000 + obs.server_round, time_limit=self.plan.attack.time_limit
            )
            with self._lock:
                if self._stopping:
                    continue
                self.submitted += 1
                self._pending[id(job)] = job
            if self._deferred is not None:
                self._deferred.append(job)
            else:
                self._run(job)

    def _run(self, job: AttackJob) -> None:
        if self._pool is None:
            self._finish(job, *run_job(job, self.cfg))
            return
        try:
            fut = self._pool.submit(run_job, job, self.cfg)
        except RuntimeError:  # the pool was shut down (stopping)
            self._finish(job, _rows(job, status="interrupted", reason="the run stopped before this attack ran"), {})
            return
        fut.add_done_callback(lambda f, job=job: self._done(job, f))

    def _done(self, job: AttackJob, fut: Future) -> None:
        if self._stopping or self._stop.is_set() or fut.cancelled():
            rows, images = _rows(job, status="interrupted", reason="the run stopped before this attack finished"), {}
            per_image: list[dict[str, Any]] = []
        else:
            try:
                rows, images, per_image = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker died: still a row
                rows, images, per_image = (
                    _rows(job, status="error", reason=f"worker failed: {type(exc).__name__}: {exc}"[:300]),
                    {},
                    [],
                )
        self._finish(job, rows, images, per_image)

    def _finish(
        self,
        job: AttackJob,
        rows: list[dict[str, Any]],
        images: dict[str, torch.Tensor],
        per_image: Sequence[dict[str, Any]] = (),
    ) -> None:
        with self._lock:
            if self._pending.pop(id(job), None) is None:
                return  # already recorded (interrupted)
            self.completed += 1
        if images:
            torch.save(
                {k: (v * 255).round().to(torch.uint8) if k in ("truth", "recon") else v for k, v in images.items()}
                | {"observer": job.observation.observer, "attack": job.attack, "round": job.observation.server_round},
                self.recon_dir / f"{job.name}.pt",
            )
        self._record(rows, per_image)

    def _record(self, rows: list[dict[str, Any]], per_image: Sequence[dict[str, Any]] = ()) -> None:
        self.writer.write(rows, per_image)
        if self.on_row:
            for row in rows:
                try:
                    self.on_row(row)
                except Exception:  # noqa: BLE001 - progress display only
                    log.debug("on_row failed", exc_info=True)

    def pending(self) -> int:
        return len(self._pending)

    def _close_pool(self, wait: bool) -> None:
        """Shut the workers down (``wait``: let the jobs in flight finish first), and make sure
        none is left: workers spawned up front and never given a job are not told to exit by
        the executor itself, and busy ones must go when the run stops."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=wait, cancel_futures=not wait)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    # ---- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Run the deferred jobs, wait for every job in flight (each one's rows land as it
        finishes), then stop the workers. If the run's stop event is set meanwhile,
        :meth:`stop` instead."""
        stop = self._stop
        if self._deferred:
            if self.attack.workers != 0 and self._pool is None and not stop.is_set():
                self._pool = _start_pool(self.attack.workers, self.attack.ray_address)
            jobs, self._deferred = self._deferred, []
            for i, job in enumerate(jobs):
                if stop.is_set():
                    self._deferred = jobs[i:]
                    break
                self._run(job)
        while self.pending() and not stop.wait(0.2):
            pass
        if stop.is_set():
            self.stop()
        else:
            self._close_pool(wait=True)

    def stop(self) -> None:
        """Abandon every job that has not finished (an ``interrupted`` row each) and stop the
        worker processes now."""
        with self._lock:
            self._stopping = True
            abandoned = list(self._pending.values())
            self._pending.clear()
        self._deferred = []
        self._close_pool(wait=False)
        rows = []
        for job in abandoned:
            rows += _rows(job, status="interrupted", reason="the run stopped before this attack finished")
        if rows:
            self._record(rows)
