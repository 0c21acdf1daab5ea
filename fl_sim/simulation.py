"""Running the apps on Flower's simulation engine (Ray), one SuperNode per client."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import RunConfig

__all__ = ["backend_config", "simulate"]


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


def simulate(cfg: RunConfig, *, verbose: bool = False, on_round=None, wrap_strategy=None, client_app=None) -> None:
    """Run ``cfg`` with the Message-API apps; ``wrap_strategy`` and ``on_round`` go to
    :func:`fl_sim.server_app.run_server`."""
    from flwr.simulation import run_simulation

    from .client_app import app as default_client_app
    from .server_app import make_server_app

    run_simulation(
        server_app=make_server_app(cfg.to_flower(), on_round=on_round, wrap_strategy=wrap_strategy),
        client_app=client_app or default_client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config(verbose),
        verbose_logging=verbose,
    )
