"""Where a run computes: the one function that turns ``--device`` into a ``torch.device``.

``auto`` (the default) is CUDA when ``torch.cuda.is_available()``, else the CPU; ``cpu`` and
``cuda`` are what they say, and ``cuda`` on a machine without CUDA is a one-line
:class:`DeviceError`. Every party resolves the setting on its own machine: a client's training
where the client runs, the server's attacks where the server runs. The CPU is the tested
default, and a run on the CPU computes exactly what it computed before the setting existed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DEVICES", "DeviceError", "check_device_name", "resolve_device", "gpu_share", "model_device"]

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device name that is not one of :data:`DEVICES`, or CUDA asked for where there is none."""


def check_device_name(name: str) -> str:
    """``name`` stripped and lower-cased if it is one of :data:`DEVICES`; else DeviceError.
    Only the name: whether this machine has CUDA is :func:`resolve_device`'s question."""
    value = str(name).strip().lower()
    if value not in DEVICES:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return value


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cpu``; ``cuda``
    (DeviceError when this machine has no CUDA)."""
    value = check_device_name(name)
    cuda = torch.cuda.is_available()
    if value == "cuda" and not cuda:
        raise DeviceError("cuda is not available on this machine (torch.cuda.is_available() is False): use cpu or auto")
    if value == "auto":
        value = "cuda" if cuda else "cpu"
    return torch.device(value)


def gpu_share(name: str, clients: int) -> float:
    """The share of a GPU each simulated client asks Ray for: ``1 / clients`` of the GPUs this
    machine has (at most one each) when ``name`` resolves to CUDA, so that every client of a
    round fits at once; 0 on the CPU."""
    if resolve_device(name).type != "cuda":
        return 0.0
    share = min(1.0, torch.cuda.device_count() / max(int(clients), 1))
    return max(math.floor(share * 1e4) / 1e4, 1e-4)  # Ray keeps four decimals of a resource


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any): where a
    function handed a model computes."""
    return next(model.parameters(), torch.empty(0)).device
