"""A run folder belongs to one run.

:meth:`RunFolder.claim` takes a folder for a run before anything starts:

- ``new`` (the default): the folder must not exist or be empty; a default name
  (``runs/<date>-<time>``, then ``-2``, ``-3``, ... if taken) is created exclusively, so two
  runs started in the same second cannot share one;
- ``overwrite``: an existing run folder (it holds config.json) is emptied first; anything
  else that is not empty is refused, so a mistyped ``--out`` cannot delete a user's files;
- ``resume``: the folder must hold a run whose settings match the plan's (the number of
  rounds may grow; how many attack workers run may change); the federation continues after
  its last finished round.

While the run lasts it holds an exclusive lock on ``run.lock`` in the folder (with its pid),
and a second run on the same folder is refused with one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = ["RunFolder", "RunFolderError", "default_run_dir", "RUNTIME_KEYS"]

LOCK = "run.lock"
# Keys that may differ between a run and its resumption: they change how the run is carried
# out (where it computes, too) or how long it goes on, not what a finished round means.
RUNTIME_KEYS = frozenset(
    {
        "num-server-rounds",
        "attack-workers",
        "defer-attacks",
        "out-dir",
        "round-timeout",
        "resume",
        "device",
        "resolved-device",
    }
)


class RunFolderError(ValueError):
    """A folder that cannot be used for this run; the message is one line."""


def default_run_dir(root: str | Path = "runs", prefix: str = "") -> Path:
    """A new, empty folder ``root/<prefix><date>-<time>[-N]``, created exclusively."""
    root = Path(root)
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunFolderError(f"cannot create a run folder under {root}: {exc.strerror or exc}") from None
    raise RunFolderError(f"no free run folder name under {root} for {stamp}")


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = (set(old) | set(new)) - RUNTIME_KEYS
    return sorted(k for k in keys if str(old.get(k)) != str(new.get(k)))


class RunFolder:
    """A claimed run folder: ``path``, and the lock held until :meth:`release`."""

    def __init__(self, path: Path, lock_file) -> None:
        self.path = path
        self._lock_file = lock_file

    @classmethod
    def claim(
        cls,
        path: str | Path | None,
        mode: Literal["new", "resume", "overwrite"],
        config: Mapping[str, Any],
        *,
        default_prefix: str = "",
    ) -> "RunFolder":
        """Claim ``path`` (None: a new default folder) for a run of ``config`` (the plan's
        mapping); see the module docstring. Raises :class:`RunFolderError`."""
        if path is None:
            if mode != "new":
                raise RunFolderError(f"--{mode} needs --out: the run folder to {mode}")
            folder = default_run_dir(prefix=default_prefix)
        else:
            folder = Path(path).expanduser().absolute()
            if folder.exists() and not folder.is_dir():
                raise RunFolderError(f"{folder} exists and is not a folder")
        is_run = (folder / "config.json").is_file()
        busy = folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())
        if mode == "new" and busy:
            raise RunFolderError(
                f"run folder {folder} is not empty: pass --resume to continue the run in it, "
                "--overwrite to replace it, or another --out"
            )
        # a run of the SecAgg+ observer alone keeps its config in secagg/ (experiment.SECAGG_DIR)
        if mode == "overwrite" and busy and not (is_run or (folder / "secagg" / "config.json").is_file()):
            raise RunFolderError(f"{folder} is not empty and holds no run (no config.json): not deleting it")
        if mode == "resume":
            if not is_run:
                raise RunFolderError(f"nothing to resume in {folder}: it holds no run (no config.json)")
            try:
                old = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError) as exc:
                raise RunFolderError(f"{folder}/config.json is unreadable: {exc}") from None
            diff = _differences(old, config)
            if diff:
                k = diff[0]
                raise RunFolderError(
                    f"cannot resume {folder}: its run has {k}={old.get(k)!r}, this one {config.get(k)!r}"
                    + (f" (and {len(diff) - 1} more differences)" if len(diff) > 1 else "")
                )
            done = _last_round(folder / "rounds.csv")
            if done > int(config.get("num-server-rounds", 0)):
                raise RunFolderError(
                    f"cannot resume {folder} with fewer rounds ({config.get('num-server-rounds')}) than it "
                    f"has finished ({done})"
                )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_file = (folder / LOCK).open("a+")
        except OSError as exc:
            raise RunFolderError(f"cannot write the run folder {folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise RunFolderError(f"run folder {folder} is in use by another run (pid {owner})") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        if mode == "overwrite":
            for p in folder.iterdir():
                if p.name == LOCK:
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return cls(folder, lock_file)

    def release(self) -> None:
        # The lock file stays (empty): removing it could let two later runs lock two files.
        if self._lock_file is not None:
            try:
                self._lock_file.seek(0)
                self._lock_file.truncate()
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _last_round(path: Path) -> int:
    if not path.exists():
        return -1
    last = -1
    for line in path.read_text().splitlines()[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit():
            last = max(last, int(head))
    return last
