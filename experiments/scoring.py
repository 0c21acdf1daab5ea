"""The referee: rebuilds the true batch behind an observation and scores a reconstruction.

The true batch is never taken from a client's message: it is rebuilt from (partition, round,
seed) with :func:`fl_sim.task.client_batch_indices` (FedSGD) or :func:`fl_sim.task.local_schedule`
(FedAvg: every image the local steps used), the pure functions the clients use, and the
partitions the run's clients really hold (a node whose ``num-partitions`` disagreed with the
run's ``num-clients`` was refused by the client itself, so the two cannot differ silently).

A reconstruction is matched to the true images one to one (Hungarian assignment on MSE,
:func:`attacks.match_batch`); a true image left without a reconstruction (the attack
estimated fewer images than there were) is scored against a mid-grey image, so it counts as
not recovered. A client's row scores that client's images: the median PSNR, SSIM and MSE over
them, the share of their labels recovered, and how many were recovered at >= 30 dB. Never
the best image of a batch: one exact image beside a failure is a median between the two,
and one image recovered out of two.

Beside them (docs/metrics.md): the median registered PSNR (``rpsnr``: a translation of up to
2 pixels allowed), the median LPIPS where its weights are on disk, and the IIP, the share of
the client's images whose reconstruction's nearest neighbour among the client's own images
(its partition, ``Truth.partitions``) is that image.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attacks import SUCCESS_PSNR, match_batch, score_batch
from attacks.metrics import identified
from fl_sim.config import RunConfig
from fl_sim.data import load_dataset, to_float
from fl_sim.task import client_batch_indices, client_indices, local_schedule

from .observe import RefereeKey, Truth

__all__ = ["Truth", "ClientScore", "true_batch", "score"]


@dataclass(frozen=True)
class ClientScore:
    """One client's images in a scored reconstruction (see the module docstring)."""

    client: int
    images: int
    recovered: int  # images at >= SUCCESS_PSNR
    psnr: float  # medians over the client's images
    ssim: float
    mse: float
    label_acc: float  # share of labels right; nan when the attack returned none
    iip: float  # share of the images identified (nearest neighbour in the partition); nan without partitions
    rpsnr: float  # median registered PSNR
    lpips: float  # median LPIPS; nan where LPIPS is not available

    def columns(self) -> dict[str, float | int]:
        """The results.csv columns this score fills."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "client"}


def true_batch(cfg: RunConfig, key: RefereeKey, server_round: int) -> Truth:
    """The images behind an observation: each target client's FedSGD batch of
    ``server_round``, or under FedAvg every image of its local schedule (each once); and each
    target's partition (its images, uint8), the candidates of IIP."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    xs, ys, owners, indices = [], [], [], []
    schedule = None
    partitions = {}
    for pid in key.targets:
        partitions[pid] = data.train_x[torch.as_tensor(client_indices(cfg, pid, cfg.num_clients))]
        if cfg.mode == "fedsgd":
            positions = client_batch_indices(cfg, pid, cfg.num_clients, server_round)
        else:
            steps = local_schedule(cfg, pid, cfg.num_clients, server_round)
            seen = np.concatenate(steps)
            positions = seen[np.sort(np.unique(seen, return_index=True)[1])]  # in order of first use
            where = {int(v): i for i, v in enumerate(positions)}
            schedule = tuple(tuple(where[int(v)] for v in step) for step in steps)
        idx = torch.as_tensor(positions)
        xs.append(to_float(data.train_x[idx]))
        ys.append(data.train_y[idx])
        owners += [pid] * len(idx)
        indices += data.source_index(positions)
    return Truth(
        torch.cat(xs),
        torch.cat(ys),
        tuple(owners),
        schedule if len(key.targets) == 1 else None,
        tuple(indices),
        partitions,
    )


def _median(values: list[float]) -> float:
    finite = [min(v, 300.0) for v in values if not math.isnan(v)]  # an exact match is inf: cap for medians
    return float(statistics.median(finite)) if finite else math.nan


def score(recon: Tensor, recon_labels: Tensor | None, truth: Truth) -> tuple[list[ClientScore], list[dict], Tensor]:
    """Score ``recon`` against ``truth``: one :class:`ClientScore` per owner (in the order of
    ``truth.owners``), the per-image scores in the order of the true images (``psnr``,
    ``ssim``, ``mse``, ``rpsnr``, ``lpips``, ``label_correct`` when labels are compared,
    ``matched``, ``iip`` (True when identified, False when not or unmatched, "" when
    ``truth`` has no partitions), and the image's ``client``, dataset ``index``,
    ``label_true`` and the ``label_recovered`` of its matched reconstruction, "" when there is
    none), and the reconstructions in the order of the true images (mid-grey where none was
    matched), for the figures."""
    recon = torch.nan_to_num(recon.detach().to(torch.float32), nan=0.5).clamp(0, 1)
    perm = match_batch(recon, truth.images)
    per_image = score_batch(
        recon, truth.images, recon_labels, truth.labels if recon_labels is not None else None, perm=perm
    )
    recovered = None if recon_labels is None else torch.as_tensor(recon_labels).reshape(-1).tolist()
    for i, (row, j) in enumerate(zip(per_image, perm)):
        row["matched"] = bool(j >= 0)
        row.update(
            client=truth.owners[i],
            index=truth.indices[i] if truth.indices is not None else "",
            label_true=int(truth.labels[i]),
            label_recovered=int(recovered[j]) if recovered is not None and 0 <= j < len(recovered) else "",
            iip="",
        )
    ordered = torch.stack([recon[j] if j >= 0 else torch.full_like(truth.images[i], 0.5) for i, j in enumerate(perm)])
    clients = []
    for pid in dict.fromkeys(truth.owners):
        mine = [i for i, owner in enumerate(truth.owners) if owner == pid]
        rows = [per_image[i] for i in mine]
        iip = math.nan
        if truth.partitions is not None and pid in truth.partitions:
            found = identified(ordered[mine], truth.images[mine], truth.partitions[pid])
            for row, hit in zip(rows, found):
                row["iip"] = hit and row["matched"]  # an unmatched image is never identified
            iip = sum(row["iip"] for row in rows) / len(rows)
        labels = [row["label_correct"] for row in rows if "label_correct" in row]
        clients.append(
            ClientScore(
                client=pid,
                images=len(rows),
                recovered=sum(row["psnr"] >= SUCCESS_PSNR for row in rows),
                psnr=_median([row["psnr"] for row in rows]),
                ssim=_median([row["ssim"] for row in rows]),
                mse=_median([row["mse"] for row in rows]),
                label_acc=float(sum(labels) / len(labels)) if labels else math.nan,
                iip=iip,
                rpsnr=_median([row["rpsnr"] for row in rows]),
                lpips=_median([row["lpips"] for row in rows]),
            )
        )
    return clients, per_image, ordered
