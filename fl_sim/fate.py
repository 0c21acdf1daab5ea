"""Nothing of a run outlives it: a watchdog for the processes Ray starts.

Ray's local node fate-shares with the process that started it (its GCS and raylet die with it,
by ``PR_SET_PDEATHSIG``), but the raylet's own children do not: when the run's main process is
SIGKILLed (the OOM killer's way), Ray's ``DashboardAgent`` and ``RuntimeEnvAgent`` notice that
the raylet is gone and then report it to the GCS, which is gone too: they stay under PID 1
(over 10 s here; the report alone may wait 60 s for the GCS), and they ignore SIGTERM.
``include_dashboard=False`` does not stop them: the agents run on every node.

:func:`fate_shared` marks the processes of a run and kills them when it dies. It puts a token in
the environment, which every process Ray starts inherits, and starts a watchdog: a small process
of its own session, which ignores the signals a terminal sends to the run's process group, looks
at the run's process tree every half second while the run lives, and, once the run's main
process has ended (a pidfd, or polling where there is none), SIGKILLs every process it saw in
that tree that is still running, and every process of this user whose environment holds the
token (one started after its last look). The token alone does not do: Ray renames its processes
(setproctitle), which overwrites the environment that ``/proc`` shows. When the block ends
normally, the watchdog is ended and the token taken back.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

__all__ = ["TOKEN_VARIABLE", "fate_shared", "processes_marked"]

TOKEN_VARIABLE = "FL_SIM_RUN_TOKEN"
POLL = 0.5  # seconds between the watchdog's looks at the run's process tree


def processes_marked(token: str) -> list[psutil.Process]:
    """This user's processes whose environment holds ``TOKEN_VARIABLE=token`` (not this one)."""
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TOKEN_VARIABLE) == token:
                found.append(p)
        except psutil.Error:  # gone, or another user's: not ours to read or kill
            pass
    return found


@contextmanager
def fate_shared() -> Iterator[str]:
    """Within the block, every process started from this one carries a token; a watchdog kills
    them all if this process dies before the block ends. Yields the token."""
    token = uuid.uuid4().hex
    before = os.environ.get(TOKEN_VARIABLE)
    os.environ[TOKEN_VARIABLE] = token
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "fl_sim.fate", str(os.getpid()), token],
        start_new_session=True,  # a terminal's Ctrl-C to the run's group does not reach it
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE},  # not a process to kill
    )
    try:
        yield token
    finally:
        watchdog.kill()  # the run ended and stopped its own processes: the watchdog's job is over
        watchdog.wait()
        if before is None:
            os.environ.pop(TOKEN_VARIABLE, None)
        else:
            os.environ[TOKEN_VARIABLE] = before


def _exited(pid: int, fd: int | None, timeout: float) -> bool:
    """Whether process ``pid`` has exited (a zombie counts), waiting up to ``timeout`` s."""
    if fd is not None:
        return bool(select.select([fd], [], [], timeout)[0])  # a pidfd is readable once it exited
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        return True
    time.sleep(timeout)
    return False


def _watch(pid: int, token: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None  # already gone
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3, or not Linux): poll
        fd = None
    # The run's descendants, seen while it lives: the token does not find them all, because Ray
    # renames its processes (setproctitle), which overwrites the environment that /proc shows.
    seen: dict[int, psutil.Process] = {}
    while not _exited(pid, fd, POLL):
        try:
            for p in psutil.Process(pid).children(recursive=True):
                if p.pid != os.getpid():
                    seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
    for _ in range(3):  # a process may still be starting one when it is killed: look again
        left = [p for p in seen.values() if p.is_running()]  # is_running: the same process, not a reused pid
        left += [p for p in processes_marked(token) if p.pid not in seen]
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=2)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
