"""The plan's presets and its own names, as plain data with no import: what ``--help`` shows
without loading torch or Flower. :mod:`experiments.plan` applies them (its rules) and
re-exports them; :mod:`experiments.cli` shows them in the flags' help."""

from __future__ import annotations

from typing import Any

__all__ = [
    "OBSERVERS",
    "PASSIVE_OBSERVERS",
    "BATCH_SIZE_GRANTS",
    "ATTACK_PRESET",
    "DEMO_PRESET",
    "ACTIVE_PRESET",
    "PRESETS",
    "ATTACK_DEFAULTS",
    "MAX_UPDATE_IMAGES",
    "FEDAVG_ATTACK_STEPS",
]

OBSERVERS = ("server", "client", "secagg", "active")
PASSIVE_OBSERVERS = ("server", "client", "secagg")  # what "all" means: the servers that send the honest model
# What the attackers are told of the number of images in the update they attack:
# observed: what each observer sees (the server: the reply's num-examples; SecAgg+: the sum of
#           the clients' clear-text num-examples; the curious client: nothing, it estimates);
# all: every observer is granted the true count; none: no observer is, every attack estimates.
BATCH_SIZE_GRANTS = ("observed", "all", "none")
# With an attack, keys the user left unset take the papers' FedSGD setting: DLG's LeNet with its
# U(-0.5, 0.5) initialisation (which R-GAP inverts too), one image per client update, and a run
# short enough to finish in a few minutes on two cores.
ATTACK_PRESET: dict[str, Any] = {
    "mode": "fedsgd",
    "batch-size": 1,
    "num-clients": 4,
    "num-server-rounds": 2,
    "model": "lenet",
    "init": "paper",
}
# The demo (``python -m experiments.run`` with no --attack): a federation that trains while its
# server spies. FedSGD with one image per client, so each reply is one sample's gradient (what
# R-GAP inverts exactly, trained or not); 10 clients make each step a batch of 10, at a server
# learning rate at which CNN6 passes 0.85 test accuracy on mnist5k within about 120 rounds
# (measured over model seeds 0-2); 150 rounds of about 0.3 s; attacked in the first, middle and
# last round. SecAgg+ (a second federation of 1.3 s rounds) is left to --observers all.
DEMO_PRESET: dict[str, Any] = {
    "attack": "rgap",
    "mode": "fedsgd",
    "batch-size": 1,
    "num-clients": 10,
    "num-server-rounds": 150,
    "server-lr": 0.1,
    "model": "cnn6",
    "init": "kaiming",
    "attack-rounds": "spread",
    "observers": "server,client",
}
# With the active observer named, keys left unset take the setting of the target: FedSGD
# with 16 images per client and 4 clients (64 images in a SecAgg+ aggregate), on the fully
# connected model whose first layer holds the weights-only imprint.
ACTIVE_PRESET: dict[str, Any] = {
    "mode": "fedsgd",
    "batch-size": 16,
    "num-clients": 4,
    "num-server-rounds": 2,
    "model": "mlp",
    "init": "torch",
}
PRESETS = {"paper": ATTACK_PRESET, "demo": DEMO_PRESET, "active": ACTIVE_PRESET}
# The most images one attacked update may hold: an attack optimises one dummy image per image
# (Inverting Gradients on 32 CIFAR images in 3 local steps: 200 s on one core).
MAX_UPDATE_IMAGES = 64
# A preset's FedAvg attack with no local schedule given (neither local-steps nor local-epochs):
# one epoch of the preset's batch of 1 over a client's 1,000 images would be an update of 1,000
# images, more than any attack reconstructs. The preset takes this many local steps instead (R-GAP:
# 1, the one step it inverts), the fewest that make the update a FedAvg update of several steps
# (docs/results/fedavg.md measures 1, 2, 5 and 10).
FEDAVG_ATTACK_STEPS = 2
# The attack keys' defaults (the federation's are RunConfig's).
ATTACK_DEFAULTS: dict[str, Any] = {
    "attack": "none",
    "observers": "all",
    "attack-rounds": "1",
    "attack-clients": "all",
    "max-attacks-per-round": 0,
    "curious-client": 0,
    "attack-workers": 1,
    "ray-address": "",
    "defer-attacks": False,
    "grant-batch-size": "observed",
    "grant-labels": False,
    "grant-batch-order": False,
    "attack-time-limit": 0.0,
    "active-attack": "imprint",
    "active-bins": 500,
}
