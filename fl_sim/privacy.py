"""The server's side of differential privacy: Flower's central-DP strategy wrapper around the
honest strategy, and the formal guarantee of a run's defences from the real accountants."""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from .settings import DPSGD, CentralDP, Defence, LocalDP

__all__ = ["dp_wrapper", "privacy_spent"]


def dp_wrapper(strategy, defences: tuple[Defence, ...], num_sampled_clients: int):
    """Flower's central-DP strategy wrapper around ``strategy`` when the run names central DP
    (else ``strategy`` itself)."""
    central = next((d for d in defences if isinstance(d, CentralDP)), None)
    if central is None:
        return strategy
    cls = (
        DifferentialPrivacyServerSideFixedClipping
        if central.side == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return cls(strategy, central.noise, central.clip, num_sampled_clients)


def privacy_spent(
    defences: tuple[Defence, ...],
    *,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    partition_sizes: list[int],
    batch_size: int,
    steps_per_round: int,
) -> list[dict[str, Any]]:
    """The formal guarantee of each DP defence after ``rounds`` rounds, from the real
    accountants: a list of ``{defence, epsilon, delta, level, accountant, note}``.

    - DP-SGD: Opacus's RDP accountant, per client (sample-level), ``steps_per_round`` steps a
      round at sampling rate ``batch_size / partition size``; the worst client is reported.
      Opacus assumes Poisson sampling; the clients' batches are a seeded shuffle, as in most
      DP-SGD practice, so the figure is the customary one, not a proof for this sampler.
    - central DP: Flower's RDP accountant (``flwr[dp]``), client-level, one Gaussian release
      of ``clients_per_round`` of ``num_clients`` clients a round, no amplification. (Flower's
      wrapper can hold this accountant itself, but only for equally weighted clients; FedAvg
      here weights by examples, so the same accountant runs beside it.)
    - local DP: ``LocalDpMod``'s (epsilon, delta) hold per round; over the rounds, basic
      composition gives ``rounds * epsilon``.
    """
    out: list[dict[str, Any]] = []
    for d in defences:
        if isinstance(d, DPSGD):
            if d.noise <= 0:
                out.append(
                    {
                        "defence": d.spec(),
                        "epsilon": math.inf,
                        "delta": d.delta,
                        "level": "sample",
                        "accountant": "none (no noise)",
                        "note": "clipping without noise gives no DP guarantee",
                    }
                )
                continue
            from opacus.accountants import RDPAccountant  # heavy import (~1 s), only for DP-SGD runs

            worst = 0.0
            for n in sorted(set(partition_sizes)):
                acc = RDPAccountant()
                acc.history = [(d.noise, min(1.0, batch_size / max(n, 1)), rounds * steps_per_round)]
                worst = max(worst, float(acc.get_epsilon(d.delta)))
            out.append(
                {
                    "defence": d.spec(),
                    "epsilon": worst,
                    "delta": d.delta,
                    "level": "sample",
                    "accountant": "opacus RDPAccountant",
                    "note": f"{rounds * steps_per_round} steps, worst client",
                }
            )
        elif isinstance(d, CentralDP):
            # Flower's accountant needs the optional flwr[dp] extra (dp-accounting): only central-DP runs import it
            from flwr.supercore.privacy_accounting import (
                GaussianPrivacyEvent,
                NeighboringRelation,
                PrivacyConfig,
                SamplingMethod,
            )
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # optional flwr[dp] extra

            acc = RdpAccountant(
                PrivacyConfig(
                    target_delta=d.delta,
                    population_size=num_clients,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
            acc.compose(GaussianPrivacyEvent(d.noise, clients_per_round, num_clients), count=rounds)
            out.append(
                {
                    "defence": d.spec(),
                    "epsilon": float(acc.get_privacy_spent().epsilon),
                    "delta": d.delta,
                    "level": "client",
                    "accountant": "flwr RdpAccountant",
                    "note": f"{rounds} releases",
                }
            )
        elif isinstance(d, LocalDP):
            out.append(
                {
                    "defence": d.spec(),
                    "epsilon": rounds * d.epsilon,
                    "delta": rounds * d.delta,
                    "level": "update",
                    "accountant": "LocalDpMod per round, basic composition",
                    "note": f"{d.epsilon} per round, noise std {d.noise_std:.4g}",
                }
            )
    return out
