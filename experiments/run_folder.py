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

What made the run is recorded in its config.json under ``provenance`` (:func:`provenance`): a
list with one entry per session that ran it (the first run, then each resume), each with the
command, start and end times, the versions of Python and the packages, and the git commit.
It is a record, not a setting: a resume compares everything else.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = [
    "RunFolder",
    "RunFolderError",
    "default_run_dir",
    "RUNTIME_KEYS",
    "PROVENANCE",
    "provenance",
    "command_line",
    "write_provenance",
    "utc_now",
]

LOCK = "run.lock"
# config.json's record of what made the run (a list: one entry per session), not a setting
PROVENANCE = "provenance"
# Keys that may differ between a run and its resumption: they change how the run is carried
# out (where it computes, too) or how long it goes on, not what a finished round means; and the
# provenance, a record of what ran it.
RUNTIME_KEYS = frozenset(
    {
        "num-server-rounds",
        "attack-workers",
        "ray-address",
        "defer-attacks",
        "out-dir",
        "round-timeout",
        "resume",
        "device",
        "resolved-device",
        PROVENANCE,
    }
)
# The distributions whose versions a run records; the first is this project (pyproject's name).
PACKAGES = ("fl-privacy-testbed", "flwr", "torch", "torchvision", "numpy", "opacus")
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # where the running code lives: a checkout, or site-packages
GIT_TIMEOUT = 10.0  # seconds a git query may take before the commit is recorded as unknown
# A flag whose value a command line must not leave in a run folder (flwr-serverapp's --token)
SECRET_FLAG = re.compile(r"^--?[\w-]*(token|secret|password|passwd|private-key|api-key)$", re.IGNORECASE)
HIDDEN = "***"


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


def utc_now() -> str:
    """Now, as an ISO 8601 time in UTC to the second (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path) -> dict[str, Any] | None:
    """The commit checked out at ``root`` and whether the tree differs from it (``dirty``: a
    changed file, or a file git does not ignore and does not track, such as a new module);
    None where ``root`` is not the top of a git checkout (an installed package) or git is
    missing or fails."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT, check=True
        )
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None  # root sits inside some other repository (a venv inside a checkout)
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(argv: list[str] | None = None) -> str:
    """``argv`` (default: this process's command line, ``sys.orig_argv``) as one shell line,
    with the value of every secret flag (:data:`SECRET_FLAG`, ``--flag VALUE`` or
    ``--flag=VALUE``) replaced by :data:`HIDDEN`."""
    out: list[str] = []
    for arg in sys.orig_argv if argv is None else argv:
        name, eq, _ = arg.partition("=")
        if out and SECRET_FLAG.match(out[-1]) and not arg.startswith("-"):
            arg = HIDDEN
        elif eq and SECRET_FLAG.match(name):
            arg = f"{name}={HIDDEN}"
        out.append(arg)
    return shlex.join(out)


def provenance(command: str | None = None, *, device: str | None = None) -> dict[str, Any]:
    """What is making a run, now: ``command`` (default: this process's command line,
    :func:`command_line`) and the working directory, the start time (``ended`` is filled in by
    the run's end), the versions of Python and of :data:`PACKAGES` (None: not installed), the
    git commit of the running code with ``dirty`` (None: not run from a checkout), and
    ``device``'s name where it is a GPU."""
    record: dict[str, Any] = {
        "command": command if command is not None else command_line(),
        "cwd": os.getcwd(),
        "started": utc_now(),
        "ended": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": _git(SOURCE_ROOT),
    }
    if device is not None and device.startswith("cuda"):
        import torch  # only to name the GPU; run_folder itself stays light for the command line

        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return record


def write_provenance(config_path: str | Path, sessions: list[Mapping[str, Any]]) -> None:
    """Set the provenance of the run whose config.json is ``config_path`` (atomically; the
    rest of the file is kept)."""
    path = Path(config_path)
    config = json.loads(path.read_text())
    config[PROVENANCE] = [dict(s) for s in sessions]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
