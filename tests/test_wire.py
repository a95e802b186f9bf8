"""Weights on the wire (transport/wire.py): joined one vector per dtype, read back exactly, checked against the
global model; and the Flower pull/executor patches still find what they were written against."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.weights.packing import pack_state, packed_sizes, split_joined
from server.strategy import reply_problem
from server.task_sum import array_view, record_values
from transport.object_pulls import quick_object_pulls
from transport.protocol import ARRAYS, COUNT, METRICS
from transport.superexec import ForkExecutor, check_flower
from transport.wire import joined_record, record_like


@pytest.fixture(scope="module")
def model_state():
    return M3FM(get_config("tiny")).state_dict()


def test_joined_weights_are_one_array_per_dtype_and_read_back_exactly(model_state):
    packed = pack_state(model_state)
    packed["shared@int64"] = np.arange(7, dtype=np.int64)  # another dtype travels in a vector of its own
    record = joined_record(packed)
    assert sorted(record.keys()) == ["float32", "int64"] and len(packed) > 30
    reference = {k: v.copy() for k, v in packed.items()}
    back = record_values(record, reference)
    assert list(back) == list(packed)
    for k, v in packed.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    # the site splits with sizes from its own model (client/service.py), no layout on the wire
    site = split_joined({k: array_view(a) for k, a in joined_record(pack_state(model_state)).items()},
                        packed_sizes(model_state))
    assert all(np.array_equal(site[k], v) for k, v in pack_state(model_state).items())


def test_a_joined_reply_that_does_not_fit_is_rejected_naming_why(model_state):
    packed = pack_state(model_state)
    reference = {k: v.copy() for k, v in packed.items()}
    counts = MetricRecord({f"{COUNT}shared": 3})

    def problem(record):
        return reply_problem(RecordDict({ARRAYS: record, METRICS: counts}), reference, {"shared"}, float("inf"))

    assert problem(joined_record(packed)) is None
    short = dict(packed)
    short["shared"] = short["shared"][:-1]
    assert "the float32 vector: expected" in problem(joined_record(short))
    as_double = {k: v.astype(np.float64) for k, v in packed.items()}
    assert "one vector per dtype ['float32']" in problem(joined_record(as_double))
    wrong_keys = ArrayRecord({"shared": Array(packed["shared"])})  # some group keys, not all
    assert "keys differ from the global model" in problem(wrong_keys)
    bad = dict(packed)
    bad["shared"] = bad["shared"].copy()
    bad["shared"][0] = np.nan
    assert problem(joined_record(bad)) == "non-finite values in shared"


def test_a_reply_comes_back_in_the_form_its_message_came(model_state):
    packed = pack_state(model_state)
    per_group = ArrayRecord({k: Array(v) for k, v in packed.items()})
    assert list(record_like(packed, per_group).keys()) == list(packed)  # Flower's clipping mod compares keys
    assert list(record_like(packed, joined_record(packed)).keys()) == ["float32"]


def test_flowers_pull_backoff_and_executor_are_still_where_the_patches_expect():
    from flwr.supercore.inflatable import inflatable_utils

    before = dict(inflatable_utils.pull_objects.__kwdefaults__)
    try:
        quick_object_pulls(0.01, 0.1)
        after = inflatable_utils.pull_objects.__kwdefaults__
        assert after["initial_backoff"] == 0.01 and after["backoff_cap"] == 0.1
        # as patient as before in all: tries grow as the cap shrinks
        assert after["max_tries_per_object"] * 0.1 >= before["max_tries_per_object"] * before["backoff_cap"]
    finally:
        inflatable_utils.pull_objects.__kwdefaults__.update(before)
    check_flower()
    executor = ForkExecutor()
    executor.reconcile()  # no children yet: nothing to reap
    assert executor.children == set()
