"""Runs that stop when told: Ctrl-C or SIGTERM sets a stop event instead of raising wherever
the main thread happens to be.

Flower's simulation runs the ServerApp in a thread of its own and the simulation engine in
the main thread: a KeyboardInterrupt in the main thread leaves the server waiting out round
timeouts. With :class:`StopOnSignal` the first signal only sets ``event``; the server, which
waits on a :class:`fl_sim.server_app.StoppableGrid`, abandons the round in flight within a
poll, Flower's engine shuts Ray down, and the caller marks unfinished attacks and exits with
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). A second signal does not wait:
it kills every process the run started and exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import psutil

__all__ = ["StopOnSignal", "kill_descendants", "terminate"]


def terminate(processes: list, grace: float = 3.0) -> None:
    """SIGTERM every psutil process in ``processes``, then SIGKILL those left after ``grace`` s."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def kill_descendants(grace: float = 3.0) -> None:
    """Stop every descendant of this process (:func:`terminate`)."""
    try:
        terminate(psutil.Process().children(recursive=True), grace)
    except psutil.Error:
        pass


class StopOnSignal:
    """Within the block, SIGINT and SIGTERM set ``event`` (and call ``on_signal(signum)``);
    a second signal kills the run's processes and exits. ``signum`` is the first signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, event: threading.Event | None = None, on_signal: Callable[[int], None] | None = None) -> None:
        self.event = event or threading.Event()
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print("\nsecond signal: stopping every process of the run now", file=sys.stderr, flush=True)
            kill_descendants(grace=1.0)
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()
        if self.on_signal:
            self.on_signal(signum)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
