"""Defences against gradient inversion, each where it lives in a real deployment.

A run names them in its config (``defences = "prune:ratio=0.3;noise:sigma=0.01"``, the flag
``--defence NAME[:KEY=VALUE,...]``, repeatable). Where a defence sits decides whom it protects
against, and the testbed measures that rather than assumes it:

- ``prune:ratio=p`` (DLG's defence, Zhu et al. 2019, section 5): the client zeroes the
  smallest-magnitude fraction ``p`` of each tensor of its update (gradient compression), in a
  ClientApp mod, so every observer sees the pruned update.
- ``noise:sigma=s`` (DLG's other defence): the client adds Gaussian noise of standard deviation
  ``s`` to every entry of its update (DLG's paper gives the variance, ``s**2``), in a mod;
  ``noise:rms=k``: of ``k`` times the update's RMS entry (relative, as the clients' audit
  applies it).
- ``ldp:clip=C,epsilon=e[,delta=d,sensitivity=S]``: Flower's ``LocalDpMod`` on the ClientApp:
  the update is clipped to norm C and Gaussian noise calibrated to (e, d) for sensitivity S
  (default C) is added before it leaves the client; (e, d) per round.
- ``central-dp:noise=z,clip=C[,side=server|client,delta=d]``: Flower's central DP, the
  strategy wrappers ``DifferentialPrivacyServerSideFixedClipping`` (the server clips each
  update it received) or ``DifferentialPrivacyClientSideFixedClipping`` with Flower's
  ``fixedclipping_mod`` on the clients (the client clips before sending); either way the
  server adds noise of standard deviation ``z C / n`` to the aggregate of ``n`` clients. The
  server therefore sees un-noised updates (clipped ones with ``side=client``): central DP
  protects against whoever sees the model, not against the server. Under ``side=client`` the
  norm the client clips to arrives in the server's train config (Flower's design): the
  client trusts the server for it.
- ``dpsgd:noise=z,clip=C[,delta=d]``: sample-level DP-SGD with Opacus in the client's local
  training: per-sample gradients clipped to C, summed, Gaussian noise of standard deviation
  ``z C`` added, divided by the batch size (FedSGD: the one batch's gradient; FedAvg: every
  local step).

``ldp`` and ``central-dp`` clip the *weight* update (Flower's implementations clip
``reply - sent``), so they need FedAvg replies (``mode = fedavg``; one local step on one batch
is FedSGD's update in weight form). :func:`privacy_spent` reports the formal guarantee of a
run's defences from the real accountants (Opacus's RDP accountant for DP-SGD, Flower's RDP
accountant for central DP); pruning and plain noise have none.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import numpy as np
import torch

__all__ = [
    "Defence",
    "Prune",
    "GaussianNoise",
    "LocalDP",
    "CentralDP",
    "DPSGD",
    "DEFENCES",
    "DefenceError",
    "parse_defences",
    "format_defences",
    "defend_update",
    "defence_mod",
    "dp_wrapper",
    "privacy_spent",
]


class DefenceError(ValueError):
    """A defence spec that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Defence:
    """A defence and its settings (subclasses: the fields are the spec's keys)."""

    name: ClassVar[str] = ""
    needs_fedavg: ClassVar[bool] = False  # clips the weight update (Flower's implementations)

    def validate(self) -> None:
        """Raise :class:`DefenceError` for a value out of range."""

    strength_key: ClassVar[str] = ""  # the setting a sweep varies: larger is stronger, except ldp's epsilon

    def spec(self) -> str:
        values = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}:{values}" if values else self.name

    @property
    def family(self) -> str:
        """The curve a sweep draws this defence on (its name; central DP per side)."""
        return self.name

    @property
    def strength(self) -> float:
        return float(getattr(self, self.strength_key))


def _positive(defence: Defence, *names: str) -> None:
    for n in names:
        v = getattr(defence, n)
        if not (math.isfinite(v) and v > 0):
            raise DefenceError(f"{defence.name}: {n} must be a finite number > 0, got {v}")


def _probability(defence: Defence, name: str) -> None:
    v = getattr(defence, name)
    if not 0 < v < 1:
        raise DefenceError(f"{defence.name}: {name} must lie in (0, 1), got {v}")


@dataclass(frozen=True)
class Prune(Defence):
    ratio: float
    name: ClassVar[str] = "prune"
    strength_key: ClassVar[str] = "ratio"

    def validate(self) -> None:
        if not 0 <= self.ratio < 1:
            raise DefenceError(f"prune: ratio must lie in [0, 1), got {self.ratio}")


@dataclass(frozen=True)
class GaussianNoise(Defence):
    """N(0, s^2) on every entry of the update, s = ``sigma`` + ``rms`` x the update's RMS entry
    (``rms``: noise relative to the update, one setting for any model or round; the clients'
    audit strengthens it this way)."""

    sigma: float = 0.0
    rms: float = 0.0
    name: ClassVar[str] = "noise"
    strength_key: ClassVar[str] = "sigma"

    def validate(self) -> None:
        for key in ("sigma", "rms"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise DefenceError(f"noise: {key} must be a finite number >= 0, got {value}")
        if self.sigma == 0 and self.rms == 0:
            raise DefenceError("noise: needs sigma=... (absolute) or rms=... (relative to the update's RMS entry)")

    def spec(self) -> str:
        parts = [f"sigma={self.sigma}"] if self.sigma or not self.rms else []
        return "noise:" + ",".join(parts + ([f"rms={self.rms}"] if self.rms else []))

    @property
    def strength(self) -> float:
        return self.sigma if self.sigma or not self.rms else self.rms

    def scale(self, update: dict[str, torch.Tensor]) -> float:
        """The noise's standard deviation for ``update``."""
        if not self.rms:
            return self.sigma
        count = sum(v.numel() for v in update.values())
        rms = math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()) / max(count, 1))
        return self.sigma + self.rms * rms


@dataclass(frozen=True)
class LocalDP(Defence):
    clip: float
    epsilon: float
    delta: float = 1e-5
    sensitivity: float = 0.0  # 0: the clipping norm
    name: ClassVar[str] = "ldp"
    needs_fedavg: ClassVar[bool] = True
    strength_key: ClassVar[str] = "epsilon"

    def validate(self) -> None:
        _positive(self, "clip", "epsilon")
        _probability(self, "delta")
        if not (math.isfinite(self.sensitivity) and self.sensitivity >= 0):
            raise DefenceError(f"ldp: sensitivity must be a finite number >= 0, got {self.sensitivity}")

    @property
    def noise_std(self) -> float:
        """The standard deviation LocalDpMod adds (the Gaussian mechanism for (epsilon, delta))."""
        s = self.sensitivity or self.clip
        return s * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


@dataclass(frozen=True)
class CentralDP(Defence):
    noise: float
    clip: float
    side: str = "server"
    delta: float = 1e-5
    name: ClassVar[str] = "central-dp"
    needs_fedavg: ClassVar[bool] = True
    strength_key: ClassVar[str] = "noise"

    @property
    def family(self) -> str:
        return f"central-dp ({self.side})"

    def validate(self) -> None:
        _positive(self, "noise", "clip")
        _probability(self, "delta")
        if self.side not in ("server", "client"):
            raise DefenceError(f"central-dp: side must be server or client, got {self.side!r}")


@dataclass(frozen=True)
class DPSGD(Defence):
    noise: float
    clip: float
    delta: float = 1e-5
    name: ClassVar[str] = "dpsgd"
    strength_key: ClassVar[str] = "noise"

    def validate(self) -> None:
        _positive(self, "clip")
        _probability(self, "delta")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise DefenceError(f"dpsgd: noise must be a finite number >= 0, got {self.noise}")


DEFENCES: dict[str, type[Defence]] = {d.name: d for d in (Prune, GaussianNoise, LocalDP, CentralDP, DPSGD)}


def _one(text: str) -> Defence:
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    cls = DEFENCES.get(name)
    if cls is None:
        raise DefenceError(f"unknown defence {name!r}: choose one of {', '.join(DEFENCES)}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for item in (t.strip() for t in rest.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise DefenceError(f"{name}: expected KEY=VALUE with KEY one of {', '.join(known)}, got {item!r}")
        if key in values:
            raise DefenceError(f"{name}: {key} given twice")
        kind = known[key].type if isinstance(known[key].type, type) else {"float": float, "str": str}[known[key].type]
        try:
            values[key] = kind(value.strip())
        except ValueError:
            raise DefenceError(f"{name}: {key} must be {kind.__name__}, got {value.strip()!r}") from None
    missing = [f.name for f in fields(cls) if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise DefenceError(f"{name}: needs {', '.join(f'{m}=...' for m in missing)}")
    defence = cls(**values)
    defence.validate()
    return defence


def parse_defences(text: str) -> tuple[Defence, ...]:
    """``"prune:ratio=0.3;noise:sigma=0.01"`` -> the defences, in the order they apply to an
    update. At most one DP-SGD and one central DP."""
    out = tuple(_one(t) for t in str(text).split(";") if t.strip())
    for cls in (DPSGD, CentralDP, LocalDP):
        if sum(isinstance(d, cls) for d in out) > 1:
            raise DefenceError(f"{cls.name} is named twice")
    return out


def format_defences(defences: tuple[Defence, ...]) -> str:
    return ";".join(d.spec() for d in defences)


# ---- applying them ---------------------------------------------------------------------


def _generator(seed: int, partition_id: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, partition_id, server_round, salt]).generate_state(1)[0]))


def _prune(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` smallest-magnitude entries of ``t`` (ties at the threshold included)."""
    k = int(ratio * t.numel() + 1e-9)  # 0.29 * 100 is 28.999...
    if k == 0:
        return t
    threshold = t.abs().reshape(-1).kthvalue(k).values
    return torch.where(t.abs() <= threshold, torch.zeros_like(t), t)


def defend_update(update: dict[str, torch.Tensor], defences: tuple[Defence, ...], *, seed: int, partition_id: int,
                  server_round: int) -> dict[str, torch.Tensor]:
    """Apply the client's own update defences (pruning, Gaussian noise) to ``update`` (a
    gradient, or a weight delta), in order; the others live elsewhere. Seeded by (seed,
    partition, round), so a run repeats."""
    out = dict(update)
    for i, d in enumerate(defences):
        if isinstance(d, Prune):
            out = {k: _prune(v, d.ratio) for k, v in out.items()}
        elif isinstance(d, GaussianNoise):
            gen = _generator(seed, partition_id, server_round, 1000 + i)
            sigma = d.scale(out)
            out = {k: v + sigma * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in out.items()}
    return out


def _update_mod(msg, context, call_next):
    """Prune / noise the train reply's update: a FedSGD gradient as it is, a FedAvg reply as
    its delta from the weights that were sent."""
    from flwr.app import ArrayRecord

    from .config import RunConfig
    from .task import node_partition

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    pid = node_partition(cfg, context.node_config)
    arrays = reply.content["arrays"].to_torch_state_dict()
    sent = msg.content["arrays"].to_torch_state_dict() if cfg.mode == "fedavg" else None
    update = arrays if sent is None else {k: arrays[k] - sent[k] for k in arrays}
    defended = defend_update(update, cfg.defence_list, seed=cfg.seed, partition_id=pid,
                             server_round=int(msg.content["config"]["server-round"]))
    new = defended if sent is None else {k: sent[k] + defended[k] for k in defended}
    reply.content["arrays"] = ArrayRecord({k: v.contiguous() for k, v in new.items()})
    return reply


def defence_mod(msg, context, call_next):
    """The client's defences as one Flower mod on the train handler: our pruning and noise,
    Flower's ``LocalDpMod`` and, under client-side central DP, Flower's ``fixedclipping_mod``,
    applied to the update in the order the run names them. DP-SGD is not a mod: it changes
    the local training itself (:mod:`fl_sim.task`)."""
    from flwr.app.message_type import MessageType
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

    from .config import RunConfig

    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    cfg = RunConfig.from_mapping(dict(msg.content["config"]))
    defences = cfg.defence_list
    if any(isinstance(d, LocalDP) for d in defences):
        from .task import node_partition

        # LocalDpMod draws from numpy's global generator: seed it per (seed, client, round) so a run repeats
        round_ = int(msg.content["config"].get("server-round", 0))
        np.random.seed(np.random.SeedSequence([cfg.seed, node_partition(cfg, context.node_config), round_, 2000])
                       .generate_state(1)[0])
    handler: Callable = call_next
    for d in defences:  # the first named applies first: innermost
        if isinstance(d, (Prune, GaussianNoise)):
            mod = _update_mod
        elif isinstance(d, LocalDP):
            mod = LocalDpMod(d.clip, d.sensitivity or d.clip, d.epsilon, d.delta)
        elif isinstance(d, CentralDP) and d.side == "client":
            mod = fixedclipping_mod
        else:
            continue
        handler = (lambda inner, m: lambda msg_, ctx_: m(msg_, ctx_, inner))(handler, mod)
    return handler(msg, context)


def dp_wrapper(strategy, defences: tuple[Defence, ...], num_sampled_clients: int):
    """Flower's central-DP strategy wrapper around ``strategy`` when the run names central DP
    (else ``strategy`` itself)."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    central = next((d for d in defences if isinstance(d, CentralDP)), None)
    if central is None:
        return strategy
    cls = DifferentialPrivacyServerSideFixedClipping if central.side == "server" else DifferentialPrivacyClientSideFixedClipping
    return cls(strategy, central.noise, central.clip, num_sampled_clients)


# ---- what they guarantee -----------------------------------------------------------------


def privacy_spent(defences: tuple[Defence, ...], *, rounds: int, num_clients: int, clients_per_round: int,
                  partition_sizes: list[int], batch_size: int, steps_per_round: int) -> list[dict[str, Any]]:
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
                out.append({"defence": d.spec(), "epsilon": math.inf, "delta": d.delta, "level": "sample",
                            "accountant": "none (no noise)", "note": "clipping without noise gives no DP guarantee"})
                continue
            from opacus.accountants import RDPAccountant

            worst = 0.0
            for n in sorted(set(partition_sizes)):
                acc = RDPAccountant()
                acc.history = [(d.noise, min(1.0, batch_size / max(n, 1)), rounds * steps_per_round)]
                worst = max(worst, float(acc.get_epsilon(d.delta)))
            out.append({"defence": d.spec(), "epsilon": worst, "delta": d.delta, "level": "sample",
                        "accountant": "opacus RDPAccountant", "note": f"{rounds * steps_per_round} steps, worst client"})
        elif isinstance(d, CentralDP):
            from flwr.supercore.privacy_accounting import (
                GaussianPrivacyEvent,
                NeighboringRelation,
                PrivacyConfig,
                SamplingMethod,
            )
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            acc = RdpAccountant(PrivacyConfig(target_delta=d.delta, population_size=num_clients,
                                              neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                              sampling_method=SamplingMethod.NO_AMPLIFICATION))
            acc.compose(GaussianPrivacyEvent(d.noise, clients_per_round, num_clients), count=rounds)
            out.append({"defence": d.spec(), "epsilon": float(acc.get_privacy_spent().epsilon), "delta": d.delta,
                        "level": "client", "accountant": "flwr RdpAccountant", "note": f"{rounds} releases"})
        elif isinstance(d, LocalDP):
            out.append({"defence": d.spec(), "epsilon": rounds * d.epsilon, "delta": rounds * d.delta,
                        "level": "update", "accountant": "LocalDpMod per round, basic composition",
                        "note": f"{d.epsilon} per round, noise std {d.noise_std:.4g}"})
    return out
