"""The spying ServerApp for Flower's deployment engine (``flwr run``, SuperLink, SuperNodes).

``python -m experiments.run`` drives the simulation engine itself; a real deployment instead
loads a ServerApp by name. This one is the honest ServerApp with the intercepting strategy
and the attack runner around it, configured by run-config keys beside the federation's own:

- ``attack``: ``none`` (honest), ``rgap``, ``dlg``, ``idlg``, ``ig``, or a comma list;
- ``observers``: ``server`` and/or ``client`` (comma list); the ``secagg`` observer needs the
  legacy SecAgg+ apps, so it runs only under ``python -m experiments.run``;
- ``attack-rounds`` (comma list, or ``all``), ``attack-workers`` (0: inline), ``curious-client``.

The run folder (``out-dir``) gets rounds.csv, results.csv, the figures and summary.md.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.config import RunConfig
from fl_sim.intercepting_strategy import InterceptingStrategy
from fl_sim.server_app import run_server

app = ServerApp()


def _list(value, cast=str):
    text = str(value).strip()
    if text in ("", "all", "none"):
        return None if text == "all" else []
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


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
    if not attacks:
        run_server(grid, cfg)
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
        ))
    finally:
        runner.close(wait=True)
        finish(runner, cfg, Path(cfg.out_dir))
