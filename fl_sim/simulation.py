"""Running the apps on Flower's simulation engine (Ray), one SuperNode per client."""

from __future__ import annotations

import logging
import os
from typing import Any

from .client_app import app as default_client_app
from .config import RunConfig
from .server_app import make_server_app

__all__ = ["backend_config", "run_apps", "simulate"]


def backend_config(verbose: bool = False) -> dict[str, Any]:
    """One CPU per simulated client, as many clients at once as the machine has cores."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }


def run_apps(server_app, client_app, num_supernodes: int, *, verbose: bool = False) -> None:
    """``server_app`` and ``client_app`` on Flower's simulation engine with ``num_supernodes``
    SuperNodes (partition ids 0..N-1, ``num-partitions`` N)."""
    from flwr.simulation import run_simulation  # imports Ray (seconds): only runs on Ray's engine pay it

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=backend_config(verbose),
        verbose_logging=verbose,
    )


def simulate(cfg: RunConfig, *, verbose: bool = False, client_app=None, **run_kwargs: Any) -> None:
    """Run ``cfg`` with the honest Message-API apps; ``run_kwargs`` (``wrap_strategy``,
    ``on_round``, ``on_dropped``, ``stop``) go to :func:`fl_sim.server_app.run_server`."""
    run_apps(make_server_app(cfg.to_flower(), **run_kwargs), client_app or default_client_app, cfg.num_clients,
             verbose=verbose)
