"""One plan's run: its run folder, its attack runner, and the server apps that carry it out.

Every entry point runs a plan through this class, so a rule of the plan holds on every path:
``python -m experiments.run`` hands :meth:`Experiment.server_app` (and, for the SecAgg+
observer, :meth:`Experiment.secagg_server_app`) to Flower's simulation engine; the spying
ServerApp that a deployment loads (``experiments.apps.server_app``) calls
:meth:`Experiment.serve` on the grid it is given. Both write the same files with the same
writers.

A phase (``main``: the federation, with the spying strategy when the plan intercepts;
``secagg``: the second, SecAgg+ run) ends ``completed``, ``stopped`` (the stop event was set:
the round in flight is abandoned, nothing is invented) or ``failed`` (a round with no valid
reply; the reason is kept). :meth:`finish` then lets the attacks in flight finish (or, after a
stop, marks them interrupted), and writes the figures, summary.md and summary.json.

config.json records what made the run beside its plan (:func:`experiments.run_folder.provenance`):
the command (``command``, default this process's command line), the start and end times, the
versions and the git commit; a resume adds its own entry.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.device import resolve_device
from fl_sim.intercepting_strategy import InterceptingStrategy
from fl_sim.privacy import privacy_spent
from fl_sim.secagg import serve_secagg
from fl_sim.server_app import FederationLog, RunStopped, run_server
from fl_sim.strategy import RoundFailed
from fl_sim.task import client_indices, local_schedule

from .plan import RESOLVED_DEVICE, ConfigError, ExperimentPlan
from .report.summary import finish as report
from .run_folder import PROVENANCE, provenance, utc_now, write_provenance
from .runner import AttackRunner

__all__ = ["Experiment", "Outcome", "SECAGG_DIR", "PRIVACY", "privacy_report"]

log = logging.getLogger(__name__)

SECAGG_DIR = "secagg"  # the SecAgg+ run's own federation files, inside the run folder
PRIVACY = "privacy.json"  # the run's defences and the formal guarantee of each, from the accountants


def privacy_report(plan: ExperimentPlan) -> dict[str, Any]:
    """The plan's defences and what each guarantees after all its rounds
    (:func:`fl_sim.privacy.privacy_spent`: Opacus's and Flower's accountants)."""
    c = plan.fed
    defences = c.defence_list
    sizes, steps = [], 1
    if defences:
        sizes = [len(client_indices(c, pid, c.num_clients)) for pid in range(c.num_clients)]
        if c.mode == "fedavg":  # the most local steps any client takes in a round
            steps = max(len(local_schedule(c, pid, c.num_clients, 1)) for pid in range(c.num_clients))
    return {
        "defences": [d.spec() for d in defences],
        "guarantees": privacy_spent(
            defences,
            rounds=c.num_server_rounds,
            num_clients=c.num_clients,
            clients_per_round=c.clients_per_round(),
            partition_sizes=sizes,
            batch_size=c.batch_size,
            steps_per_round=steps,
        ),
    }


def _earlier_sessions(out: Path, resume: bool) -> list[dict[str, Any]]:
    """The provenance of the sessions that ran ``out``'s run before (none for a new run, or a
    run folder written before provenance was recorded)."""
    if not resume:
        return []
    for path in (out / "config.json", out / SECAGG_DIR / "config.json"):
        try:
            earlier = json.loads(path.read_text()).get(PROVENANCE)
        except (OSError, ValueError):
            continue
        return list(earlier) if isinstance(earlier, list) else []
    return []


@dataclass(frozen=True)
class Outcome:
    """How a phase ended: ``completed``, ``stopped`` or ``failed`` (with the reason)."""

    status: str
    reason: str = ""


class Experiment:
    """Carry out ``plan`` in ``plan.fed.out_dir``.

    ``stop``: when set, the phase running stops at its next wait for replies and no further
    phase starts. ``on_round(phase, row)`` gets each rounds.csv row; ``on_row`` each
    results.csv row (progress display). ``command``: what config.json records as the command
    that made the run (default: this process's command line)."""

    def __init__(
        self,
        plan: ExperimentPlan,
        *,
        stop: threading.Event | None = None,
        on_round: Callable[[str, dict[str, Any]], None] | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        command: str | None = None,
    ) -> None:
        self.plan = plan
        self.out = Path(plan.fed.out_dir)
        if not plan.fed.out_dir:
            raise ConfigError("out-dir", "an experiment needs its run folder")
        if not plan.resume and (self.out / "config.json").exists():
            raise ConfigError("out-dir", f"{self.out} already holds a run: resume it or choose another folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = str(resolve_device(plan.fed.device))
        # this session's provenance after those of the sessions before it (a resumed run)
        self.provenance = [*_earlier_sessions(self.out, plan.resume), provenance(command, device=self.device)]
        self.stop = stop or threading.Event()
        self.on_round = on_round
        self.runner = AttackRunner(plan, self.out, on_row=on_row, stop=self.stop) if plan.attacked else None
        self.outcomes: dict[str, Outcome] = {}
        self.logs: dict[str, FederationLog] = {}
        (self.out / PRIVACY).write_text(json.dumps(privacy_report(plan), indent=2) + "\n")

    # ---- phases --------------------------------------------------------------------------

    def _phase(self, name: str, body: Callable[[], None]) -> Outcome:
        if self.stop.is_set():
            outcome = Outcome("stopped", "stopped before it started")
        else:
            try:
                body()
                outcome = Outcome("stopped", "stopped") if self.stop.is_set() else Outcome("completed")
            except RunStopped:
                outcome = Outcome("stopped", "stopped while waiting for replies")
            except RoundFailed as exc:
                outcome = Outcome("failed", str(exc))
            except Exception as exc:  # noqa: BLE001 - whatever ended the phase, finish() still runs
                log.debug("phase %s ended by an exception", name, exc_info=True)
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                outcome = Outcome("stopped", reason) if self.stop.is_set() else Outcome("failed", reason)
        self.outcomes[name] = outcome
        return outcome

    def _round_hook(self, phase: str):
        return (lambda row: self.on_round(phase, row)) if self.on_round else None

    def _config(self) -> dict[str, Any]:
        """config.json: the plan, the device ``device`` resolved to on this machine (where
        the attacks ran, and the simulated clients trained), and the provenance."""
        return {**self.plan.to_mapping(), RESOLVED_DEVICE: self.device, PROVENANCE: self.provenance}

    def _note_flower_run(self, grid: Grid) -> None:
        """Add the Flower run to this session's provenance where it came from a submitted app
        bundle (a deployment): its id and the bundle's id, version and hash, which name the
        code the ServerApp ran (it runs from the installed bundle, not from a checkout)."""
        try:
            run = grid.run
        except Exception:  # noqa: BLE001 - a grid with no run to tell: nothing to add
            return
        if getattr(run, "fab_hash", ""):
            self.provenance[-1]["flower-run"] = {
                "run-id": run.run_id,
                "fab-id": run.fab_id,
                "fab-version": run.fab_version,
                "fab-hash": run.fab_hash,
            }

    def _record_provenance(self) -> None:
        """Write the provenance into the run's config.json files (a resumed run's were written
        by the session before; the end time is known at the end)."""
        for path in (self.out / "config.json", self.out / SECAGG_DIR / "config.json"):
            if path.is_file():
                write_provenance(path, self.provenance)

    def _swap(self):
        """The active server's model swap (None for an honest server)."""
        a = self.plan.attack
        return self.runner.swap if a is not None and a.is_active and self.runner is not None else None

    def serve(self, grid: Grid) -> Outcome:
        """The main federation on ``grid``: the honest server, wrapped by the spying strategy
        when the plan intercepts (server or curious-client observers)."""
        plan, runner = self.plan, self.runner

        def wrap(honest):
            return InterceptingStrategy(
                honest,
                kind="gradient" if plan.fed.mode == "fedsgd" else "weights",
                on_update=runner.on_update,
                on_aggregate=partial(runner.on_aggregate, observer="client"),
            )

        def body() -> None:
            self._note_flower_run(grid)
            log_ = self.logs["main"] = FederationLog(self.out, self._config(), resume=plan.resume)
            if plan.resume:
                self._record_provenance()
            run_server(
                grid,
                plan.fed,
                log_,
                wrap_strategy=wrap if plan.intercepts else None,
                on_round=self._round_hook("main"),
                on_dropped=runner.on_dropped if runner else None,
                replace_model=self._swap(),
                stop=self.stop,
            )

        return self._phase("main", body)

    def server_app(self) -> ServerApp:
        """A ServerApp that runs :meth:`serve` (for Flower's simulation engine)."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.serve(grid)

        return app

    def secagg_server_app(self) -> ServerApp:
        """The SecAgg+ run: same seed, model and batches, Flower's SecAgg+ workflow; its
        federation files go to ``secagg/`` in the run folder, its attack rows to the run's
        results.csv (observer ``secagg``)."""
        runner = self.runner
        cfg = self.plan.fed.replace(out_dir=str(self.out / SECAGG_DIR))
        app = ServerApp()

        def body(grid: Grid, context: Context) -> None:
            self._note_flower_run(grid)
            log_ = self.logs["secagg"] = FederationLog(
                cfg.out_dir, {**self._config(), "out-dir": cfg.out_dir}, resume=self.plan.resume
            )
            if self.plan.resume:
                self._record_provenance()
            serve_secagg(
                grid,
                context,
                cfg,
                log_,
                on_aggregate=partial(runner.on_aggregate, observer="secagg"),
                on_round=self._round_hook("secagg"),
                replace_model=self._swap(),
                stop=self.stop,
            )

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self._phase("secagg", lambda: body(grid, context))

        return app

    # ---- the end -------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.stop.is_set() or any(o.status == "stopped" for o in self.outcomes.values())

    @property
    def failure(self) -> str | None:
        """The first failed phase's reason, if any."""
        return next((o.reason for o in self.outcomes.values() if o.status == "failed"), None)

    def finish(self):
        """Let the attacks finish (after a stop: mark them interrupted and stop the workers),
        then record the end time and write the figures, summary.md and summary.json. Returns
        the summary table (observer x attack)."""
        if self.runner is not None:
            if self.stopped:
                self.runner.stop()
            else:
                self.runner.close()  # a stop while the attacks finish abandons the rest
        self.provenance[-1]["ended"] = utc_now()
        self._record_provenance()
        return report(self.out, self._config(), self.outcomes)  # config.json's keys, the resolved device with them
