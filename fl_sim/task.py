"""What a client does with its data: the loss, one batch's gradient, local SGD, evaluation."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RunConfig
from .data import Dataset, batch_indices, load_dataset, partition, to_float
from .device import model_device
from .models import build_model
from .settings import DPSGD

__all__ = [
    "loss_fn",
    "batch_gradient",
    "local_sgd",
    "dp_batch_gradient",
    "dp_generator",
    "dp_local_sgd",
    "LocalUpdate",
    "client_round",
    "evaluate",
    "client_indices",
    "client_batch",
    "client_batch_indices",
    "local_schedule",
    "parameter_names",
    "model_with",
    "node_partition",
]


def parameter_names(model: nn.Module) -> list[str]:
    """The names of the model's trainable parameters, in ``parameters()`` order: the entries a
    FedSGD gradient has (a state dict may hold more, e.g. buffers)."""
    return [name for name, _ in model.named_parameters()]


def model_with(cfg: RunConfig, state: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Dataset, nn.Module]:
    """The run's dataset and its model (``cfg.model``) holding ``state``: what a client does
    with the weights it is sent, and what a harness does with the weights it saw. ``state``
    is a state dict, or its tensors in ``state_dict()`` order (the legacy path's arrays)."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    if not isinstance(state, Mapping):
        keys = list(model.state_dict())
        if len(keys) != len(state):
            raise ValueError(f"got {len(state)} arrays for a model with {len(keys)} entries")
        state = dict(zip(keys, state))
    model.load_state_dict(state)
    return data, model


def node_partition(cfg: RunConfig, node_config) -> int:
    """This node's partition id, from its node config (``partition-id``, ``num-partitions``).
    A node whose ``num-partitions`` disagrees with the run's ``num-clients`` would train on a
    different split than the server's referee rebuilds, so it is refused."""
    try:
        pid, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the node config must set integer partition-id and num-partitions") from None
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"this node's num-partitions={num_partitions} disagrees with the run's num-clients="
            f"{cfg.num_clients}: fix the SuperNode's --node-config or the run config"
        )
    if not 0 <= pid < num_partitions:
        raise ValueError(f"partition-id {pid} is outside 0..{num_partitions - 1}")
    return pid


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    """The clients' training loss: softmax cross-entropy averaged over the batch."""
    return F.cross_entropy(logits, labels)


def batch_gradient(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[list[Tensor], float]:
    """FedSGD: the loss gradient on one batch, one tensor per parameter in ``parameters()``
    order (named by :func:`parameter_names`), on the model's device, and the loss. ``images``
    are float in [0, 1], on any device."""
    model.eval()  # the attacked models have no dropout or batch norm; eval keeps it that way
    device = model_device(model)
    loss = loss_fn(model(images.to(device)), labels.to(device))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [g.detach() for g in grads], loss.item()


def local_sgd(model: nn.Module, data: Dataset, batches: list[np.ndarray], *, lr: float) -> tuple[float, int]:
    """FedAvg: plain SGD at ``lr``, one step per batch of ``batches`` (sample indices, in order:
    :func:`local_schedule`), on the model's device. Returns the mean training loss and the
    number of steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    device = model_device(model)
    total = 0.0
    for batch in batches:
        chunk = torch.as_tensor(batch)
        opt.zero_grad()
        loss = loss_fn(model(to_float(data.train_x[chunk].to(device))), data.train_y[chunk].to(device))
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(len(batches), 1), len(batches)


def dp_generator(cfg: RunConfig, partition_id: int, server_round: int, device: str = "cpu") -> torch.Generator:
    """The seeded generator of a client's DP-SGD noise in a round, so a run repeats; on
    ``device``, where Opacus draws the noise (beside the model's parameters)."""
    return torch.Generator(device=device).manual_seed(
        int(np.random.SeedSequence([cfg.seed, partition_id, server_round, 77]).generate_state(1)[0])
    )


def _dp_optimizer(model: nn.Module, lr: float, noise: float, clip: float, batch_size: int, generator: torch.Generator):
    """Opacus's sample-level DP-SGD around ``model``: per-sample gradients (GradSampleModule),
    clipped to ``clip``, summed, noised with standard deviation ``noise * clip`` and divided by
    ``batch_size`` (DPOptimizer)."""
    # Opacus is a heavy import (~1 s): only DP-SGD clients pay it
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer  # heavy, as above

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampled = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(sampled.parameters(), lr=lr),
        noise_multiplier=noise,
        max_grad_norm=clip,
        expected_batch_size=batch_size,
        generator=generator,
    )
    return sampled, opt


def dp_batch_gradient(
    model: nn.Module, images: Tensor, labels: Tensor, *, noise: float, clip: float, generator: torch.Generator
) -> tuple[list[Tensor], float]:
    """FedSGD under DP-SGD: the batch's gradient as Opacus makes it private (per-sample
    clipping, Gaussian noise), one tensor per parameter, and the (non-private) loss."""
    model.train()  # Opacus records activations in training mode only (the models have no dropout or batch norm)
    sampled, opt = _dp_optimizer(model, 0.0, noise, clip, len(labels), generator)
    device = model_device(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backward hooks on an input that needs no gradient
        loss = loss_fn(sampled(images.to(device)), labels.to(device))
        loss.backward()
    opt.pre_step()  # clip, sum, noise, scale: into each parameter's .grad
    grads = [p.grad.detach().clone() for p in model.parameters()]
    sampled.remove_hooks()
    return grads, loss.item()


def dp_local_sgd(
    model: nn.Module,
    data: Dataset,
    batches: list[np.ndarray],
    *,
    lr: float,
    noise: float,
    clip: float,
    generator: torch.Generator,
) -> tuple[float, int]:
    """FedAvg under DP-SGD: :func:`local_sgd` with Opacus's private optimizer (every step's
    gradient clipped per sample and noised)."""
    model.train()
    sampled, opt = _dp_optimizer(model, lr, noise, clip, len(batches[0]) if batches else 1, generator)
    device = model_device(model)
    total = 0.0
    for batch in batches:
        chunk = torch.as_tensor(batch)
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = loss_fn(sampled(to_float(data.train_x[chunk].to(device))), data.train_y[chunk].to(device))
            loss.backward()
        opt.step()
        total += loss.item()
    sampled.remove_hooks()
    return total / max(len(batches), 1), len(batches)


@dataclass
class LocalUpdate:
    """What a client's train round produced: FedSGD's ``gradients`` (one per parameter; the
    model untouched), or FedAvg's model trained in place (``gradients`` None); the mean
    training loss, the reply's ``num_examples`` (the batch, or the partition) and the steps."""

    gradients: list[Tensor] | None
    loss: float
    num_examples: int
    steps: int


def client_round(cfg: RunConfig, partition_id: int, server_round: int, data: Dataset, model: nn.Module) -> LocalUpdate:
    """One client's training in ``server_round``, as the run configures it: FedSGD's gradient
    of its batch, or FedAvg's local SGD over its :func:`local_schedule` (in place), either
    under Opacus's DP-SGD when the run's defences name it, on the model's device (the caller
    placed it: :func:`fl_sim.device.resolve_device`; FedSGD's gradients come back there). Both
    client apps (plain and SecAgg+) train through this."""

    dp = next((d for d in cfg.defence_list if isinstance(d, DPSGD)), None)
    gen = dp_generator(cfg, partition_id, server_round, model_device(model).type)
    if cfg.mode == "fedsgd":
        images, labels = client_batch(cfg, partition_id, cfg.num_clients, server_round)
        grads, loss = (
            batch_gradient(model, images, labels)
            if dp is None
            else dp_batch_gradient(model, images, labels, noise=dp.noise, clip=dp.clip, generator=gen)
        )
        return LocalUpdate(grads, loss, len(labels), 1)
    batches = local_schedule(cfg, partition_id, cfg.num_clients, server_round)
    loss, steps = (
        local_sgd(model, data, batches, lr=cfg.lr)
        if dp is None
        else dp_local_sgd(model, data, batches, lr=cfg.lr, noise=dp.noise, clip=dp.clip, generator=gen)
    )
    return LocalUpdate(None, loss, len(client_indices(cfg, partition_id, cfg.num_clients)), steps)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy on uint8 ``images``, computed on the model's device."""
    model.eval()
    device = model_device(model)
    loss, correct = 0.0, 0
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(to_float(xb))
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(labels), 1)
    return loss / n, correct / n


@functools.lru_cache(maxsize=8)
def _partitions(dataset: str, data_root: str, num_partitions: int, scheme: str, alpha: float, k: int, seed: int):
    data = load_dataset(dataset, data_root)
    return partition(data.train_y, num_partitions, scheme, alpha=alpha, classes_per_client=k, seed=seed)


def client_indices(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """The training-sample indices of client ``partition_id`` under ``cfg`` (sorted): its
    partition, or with ``samples-per-client`` N the first N of the partition in a seeded
    order (a seeded random choice, nested: the images of N are among those of N + 1; the
    first N of the sorted indices would be one class of a dataset stored class by class)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    parts = _partitions(
        cfg.dataset, cfg.data_root, num_partitions, cfg.partition, cfg.alpha, cfg.classes_per_client, cfg.seed
    )
    part = parts[partition_id]
    if cfg.samples_per_client <= 0 or cfg.samples_per_client >= len(part):
        return part
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, partition_id, 5150]))
    return np.sort(rng.permutation(part)[: cfg.samples_per_client])


def local_schedule(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int) -> list[np.ndarray]:
    """The batches (sample indices, in order) of a FedAvg client's local SGD in ``server_round``:
    exactly ``local-steps`` batches when set, else ``local-epochs`` passes; each pass a seeded
    shuffle of the partition cut into ``batch-size`` chunks. A pure function of its arguments,
    like :func:`client_batch`: the server configured the schedule, so a harness can rebuild
    which images went into an update."""
    idx = torch.as_tensor(client_indices(cfg, partition_id, num_partitions))
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([cfg.seed, partition_id, server_round]).generate_state(1)[0])
    )
    target = cfg.steps_for(len(idx))
    batches: list[np.ndarray] = []
    while len(batches) < target:
        for chunk in idx[torch.randperm(len(idx), generator=gen)].split(cfg.batch_size):
            batches.append(chunk.numpy())
            if len(batches) == target:
                break
    return batches


def client_batch_indices(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int) -> np.ndarray:
    """The positions in the training split of the batch client ``partition_id`` uses for
    FedSGD in ``server_round`` (a pure function of its arguments, like :func:`local_schedule`)."""
    return batch_indices(
        client_indices(cfg, partition_id, num_partitions), server_round, cfg.seed, cfg.batch_size, partition_id
    )


def client_batch(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int) -> tuple[Tensor, Tensor]:
    """The batch client ``partition_id`` uses for FedSGD in ``server_round``: images as float
    in [0, 1] and labels. A pure function of its arguments: the attack harness calls it to
    score a reconstruction, so no ground truth travels in a client's message."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    t = torch.as_tensor(client_batch_indices(cfg, partition_id, num_partitions, server_round))
    return to_float(data.train_x[t]), data.train_y[t]
