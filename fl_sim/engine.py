"""An in-process engine: the real ServerApp and the real ClientApp in one process, without Ray.

Flower's simulation engine (:func:`flwr.simulation.run_simulation`) starts Ray, which costs
about 20 s per federation: most of a small test's time. :func:`run_inprocess` runs the same
apps the same way, on :class:`InProcessGrid`, a real :class:`flwr.serverapp.Grid` that hands
each message to the ClientApp in a worker thread of this process. What the apps see is what
they see under Ray:

- N nodes with random 64-bit node ids (seeded here, so a run repeats), node config
  ``{"partition-id": i, "num-partitions": N}``, and a per-node :class:`Context` kept across
  rounds (mods keep state there: the leakage audit's memory, SecAgg+'s keys and shares);
- messages cross the boundary through Flower's protobuf serde, both ways, so a client never
  holds the server's tensors nor the server a client's; the grid sets the metadata a
  SuperLink sets (message ids, run id, source node, delivery time) and checks messages with
  Flower's own validator;
- a ClientApp that raises becomes an error reply built as Flower's simulation backend builds
  it (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``str(type(ex)) + ":<'" + str(ex) + "'>"``
  of a ``ClientAppException``);
- replies are pulled as they finish, and ``send_and_receive`` gives up after ``timeout`` like
  Flower's ``InMemoryGrid``: a client that never answers is missing, and its thread (a daemon)
  blocks neither the next run nor the process's exit.

What differs from Ray: the clients share the process. State that is global to a process is
shared by the clients running at once (torch's thread count, which the project's ClientApps
set to 1, and the global RNGs of numpy and torch, which Flower's ``LocalDpMod`` draws from);
``max_workers=1`` runs one client at a time when that matters. :func:`run_inprocess` puts
back what the run changed of the process (torch's thread count, Flower's task identity and
console logging).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from logging import DEBUG, ERROR
from queue import SimpleQueue
from uuid import uuid4

import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.metadata import Metadata
from flwr.app.user_config import UserConfig, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    MESSAGE_TTL_TOLERANCE,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    user_config_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.server.run_serverapp import run as run_server_app
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.constant import NOOP_FEDERATION_ID, NodeStatus
from flwr.supercore.date import now
from flwr.supercore.logger import ConsoleHandler, update_console_handler
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "run_inprocess", "node_ids"]

_RESERVED_NODE_IDS = frozenset({0, SUPERLINK_NODE_ID})  # Flower never gives these to a SuperNode


def node_ids(num_nodes: int, seed: int) -> list[int]:
    """``num_nodes`` distinct node ids as Flower draws them (random unsigned 64-bit integers,
    never 0 or the SuperLink's), from ``seed`` so that a run repeats."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < num_nodes:
        candidate = rng.getrandbits(64)
        if candidate not in _RESERVED_NODE_IDS and candidate not in ids:
            ids.append(candidate)
    return ids


def _encode(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def _decode(payload: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(payload))


def _expired(metadata: Metadata, at: float) -> bool:
    """Flower's link state's rule (``message_ttl_has_expired``)."""
    return metadata.ttl + metadata.created_at < at


def _unavailable(message_id: str, run_id: int, instruction: Metadata | None = None) -> Message:
    """The error reply Flower's link state gives for an instruction that is unknown or expired
    (``instruction`` None) or whose reply expired. Its module is imported only here: it loads
    the whole link state (seconds), and a run whose messages keep Flower's 12 h TTL never
    needs it."""
    # lazy: this module loads Flower's whole link state (seconds), needed only for expired messages
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_ins_message,
        create_message_error_unavailable_res_message,
    )

    if instruction is None:
        return create_message_error_unavailable_ins_message(message_id, run_id)
    return create_message_error_unavailable_res_message(instruction, "msg_unavail")


def _copy_context(context: Context) -> Context:
    """The context as a SuperNode hands it to its ClientApp process: through the serde."""
    return context_from_proto(context_to_proto(context))


@dataclass
class _Node:
    """A SuperNode: its id, its node config and its Context per run (kept across rounds)."""

    node_id: int
    node_config: UserConfig
    contexts: dict[int, Context]
    initial_run_config: dict[int, UserConfig]
    lock: threading.Lock


@dataclass
class _Pending:
    """An instruction the server pushed: its metadata and, once the node answered, the reply
    as it came over the wire."""

    metadata: Metadata
    reply: bytes | None = None


class _Workers:
    """At most ``size`` daemon threads running jobs in the order they came. Daemon threads,
    because a ClientApp that hangs (the ``silent`` fault sleeps past the round timeout) must
    keep neither the next run nor the process waiting; a pool per grid, so that a hung
    client holds a worker of its own run only."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException:  # noqa: BLE001 - a worker outlives any one job
                log(ERROR, "in-process engine: a worker job failed:\n%s", traceback.format_exc())

    def shutdown(self) -> None:
        """Let each thread end after the job it is running (queued jobs are the caller's)."""
        for _ in self._threads:
            self._jobs.put(None)


class InProcessGrid(Grid):
    """A Flower Grid whose ``num_nodes`` SuperNodes run ``client_app`` in threads of this
    process (see the module docstring). ``seed`` draws the node ids; at most ``max_workers``
    ClientApps run at once (default: one per node, at most one per core). ``run_config`` is
    the run config the nodes' contexts get (as ``flwr run`` fuses it for every app of a run);
    none, as under :func:`flwr.simulation.run_simulation`, gives ``{}``.

    :meth:`close` (or leaving a ``with`` block) stops the workers: messages not yet delivered
    are dropped, and a ClientApp still running is left to finish on its own."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: Mapping[str, UserConfigValue] | None = None,
        seed: int = 0,
        max_workers: int | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        workers = max_workers if max_workers is not None else min(num_nodes, os.cpu_count() or 1)
        if workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._client_app = client_app
        self._run_config: UserConfig = dict(run_config or {})
        user_config_to_proto(self._run_config)  # a value the wire cannot carry fails here, not in a client
        self._nodes = {
            nid: _Node(nid, {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes}, {}, {}, threading.Lock())
            for i, nid in enumerate(node_ids(num_nodes, seed))
        }
        self._run: Run | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._replies = 0  # replies stored so far: send_and_receive waits for it to change
        self._closed = False
        self._workers = _Workers(workers, name="fl-sim-node")

    # ---- the run ------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        """Set the run, and give every node a fresh Context for it (as a SuperNode registers
        one when it first sees a run)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        for node in self._nodes.values():
            with node.lock:
                if run.run_id not in node.contexts:
                    node.initial_run_config[run.run_id] = dict(self._run_config)
                    node.contexts[run.run_id] = Context(
                        run_id=run.run_id,
                        node_id=node.node_id,
                        node_config=dict(node.node_config),
                        state=RecordDict(),
                        run_config=dict(self._run_config),
                    )
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("InProcessGrid: set_run was not called")
        return Run(**vars(self._run))

    def node_context(self, node_id: int) -> Context:
        """A copy of the Context node ``node_id`` keeps for the current run (for tests)."""
        node = self._nodes[node_id]
        with node.lock:
            return _copy_context(node.contexts[self.run.run_id])

    # ---- nodes --------------------------------------------------------------------------

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=nid, status=NodeStatus.ONLINE) for nid in self._nodes]

    # ---- messages -----------------------------------------------------------------------

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Stamp each message as a SuperLink does (a new message id, the run, the SuperLink as
        source), check it with Flower's validator, and queue its serialised form for its node.
        A message Flower would refuse is logged and left out of the returned ids."""
        run = self.run
        ids: list[str] = []
        for msg in messages:
            meta = msg.metadata
            meta.__dict__["_message_id"] = str(uuid4())
            meta.__dict__["_run_id"] = run.run_id
            meta.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {msg}")  # as InMemoryGrid._check_message
            errors = validate_message(msg, is_reply_message=False)
            node = self._nodes.get(meta.dst_node_id)
            if errors or node is None:
                log(
                    ERROR,
                    "in-process engine: message not pushed: %s",
                    errors or f"invalid destination node ID {meta.dst_node_id}",
                )
                continue
            payload = _encode(msg)
            with self._lock:
                self._pending[meta.message_id] = _Pending(copy.deepcopy(meta))
            self._workers.submit(lambda p=payload, n=node, m=meta.message_id: self._deliver(m, p, n))
            ids.append(meta.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived for ``message_ids``, each once (then the instruction is
        forgotten); as Flower's link state, an error reply for an id that is unknown or whose
        TTL ran out, and a ``REPLY_MESSAGE_UNAVAILABLE`` error for a reply whose TTL ran out."""
        run_id = self.run.run_id
        current = now()
        found: list[tuple[Metadata, bytes]] = []
        out: list[Message] = []
        with self._lock:
            for mid in set(message_ids):
                pending = self._pending.get(mid)
                if pending is None or (pending.reply is None and _expired(pending.metadata, current.timestamp())):
                    self._pending.pop(mid, None)
                    out.append(_unavailable(mid, run_id))
                elif pending.reply is not None:
                    del self._pending[mid]
                    found.append((pending.metadata, pending.reply))
        for ins_metadata, payload in found:  # decoded outside the lock: the server's own copy
            reply = _decode(payload)
            if _expired(reply.metadata, current.timestamp()):
                reply = _unavailable(ins_metadata.message_id, run_id, ins_metadata)
            reply.metadata.delivered_at = current.isoformat()
            out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and collect their replies until all came or ``timeout`` seconds
        passed (``None``: no limit), as ``InMemoryGrid`` does, but woken by each reply
        instead of polling."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            with self._lock:
                seen = self._replies
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            remaining = None if end is None else end - time.monotonic()
            if not pending or (remaining is not None and remaining <= 0):
                break
            with self._arrived:
                self._arrived.wait_for(lambda before=seen: self._replies != before, timeout=remaining)
        return replies

    # ---- the nodes' side ----------------------------------------------------------------

    def _deliver(self, message_id: str, payload: bytes, node: _Node) -> None:
        """Run the ClientApp on one message, in a worker thread, as Flower's simulation
        backend does: the node's Context in (a copy) and out, an exception as an error reply."""
        with self._lock:
            if self._closed or message_id not in self._pending:
                return
        msg = _decode(payload)
        msg.metadata.delivered_at = now().isoformat()
        run_id = msg.metadata.run_id
        try:
            with node.lock:
                context = _copy_context(node.contexts[run_id])
            try:
                reply = self._client_app(message=msg, context=context)
            except Exception as ex:  # noqa: BLE001 - as Flower's Ray actor wraps it
                raise ClientAppException(str(ex)) from ex
            with node.lock:
                if context.run_config != node.initial_run_config[run_id]:
                    raise ValueError(
                        f"The `run_config` field of the `Context` object cannot be modified (run_id: {run_id})."
                    )
                node.contexts[run_id] = _copy_context(context)
        except Exception as ex:  # noqa: BLE001 - reported to the server as an error reply, as under Ray
            log(ERROR, ex)
            log(ERROR, traceback.format_exc())
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION if isinstance(ex, ClientAppException) else ErrorCode.UNKNOWN
            reply = Message(Error(code=code, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self._store_reply(message_id, reply)

    def _store_reply(self, message_id: str, reply: Message) -> None:
        """Keep ``reply`` for the server, if Flower's link state would: a valid reply, to the
        instruction it names, from the node it was sent to, within the instruction's TTL."""
        errors = validate_message(reply, is_reply_message=True)
        meta = reply.metadata
        with self._lock:
            pending = self._pending.get(message_id)
            if pending is None:  # forgotten (expired) while the client worked: nobody waits for it
                return
            ins = pending.metadata
            max_ttl = ins.created_at + ins.ttl - meta.created_at
            if meta.reply_to_message_id != message_id or meta.src_node_id != ins.dst_node_id:
                errors.append(f"the reply does not answer message {message_id} of node {ins.dst_node_id}")
            elif meta.ttl - max_ttl > MESSAGE_TTL_TOLERANCE:
                errors.append(f"the reply's TTL {meta.ttl:.2f} exceeds the allowed {max_ttl:.2f}")
            if errors:
                log(ERROR, "in-process engine: reply not stored: %s", errors)
                return
            pending.reply = _encode(reply)
            self._replies += 1
            self._arrived.notify_all()

    # ---- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Deliver nothing more: queued messages are dropped, running ClientApps finish alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._workers.shutdown()

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _process_state_restored(verbose: bool) -> Iterator[None]:
    """Within the block, Flower's console logs at DEBUG when ``verbose`` (as ``run_simulation``
    sets them); after it, torch's thread count, Flower's task identity and its console
    handlers are as they were.

    The thread count: the ClientApps call ``torch.set_num_threads(1)`` in the workers. With
    torch's OpenMP backend that sets the calling thread's count and also the count every
    thread started later begins with, so the caller's own count looks untouched while the
    next threads (the next run's, an attack pool's) would start with 1: setting the caller's
    count again puts both back."""
    threads = torch.get_num_threads()
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # pylint: disable=W0212
    consoles = [
        (h, h.level, h.timestamps, h.colored)
        for h in logging.getLogger("flwr").handlers
        if isinstance(h, ConsoleHandler)
    ]
    if verbose:
        update_console_handler(level=DEBUG, timestamps=True, colored=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # even when this thread still has it: see the docstring
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity  # pylint: disable=W0212
        for handler, level, timestamps, colored in consoles:
            handler.setLevel(level)
            handler.timestamps, handler.colored = timestamps, colored


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    *,
    run_config: Mapping[str, UserConfigValue] | None = None,
    verbose: bool = False,
    seed: int = 0,
    max_workers: int | None = None,
) -> Context:
    """Run ``server_app`` against ``num_supernodes`` nodes running ``client_app``, all in this
    process, and return the server's Context after the run.

    As :func:`flwr.simulation.run_simulation` does: a new run (an empty ``Run``: no FAB, so
    the run config is ``run_config`` or, as there, empty, for the server and for every
    node), Flower's task identity set to the SuperLink, and the ServerApp called through
    Flower's ``run_serverapp.run``; an exception raised by its main reaches the caller as it
    was raised. ``seed`` draws the run and node ids; ``max_workers`` as
    :class:`InProcessGrid`. What the run changed of the process is put back (see
    :func:`_process_state_restored`)."""
    rng = random.Random(f"fl_sim.engine.run:{seed}")
    run = Run.create_empty(run_id=rng.getrandbits(64) or 1)
    run.primary_task_id = rng.getrandbits(64) or 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config or {})
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {})
    )
    with _process_state_restored(verbose):
        grid = InProcessGrid(client_app, num_supernodes, run_config=run_config, seed=seed, max_workers=max_workers)
        with grid:
            grid.set_run(run)
            TaskIdentity.task_id = 1  # as run_simulation: the messages the ServerApp makes come from the SuperLink
            TaskIdentity.run_id = run.run_id
            TaskIdentity.node_id = SUPERLINK_NODE_ID
            log(DEBUG, "in-process engine: run %s with %s nodes", run.run_id, num_supernodes)
            return run_server_app(grid=grid, context=context, server_app_dir="", loaded_server_app=server_app)
