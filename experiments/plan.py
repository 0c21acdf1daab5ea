"""The experiment plan: one typed object, built from a run config and validated once, from
which every entry point is made (``python -m experiments.run``, ``python -m
experiments.deploy``, the spying ServerApp that ``flwr run`` loads).

A plan is the federation's settings (:class:`fl_sim.config.RunConfig`) and, when the run is
attacked, an :class:`AttackPlan`: which attacks, which observers, which rounds and clients,
and what the attackers are granted. Both come from one flat mapping of Flower run-config keys
(those of ``[tool.flwr.app.config]`` in pyproject.toml), so the same plan travels unchanged
from a command line into a deployment's run config and back. Every rule lives here:

- names: attacks (the registry in :mod:`attacks`), observers, grant policies;
- attacks run on FedSGD updates, or on FedAvg updates (the server configured the local
  learning rate, steps or epochs and batch size; the reply's num-examples gives the steps an
  epoch took); R-GAP only on a one-step update (it inverts one sample's gradient), fedavg-sim
  only on FedAvg weight deltas (it simulates a client's local training), and only for the
  ``server`` observer (the one that sees one client's own update: an aggregate mixes several
  clients' trainings); ``attack = "all"`` is every passive attack that applies to the mode
  (so fedavg-sim is in it only for ``mode = "fedavg"``), each observer running those that
  apply to what it sees (:meth:`AttackPlan.attacks_for`), and an attack named where it does
  not apply is refused;
- the curious client needs 3 or more clients per round (with 2, subtracting its own update
  leaves the other client's update exactly: that is the server's view, not an aggregate);
- SecAgg+ needs 2 or more clients per round and the simulation engine (its legacy
  apps are not in the deployment's app); ``observers = "all"`` (the default) means every
  observer the engine can run that one of the named attacks applies to (``--attack
  fedavg-sim`` alone: the server), and a named observer that none applies to is refused;
- attacked rounds and clients must exist (``attack-rounds = "spread"``: the first, middle and
  last round); a silent faulty client shortens the round timeout;
- an attack setting (observers, attacked rounds, grants, ...) given without an attack is
  refused rather than ignored, unless the ``active`` observer is named: the active server
  (``active-attack``, ``active-bins``) replaces the model in the attacked rounds and inverts
  what comes back (with ``secagg`` also in the SecAgg+ run), with or without passive attacks;
  ``observers = "all"`` means the passive ones; the weights-only imprint needs a model whose
  first layer is linear on the image (``mlp``) with at least ``active-bins`` units, the
  imprint block the simulation engine (the clients run the server's ClientApp), trap weights
  a model whose first layer is linear on the image, and no ``active-bins`` (they use every
  unit of that layer);
- what the data allows (``check_data``): the dataset loads and the partition is feasible
  (every client holds an image, and at least ``samples-per-client`` when it is set), and an
  attacked FedAvg update holds at most :data:`MAX_UPDATE_IMAGES` images (a client with
  1,000 images and one local epoch of batch 1 would ask for 1,000 dummy images), checked
  before any process starts; a batch size above a client's images is said in one line (its
  batch is all of them);
- a preset's attack on FedAvg with neither ``local-steps`` nor ``local-epochs`` given takes
  :data:`~experiments.presets.FEDAVG_ATTACK_STEPS` local steps (1 for R-GAP), so that the
  first command a user tries makes an update the attacks take; the plan's ``notes`` say so in
  one line. The presets are plain data in :mod:`experiments.presets`.

Errors are :class:`fl_sim.config.ConfigError` with the key at fault; entry points name it the
way their user typed it (``--rounds`` on a command line, ``num-server-rounds`` in a run
config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

import torch

from attacks import ACTIVE, ATTACKS, construct
from fl_sim.config import ConfigError, RunConfig
from fl_sim.data import load_dataset, partition
from fl_sim.device import DeviceError, resolve_device
from fl_sim.models import build_model

from .presets import (
    ACTIVE_PRESET,
    ATTACK_DEFAULTS,
    ATTACK_PRESET,
    BATCH_SIZE_GRANTS,
    DEMO_PRESET,
    FEDAVG_ATTACK_STEPS,
    MAX_UPDATE_IMAGES,
    OBSERVERS,
    PASSIVE_OBSERVERS,
    PRESETS,
)
from .run_folder import PROVENANCE

__all__ = [
    "OBSERVERS",
    "ONE_CLIENT_ATTACKS",
    "PASSIVE_OBSERVERS",
    "ACTIVE_ATTACKS",
    "BATCH_SIZE_GRANTS",
    "ATTACK_PRESET",
    "ATTACK_KEYS",
    "DEMO_PRESET",
    "PRESETS",
    "AttackPlan",
    "ExperimentPlan",
    "ConfigError",
    "RESOLVED_DEVICE",
    "attack_names",
]

# Attacks that read one client's own update, not an aggregate of several (fedavg-sim simulates
# one client's local training), and the passive observer that sees one: the server.
ONE_CLIENT_ATTACKS = frozenset({"fedavg-sim"})
ONE_CLIENT_OBSERVERS = ("server",)
# The active server's constructions (attacks.ACTIVE, built by attacks.construct).
ACTIVE_ATTACKS = tuple(ACTIVE)
# config.json's record of the device the run resolved ``device`` to on the machine that wrote it
# (a record, not a setting: from_mapping accepts it back and ignores it).
RESOLVED_DEVICE = "resolved-device"
SILENT_ROUND_TIMEOUT = 30.0  # seconds a round waits when a client is configured to stay silent
Engine = Literal["simulation", "deployment"]


def attack_names() -> list[str]:
    """The registered attacks (read at call time, so that a registry entry added later counts)."""
    return list(ATTACKS)


def _names(text: Any) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def _ints(key: str, text: Any) -> frozenset[int] | None:
    """``"all"`` -> None; ``"1,3"`` -> {1, 3}."""
    value = str(text).strip()
    if value == "all":
        return None
    try:
        items = frozenset(int(v) for v in _names(value))
    except ValueError:
        raise ConfigError(key, f"expected comma-separated integers or 'all', got {value!r}") from None
    if not items:
        raise ConfigError(key, "expected at least one integer, or 'all'")
    return items


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _int(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be an integer, got {value!r}") from None
    if number < least:
        raise ConfigError(key, f"must be >= {least}, got {number}")
    return number


def _workers(value: Any, ray_address: str, given: Mapping[str, Any]) -> int | str:
    """``attack-workers``: a number of local processes, or ``ray`` (Ray tasks); a
    ``ray-address`` sends the attacks to Ray, so it needs ``ray`` or the key left out."""
    ray = str(value).strip().lower() == "ray"
    if ray_address and not ray:
        if "attack-workers" in given:
            raise ConfigError("ray-address", "sends the attacks to Ray: set --attack-workers ray or leave it out")
        return "ray"
    if ray:
        return "ray"
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        raise ConfigError("attack-workers", f"must be a number of worker processes (>= 0) or ray, got {value!r}")
    return _int("attack-workers", value, 0)


def _seconds(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not (number >= 0 and number < float("inf")):
        raise ConfigError(key, f"must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return number


@dataclass(frozen=True)
class AttackPlan:
    """What is attacked, by whom, and what the attackers are granted.

    ``rounds``/``clients``: the attacked rounds and partition ids (None: all);
    ``max_per_round``: a cap on attacked updates per round and observer (0: none);
    ``curious_client``: the partition id of the curious client; ``workers``: attack processes
    (0: inline, the round waits); ``defer``: hold the attacks until training ends;
    ``grant_batch_size``: one of :data:`BATCH_SIZE_GRANTS`; ``grant_labels``: give every
    attacker the batch's true labels (an upper bound: no observer sees them);
    ``grant_order``: give the server the order of a FedAvg client's local batches (which
    image went into which step; the server configured the steps but not the shuffle).
    ``time_limit``: seconds after which an optimisation attack (DLG, iDLG, Inverting
    Gradients) stops with its best image so far, status ``time_limit`` (0: none; R-GAP is
    analytic and has none)."""

    attacks: tuple[str, ...]
    observers: tuple[str, ...] = ("server", "client", "secagg")
    rounds: frozenset[int] | None = frozenset({1})
    clients: frozenset[int] | None = None
    max_per_round: int = 0
    curious_client: int = 0
    workers: int | str = 1
    ray_address: str = ""
    defer: bool = False
    grant_batch_size: str = "observed"
    grant_labels: bool = False
    grant_order: bool = False
    time_limit: float = 0.0
    active: str = "imprint"
    active_bins: int = 500

    @property
    def passive(self) -> tuple[str, ...]:
        """The observers that attack what the honest server's round shows them."""
        return tuple(o for o in self.observers if o != "active")

    @property
    def is_active(self) -> bool:
        return "active" in self.observers

    def attacks_for(self, observer: str) -> tuple[str, ...]:
        """The plan's passive attacks that apply to what ``observer`` sees: those of
        :data:`ONE_CLIENT_ATTACKS` only for an observer of one client's own update."""
        return tuple(a for a in self.attacks if a not in ONE_CLIENT_ATTACKS or observer in ONE_CLIENT_OBSERVERS)

    def attacked(self, server_round: int, partition_id: int | None = None) -> bool:
        """Whether updates of ``server_round`` (and of client ``partition_id``) are attacked."""
        if self.rounds is not None and server_round not in self.rounds:
            return False
        return partition_id is None or self.clients is None or partition_id in self.clients


@dataclass(frozen=True)
class ExperimentPlan:
    """The federation's settings and, for an attacked run, the :class:`AttackPlan`."""

    fed: RunConfig
    attack: AttackPlan | None = None
    resume: bool = False  # continue the run in ``fed.out_dir`` (an invocation setting, not the experiment's)
    # what a preset chose that the user did not ask for, one line each (printed by the entry points)
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, engine: Engine = "simulation", preset: str | None = None
    ) -> "ExperimentPlan":
        """The plan of a flat mapping of run-config keys (``batch-size`` or ``batch_size``).
        Keys not given take ``preset``'s values (:data:`PRESETS`) and then their defaults;
        with no preset, a named attack brings the papers' FedSGD setting
        (:data:`ATTACK_PRESET`). Unknown keys are refused. Validated for ``engine``."""
        given = {str(k).replace("_", "-"): v for k, v in values.items()}
        records = {
            "resume",
            "server-round",
            RESOLVED_DEVICE,
            PROVENANCE,
        }  # not settings: a flag, Flower's, config.json's records
        unknown = sorted(set(given) - set(default_mapping()) - records)
        if unknown:
            raise ConfigError(unknown[0], "not a setting of this app (the keys are those of [tool.flwr.app.config])")
        if preset is not None and preset not in PRESETS:
            raise ConfigError("preset", f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        active = "active" in _names(given.get("observers", PRESETS.get(preset or "", {}).get("observers", "")))
        chosen = PRESETS[preset] if preset else ACTIVE_PRESET if active else ATTACK_PRESET
        named = given.get("attack", chosen.get("attack", "none"))
        attacked = _names(named) not in ([], ["none"])
        resolved = dict(default_mapping())
        if attacked or active:  # a preset is an attacked setting; plain training has none
            resolved.update(chosen)
        if "silent" in str(given.get("faulty-clients", "")) and "round-timeout" not in given:
            resolved["round-timeout"] = SILENT_ROUND_TIMEOUT
        resolved.update(given)
        resolved["attack"] = named
        fed = RunConfig.from_mapping(resolved)
        notes: list[str] = []
        if attacked and fed.mode == "fedavg" and not {"local-steps", "local-epochs"} & set(given):
            fed, note = _fedavg_attack_schedule(fed, _names(named))
            notes.append(note)
        attacks = _attack_list(named, fed)
        attack = None
        if not attacks and not active:
            # an attack setting given without an attack has no effect: say so rather than ignore it
            for key, default in ATTACK_DEFAULTS.items():
                if key != "attack" and key in given and str(given[key]).strip().lower() != str(default).strip().lower():
                    raise ConfigError(
                        key,
                        f"has no effect without an attack: name one (attack = {', '.join(attack_names())} "
                        "or all) or leave it out",
                    )
        if attacks or active:
            attack = AttackPlan(
                attacks=tuple(attacks),
                observers=tuple(_observer_list(resolved["observers"], engine, attacks)),
                rounds=_rounds(resolved["attack-rounds"], fed.num_server_rounds),
                clients=_ints("attack-clients", resolved["attack-clients"]),
                max_per_round=_int("max-attacks-per-round", resolved["max-attacks-per-round"], 0),
                curious_client=_int("curious-client", resolved["curious-client"], 0),
                workers=_workers(resolved["attack-workers"], str(resolved["ray-address"]).strip(), given),
                ray_address=str(resolved["ray-address"]).strip(),
                defer=_bool("defer-attacks", resolved["defer-attacks"]),
                grant_batch_size=str(resolved["grant-batch-size"]),
                grant_labels=_bool("grant-labels", resolved["grant-labels"]),
                grant_order=_bool("grant-batch-order", resolved["grant-batch-order"]),
                time_limit=_seconds("attack-time-limit", resolved["attack-time-limit"]),
                active=str(resolved["active-attack"]).strip(),
                active_bins=_int("active-bins", resolved["active-bins"], 1),
            )
        plan = cls(fed, attack, resume=_bool("resume", given.get("resume", False)), notes=tuple(notes))
        plan.validate(engine)
        return plan

    def to_mapping(self) -> dict[str, Any]:
        """Every key of the plan, Flower style: what ``from_mapping`` takes back (a deployment's
        run config, config.json). Without an attack, the attack keys keep their defaults."""
        out = dict(default_mapping())
        out.update(self.fed.to_flower())
        a = self.attack
        if a is not None:
            out.update(
                {
                    "attack": ",".join(a.attacks),
                    "observers": ",".join(a.observers),
                    "attack-rounds": "all" if a.rounds is None else ",".join(map(str, sorted(a.rounds))),
                    "attack-clients": "all" if a.clients is None else ",".join(map(str, sorted(a.clients))),
                    "max-attacks-per-round": a.max_per_round,
                    "curious-client": a.curious_client,
                    "attack-workers": a.workers,
                    "ray-address": a.ray_address,
                    "defer-attacks": a.defer,
                    "grant-batch-size": a.grant_batch_size,
                    "grant-labels": a.grant_labels,
                    "grant-batch-order": a.grant_order,
                    "attack-time-limit": a.time_limit,
                    "active-attack": a.active,
                    "active-bins": a.active_bins,
                }
            )
        else:
            out["attack"] = "none"
        return out

    def replace(self, **fed_changes: Any) -> "ExperimentPlan":
        """The same plan with federation settings changed (validated)."""
        return dataclasses.replace(self, fed=self.fed.replace(**fed_changes))

    # ---- the rules ------------------------------------------------------------------------

    def validate(self, engine: Engine = "simulation") -> None:
        """Check every rule of the module docstring that needs no data; raises ConfigError."""
        a, c = self.attack, self.fed
        if a is None:
            return
        if not a.observers:
            raise ConfigError("observers", "name at least one observer")
        if a.attacks and not a.passive:
            raise ConfigError(
                "attack",
                f"{a.attacks[0]} attacks what a passive observer sees, and the only observer is "
                "the active server: add server, client or secagg, or use --attack none",
            )
        if a.active not in ACTIVE_ATTACKS:
            raise ConfigError(
                "active-attack", f"unknown active attack {a.active!r}: choose from {', '.join(ACTIVE_ATTACKS)}"
            )
        if a.is_active and a.active == "imprint-block":
            if engine != "simulation":
                raise ConfigError(
                    "active-attack",
                    "imprint-block changes the model's architecture, so the clients must run "
                    "the server's ClientApp (experiments.apps.client_app:imprint_app), which "
                    "python -m experiments.run ships; a deployment runs pyproject's clientapp",
                )
        if a.is_active and a.active == "trap" and a.active_bins != ATTACK_DEFAULTS["active-bins"]:
            raise ConfigError("active-bins", "trap weights use every unit of the layer: --active-bins is the imprint's")
        if not a.is_active and (a.active, a.active_bins) != (
            ATTACK_DEFAULTS["active-attack"],
            ATTACK_DEFAULTS["active-bins"],
        ):
            raise ConfigError(
                "active-attack" if a.active != ATTACK_DEFAULTS["active-attack"] else "active-bins",
                "has no effect without the active observer (--observers active)",
            )
        for observer in a.passive if a.attacks else ():
            if not a.attacks_for(observer):
                raise ConfigError(
                    "observers",
                    f"the {observer} observer sees an aggregate of several clients' updates, and "
                    f"{', '.join(a.attacks)} reads one client's own update: add another attack "
                    "(ig, dlg, idlg) or leave that observer out (e.g. --observers server)",
                )
        if a.grant_order and c.mode != "fedavg":
            raise ConfigError(
                "grant-batch-order",
                "a FedSGD update is one batch: there is no order of local batches to grant (use mode fedavg)",
            )
        if a.grant_batch_size not in BATCH_SIZE_GRANTS:
            raise ConfigError(
                "grant-batch-size",
                f"unknown policy {a.grant_batch_size!r}: choose one of {', '.join(BATCH_SIZE_GRANTS)}",
            )
        per_round = c.clients_per_round()
        if "client" in a.observers:
            if per_round < 3:
                raise ConfigError(
                    "observers",
                    f"the curious-client observer needs >= 3 clients per round, this run has "
                    f"{per_round} (with 2, subtracting its own update leaves the other "
                    "client's update exactly)",
                )
            if not 0 <= a.curious_client < c.num_clients:
                raise ConfigError(
                    "curious-client", f"{a.curious_client} is not a partition id (0..{c.num_clients - 1})"
                )
        if "secagg" in a.observers:
            if engine != "simulation":
                raise ConfigError(
                    "observers",
                    "the secagg observer runs only under python -m experiments.run (its "
                    "SecAgg+ apps are Flower's legacy ones, not this deployment's app)",
                )
            if per_round < 2:
                raise ConfigError("observers", f"SecAgg+ needs >= 2 clients per round, this run has {per_round}")
        if a.rounds is not None:
            outside = sorted(r for r in a.rounds if not 1 <= r <= c.num_server_rounds)
            if outside:
                raise ConfigError("attack-rounds", f"round {outside[0]} is not in 1..{c.num_server_rounds}")
        if a.clients is not None:
            outside = sorted(p for p in a.clients if not 0 <= p < c.num_clients)
            if outside:
                raise ConfigError("attack-clients", f"{outside[0]} is not a partition id (0..{c.num_clients - 1})")

    def check_data(self):
        """What needs the data and the machine, checked before any process starts: the device
        exists here (``cuda`` needs CUDA), the dataset loads (a
        :class:`fl_sim.data.DatasetError` otherwise) and the partition is feasible (a
        ConfigError naming the setting). Returns the dataset, its ``notes`` extended by what the
        data made of the settings (a batch size above a client's images: its batch is all of
        them), one line each for the entry point to print."""
        c = self.fed
        try:
            resolve_device(c.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from None
        data = load_dataset(c.dataset, c.data_root)
        if c.num_clients > len(data.train_y):
            raise ConfigError("num-clients", f"{c.num_clients} clients for {len(data.train_y)} training images")
        key = {"dirichlet": "alpha", "pathological": "classes-per-client"}.get(c.partition, "partition")
        try:
            parts = partition(
                data.train_y,
                c.num_clients,
                c.partition,
                alpha=c.alpha,
                classes_per_client=c.classes_per_client,
                seed=c.seed,
            )
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        empty = [i for i, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ConfigError(key, f"client {empty[0]} gets no training image under this partition")
        short = [i for i, p in enumerate(parts) if len(p) < c.samples_per_client]
        if short:
            raise ConfigError(
                "samples-per-client",
                f"client {short[0]} holds {len(parts[short[0]])} training images under this partition, "
                f"fewer than {c.samples_per_client}",
            )
        held = [min(len(p), c.samples_per_client) if c.samples_per_client else len(p) for p in parts]
        fewer = [n for n in held if n < c.batch_size]
        notes = list(data.notes)
        if fewer and min(held) == max(held):
            notes.append(f"batch size {c.batch_size}: each client holds {held[0]} images, so its batch is all of them")
        elif fewer:
            who = "every client holds" if len(fewer) == len(held) else f"{len(fewer)} of {len(held)} clients hold"
            notes.append(
                f"batch size {c.batch_size}: {who} fewer images ({min(fewer)} to {max(fewer)}), so a client's "
                "batch is all of its images"
            )
        if self.attack is not None and self.attack.is_active:
            model = build_model(c.model, data.input_shape, data.num_classes)
            try:  # the construction on stand-in public images: does the model hold it?
                construct(
                    self.attack.active,
                    model,
                    data.input_shape,
                    torch.rand(4, *data.input_shape),
                    self.attack.active_bins,
                )
            except ValueError as exc:
                key = "active-bins" if "bins do not fit" in str(exc) else "model"
                raise ConfigError(key, f"the active server's {self.attack.active}: {exc}") from None
        if self.attack is not None and self.attack.passive and c.mode == "fedavg":
            held = max(len(p) for p in parts)
            held = min(held, c.samples_per_client) if c.samples_per_client else held
            images = c.images_for(held)
            if images > MAX_UPDATE_IMAGES:
                steps = c.steps_for(held)
                raise ConfigError(
                    "local-steps" if c.local_steps else "local-epochs",
                    f"a client's FedAvg update would hold {images} images ({steps} local steps of "
                    f"{c.batch_size}): the attacks reconstruct at most {MAX_UPDATE_IMAGES} per update "
                    "(set --local-steps, e.g. 5, or fewer images per client with --samples-per-client)",
                )
        return dataclasses.replace(data, notes=tuple(notes))

    # ---- what the rules decide ------------------------------------------------------------

    @property
    def attacked(self) -> bool:
        return self.attack is not None

    @property
    def intercepts(self) -> bool:
        """Whether the main federation's server wraps its strategy to spy (a server or
        curious-client observer)."""
        return self.attack is not None and bool({"server", "client", "active"} & set(self.attack.observers))

    @property
    def runs_main(self) -> bool:
        """Whether the main (non-SecAgg+) federation runs: always, unless SecAgg+ is the only
        observer."""
        return self.attack is None or self.intercepts

    @property
    def runs_secagg(self) -> bool:
        return self.attack is not None and "secagg" in self.attack.observers


def one_step(cfg: RunConfig) -> bool:
    """Whether every update of the run is one batch's gradient: FedSGD, or FedAvg with one
    local step (its delta is -lr times that gradient)."""
    return cfg.mode == "fedsgd" or cfg.local_steps == 1


def not_applicable(name: str, cfg: RunConfig) -> str | None:
    """Why attack ``name`` does not apply to the updates of a run of ``cfg`` (one line), or
    None when it does: the one rule that both ``attack = "all"`` and a named attack follow."""
    if name == "rgap" and not one_step(cfg):
        return (
            "rgap inverts one sample's gradient, and a FedAvg update of several local steps is "
            "not one: use ig, dlg or idlg (or --local-steps 1)"
        )
    if name == "fedavg-sim" and cfg.mode != "fedavg":
        return (
            "fedavg-sim simulates a FedAvg client's local training and reads its weight delta; "
            "a FedSGD update is one batch's gradient: use --mode fedavg, or dlg, idlg, rgap or ig"
        )
    return None


def _fedavg_attack_schedule(cfg: RunConfig, attacks: list[str]) -> tuple[RunConfig, str]:
    """The local schedule of an attacked FedAvg run that names neither local steps nor epochs:
    :data:`FEDAVG_ATTACK_STEPS` local steps (1 for R-GAP, which inverts one step), fewer where
    the batch would put more than :data:`MAX_UPDATE_IMAGES` images in an update; with the one
    line that says so."""
    rgap = "rgap" in attacks
    steps = 1 if rgap else max(1, min(FEDAVG_ATTACK_STEPS, MAX_UPDATE_IMAGES // cfg.batch_size))
    images = steps * cfg.batch_size
    why = "the one step R-GAP inverts" if rgap else f"so an update holds {images} images, not a whole epoch's"
    note = (
        f"FedAvg attack preset: {steps} local step{'s' if steps > 1 else ''} of batch {cfg.batch_size} per round, "
        f"{why} (--local-steps or --local-epochs to choose)"
    )
    return cfg.replace(local_steps=steps), note


def _attack_list(text: Any, cfg: RunConfig) -> list[str]:
    """The named attacks; ``all`` is every registered attack that applies to the run's updates."""
    names = _names(text)
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return [n for n in attack_names() if not_applicable(n, cfg) is None]
    known = attack_names()
    bad = [n for n in names if n not in known]
    if bad or "none" in names:
        raise ConfigError(
            "attack", f"unknown attack {(bad or ['none'])[0]!r}: choose from {', '.join(known)}, all or none"
        )
    for name in names:
        reason = not_applicable(name, cfg)
        if reason is not None:
            raise ConfigError("attack", reason)
    return list(dict.fromkeys(names))


def _rounds(text: Any, num_rounds: int) -> frozenset[int] | None:
    """``attack-rounds``: integers, ``all``, or ``spread`` (the first, middle and last round)."""
    if str(text).strip() == "spread":
        return frozenset({1, (num_rounds + 1) // 2, num_rounds})
    try:
        return _ints("attack-rounds", text)
    except ConfigError:
        raise ConfigError(
            "attack-rounds", f"expected comma-separated integers, 'all' or 'spread', got {str(text).strip()!r}"
        ) from None


def _observer_list(text: Any, engine: Engine, attacks: list[str]) -> list[str]:
    """``all`` is every observer the engine can run (no SecAgg+ in a deployment) that one of
    ``attacks`` applies to (an attack of :data:`ONE_CLIENT_ATTACKS` only to the server)."""
    if str(text).strip() == "all":
        runs = [o for o in PASSIVE_OBSERVERS if engine == "simulation" or o != "secagg"]
        if attacks and all(a in ONE_CLIENT_ATTACKS for a in attacks):
            runs = [o for o in runs if o in ONE_CLIENT_OBSERVERS]
        return runs
    names = _names(text)
    bad = [n for n in names if n not in OBSERVERS]
    if bad:
        raise ConfigError("observers", f"unknown observer {bad[0]!r}: choose from {', '.join(OBSERVERS)} or all")
    return list(dict.fromkeys(names))


ATTACK_KEYS = frozenset(ATTACK_DEFAULTS)  # the plan keys that belong to the attacks, not the federation


def default_mapping() -> dict[str, Any]:
    """Every plan key with its default (the federation's from RunConfig): what pyproject's
    ``[tool.flwr.app.config]`` must hold (a test checks that it does)."""
    fed = {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    return {**fed, **ATTACK_DEFAULTS}
