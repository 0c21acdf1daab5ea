"""One run's settings: the keys of ``[tool.flwr.app.config]`` in pyproject.toml.

The ServerApp resolves them (Flower's run config, then any overrides) and sends them to the
clients in every train message, so client and server never disagree about the run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .data import DATASETS, PARTITIONS
from .device import DeviceError, check_device_name
from .models import INITS, model_names
from .settings import AuditError, AuditPolicy, Defence, DefenceError, parse_defences

__all__ = ["RunConfig", "ConfigError", "MODES", "FAULTS", "parse_faults"]

MODES = ("fedavg", "fedsgd")
# What a client told to misbehave does in its train reply (fault injection, ``faulty-clients``):
# NaN or Inf in its update, an array of the wrong shape, no reply before the round times out,
# or an error reply (the ClientApp raises).
FAULTS = ("nan", "inf", "shape", "silent", "error")


class ConfigError(ValueError):
    """A bad setting: ``key`` is the run-config key at fault (e.g. ``batch-size``), ``problem``
    the one-line reason. Entry points name the key the way their user typed it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def parse_faults(text: str) -> dict[int, str]:
    """``"1:nan,2:shape"`` -> ``{1: "nan", 2: "shape"}``; raises ``ConfigError`` naming the bad item."""
    faults: dict[int, str] = {}
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        pid, sep, kind = item.partition(":")
        if not sep or not pid.strip().isdigit() or kind.strip() not in FAULTS:
            raise ConfigError("faulty-clients", f"expected ID:KIND with KIND one of {', '.join(FAULTS)}, got {item!r}")
        if int(pid) in faults:
            raise ConfigError("faulty-clients", f"client {int(pid)} is listed twice")
        faults[int(pid)] = kind.strip()
    return faults


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "mnist5k"
    data_root: str = "data"
    model: str = "cnn6"
    init: str = "kaiming"
    mode: str = "fedavg"
    num_clients: int = 10
    num_server_rounds: int = 5
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0
    lr: float = 0.1
    server_lr: float = 0.05
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_clients: int = 2
    round_timeout: float = 600.0
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    samples_per_client: int = 0  # each client keeps this many images of its partition, a seeded choice (0: all)
    seed: int = 0
    defences: str = ""
    faulty_clients: str = ""
    audit: str = ""  # the clients' leakage audit (fl_sim/audit.py), e.g. "protect:psnr=20"; "": none
    out_dir: str = ""  # the run folder; "" lets the entry point make a new one under runs/
    device: str = "auto"  # where clients train and attacks run: auto | cpu | cuda (fl_sim/device.py)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower-style (``batch-size``) or Python-style (``batch_size``) keys;
        unknown keys are ignored (Flower adds its own, e.g. ``server-round``)."""
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in known:
                kwargs[name] = value
        return cls(**kwargs).validated()

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "RunConfig":
        """Coerce types and check values; raises :class:`ConfigError` naming the key."""
        coerced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            key = f.name.replace("_", "-")
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(key, f"must be an integer, got {value!r}")
            if kind is not str and isinstance(value, bool):
                raise ConfigError(key, f"must be {kind.__name__}, got {value!r}")
            try:
                coerced[f.name] = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(key, f"must be {kind.__name__}, got {value!r}") from None
        if coerced["dataset"].lower().endswith(".npz") and not coerced["dataset"].startswith("npz:"):
            coerced["dataset"] = f"npz:{coerced['dataset']}"  # a bare path to an .npz file is that file
        c = dataclasses.replace(self, **coerced)

        def bad(name: str, problem: str) -> ConfigError:
            return ConfigError(name.replace("_", "-"), problem)

        if not (c.dataset in DATASETS or c.dataset.startswith("npz:")):
            raise bad(
                "dataset",
                f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}, "
                "npz:PATH or a path ending in .npz",
            )
        if c.model not in model_names():
            raise bad("model", f"unknown model {c.model!r}: choose one of {', '.join(model_names())}")
        if c.init not in INITS:
            raise bad("init", f"unknown init {c.init!r}: choose one of {', '.join(INITS)}")
        if c.mode not in MODES:
            raise bad("mode", f"unknown mode {c.mode!r}: choose one of {', '.join(MODES)}")
        try:
            c = dataclasses.replace(c, device=check_device_name(c.device))
        except DeviceError as exc:
            raise bad("device", str(exc)) from None
        if c.partition not in PARTITIONS:
            raise bad("partition", f"unknown partition {c.partition!r}: choose one of {', '.join(PARTITIONS)}")
        for name in (
            "num_clients",
            "num_server_rounds",
            "batch_size",
            "local_epochs",
            "min_clients",
            "classes_per_client",
        ):
            if getattr(c, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(c, name)}")
        for name in ("local_steps", "seed"):
            if getattr(c, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(c, name)}")
        if c.samples_per_client < 0:
            raise bad("samples_per_client", f"must be >= 1 (or 0: all of the partition), got {c.samples_per_client}")
        for name in ("lr", "server_lr", "alpha", "round_timeout"):
            value = getattr(c, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(name, f"must be a finite number > 0, got {value}")
        if not 0 < c.fraction_train <= 1:
            raise bad("fraction_train", f"must be in (0, 1], got {c.fraction_train}")
        if not 0 <= c.fraction_evaluate <= 1:
            raise bad("fraction_evaluate", f"must be in [0, 1], got {c.fraction_evaluate}")
        try:
            defences = parse_defences(c.defences)
        except DefenceError as exc:
            raise bad("defences", str(exc)) from None
        for d in defences:
            if d.needs_fedavg and c.mode != "fedavg":
                raise bad(
                    "defences",
                    f"{d.name} clips the weight update (reply - sent, as Flower implements it): use "
                    "mode fedavg (one local step on one batch is FedSGD's update in weight form)",
                )
        try:
            policy = AuditPolicy.parse(c.audit)
        except AuditError as exc:
            raise bad("audit", str(exc)) from None
        outside = sorted(p for p in (policy.clients or ()) if p >= c.num_clients) if policy else []
        if outside:
            raise bad("audit", f"client {outside[0]} is not a partition id (0..{c.num_clients - 1})")
        bad_ids = [pid for pid in parse_faults(c.faulty_clients) if pid >= c.num_clients]
        if bad_ids:
            raise bad("faulty_clients", f"client {bad_ids[0]} is not a partition id (0..{c.num_clients - 1})")
        return c

    @property
    def defence_list(self) -> tuple[Defence, ...]:
        """The run's defences (:mod:`fl_sim.mods.defences`), in the order they apply to an update."""
        return parse_defences(self.defences)

    @property
    def audit_policy(self) -> AuditPolicy | None:
        """The clients' leakage audit (:mod:`fl_sim.mods.audit`), or None."""
        return AuditPolicy.parse(self.audit)

    @property
    def faults(self) -> dict[int, str]:
        """Fault injection: partition id -> what that client does wrong (see ``FAULTS``)."""
        return parse_faults(self.faulty_clients)

    def steps_for(self, examples: int) -> int:
        """A FedAvg client's local steps on ``examples`` images: ``local-steps`` when set, else
        ``local-epochs`` passes of ``ceil(examples / batch-size)`` batches (what the server
        knows from its config and the reply's num-examples)."""
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * max(1, -(-int(examples) // self.batch_size))

    def images_for(self, examples: int) -> int:
        """How many distinct images a FedAvg client's local steps use on ``examples`` images
        (all of them once the steps pass over the data)."""
        return min(int(examples), self.steps_for(examples) * self.batch_size)

    def clients_per_round(self) -> int:
        """How many clients the server samples each round when all are online (Flower's
        FedAvg: ``max(int(N * fraction_train), min_clients)``, at most N)."""
        least = min(self.min_clients, self.num_clients)
        return min(self.num_clients, max(int(self.num_clients * self.fraction_train), least))

    def to_flower(self) -> dict[str, Any]:
        """Flower-style keys, for a ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
