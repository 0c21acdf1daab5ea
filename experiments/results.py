"""results.csv: one row per (round, client, observer, attack); images.csv: one row per true
image of each scored attack; and their one writer.

Every row says what its attacker was granted (``labels_granted``, ``batch_size_granted``,
``batch_size_source``, for a FedAvg update the ``local_steps`` it was read as (0: a FedSGD
gradient) and ``order_granted``, the client's batch order: see :mod:`experiments.observe`),
how many images the attack
reconstructed (``batch_size_used``) and how the row was tied to its client
(``attribution``: ``direct`` for an observer that saw the client's own update, ``post-hoc``
for one that saw an aggregate and was matched to the clients' images afterwards). ``psnr``,
``ssim`` and ``mse`` are medians over the client's images, ``recovered`` of ``images`` were
at >= 30 dB (:mod:`experiments.scoring`); at the end, ``iip`` is the share of the client's
images identified (image identifiability precision), ``rpsnr`` the median registered PSNR and
``lpips`` the median LPIPS (nan where its weights are not on disk; docs/metrics.md).
``bins``: the number of bins of the active server's imprint (empty for the passive
observers).

``status`` is the attack's own (``ok``, ``blend``, ``diverged``, ``not_converged``,
``inconsistent``, ...) for a scored row, or why there is no score: ``error`` (the attack
raised), ``missing`` / ``invalid`` (the client's reply never arrived or was refused by the
server: nothing to attack), ``skipped`` (the observer had nothing to attack), ``interrupted``
(the run stopped before the attack finished). ``UNSCORED`` lists those.

images.csv (``IMAGE_FIELDS``) has a row per image behind every scored results.csv row (``images``
rows for a row of ``images`` images; none for an unscored one): its ``round``, ``client``,
``observer``, ``attack``, its ``index`` in its dataset (:meth:`fl_sim.data.Dataset.source_index`),
the ``psnr`` and ``ssim`` of the reconstruction matched to it (the optimal assignment of
:mod:`experiments.scoring`: each true image gets at most one reconstruction), ``label_true``,
the matched reconstruction's ``label_recovered`` (empty when the attack returned no labels),
``status``: the attack's, or ``unmatched`` when no reconstruction was left for the image
(the attack returned fewer than there were; scored against mid-grey); and at the end ``iip``
(True when the reconstruction's nearest neighbour among the client's images is this image),
``rpsnr`` and ``lpips``. A job that runs again
(its round rerun after a resume) replaces its images' rows: one row per (round, client,
observer, attack, index).
"""

from __future__ import annotations

import csv
import math
import threading
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

__all__ = [
    "RESULT_FIELDS",
    "IMAGE_FIELDS",
    "IMAGES_CSV",
    "UNSCORED",
    "ResultsWriter",
    "blank_row",
    "image_rows",
    "read_results",
    "read_images",
]

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
    "iip",
    "rpsnr",
    "lpips",
]
UNSCORED = ("error", "missing", "invalid", "skipped", "interrupted")
IMAGES_CSV = "images.csv"
IMAGE_FIELDS = [
    "round",
    "client",
    "observer",
    "attack",
    "index",
    "psnr",
    "ssim",
    "label_true",
    "label_recovered",
    "status",
    "iip",
    "rpsnr",
    "lpips",
]
_IMAGE_KEY = ("round", "client", "observer", "attack", "index")


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
        iip=math.nan,
        rpsnr=math.nan,
        lpips=math.nan,
        seconds=0.0,
        status="ok",
    )
    row.update(values)
    return row


def image_rows(
    server_round: int, observer: str, attack: str, status: str, per_image: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """images.csv rows of one scored job: ``per_image`` are the referee's per-image scores
    (:func:`experiments.scoring.score`), in the order of the true images."""
    return [
        {
            "round": server_round,
            "client": r["client"],
            "observer": observer,
            "attack": attack,
            "index": r["index"],
            "psnr": r["psnr"],
            "ssim": r["ssim"],
            "label_true": r["label_true"],
            "label_recovered": r["label_recovered"],
            "status": status if r.get("matched", True) else "unmatched",
            "iip": r.get("iip", ""),
            "rpsnr": r["rpsnr"],
            "lpips": r["lpips"],
        }
        for r in per_image
    ]


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in _IMAGE_KEY)


def _open_csv(path: Path, fields: list[str]) -> list[str]:
    """The columns of the CSV at ``path``, written with ``fields`` as its header if it is new
    (a resumed run keeps its file's columns: one written before a column was added)."""
    if not path.exists():
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(fields)
        return list(fields)
    with path.open(newline="") as f:
        return next(csv.reader(f), None) or list(fields)


class ResultsWriter:
    """Appends rows to ``results.csv`` and their images' rows to ``images.csv`` beside it as
    they come (thread-safe), keeping them in ``rows`` and ``image_rows``; existing files (a
    resumed run) are appended to, and an image row whose key (round, client, observer,
    attack, index) is already in images.csv replaces the old one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.images_path = self.path.with_name(IMAGES_CSV)
        self.rows: list[dict[str, Any]] = []
        self.image_rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.fields = _open_csv(self.path, RESULT_FIELDS)
        self.image_fields = _open_csv(self.images_path, IMAGE_FIELDS)
        with self.images_path.open(newline="") as f:
            self._image_keys = {_key(r) for r in csv.DictReader(f)}

    def write(self, rows: Iterable[dict[str, Any]], images: Iterable[dict[str, Any]] = ()) -> None:
        """Append ``rows`` to results.csv and ``images`` (:func:`image_rows`) to images.csv,
        the images first (a run killed between the two leaves no results row without its
        images)."""
        rows, images = list(rows), list(images)
        with self._lock:
            if images:
                self._write_images(images)
            with self.path.open("a", newline="") as f:
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                for row in rows:
                    w.writerow(row)
            self.rows += rows

    def _write_images(self, images: list[dict[str, Any]]) -> None:
        keys = {_key(r) for r in images}
        if keys & self._image_keys:  # a job that ran again: its rows replace the old ones
            with self.images_path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if _key(r) not in keys]
            with self.images_path.open("w", newline="") as f:
                w = csv.DictWriter(f, self.image_fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)
            self.image_rows = [r for r in self.image_rows if _key(r) not in keys]
        with self.images_path.open("a", newline="") as f:
            csv.DictWriter(f, self.image_fields, extrasaction="ignore").writerows(images)
        self._image_keys |= keys
        self.image_rows += images


def read_results(path: str | Path):
    """results.csv as a pandas DataFrame (empty, with the columns, when there is none)."""
    p = Path(path)
    if not p.exists():
        return pd.DataFrame(columns=RESULT_FIELDS)
    return pd.read_csv(p)


def read_images(path: str | Path):
    """images.csv (a path to it, or its run folder) as a pandas DataFrame (empty, with the
    columns, when there is none)."""
    p = Path(path)
    p = p / IMAGES_CSV if p.is_dir() else p
    if not p.exists():
        return pd.DataFrame(columns=IMAGE_FIELDS)
    return pd.read_csv(p)
