"""The spying ServerApp for Flower's deployment engine (``flwr run``, SuperLink, SuperNodes).

``python -m experiments.run`` drives the simulation engine itself; a real deployment instead
loads a ServerApp by name. This one is the honest ServerApp with the intercepting strategy
and the attack runner around it, configured by run-config keys beside the federation's own:

- ``attack``: ``none`` (honest), ``rgap``, ``dlg``, ``idlg``, ``ig``, or a comma list;
- ``observers``: ``server`` and/or ``client`` (comma list); the ``secagg`` observer needs the
  legacy SecAgg+ apps, so it runs only under ``python -m experiments.run``;
- ``attack-rounds`` (comma list, or ``all``), ``attack-workers`` (0: inline), ``curious-client``.

The run folder (``out-dir``) gets rounds.csv, results.csv, the figures and summary.md.

A client whose reply did not arrive in a round (its SuperNode died, or it missed
``round-timeout``) is marked: a row of ``missing.csv`` (round, node_id, client, reason) as the
round ends, in honest runs too, and, in attacked rounds, a ``results.csv`` row per server-side
attack with status ``missing`` (added after the summary is computed, so medians and success
rates count only updates that arrived; summary.md lists the missing replies separately).
"""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.config import RunConfig
from fl_sim.intercepting_strategy import InterceptingStrategy, MissingReply
from fl_sim.server_app import run_server

app = ServerApp()


def _list(value, cast=str):
    text = str(value).strip()
    if text in ("", "all", "none"):
        return None if text == "all" else []
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


MISSING_FIELDS = ["round", "node_id", "client", "reason"]


class MissingLog:
    """Appends one ``missing.csv`` row per (round, node) whose reply did not arrive."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "missing.csv"
        self.rows: list[MissingReply] = []

    def __call__(self, gone: MissingReply) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(MISSING_FIELDS)
            w.writerow([gone.server_round, gone.node_id, gone.partition_id, gone.reason])
        self.rows.append(gone)


def _mark_missing(runner, missing: MissingLog, out_dir: Path) -> None:
    """results.csv rows (status ``missing``) for attacked rounds, and a summary.md section."""
    from experiments.attack_runner import RESULT_FIELDS

    if not missing.rows:
        return
    rows = []
    if "server" in runner.observers:
        for gone in missing.rows:
            if runner.rounds is not None and gone.server_round not in runner.rounds:
                continue
            for attack in runner.attacks:
                rows.append({"round": gone.server_round, "client": gone.partition_id, "observer": "server",
                             "attack": attack, "psnr": math.nan, "ssim": math.nan, "mse": math.nan,
                             "label_acc": math.nan, "seconds": 0.0, "status": "missing",
                             "reason": f"node {gone.node_id}: {gone.reason}"})
    with runner.csv_path.open("a", newline="") as f:
        csv.DictWriter(f, RESULT_FIELDS).writerows(rows)
    summary = Path(out_dir) / "summary.md"
    lines = ["", "## Missing replies", "",
             "Clients sent a train message whose reply never arrived (not attacked, not aggregated):", ""]
    lines += [f"- round {g.server_round}, client {g.partition_id} (node {g.node_id}): {g.reason}" for g in missing.rows]
    with summary.open("a") as f:
        f.write("\n".join(lines) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from attacks import ATTACKS
    from experiments.attack_runner import AttackRunner
    from experiments.report import finish

    rc = dict(context.run_config)
    cfg = RunConfig.from_mapping(rc)
    attacks = _list(rc.get("attack", "none")) or []
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}: choose from {', '.join(ATTACKS)} or none")
    missing = MissingLog(Path(cfg.out_dir))
    if not attacks:
        # Wrapped only to mark missing replies; no hook touches the updates.
        run_server(grid, cfg, wrap_strategy=lambda honest: InterceptingStrategy(
            honest, kind="gradient" if cfg.mode == "fedsgd" else "weights", on_missing=missing))
        return
    if cfg.mode != "fedsgd":
        raise ValueError("attacks run on FedSGD updates (mode = 'fedsgd'); scoring FedAvg updates is not supported yet")
    observers = [o for o in (_list(rc.get("observers", "server")) or ["server"]) if o != "secagg"]
    runner = AttackRunner(
        cfg, attacks, Path(cfg.out_dir), rounds=_list(rc.get("attack-rounds", "1"), int),
        observers=observers, curious_client=int(rc.get("curious-client", 0)),
        workers=int(rc.get("attack-workers", 1)),
    )
    try:
        run_server(grid, cfg, wrap_strategy=lambda honest: InterceptingStrategy(
            honest, kind="gradient",
            on_update=runner.on_update, on_aggregate=partial(runner.on_aggregate, observer="client"),
            on_missing=missing,
        ))
    finally:
        runner.close(wait=True)
        finish(runner, cfg, Path(cfg.out_dir))
        _mark_missing(runner, missing, Path(cfg.out_dir))
