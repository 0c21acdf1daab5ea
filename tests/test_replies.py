"""The server's checks of a client's reply, on real Flower messages (no runtime needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.mods.faults import spoil
from fl_sim.replies import ReplySpec, check_reply
from fl_sim.strategy import FedSGD, RoundFailed, ScreeningStrategy


@pytest.fixture(autouse=True)
def task_identity():
    """Flower messages need a task identity (a runtime sets it); restore whatever was there."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


SENT = ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(3)})


def _reply(node: int, arrays: dict | None = None, **metrics) -> Message:
    ask = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    arrays = arrays if arrays is not None else {"w": torch.ones(3, 2), "b": torch.ones(3)}
    return Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": 2, "partition-id": node, **metrics}),
            }
        ),
        reply_to=ask,
    )


def _error(node: int) -> Message:
    ask = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="ValueError: the client broke"), reply_to=ask)


SPEC = ReplySpec.like(SENT, max_examples=4, num_partitions=3)


@pytest.mark.parametrize(
    "arrays,metrics,verdict",
    [
        (None, {}, None),
        ({"w": torch.full((3, 2), math.nan), "b": torch.ones(3)}, {}, ("invalid", "array 'w' holds 6 NaN or Inf")),
        (
            {"w": torch.ones(3, 2), "b": torch.tensor([1.0, math.inf, 0.0])},
            {},
            ("invalid", "array 'b' holds 1 NaN or Inf"),
        ),
        ({"w": torch.ones(2, 2), "b": torch.ones(3)}, {}, ("invalid", "array 'w' has shape (2, 2), expected (3, 2)")),
        (
            {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(3)},
            {},
            ("invalid", "has dtype float64, expected float32"),
        ),
        ({"w": torch.ones(3, 2)}, {}, ("invalid", "missing b")),
        ({"w": torch.ones(3, 2), "b": torch.ones(3), "x": torch.ones(1)}, {}, ("invalid", "unexpected x")),
        (None, {"num-examples": -5}, ("invalid", "num-examples must be a positive integer, got -5")),
        (None, {"num-examples": 0}, ("invalid", "num-examples must be a positive integer")),
        (None, {"num-examples": 2.5}, ("invalid", "num-examples must be a positive integer")),
        (None, {"num-examples": 10**9}, ("invalid", "exceeds the 4 a client may use")),
        (None, {"partition-id": 7}, ("invalid", "partition-id must be one of 0..2, got 7")),
    ],
)
def test_check_reply(arrays, metrics, verdict):
    got = check_reply(_reply(1, arrays, **metrics), SPEC)
    if verdict is None:
        assert got is None
    else:
        assert got[0] == verdict[0] and verdict[1] in got[1], got


def test_an_error_reply_is_an_error_with_its_reason():
    status, reason = check_reply(_error(2), SPEC)
    assert status == "error" and "the client broke" in reason


def _strategy(dropped):
    honest = FedSGD(
        server_lr=0.5,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    s = ScreeningStrategy(
        honest, honest, reply_names=["w", "b"], max_examples=4, num_partitions=3, on_dropped=dropped.append
    )
    # what configure_train records: round, weights, nodes sent to (and FedSGD the global model)
    s._sent, honest._global = (1, SENT, [0, 1, 2]), (1, SENT)
    return s


def test_bad_replies_are_dropped_and_the_rest_aggregated():
    dropped = []
    s = _strategy(dropped)
    nan = {"w": torch.full((3, 2), math.nan), "b": torch.ones(3)}
    arrays, _ = s.aggregate_train(
        1, [_reply(0, {"w": torch.full((3, 2), 2.0), "b": torch.full((3,), 2.0)}), _reply(1, nan)]
    )  # node 2 never answers
    assert [(d.node_id, d.partition_id, d.status) for d in dropped] == [(1, 1, "invalid"), (2, -1, "missing")]
    new = arrays.to_torch_state_dict()
    # the valid reply alone moved the model: w = 0 - 0.5 * 2
    assert torch.equal(new["w"], torch.full((3, 2), -1.0)) and torch.isfinite(new["b"]).all()
    assert s.last_screened.server_round == 1 and len(s.last_screened.accepted) == 1


def test_a_round_with_no_valid_reply_fails_and_names_the_first_reason():
    s = _strategy([])
    with pytest.raises(RoundFailed, match=r"round 1: no reply could be aggregated \(3 dropped\).*the client broke"):
        s.aggregate_train(1, [_error(0), _error(1), _error(2)])


@pytest.mark.parametrize("kind", ["nan", "inf", "shape"])
def test_every_fault_is_caught_by_the_check(kind):
    arrays = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    spoilt = spoil([a.numpy() for a in arrays.values()], kind, round_timeout=1.0)
    reply = _reply(1, {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in zip(arrays, spoilt)})
    assert check_reply(reply, SPEC)[0] == "invalid"


def test_a_simulated_clients_traceback_is_summed_up_by_its_own_exception():
    from fl_sim.replies import error_summary

    ray_style = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
        "(pid=1)\n  File \"fl_sim/task.py\", line 3, in f\n    raise ValueError('bad partition')\n"
        "ValueError: bad partition\n\nThe above exception was the direct cause of the following exception:\n"
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: bad "
        "partition'>"
    )
    assert error_summary(ray_style) == "bad partition"
    assert (
        error_summary("Traceback ...\n  File x\nfl_sim.mods.faults.InjectedFault: it broke")
        == "InjectedFault: it broke"
    )
    assert error_summary("plain words") == "plain words"
