"""Running the apps, one SuperNode per client: on Flower's simulation engine (Ray), or in this
process (:mod:`fl_sim.engine`: the same apps without Ray's start-up, for tests and small runs).

The engine is ``ray`` unless a caller names one, or the environment variable ``FL_SIM_ENGINE``
(``ray`` or ``inprocess``) names it: one setting switches every federation of a test session.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .client_app import app as default_client_app
from .config import RunConfig
from .device import gpu_share
from .engine import run_inprocess
from .fate import fate_shared
from .server_app import make_server_app

__all__ = ["ENGINES", "backend_config", "resolve_engine", "run_apps", "simulate"]

ENGINES = ("ray", "inprocess")
ENGINE_VARIABLE = "FL_SIM_ENGINE"


def resolve_engine(engine: str | None = None) -> str:
    """``engine``, or when it is None the one ``FL_SIM_ENGINE`` names (default ``ray``); a
    name that is neither raises a one-line ValueError."""
    if engine is None:
        engine = os.environ.get(ENGINE_VARIABLE, "").strip() or "ray"
        if engine not in ENGINES:
            raise ValueError(f"{ENGINE_VARIABLE} must be one of {', '.join(ENGINES)}, got {engine!r}")
    elif engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def backend_config(verbose: bool = False, device: str = "auto", num_clients: int = 1) -> dict[str, Any]:
    """One CPU per simulated client, as many clients at once as the machine has cores; when
    ``device`` resolves to CUDA, each client also gets ``1 / num_clients`` of the GPUs
    (:func:`fl_sim.device.gpu_share`), so every client of a round fits on them at once (Ray
    hides the GPUs from a client that asks for none)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpu_share(device, num_clients)},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }


def run_apps(
    server_app,
    client_app,
    num_supernodes: int,
    *,
    verbose: bool = False,
    engine: str | None = None,
    device: str = "auto",
) -> None:
    """``server_app`` and ``client_app`` with ``num_supernodes`` SuperNodes (partition ids
    0..N-1, ``num-partitions`` N) on ``engine``: ``ray`` (Flower's simulation engine) or
    ``inprocess`` (:func:`fl_sim.engine.run_inprocess`); None: :func:`resolve_engine`.
    ``device``: the run's ``device`` setting, for Ray's GPU share (the clients place their
    models themselves; in-process they share this process's devices)."""
    if resolve_engine(engine) == "inprocess":
        run_inprocess(server_app, client_app, num_supernodes, verbose=verbose)
        return
    from flwr.simulation import run_simulation  # imports Ray (seconds): only runs on Ray's engine pay it

    with fate_shared():  # Ray's agents outlive a SIGKILLed run unless a watchdog ends them
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=backend_config(verbose, device, num_supernodes),
            verbose_logging=verbose,
        )


def simulate(
    cfg: RunConfig, *, verbose: bool = False, client_app=None, engine: str | None = None, **run_kwargs: Any
) -> None:
    """Run ``cfg`` with the honest Message-API apps on ``engine`` (see :func:`run_apps`);
    ``run_kwargs`` (``wrap_strategy``, ``on_round``, ``on_dropped``, ``stop``) go to
    :func:`fl_sim.server_app.run_server`."""
    run_apps(
        make_server_app(cfg.to_flower(), **run_kwargs),
        client_app or default_client_app,
        cfg.num_clients,
        verbose=verbose,
        engine=engine,
        device=cfg.device,
    )
