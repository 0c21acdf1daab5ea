"""The parsed settings of the clients' defences and audit: what a run config's ``defences``
and ``audit`` strings mean, checked once when the config is made. At the bottom of the
imports: :mod:`fl_sim.config` reads these; the mods that apply them
(:mod:`fl_sim.mods.defences`, :mod:`fl_sim.mods.audit`) and the server's privacy accounting
(:mod:`fl_sim.privacy`) import them from here.

Defences (``defences = "prune:ratio=0.3;noise:sigma=0.01"``, the flag
``--defence NAME[:KEY=VALUE,...]``, repeatable); see :mod:`fl_sim.mods.defences` for where
each one is applied and whom it protects against:

- ``prune:ratio=p``; ``noise:sigma=s`` or ``noise:rms=k``;
- ``ldp:clip=C,epsilon=e[,delta=d,sensitivity=S]`` (Flower's ``LocalDpMod``);
- ``central-dp:noise=z,clip=C[,side=server|client,delta=d]`` (Flower's central DP wrappers);
- ``dpsgd:noise=z,clip=C[,delta=d]`` (Opacus, in the client's local training).

The audit (``audit = "log|block|protect[:psnr=20,margin=0,budget=30,probe=true,defence=noise,clients=0+2,
dsnr=4,rows=true]"``): see :mod:`fl_sim.mods.audit`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

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
    "AUDIT_ACTIONS",
    "AUDIT_DEFENCES",
    "AuditError",
    "AuditPolicy",
    "DSNR_THRESHOLD",
    "DSNR_MIN_BATCH",
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


# ---- the clients' audit ---------------------------------------------------------------------

AUDIT_ACTIONS = ("log", "block", "protect")
# protect's defences, each a ladder of strengths tried in order (noise: sigma as a multiple of
# the update's RMS entry, so one ladder fits every model; prune: the fraction zeroed per tensor)
AUDIT_DEFENCES: dict[str, tuple[float, ...]] = {
    "noise": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "prune": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
}


# The per-unit D-SNR above which the audit judges the model sent built to single samples out
# (fl_sim.mods.dsnr: the mean share of a sample's gradient in units it alone drives): 1.5 x the
# largest over the calibration set of honest updates (the demo federation's client 0, batches
# 16-64, rounds 1-60: 0.049), rounded up; false alarms on the held-out updates and the trap's
# values: docs/results/audit.md (python -m experiments.bench.dsnr)
DSNR_THRESHOLD = 0.1
# The smallest batch the D-SNR check judges (smaller ones: recorded, not judged; see fl_sim.mods.audit):
# honest batches of 8 reach 0.23 in the head (one sample alone of its class), of 4 0.62, of 2 1.0
DSNR_MIN_BATCH = 9


class AuditError(ValueError):
    """An ``audit`` setting that cannot be used; the message is one line."""


@dataclass(frozen=True)
class AuditPolicy:
    """What the audit does with a reply (see the module docstring)."""

    action: str
    psnr: float = 20.0
    margin: float = 0.0  # dB: an image at or above psnr - margin is at risk
    budget: float = 30.0
    probe: bool = True
    defence: str = "noise"
    clients: frozenset[int] | None = None  # None: every client audits
    dsnr: float = DSNR_THRESHOLD  # math.inf ("dsnr=off"): the D-SNR check is off
    rows: bool = True  # the copied-rows statistic of the tampering checks (False: entries and shapes only)

    def audits(self, partition_id: int) -> bool:
        return self.clients is None or partition_id in self.clients

    @property
    def bar(self) -> float:
        """The PSNR (dB) from which one image of the update counts as recovered: ``psnr``
        lowered by the safety ``margin``."""
        return self.psnr - self.margin

    @classmethod
    def parse(cls, text: str) -> "AuditPolicy | None":
        """``""`` -> None (no audit); ``"protect:psnr=20,defence=prune"`` -> a policy."""
        text = str(text).strip()
        if not text:
            return None
        action, _, rest = text.partition(":")
        action = action.strip()
        if action not in AUDIT_ACTIONS:
            raise AuditError(
                f"unknown audit action {action!r}: choose one of {', '.join(AUDIT_ACTIONS)} (e.g. protect:psnr=20)"
            )
        values: dict[str, Any] = {}
        for item in (t.strip() for t in rest.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("psnr", "margin", "budget", "probe", "defence", "clients", "dsnr", "rows"):
                raise AuditError(
                    f"{action}: expected KEY=VALUE with KEY one of psnr, margin, budget, probe, defence, clients, "
                    f"dsnr, rows, got {item!r}"
                )
            if key == "dsnr" and value.lower() == "off":
                values[key] = math.inf
            elif key in ("psnr", "margin", "budget", "dsnr"):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise AuditError(f"{action}: {key} must be a number, got {value!r}") from None
            elif key == "clients":
                ids = [v.strip() for v in value.split("+") if v.strip()]
                if not ids or not all(v.isdigit() for v in ids):
                    raise AuditError(f"{action}: clients must be partition ids joined by +, e.g. 0+2, got {value!r}")
                values[key] = frozenset(int(v) for v in ids)
            elif key in ("probe", "rows"):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise AuditError(f"{action}: {key} must be true or false, got {value!r}")
                values[key] = value.lower() in ("true", "1", "yes")
            else:
                values[key] = value
        policy = cls(action, **values)
        policy.validate()
        return policy

    def validate(self) -> None:
        if not (math.isfinite(self.psnr) and self.psnr > 0):
            raise AuditError(f"{self.action}: psnr must be a number of dB > 0, got {self.psnr}")
        if not (math.isfinite(self.margin) and 0 <= self.margin < self.psnr):
            raise AuditError(
                f"{self.action}: margin must be a number of dB >= 0 and below psnr ({self.psnr:g}), got {self.margin}"
            )
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise AuditError(f"{self.action}: budget must be a number of seconds > 0, got {self.budget}")
        if not (self.dsnr > 0 and not math.isnan(self.dsnr)):
            raise AuditError(f"{self.action}: dsnr must be a number > 0 or off, got {self.dsnr}")
        if self.defence not in AUDIT_DEFENCES:
            raise AuditError(
                f"{self.action}: unknown defence {self.defence!r}: choose one of {', '.join(AUDIT_DEFENCES)}"
            )
        if self.action == "protect" and not self.probe:
            raise AuditError("protect: needs the probe (it strengthens the defence until the probe fails)")

    def spec(self) -> str:
        who = "" if self.clients is None else ",clients=" + "+".join(map(str, sorted(self.clients)))
        return (
            f"{self.action}:psnr={self.psnr:g},margin={self.margin:g},budget={self.budget:g},"
            f"probe={str(self.probe).lower()},"
            f"defence={self.defence},dsnr={'off' if math.isinf(self.dsnr) else f'{self.dsnr:g}'},"
            f"rows={str(self.rows).lower()}{who}"
        )

    @property
    def checks_dsnr(self) -> bool:
        return math.isfinite(self.dsnr)
