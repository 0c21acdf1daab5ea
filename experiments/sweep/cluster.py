"""Where a sweep's runs run: local processes (``--jobs N``), or Ray tasks on an existing Ray
cluster (``--ray-address ADDRESS``).

Either way a run is the same command, ``python -m experiments.run`` with the run's settings, in
a process of its own, so it has the same digest, the same folder and the same rows as anywhere
else. On a cluster:

- **The task starts that process on its node** and waits for it. The run's federation is on the
  in-process engine: a Flower simulation on Ray inside a Ray task would start a second Ray (or,
  with ``RAY_ADDRESS`` set on the node, join the cluster and take its CPUs for its clients), a
  20-second start per run and processes that outlive a cancelled task; a sweep's cells are small
  federations, which the in-process engine runs with the same results for the same seed.
- **No shared disk is needed.** The run writes its folder into a temporary folder of the node;
  the task returns the folder's files as a tar.gz archive (bytes through Ray's object store),
  with the run's output and exit code, and removes it. The driver unpacks the archive into the
  sweep folder's ``runs/<run>/`` and writes ``runs/<run>.log``, as a local run would.
- **A node needs** the project installed (the same version as the driver's), and the data the
  spec names at the same path: the run starts in the driver's working directory when the node
  has it (relative paths mean the same), else in its temporary folder. The run inherits the
  driver's ``OMP_NUM_THREADS`` and ``FL_SIM_*`` settings (torch's threads and the data's
  settings: the same results as the driver's own runs).
- **Each task asks Ray for the CPUs its run uses** (1, plus its attack workers), at most those
  of the largest node.
- **Ctrl-C on the driver** cancels the tasks in flight (``ray.cancel``): a KeyboardInterrupt in
  the task, which stops its run as Ctrl-C would (SIGTERM to its process group, SIGKILL after
  10 s). If the task's worker dies instead (a forced cancel, the driver killed), the run gets
  SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
- **A run that fails on a node** is a failed run with its reason: its exit code and last line,
  or Ray's error (the node died, the worker crashed). Ray does not retry it.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outcome", "LocalRuns", "RayRuns", "ClusterError", "run_on_node"]

FORCE_AFTER = 10.0  # seconds after a Ctrl-C's cancel until the tasks still running are killed
STOP_GRACE = 10.0  # seconds a stopped run has to end before SIGKILL
LOG_LIMIT = 1_000_000  # the last characters of a run's output that a task returns
CONNECT_TIMEOUT = 10.0  # seconds to reach the cluster's address before giving up


class ClusterError(RuntimeError):
    """No cluster answers at the address; the message is one line."""


@dataclass(frozen=True)
class Outcome:
    """How a run's process ended: its exit code (None: it never ran to an exit, ``reason``
    says why) and its seconds."""

    code: int | None
    seconds: float
    reason: str = ""


def _command(args: list[str], folder: Path, engine: str | None, device: str | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.run",
        *args,
        "--out",
        str(folder),
        "--overwrite",
        *(["--engine", engine] if engine else []),
        *(["--device", device] if device else []),
    ]


class LocalRuns:
    """Each run a process of this machine (the sweep's ``--jobs`` at once)."""

    def __init__(self, engine: str | None = None, device: str | None = None) -> None:
        self.engine, self.device = engine, device
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopped = False

    def run(self, name: str, args: list[str], folder: Path, log: Path, cpus: int) -> Outcome:
        start = time.monotonic()
        with open(log, "w") as f:
            # the user's working directory: relative data paths mean the same to the run as to the spec
            proc = subprocess.Popen(
                _command(args, folder, self.engine, self.device),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "COLUMNS": "120"},
            )
            with self.lock:
                self.procs[name] = proc
            if self.stopped:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait()
            with self.lock:
                self.procs.pop(name, None)
        return Outcome(code, time.monotonic() - start)

    def _signal(self, sig: int) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            try:
                os.killpg(p.pid, sig)  # the run stops its own Ray and attack workers
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped = True
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        pass


def _probe(address: str) -> None:
    """Raise ClusterError unless something listens at HOST:PORT (Ray's own connect retries for
    minutes on an address where nothing answers)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray://... (Ray Client), or a form Ray parses itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


class RayRuns:
    """Each run a Ray task on the cluster at ``address`` (see the module's docstring)."""

    def __init__(self, address: str, device: str | None = None) -> None:
        _probe(address)
        import ray  # Ray (seconds to import): only a sweep with --ray-address loads it here

        try:
            with warnings.catch_warnings():  # Ray's FutureWarning about GPU variables: no GPU is asked for
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray's many ways to say no: one line
            raise ClusterError(
                f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]}"
            ) from None
        self.ray, self.device = ray, device
        self.task = ray.remote(max_retries=0)(run_on_node)
        cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        self.largest = max(1, int(max(cpus, default=1)))
        self.refs: dict[str, object] = {}
        self.lock = threading.Lock()
        self.stopped = False
        self.env = {
            k: v
            for k, v in os.environ.items()
            if (k.startswith("FL_SIM_") and k != "FL_SIM_ENGINE") or k == "OMP_NUM_THREADS"
        }

    def run(self, name: str, args: list[str], folder: Path, log: Path, cpus: int) -> Outcome:
        ray = self.ray
        with self.lock:
            if self.stopped:
                return Outcome(None, 0.0, "stopped before it started")
            ref = self.task.options(num_cpus=min(cpus, self.largest), name=f"sweep:{name}").remote(
                name, args, os.getcwd(), self.env, self.device
            )
            self.refs[name] = ref
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return Outcome(None, 0.0, "cancelled")
        except ray.exceptions.RayTaskError as exc:  # the task itself raised: its cause, one line
            cause = exc.cause if exc.cause is not None else exc
            return Outcome(None, 0.0, f"ray: {type(cause).__name__}: {' '.join(str(cause).split())[:200]}")
        except ray.exceptions.RayError as exc:  # the worker or the node died, out of memory, ...
            return Outcome(None, 0.0, f"ray: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        finally:
            with self.lock:
                self.refs.pop(name, None)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(result["files"]), mode="r:gz") as tar:
            tar.extractall(folder.parent, filter="data")  # the archive holds <run>/...
        log.write_text(f"# ran on Ray node {result['node']}\n{result['log']}")
        return Outcome(result["code"], result["seconds"])

    def _cancel(self, force: bool) -> None:
        with self.lock:
            refs = list(self.refs.values())
        for ref in refs:
            try:
                self.ray.cancel(ref, force=force)
            except Exception:  # noqa: BLE001 - already finished, or the cluster is gone
                pass

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
        self._cancel(force=False)
        # A cancel that does not land (seen in a loaded test suite: the run went on to its end)
        # is made a forced one: Ray kills the task's worker, and the run gets SIGTERM from the kernel
        timer = threading.Timer(FORCE_AFTER, self._cancel, kwargs={"force": True})
        timer.daemon = True
        timer.start()

    def kill(self) -> None:
        self._cancel(force=True)

    def close(self) -> None:
        self.ray.shutdown()


# -- on the node ---------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def run_on_node(name: str, args: list[str], cwd: str, env: dict[str, str], device: str | None) -> dict:
    """The Ray task: run ``python -m experiments.run ARGS`` on this node into a temporary
    folder; return its exit code, seconds, output, node and files (a tar.gz of ``<name>/``)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fl-sweep-{name}-"))
    folder = tmp / name
    try:
        start = time.monotonic()
        with open(tmp / "log", "w") as f:
            proc = subprocess.Popen(
                _command(args, folder, "inprocess", device),
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=cwd if os.path.isdir(cwd) else tmp,
                env={
                    **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                    **env,
                    "FL_SIM_ENGINE": "inprocess",
                    "COLUMNS": "120",
                },
                process_group=0,  # its own group: stopped with its attack workers
                preexec_fn=_die_with_parent,
            )
            try:
                while True:  # in short waits, so that ray.cancel's KeyboardInterrupt lands at once
                    try:
                        code = proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        pass
            except BaseException:  # ray.cancel: stop the run as Ctrl-C would, then end the task
                _stop(proc)
                raise
        seconds = time.monotonic() - start
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            if folder.exists():
                tar.add(folder, arcname=name)
        log = (tmp / "log").read_text(errors="replace")[-LOG_LIMIT:]
        return {"code": code, "seconds": seconds, "log": log, "node": socket.gethostname(), "files": buf.getvalue()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
