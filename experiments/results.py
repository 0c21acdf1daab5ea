"""results.csv: one row per (round, client, observer, attack), and its one writer.

Every row says what its attacker was granted (``labels_granted``, ``batch_size_granted``,
``batch_size_source``, for a FedAvg update the ``local_steps`` it was read as (0: a FedSGD
gradient) and ``order_granted``, the client's batch order: see :mod:`experiments.observe`),
how many images the attack
reconstructed (``batch_size_used``) and how the row was tied to its client
(``attribution``: ``direct`` for an observer that saw the client's own update, ``post-hoc``
for one that saw an aggregate and was matched to the clients' images afterwards). ``psnr``,
``ssim`` and ``mse`` are medians over the client's images, ``recovered`` of ``images`` were
at >= 30 dB (:mod:`experiments.scoring`). ``bins``: the number of bins of the active server's
imprint (empty for the passive observers).

``status`` is the attack's own (``ok``, ``blend``, ``diverged``, ``not_converged``,
``inconsistent``, ...) for a scored row, or why there is no score: ``error`` (the attack
raised), ``missing`` / ``invalid`` (the client's reply never arrived or was refused by the
server: nothing to attack), ``skipped`` (the observer had nothing to attack), ``interrupted``
(the run stopped before the attack finished). ``UNSCORED`` lists those.
"""

from __future__ import annotations

import csv
import math
import threading
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

__all__ = ["RESULT_FIELDS", "UNSCORED", "ResultsWriter", "blank_row", "read_results"]

RESULT_FIELDS = [
    "round",
    "client",
    "observer",
    "attack",
    "psnr",
    "ssim",
    "mse",
    "label_acc",
    "images",
    "recovered",
    "batch_size_used",
    "labels_granted",
    "batch_size_granted",
    "batch_size_source",
    "local_steps",
    "order_granted",
    "attribution",
    "bins",
    "seconds",
    "status",
    "reason",
]
UNSCORED = ("error", "missing", "invalid", "skipped", "interrupted")


def blank_row(server_round: int, client: int, observer: str, attack: str, **values: Any) -> dict[str, Any]:
    """A row with no score yet; ``values`` fill in the rest."""
    row: dict[str, Any] = {k: "" for k in RESULT_FIELDS}
    row.update(
        round=server_round,
        client=client,
        observer=observer,
        attack=attack,
        psnr=math.nan,
        ssim=math.nan,
        mse=math.nan,
        label_acc=math.nan,
        seconds=0.0,
        status="ok",
    )
    row.update(values)
    return row


class ResultsWriter:
    """Appends rows to ``results.csv`` as they come (thread-safe), keeping them in ``rows``;
    an existing file (a resumed run) is appended to."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.fields = list(RESULT_FIELDS)
        if not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(RESULT_FIELDS)
        else:  # a resumed run keeps its file's columns (one written before a column was added)
            with self.path.open(newline="") as f:
                self.fields = next(csv.reader(f), None) or self.fields

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        with self._lock:
            with self.path.open("a", newline="") as f:
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                for row in rows:
                    w.writerow(row)
            self.rows += rows


def read_results(path: str | Path):
    """results.csv as a pandas DataFrame (empty, with the columns, when there is none)."""
    p = Path(path)
    if not p.exists():
        return pd.DataFrame(columns=RESULT_FIELDS)
    return pd.read_csv(p)
