"""Task-aware aggregation on hand-made arrays: exact weights, untouched untrained groups, every bad reply dropped."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from m3fm.weights.groups import parameter_group
from m3fm.weights.packing import pack_state, unpack_state
from server.strategy import build_strategy
from server.task_sum import task_aware_average

REF = {"shared": np.zeros(3, np.float32), "head:yes_no": np.zeros(2, np.float32),
       "head:lung_rads": np.full(2, 5.0, np.float32), "scale:lung": np.zeros(4, np.float32)}


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(node: int, arrays: dict | None, counts: dict, site: str | None = None, error: str | None = None):
    sent = Message(RecordDict(), dst_node_id=node, message_type="train.multitask")
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    if error:
        msg = Message(Error(code=0, reason=error), reply_to=sent)
    else:
        content = RecordDict({"site": ConfigRecord({"site_id": site or f"site-{node}", "skipped": ""}),
                              "metrics": MetricRecord({**{f"n.{g}": n for g, n in counts.items()}, "loss.x": 1.0})})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        msg = Message(content, reply_to=sent)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def strategy(name="fedavg", bound=100.0):
    s = build_strategy(name, {"shared", "head:yes_no", "head:lung_rads", "scale:lung"}, 1, bound)
    s.reference = {k: v.copy() for k, v in REF.items()}
    s.current_arrays = {k: v.copy() for k, v in REF.items()}  # what FedOpt's configure_train sets
    return s


def filled(**values):
    return {k: np.full_like(REF[k], values.get(k.replace(":", "_"), REF[k][0])) for k in REF}


def test_each_group_is_averaged_over_the_sites_that_trained_it_weighted_by_their_counts():
    a = filled(shared=1.0, head_yes_no=2.0, scale_lung=4.0)
    b = filled(shared=3.0, head_yes_no=6.0, scale_lung=9.0)
    out, contributors = task_aware_average(REF, [(a, {"shared": 10, "head:yes_no": 30, "scale:lung": 5}),
                                                 (b, {"shared": 30, "head:yes_no": 10})])
    np.testing.assert_allclose(out["shared"], 1.0 * 10 / 40 + 3.0 * 30 / 40)
    np.testing.assert_allclose(out["head:yes_no"], 2.0 * 30 / 40 + 6.0 * 10 / 40)
    np.testing.assert_allclose(out["scale:lung"], 4.0)  # only site a trained this scale; b's 9.0 is ignored
    np.testing.assert_array_equal(out["head:lung_rads"], REF["head:lung_rads"])  # nobody trained it
    assert contributors == {"shared": 2, "head:yes_no": 2, "scale:lung": 1, "head:lung_rads": 0}
    assert all(out[k].dtype == np.float32 for k in out)
    uniform, _ = task_aware_average(REF, [(a, {"shared": 10, "head:yes_no": 30, "scale:lung": 5}),
                                          (b, {"shared": 30, "head:yes_no": 10})], uniform=True)
    np.testing.assert_allclose(uniform["shared"], 2.0)  # central DP: each site once, whatever its count
    np.testing.assert_allclose(uniform["scale:lung"], 4.0)


def test_bad_replies_are_dropped_and_recorded_with_their_reason():
    good = filled(shared=1.0, head_yes_no=1.0)
    bad = {
        2: ({k: v for k, v in good.items() if k != "scale:lung"}, "missing ['scale:lung']"),
        3: ({**good, "head:extra": np.zeros(1, np.float32)}, "unexpected ['head:extra']"),
        4: ({**good, "shared": np.zeros(4, np.float32)}, "shape of shared"),
        5: ({**good, "shared": np.zeros(3, np.float64)}, "dtype of shared"),
        6: ({**good, "shared": np.array([0, np.nan, 0], np.float32)}, "non-finite values in shared"),
        7: ({**good, "shared": np.full(3, 1e3, np.float32)}, "exceeds the bound"),
    }
    replies = [reply(1, good, {"shared": 4, "head:yes_no": 4})]
    replies += [reply(n, arrays, {"shared": 4}) for n, (arrays, _) in bad.items()]
    replies.append(reply(8, good, {"shared": 4, "head:nonexistent": 2}))
    replies.append(reply(9, good, {"shared": 0}))
    replies.append(reply(10, None, {}, error="ValueError: site exploded"))
    s = strategy()
    arrays, metrics = s.aggregate_train(2, replies)
    reasons = {int(r["node_id"]): r["reason"] for r in s.outcome.rejections}
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8, 9, 10}
    for node, (_, why) in bad.items():
        assert why in reasons[node], (node, reasons[node])
    assert "unknown parameter groups ['head:nonexistent']" in reasons[8]
    assert "n.shared > 0" in reasons[9]
    assert "site exploded" in reasons[10] and s.outcome.rejections[-1]["site_id"] == "node-10"
    assert [a["site_id"] for a in s.outcome.accepted] == ["site-1"]
    np.testing.assert_allclose(arrays["shared"].numpy(), 1.0)  # the one good reply, nothing of the bad ones


def test_fedadam_moves_trained_groups_only_and_its_state_round_trips():
    s = strategy("fedadam")
    a = filled(shared=1.0, head_yes_no=1.0)
    arrays, _ = s.aggregate_train(1, [reply(1, a, {"shared": 3, "head:yes_no": 3})])
    out = {k: v.numpy() for k, v in arrays.items()}
    assert (out["shared"] > 0).all() and (out["head:yes_no"] > 0).all()  # a server Adam step toward the update
    assert all(out[k].dtype == REF[k].dtype for k in REF)  # Flower computes in float64; the model stays float32
    np.testing.assert_array_equal(out["head:lung_rads"], REF["head:lung_rads"])
    np.testing.assert_array_equal(out["scale:lung"], REF["scale:lung"])
    state = s.state()
    assert {"m_t/shared", "v_t/shared"} <= set(state)
    t = strategy("fedadam")
    t.load_state(state)
    for k, v in state.items():
        np.testing.assert_array_equal(t.state()[k], v)
    with pytest.raises(ValueError, match="keeps no state"):
        strategy("fedavg").load_state(state)


def test_packing_round_trips_the_model_and_names_a_wrong_group(tiny_model):
    sd = tiny_model.state_dict()
    packed = pack_state(sd)
    assert set(packed) == {parameter_group(k) for k in sd} and len(packed) < 40
    assert {"shared", "mim", "mlm", "head:yes_no", "scale:nodule", "task:emphysema"} <= set(packed)
    back = unpack_state(packed, sd)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="packed group 'mlm': expected a vector of"):
        unpack_state({**packed, "mlm": packed["mlm"][:-1]}, sd)
    with pytest.raises(ValueError, match="lack group"):
        unpack_state({k: v for k, v in packed.items() if k != "mim"}, sd)
