"""FedSGD and FedAvg under secure aggregation (Flower's SecAgg+): the server sees only the aggregate.

What the server sees
    With SecAgg+ every client masks its (quantised) gradient with pairwise masks, agreed with
    its neighbours by Diffie-Hellman, plus a private mask; the masks cancel only in the sum
    over clients, and the server learns the masks of a client that drops out only from
    ``reconstruction_threshold`` of its neighbours' Shamir shares. So the server (and any
    strategy it runs) never holds an individual gradient: ``aggregate_fit`` receives one
    ``(ClientProxy, FitRes)`` per contributing client, but every ``FitRes.parameters`` is the
    *same* aggregate, already the example-weighted mean of the clients' vectors (SecAgg+
    uploads ``[n_i / max_weight, n_i / max_weight * vector_i]`` and divides the sums). What
    stays in the clear per client: its node id, its ``num_examples`` and its metrics. The
    clients here put only their ``partition-id`` in the metrics (the server knows whom it
    sampled anyway, and cannot tie a gradient to any of them); the training loss travels
    inside the masked vector, as one extra trailing array, so the server gets the mean loss
    only. A gradient-inversion attacker at the server is left with the round's aggregate:
    ``RoundAggregate(before, after)`` with ``(before - after) / server_lr`` = the mean gradient.

Why the legacy path
    In flwr 1.42 SecAgg+ exists only on the legacy path: ``DefaultWorkflow(fit_workflow=
    SecAggPlusWorkflow(...))`` driven by a ``LegacyContext`` that holds a legacy
    ``flwr.server.strategy.FedAvg``, with ``secaggplus_mod`` on a ``NumPyClient``-based
    ``ClientApp``. There is no SecAgg+ for the Message-API strategies (``aggregate_train``)
    that ``fl_sim.server_app`` / ``fl_sim.client_app`` use, so this module mirrors those apps
    (same data, batches, model, local training and run folder) on the legacy API.

Quantisation and clipping caveat
    SecAgg+ works on integers modulo ``modulus_range`` (2**32): each client multiplies its
    vector by ``n_i / max_weight``, clips every entry to ``[-clipping_range, clipping_range]``
    and stochastically rounds it onto ``quantization_range`` levels. So (a) gradient entries
    beyond the clipping range are silently clipped, which changes the FedSGD step; (b) the
    aggregate carries rounding noise of up to ``2 * clipping_range / quantization_range`` per
    entry (divided by the total weight); (c) ``max_weight`` must bound ``num_examples``,
    otherwise values overflow. Flower's defaults (``max_weight=1000``, clip 8, 2**22 levels)
    are poor for FedSGD: a batch of 2 is scaled by 0.002 before quantising, which costs a
    factor 500 in precision. :func:`secagg_settings` therefore sets ``max_weight`` to the batch
    size, a clipping range of 8 (measured: max |gradient entry| on mnist5k at initialisation
    is 2.0 for cnn6/kaiming at B=1, 0.76 at B=8; lenet 0.96-1.2 at B=1, 0.46-0.71 at B=8;
    cnn6 with torch/paper init about 0.01), and as many quantisation levels as the modulus
    allows for the number of clients (2**28 for up to 15 clients, so the step is 6e-8). Clients
    send float64 arrays: SecAgg+ quantises in the arrays' own dtype, and float32 cannot resolve
    2**28 levels (it cost 4e-7). Measured (4 clients, batch 2, cnn6): the aggregate handed to
    ``aggregate_fit`` is within 5e-8 of the true mean gradient; ``(before - after) / server_lr``
    within 6e-7 (float32 weights).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Context,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .data import load_dataset
from .device import resolve_device
from .intercepting_strategy import RoundAggregate
from .models import build_model
from .mods.audit import Audit, node_memory, refusal_of, refusal_reason, remember, write_audit_row
from .mods.defences import defend_update
from .mods.faults import spoil
from .replies import DroppedReply, error_summary
from .server_app import FederationLog, StoppableGrid
from .simulation import run_apps
from .strategy import ModelSwap, RoundFailed, swapped_model
from .task import (
    client_indices,
    client_round,
    evaluate,
    model_with,
    node_partition,
    parameter_names,
)

__all__ = [
    "SecAggSettings",
    "secagg_settings",
    "SecAggClient",
    "client_app",
    "make_secagg_client_app",
    "SecAggStrategy",
    "make_secagg_server_app",
    "serve_secagg",
    "simulate_secagg",
    "LOSS_MAX",
]

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32  # Flower's default (and maximum) mask modulus
MAX_QUANT_BITS = 28  # quantised entries pass through int32 on the client; stay well below 2**31
LOSS_MAX = 64.0  # training losses above this are clipped in the securely aggregated mean loss
LOSS_SCALE_KEY = "secagg-loss-scale"  # fit-config key: the client sends loss * this


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run (see :func:`secagg_settings`)."""

    num_shares: int | float
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    modulus_range: int = MODULUS_RANGE

    @property
    def loss_scale(self) -> float:
        """Clients send ``loss * loss_scale``, so losses up to ``LOSS_MAX`` escape clipping."""
        return self.clipping_range / LOSS_MAX

    def workflow_kwargs(self) -> dict[str, Any]:
        return dict(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
        )


def _num_sampled(cfg: RunConfig) -> int:
    """Clients the legacy FedAvg samples per round when all ``cfg.num_clients`` are up."""
    return max(int(cfg.num_clients * cfg.fraction_train), 2, min(cfg.min_clients, cfg.num_clients))


def secagg_settings(cfg: RunConfig, *, clipping_range: float = 8.0, max_examples: int | None = None) -> SecAggSettings:
    """SecAgg+ parameters for ``cfg``, from the number ``n`` of clients sampled per round.

    - shares: every sampled client for n <= 3; otherwise an odd number (SecAgg+ wants odd),
      about 2 log2(n) + 1 and at most n - 1 (n=4: 3, n=10: 9, n=100: 15);
    - threshold: about 2/3 of the shares, at least 2 (3 shares: 2, so a client's masks survive
      one neighbour dropping out; 5: 4; 9: 6);
    - ``max_weight`` = batch size, so SecAgg+'s weight ratio ``num_examples / max_weight`` is 1
      for a full FedSGD batch and costs no precision; under FedAvg a client's ``num_examples``
      is its partition, so ``max_examples`` (the largest partition) is needed instead;
    - quantisation: the most levels (a power of 2, at most 2**28) such that n clients' sums
      cannot wrap around the 2**32 modulus: ``n * levels < 2**32``.
    """
    n = _num_sampled(cfg)
    if cfg.mode == "fedavg" and max_examples is None:
        raise ValueError("SecAgg+ under FedAvg needs max_examples, the largest partition (each client's weight)")
    if n < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients per round, got {n}")
    if n == 2:
        shares: int | float = 1.0  # Flower: a float is a share of the sampled clients (here: both)
    elif n == 3:
        shares = 3
    else:
        odd_below_n = n - 1 if (n - 1) % 2 else n - 2
        shares = min(odd_below_n, max(3, 2 * math.ceil(math.log2(n)) + 1))
    k = shares if isinstance(shares, int) else n
    threshold = max(2, math.ceil(2 * k / 3))
    if isinstance(shares, int) and threshold >= shares:
        threshold = shares - 1
    bits = min(MAX_QUANT_BITS, int(math.floor(math.log2(MODULUS_RANGE / (n + 1)))))
    return SecAggSettings(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=float(clipping_range),
        quantization_range=2**bits,
        max_weight=float(cfg.batch_size if cfg.mode == "fedsgd" else max_examples),
    )


# --------------------------------------------------------------------------------------------
# Client


class SecAggClient(NumPyClient):
    """The client for the legacy path: replies with one batch's gradient (FedSGD) or its
    weight delta after the round's local steps (FedAvg).

    ``fit`` returns the update (numpy, in ``model.state_dict()`` order, zeros for entries
    that are not parameters) followed by one array ``[loss * loss_scale]``, ``num_examples`` =
    batch size (FedSGD) or partition size (FedAvg), and metrics holding only the partition
    id. ``secaggplus_mod`` masks everything in the parameters before it leaves. A client named
    in ``faulty-clients`` spoils its arrays before masking (:func:`fl_sim.mods.faults.spoil`),
    as the Message-API client does.
    """

    def __init__(self, node_config, auditor=None, context: Context | None = None, build=model_with) -> None:
        self.node_config = dict(node_config)
        self.auditor = auditor  # fl_sim.mods.audit.Auditor: the clients' leakage audit, before masking
        self.node_context = context
        self.build = build  # (cfg, arrays in state_dict order) -> (dataset, model); see make_secagg_client_app

    def _model(self, parameters: NDArrays, config: dict[str, Scalar]):
        torch.set_num_threads(1)  # simulated clients share the machine's cores
        cfg = RunConfig.from_mapping(dict(config))
        pid = node_partition(cfg, self.node_config)
        data, model = self.build(cfg, [torch.as_tensor(np.asarray(a)) for a in parameters])
        return cfg, pid, data, model.to(resolve_device(cfg.device))  # this node's own answer to the run's device

    def _audit(self, parameters: NDArrays, config: dict[str, Scalar]):
        """The clients' leakage audit of this round (None when the run has none for this client)."""

        cfg = RunConfig.from_mapping(dict(config))
        pid = node_partition(cfg, self.node_config)
        policy = cfg.audit_policy
        if policy is None or not policy.audits(pid):
            return None
        if self.auditor is None:
            raise ValueError("this SecAgg+ ClientApp has no leakage audit: run experiments.apps.client_app:secagg_app")
        audit = Audit(
            self.auditor,
            cfg,
            pid,
            int(config["server-round"]),
            node_memory(self.node_context) if self.node_context is not None else {},
        )
        keys = list(audit.own.state_dict())
        if len(keys) != len(parameters):
            sent = {f"array-{i}": torch.as_tensor(np.asarray(a)) for i, a in enumerate(parameters)}
        else:
            sent = {k: torch.as_tensor(np.asarray(a)) for k, a in zip(keys, parameters)}
        return audit, audit.check_model(sent)

    def _record(self, audit, outcome) -> None:
        """SecAgg+ hides each client's reply from the server, so the client writes its own
        audit.csv row (into the run's folder) and keeps it in its context."""

        node = int(self.node_context.node_id) if self.node_context is not None else ""
        if self.node_context is not None:
            remember(self.node_context, audit.server_round, audit)
        if audit.cfg.out_dir:
            write_audit_row(
                Path(audit.cfg.out_dir) / "audit.csv", {**outcome.row, "round": audit.server_round, "node_id": node}
            )

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        audited = self._audit(parameters, config)
        if audited is not None and audited[1] is not None:
            self._record(audited[0], audited[1])
            raise RuntimeError(refusal_reason(audited[1]))  # never train on a model built to extract data
        start = time.perf_counter()
        cfg, pid, data, model = self._model(parameters, config)
        server_round = int(config["server-round"])
        sent = [p.detach().clone() for p in model.parameters()]
        done = client_round(cfg, pid, server_round, data, model)
        # FedAvg: the weight delta after the local steps is what gets masked
        grads = (
            done.gradients if done.gradients is not None else [p.detach() - s for p, s in zip(model.parameters(), sent)]
        )
        grads = [g.cpu() for g in grads]  # the defences, the audit and the masking work on the CPU
        loss, examples = done.loss, done.num_examples
        # the client's own update defences (pruning, noise) before masking, as the plain client's mod
        by_name = defend_update(
            dict(zip(parameter_names(model), grads)),
            cfg.defence_list,
            seed=cfg.seed,
            partition_id=pid,
            server_round=server_round,
        )
        if audited is not None:  # the audit sees the update the defences made, before masking
            audit = audited[0]
            outcome = audit.check_update(by_name, time.perf_counter() - start)
            self._record(audit, outcome)
            if outcome.action == "refused":
                raise RuntimeError(refusal_reason(outcome))
            if outcome.update is not None:
                by_name = {**by_name, **outcome.update}
        arrays = [
            # float64: SecAgg+ quantises in the arrays' dtype, and float32 cannot resolve 2**28 levels
            (by_name[k] if k in by_name else torch.zeros_like(v)).detach().cpu().double().numpy()
            for k, v in model.state_dict().items()
        ]
        arrays.append(np.array([loss * float(config[LOSS_SCALE_KEY])], dtype=np.float64))
        if pid in cfg.faults:
            arrays = spoil(arrays, cfg.faults[pid], cfg.round_timeout)
        return arrays, examples, {"partition-id": pid}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Federated evaluation on the node's share of the test split (as ``fl_sim.client_app``)."""
        cfg, pid, data, model = self._model(parameters, config)
        share = torch.arange(pid, len(data.test_y), cfg.num_clients)
        loss, acc = evaluate(model, data.test_x[share], data.test_y[share])
        return float(loss), len(share), {"eval_acc": float(acc)}


def make_secagg_client_app(auditor=None, build=model_with) -> ClientApp:
    """The SecAgg+ ClientApp; ``auditor`` (:class:`fl_sim.mods.audit.Auditor`) for the clients'
    leakage audit, which runs inside ``fit`` on the update before ``secaggplus_mod`` masks it;
    ``build(cfg, arrays) -> (dataset, model)`` makes the model of the arrays received, in
    ``state_dict()`` order (:func:`fl_sim.task.model_with`: the run config's model)."""

    def client_fn(context: Context):
        return SecAggClient(context.node_config, auditor, context, build).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


client_app = make_secagg_client_app()


# --------------------------------------------------------------------------------------------
# Server


def _state_dict(names: list[str], arrays: NDArrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(names, arrays)}


class SecAggStrategy(FedAvg):
    """Legacy FedAvg for SecAgg+: ``aggregate_fit`` gets the aggregate mean update (every
    result carries the same one) and takes the step ``new = old - server_lr * mean_gradient``
    (FedSGD) or ``new = old + mean_delta`` (FedAvg).

    What the server can check here is the aggregate only: its arrays must match the model's
    names and shapes and be finite, and every result must carry the same one (individual
    vectors mean the clients are not masking: this strategy refuses to average them, since it
    exists to show what SecAgg+ hides). A client that sent NaN or a wrong shape spoils the sum,
    and SecAgg+ hides which client did; a NaN may even turn into finite garbage in the
    clients' quantisation, which no check of the sum can see. A bad aggregate is dropped
    (logged, and recorded through ``on_dropped`` as one row with node -1) and the model
    stays as it was.

    ``on_aggregate`` gets a :class:`RoundAggregate` per round; its contributors are the
    clients whose masked vectors went into the sum (from their clear-text metrics and
    ``num_examples``, sorted: the server cannot attribute any part of the aggregate to one of
    them). ``round_offset`` continues the numbering of a resumed run. A hook that raises is
    logged and ignored.
    """

    def __init__(
        self,
        *,
        server_lr: float,
        param_names: list[str],
        mode: str = "fedsgd",
        loss_scale: float,
        on_aggregate: Callable[[RoundAggregate], None] | None = None,
        on_dropped: Callable[[DroppedReply], None] | None = None,
        round_offset: int = 0,
        initial: NDArrays,
        replace_model: ModelSwap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(initial_parameters=ndarrays_to_parameters(initial), **kwargs)
        self.server_lr = server_lr
        self.mode = mode
        self.param_names = list(param_names)
        self.loss_scale = loss_scale
        self.on_aggregate = on_aggregate
        self.on_dropped = on_dropped
        self.round_offset = round_offset
        self.train_history: dict[int, dict[str, float]] = {}
        self.round_counts: dict[int, tuple[int, int]] = {}  # round -> (aggregated, dropped)
        self.current: NDArrays = [np.asarray(a) for a in initial]  # the latest global weights
        self._before: dict[int, NDArrays] = {}
        self.replace_model = replace_model
        self._honest: dict[int, NDArrays] = {}  # a replaced round's honest global weights
        self._names: dict[int, list[str]] = {}  # a replaced round's entries (a model of its own may have others)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        honest = parameters_to_ndarrays(parameters)
        swapped = swapped_model(self.replace_model, server_round, _state_dict(self.param_names, honest))
        self._honest, self._names = {}, {}
        if swapped is not None:
            self._honest = {server_round: honest}
            self._names = {server_round: list(swapped)}
            parameters = ndarrays_to_parameters([v.cpu().numpy() for v in swapped.values()])
        self._before = {server_round: parameters_to_ndarrays(parameters)}
        return super().configure_fit(server_round, parameters, client_manager)

    def evaluate(self, server_round: int, parameters: Parameters):
        return super().evaluate(server_round + self.round_offset if server_round else 0, parameters)

    def _drop(self, server_round: int, status: str, reason: str) -> None:
        log.warning("round %s: %s", server_round, reason)
        if self.on_dropped is not None:
            try:
                self.on_dropped(DroppedReply(server_round, -1, -1, status, reason))  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001
                log.exception("on_dropped hook failed")

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset

        # SecAgg+ may list one failure twice; record each once, in one line.
        seen: dict[str, str] = {}
        for f in failures:
            text = str(getattr(f, "reason", None) or f).strip() or repr(f)
            summary = error_summary(text).replace("\\'", "'")  # Ray's repr escapes the quotes
            refused = refusal_of(summary)
            if refused is not None:
                seen.setdefault(f"refused:{refused[0]}", "refused")
            else:
                seen.setdefault(summary, "missing")
        for reason, status in seen.items():
            if status == "refused":
                self._drop(
                    server_round,
                    "refused",
                    f"the client's leakage audit refused to send it: {reason.split(':', 1)[1][:300]}",
                )
            else:
                self._drop(server_round, "missing", f"a client failed or dropped out under SecAgg+: {reason[:300]}")
        self.round_counts[server_round] = (len(results), len(seen))
        before = self._before.pop(server_round, None)
        if not results or before is None:
            raise RoundFailed(f"round {server_round}: nothing to aggregate under SecAgg+ ({len(results)} results)")
        vectors = [parameters_to_ndarrays(res.parameters) for _, res in results]
        first = vectors[0]
        if not all(len(v) == len(first) and all(np.array_equal(a, b) for a, b in zip(v, first)) for v in vectors[1:]):
            self._drop(
                server_round,
                "invalid",
                "results differ, so the clients are not masking (not under SecAgg+): "
                "refusing to average individual updates; the model stays",
            )
            return None, {}
        shapes_ok = len(first) == len(before) + 1 and all(np.shape(g) == np.shape(w) for g, w in zip(first, before))
        if not shapes_ok or not all(np.isfinite(a).all() for a in first):
            why = "its arrays do not match the model" if not shapes_ok else "it is not finite"
            self._drop(
                server_round,
                "invalid",
                f"the SecAgg+ aggregate is unusable ({why}): a client sent a bad "
                "update and SecAgg+ hides which; the model stays",
            )
            return None, {}
        mean, loss = first[:-1], float(np.asarray(first[-1]).reshape(-1)[0]) / self.loss_scale
        # FedSGD: a step along the mean gradient; FedAvg: the mean weight delta, which is
        # FedAvg's example-weighted mean of the clients' weights
        step = -self.server_lr if self.mode == "fedsgd" else 1.0
        after = [np.asarray(w + step * g).astype(w.dtype, copy=False) for w, g in zip(before, mean)]
        honest = self._honest.pop(server_round, None)
        names = self._names.pop(server_round, self.param_names)
        self.current = after if honest is None else honest  # a replaced round is not aggregated
        self.train_history[server_round] = {"train_loss": loss}
        if self.on_aggregate is not None:
            contributors = tuple(
                sorted((int(res.metrics.get("partition-id", -1)), int(res.num_examples)) for _, res in results)
            )
            aggregate = RoundAggregate(
                server_round,
                _state_dict(names, before),
                _state_dict(names, after),
                contributors,
                replaced=honest is not None,
                update=_state_dict(names, mean) if honest is not None else None,
            )
            try:
                self.on_aggregate(aggregate)
            except Exception:  # noqa: BLE001 - a broken hook must not break training
                log.exception("on_aggregate hook failed on round %s; training goes on", server_round)
        return ndarrays_to_parameters(self.current), {"train_loss": loss}


class _LoggedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose failed round ends the run with the reason (:class:`RoundFailed`), as a
    round with no valid reply does on the plain path: a protocol error (e.g. a client's vector
    of the wrong shape breaks the masked sum), or a round halted with too few clients left for
    the threshold. The failure is recorded as a dropped row first. A stop request passes."""

    def __call__(self, grid: Grid, context: Context) -> None:  # type: ignore[override]
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        strategy = getattr(context, "strategy", None)
        own = isinstance(strategy, SecAggStrategy)
        server_round += strategy.round_offset if own else 0
        try:
            super().__call__(grid, context)
        except RoundFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "RunStopped":
                raise
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            log.debug("SecAgg+ failed in round %s", server_round, exc_info=True)
            if own:
                strategy._drop(server_round, "invalid", f"secure aggregation failed: {why}")
            raise RoundFailed(
                f"round {server_round}: secure aggregation failed ({why}); SecAgg+ does not say which client broke it"
            ) from None
        if own and server_round not in strategy.train_history:
            raise RoundFailed(
                f"round {server_round}: secure aggregation produced no usable aggregate (too many "
                "drop-outs for the threshold, or a bad update that SecAgg+ hides)"
            )


def serve_secagg(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    log_: FederationLog,
    *,
    on_aggregate: Callable[[RoundAggregate], None] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_dropped: Callable[[DroppedReply], None] | None = None,
    settings: SecAggSettings | None = None,
    replace_model: ModelSwap | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run ``cfg`` (FedSGD or FedAvg) with SecAgg+ on ``grid``, logged to ``log_`` (see
    :func:`make_secagg_server_app` for the hooks). Raises :class:`fl_sim.strategy.RoundFailed` when a round
    has nothing to aggregate and :class:`fl_sim.server_app.RunStopped` when ``stop`` is set."""
    cfg = cfg.validated()
    grid = StoppableGrid(grid, stop) if stop is not None else grid
    data = load_dataset(cfg.dataset, cfg.data_root)
    largest = max(len(client_indices(cfg, p, cfg.num_clients)) for p in range(cfg.num_clients))
    settings = settings or secagg_settings(cfg, max_examples=largest)
    model = build_model(cfg.model, data.input_shape, data.num_classes, init=cfg.init, seed=cfg.seed)
    done = max(log_.last_round, 0)
    checkpoint = log_.checkpoint()
    if checkpoint is not None:
        model.load_state_dict(checkpoint)
    if done >= cfg.num_server_rounds:
        return
    names = list(model.state_dict())
    initial = [v.detach().cpu().numpy() for v in model.state_dict().values()]
    strategy: SecAggStrategy | None = None

    def dropped(d: DroppedReply) -> None:
        log_.drop(d)
        if on_dropped:
            on_dropped(d)

    def central_evaluate(server_round: int, arrays: NDArrays, config: dict[str, Scalar]):
        state = _state_dict(names, arrays)
        model.load_state_dict(state)
        loss, acc = evaluate(model, data.test_x, data.test_y)
        if server_round > log_.last_round:  # round 0 of a resumed run was logged before
            history = strategy.train_history.get(server_round, {}) if server_round else {}
            counts = strategy.round_counts.get(server_round, ("", "")) if server_round else ("", "")
            row = log_.end_round(
                server_round,
                state,
                train_loss=history.get("train_loss", math.nan) if server_round else "",
                test_loss=loss,
                test_accuracy=acc,
                aggregated=counts[0],
                dropped=counts[1],
            )
            if on_round:
                on_round(row)
        return float(loss), {"test_loss": float(loss), "test_accuracy": float(acc)}

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {**cfg.to_flower(), "server-round": server_round, LOSS_SCALE_KEY: settings.loss_scale}

    def evaluate_config(server_round: int) -> dict[str, Scalar]:
        return {**cfg.to_flower(), "server-round": server_round}

    least = min(cfg.min_clients, cfg.num_clients)
    strategy = SecAggStrategy(
        server_lr=cfg.server_lr,
        param_names=names,
        mode=cfg.mode,
        loss_scale=settings.loss_scale,
        on_aggregate=on_aggregate,
        on_dropped=dropped,
        round_offset=done,
        initial=initial,
        replace_model=replace_model,
        fraction_fit=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_fit_clients=max(2, least),
        min_evaluate_clients=least,
        min_available_clients=max(2, least),
        evaluate_fn=central_evaluate,
        on_fit_config_fn=fit_config,
        on_evaluate_config_fn=evaluate_config,
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_server_rounds - done, round_timeout=cfg.round_timeout),
        strategy=strategy,
    )
    fit_workflow = _LoggedSecAggPlusWorkflow(**settings.workflow_kwargs(), timeout=cfg.round_timeout)
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)


def make_secagg_server_app(cfg: RunConfig, log_: FederationLog, **kwargs: Any) -> ServerApp:
    """A ServerApp running ``cfg`` (FedSGD or FedAvg) with SecAgg+ and central evaluation, logged to
    ``log_`` (a :class:`fl_sim.server_app.FederationLog`: rounds.csv, final_model.pt,
    dropped.csv; resumed after its last round when it was opened to resume). ``kwargs`` go to
    :func:`serve_secagg`: ``on_aggregate`` gets each round's :class:`RoundAggregate`,
    ``on_round`` each ``rounds.csv`` row, ``on_dropped`` each dropped row; ``settings``
    defaults to :func:`secagg_settings` (cfg); with ``stop`` set, the run raises
    :class:`fl_sim.server_app.RunStopped` at its next wait for replies."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_secagg(grid, context, cfg, log_, **kwargs)

    return server_app


def simulate_secagg(
    cfg: RunConfig,
    log_: FederationLog | None = None,
    *,
    verbose: bool = False,
    engine: str | None = None,
    **kwargs: Any,
) -> None:
    """Run ``cfg`` with SecAgg+, one SuperNode per client, on ``engine`` (Flower's simulation
    engine, Ray, with the same backend settings as :func:`fl_sim.simulation.simulate`, or in
    process: see :func:`fl_sim.simulation.run_apps`); ``kwargs`` go to
    :func:`make_secagg_server_app`. ``log_`` defaults to a new log in ``cfg.out_dir``."""
    log_ = log_ or FederationLog(cfg.out_dir, cfg.to_flower())
    run_apps(
        make_secagg_server_app(cfg, log_, **kwargs),
        client_app,
        cfg.num_clients,
        verbose=verbose,
        engine=engine,
        device=cfg.device,
    )
