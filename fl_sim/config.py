"""One run's settings: the keys of ``[tool.flwr.app.config]`` in pyproject.toml.

The ServerApp resolves them (Flower's run config, then any overrides) and sends them to the
clients in every train message, so client and server never disagree about the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .data import DATASETS, PARTITIONS
from .models import INITS, model_names

__all__ = ["RunConfig", "MODES"]

MODES = ("fedavg", "fedsgd")


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
    seed: int = 0
    out_dir: str = "runs/latest"

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
        """Coerce types and check values; raises ``ValueError`` with a one-line reason."""
        coerced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            try:
                coerced[f.name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name.replace('_', '-')} must be {kind.__name__}, got {value!r}") from None
        c = dataclasses.replace(self, **coerced)
        if not (c.dataset in DATASETS or c.dataset.startswith("npz:")):
            raise ValueError(f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)} or npz:PATH")
        if c.model not in model_names():
            raise ValueError(f"unknown model {c.model!r}: choose one of {', '.join(model_names())}")
        if c.init not in INITS:
            raise ValueError(f"unknown init {c.init!r}: choose one of {', '.join(INITS)}")
        if c.mode not in MODES:
            raise ValueError(f"unknown mode {c.mode!r}: choose one of {', '.join(MODES)}")
        if c.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {c.partition!r}: choose one of {', '.join(PARTITIONS)}")
        for name in ("num_clients", "num_server_rounds", "batch_size", "local_epochs", "min_clients"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
        if c.local_steps < 0:
            raise ValueError(f"local-steps must be >= 0, got {c.local_steps}")
        for name in ("lr", "server_lr", "alpha"):
            if not getattr(c, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(c, name)}")
        if not 0 < c.fraction_train <= 1:
            raise ValueError(f"fraction-train must be in (0, 1], got {c.fraction_train}")
        if not 0 <= c.fraction_evaluate <= 1:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {c.fraction_evaluate}")
        if not c.round_timeout > 0:
            raise ValueError(f"round-timeout must be > 0, got {c.round_timeout}")
        return c

    def to_flower(self) -> dict[str, Any]:
        """Flower-style keys, for a ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
