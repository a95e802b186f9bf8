"""The streaming coordinator: replies folded one at a time as they arrive equal the batch task-aware average, bad
ones are still rejected with their reason, no reply is held after it was folded, and delivery hands each reply on
before the next site has answered, retrying lost ones as before."""

import gc
import time
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from server.delivery import NO_REPLY, deliver, stream
from server.strategy import build_strategy
from server.task_sum import TaskAwareSum, array_view, task_aware_average
from sim.inprocess_grid import InProcessGrid
from transport.wire import npy_array

GROUPS = {"shared", "head:yes_no", "head:lung_rads", "scale:lung"}
# sizes that cross the fold's chunk boundary (server/strategy.py CHUNK) and end mid-chunk
SIZES = {"shared": 150_001, "head:yes_no": 70_000, "head:lung_rads": 3, "scale:lung": 1_000}
TOL = dict(rtol=1e-6, atol=1e-6)  # float32 running sums against a float64 batch mean: a few float32 ulps


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reference(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(n).astype(np.float32) for k, n in SIZES.items()}


def site_weights(ref, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + 0.1 * rng.standard_normal(v.size)).astype(np.float32) for k, v in ref.items()}


# sites train different groups; nobody trains head:lung_rads
COUNTS = [{"shared": 10, "head:yes_no": 30, "scale:lung": 5}, {"shared": 30, "head:yes_no": 10},
          {"shared": 7, "scale:lung": 2}, {"shared": 1}]


def reply(node, arrays, counts, site=None, error=None, message_id=None):
    sent = Message(RecordDict(), dst_node_id=node, message_type="train.multitask")
    sent.metadata.__dict__["_message_id"] = message_id or f"m{node}"
    if error:
        msg = Message(Error(code=0, reason=error), reply_to=sent)
    else:
        msg = Message(RecordDict({
            "site": ConfigRecord({"site_id": site or f"site-{node}", "skipped": ""}),
            "metrics": MetricRecord({**{f"n.{g}": n for g, n in counts.items()}, "loss.x": float(node)}),
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}), reply_to=sent)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


@pytest.mark.parametrize("uniform", [False, True])
def test_the_running_sum_equals_the_batch_task_aware_average(uniform):
    ref = reference()
    sites = [(site_weights(ref, i + 1), c) for i, c in enumerate(COUNTS)]
    running = TaskAwareSum(ref, uniform=uniform)
    for arrays, counts in sites:
        running.add(arrays, counts)
    got, contributors = running.result()
    want, want_contributors = task_aware_average(ref, sites, uniform=uniform)
    assert contributors == want_contributors == {"shared": 4, "head:yes_no": 2, "scale:lung": 2, "head:lung_rads": 0}
    for k in ref:
        assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
    np.testing.assert_array_equal(got["head:lung_rads"], ref["head:lung_rads"])  # nobody trained it
    # the weights matter: sample counts and uniform give different means where the counts differ
    other, _ = task_aware_average(ref, sites, uniform=not uniform)
    assert not np.allclose(got["shared"], other["shared"], **TOL)


def test_arrays_travel_without_copies_and_read_back_exactly():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = npy_array(x)
    assert a.data == Array(x).data  # the same .npy bytes Flower writes
    view = array_view(a)
    np.testing.assert_array_equal(view, x)
    assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(a.data, np.uint8))
    torn = Array(dtype="float32", shape=(3, 4), stype=a.stype, data=a.data[:-8])
    with pytest.raises(ValueError):
        array_view(torn)


def strategy(name="fedavg", bound=1e3, ref=None):
    s = build_strategy(name, GROUPS, 1, bound)
    s.reference = ref if ref is not None else reference()
    s.current_arrays = {k: v.copy() for k, v in s.reference.items()}  # what FedOpt's configure_train sets
    return s


def test_replies_from_a_generator_are_checked_folded_and_let_go_one_at_a_time():
    ref = reference()
    good = [(site_weights(ref, i + 1), c) for i, c in enumerate(COUNTS[:3])]
    base = good[0][0]
    bad = {
        5: (reply(5, {**base, "shared": np.zeros(4, np.float32)}, {"shared": 3}), "shape of shared"),
        6: (reply(6, {**base, "shared": np.where(np.arange(SIZES["shared"]) == 99_999, np.nan,
                                                  base["shared"]).astype(np.float32)}, {"shared": 3}),
            "non-finite values in shared"),
        7: (reply(7, base, {"shared": 3, "head:nonexistent": 2}), "unknown parameter groups ['head:nonexistent']"),
        8: (reply(8, None, {}, error="RuntimeError: out of memory"), "site error: RuntimeError: out of memory"),
        9: (reply(9, base, {"shared": 3}, site="site-1"), "a second reply from site-1; the first counted"),
        10: (reply(10, {k: v + 50.0 for k, v in base.items()}, {"shared": 3}), "exceeds the bound"),
    }
    s = strategy()
    arrays, metrics = s.aggregate_train(3, arriving([m for m, _ in bad.values()], good))
    reasons = {int(r["node_id"]): r["reason"] for r in s.outcome.rejections}
    assert set(reasons) == set(bad)
    for node, (_, why) in bad.items():
        assert why in reasons[node], (node, reasons[node])
    assert [a["site_id"] for a in s.outcome.accepted] == ["site-1", "site-2", "site-3"]
    assert s.outcome.replies == 3 + len(bad) and s.outcome.untrained == {"head:lung_rads"}
    want, _ = task_aware_average(ref, good)
    for k in ref:
        np.testing.assert_allclose(arrays[k].numpy(), want[k], **TOL, err_msg=k)
    assert metrics["loss.x"] == pytest.approx((1 * 10 + 2 * 30 + 3 * 7) / 47)  # weighted by n.shared, good ones only


def arriving(bad: list, good: list):
    """The good replies, the bad ones after the first; each good reply is made when it is asked for, and the good
    one before it must be gone by then: folded and let go."""
    held = []
    for i, (arrays, counts) in enumerate(good):
        gc.collect()
        assert all(r() is None for r in held), "a reply was still held when the next one arrived"
        msg = reply(i + 1, arrays, counts)
        held.append(weakref.ref(msg.content["arrays"]))
        yield msg
        del msg
        if i == 0:
            yield from bad


def test_fedadam_steps_on_the_streamed_average_as_on_the_batch_one():
    ref = reference()
    s = strategy("fedadam", bound=1e9, ref=ref)
    current = {k: v.astype(np.float64) for k, v in ref.items()}
    m = {k: np.zeros_like(v) for k, v in current.items()}
    v = {k: np.zeros_like(x) for k, x in current.items()}
    for rnd in (1, 2):
        sites = [({k: (x + 0.5 * (i + rnd)).astype(np.float32) for k, x in s.reference.items()}, c)
                 for i, c in enumerate(COUNTS)]
        arrays, _ = s.aggregate_train(rnd, (reply(i + 1, a, c) for i, (a, c) in enumerate(sites)))
        assert len(s.outcome.accepted) == len(sites)
        # Flower's FedAdam on the batch task-aware average (flwr/serverapp/strategy/fedadam.py, fedopt.py)
        avg, contributors = task_aware_average({k: x.astype(np.float32) for k, x in current.items()}, sites)
        eta_norm = s.eta * np.sqrt(1 - s.beta_2 ** (rnd + 1.0)) / (1 - s.beta_1 ** (rnd + 1.0))
        for k in current:
            delta = avg[k].astype(np.float64) - current[k]
            m[k] = s.beta_1 * m[k] + (1 - s.beta_1) * delta
            v[k] = s.beta_2 * v[k] + (1 - s.beta_2) * delta ** 2
            if contributors[k]:  # nobody trained it: it stays where it was
                current[k] = (current[k] + eta_norm * m[k] / (np.sqrt(v[k]) + s.tau)).astype(np.float32)
        for k in current:
            np.testing.assert_allclose(arrays[k].numpy(), current[k], rtol=1e-6, atol=1e-6, err_msg=f"{rnd} {k}")
        np.testing.assert_array_equal(arrays["head:lung_rads"].numpy(), ref["head:lung_rads"])
        s.reference = {k: a.numpy() for k, a in arrays.items()}  # what configure_train sets next round
        s.current_arrays = {k: x.copy() for k, x in s.reference.items()}


# ---- delivery ----

def echo_app(log):
    """A ClientApp that answers with its node id and logs when it ran."""
    def app(msg, ctx):
        log.append(("ran", ctx.node_id))
        return Message(RecordDict({"metrics": MetricRecord({"node": ctx.node_id})}), reply_to=msg)
    return app


def test_each_reply_is_handed_on_before_the_next_site_runs():
    log = []
    grid = InProcessGrid(echo_app(log), {n: {} for n in (1, 2, 3)})
    sent_to = {}
    messages = [Message(RecordDict(), dst_node_id=n, message_type="evaluate") for n in (1, 2, 3)]
    for r in stream(grid, messages, timeout=5, sent_to=sent_to):
        log.append(("got", sent_to[r.metadata.reply_to_message_id]))
    assert log == [("ran", 1), ("got", 1), ("ran", 2), ("got", 2), ("ran", 3), ("got", 3)]
    assert sorted(sent_to.values()) == [1, 2, 3]
    assert grid.pull_messages(list(sent_to)) == []  # each reply is pulled once


class SlowGrid:
    """Replies become available `delay[node]` seconds after the push; a pull returns those available, each once.
    Node `lose` first gets a NODE_UNAVAILABLE error from the SuperLink (src_node_id 1); node `silent` never answers."""

    def __init__(self, delay: dict[int, float], lose: int | None = None, silent: int | None = None):
        self.delay, self.lose, self.silent = delay, lose, silent
        self.pushed: dict[str, tuple[Message, float]] = {}
        self.sent: list[int] = []
        self.pulls = 0

    def get_node_ids(self):
        return list(self.delay)

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"{len(self.sent)}-{i}"
            self.sent.append(m.metadata.dst_node_id)
            self.pushed[m.metadata.message_id] = (m, time.monotonic() + self.delay[m.metadata.dst_node_id])
        return list(self.pushed)[-len(messages):]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for i in message_ids:
            m, ready = self.pushed.get(i, (None, 0.0))
            if m is None or time.monotonic() < ready or m.metadata.dst_node_id == self.silent:
                continue
            del self.pushed[i]
            node = m.metadata.dst_node_id
            if node == self.lose:
                self.lose = None
                r = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=m)
                r.metadata.__dict__["_src_node_id"] = 1
            else:
                r = Message(RecordDict({"metrics": MetricRecord({"node": node})}), reply_to=m)
                r.metadata.__dict__["_src_node_id"] = node
            out.append(r)
        return out


def training(grid):
    return lambda to: [Message(RecordDict(), dst_node_id=n, message_type="train.pretrain") for n in to]


def test_replies_arrive_over_several_polls_and_the_first_is_handed_on_before_the_last_exists():
    grid = SlowGrid({1: 0.0, 2: 0.3, 3: 0.6})
    t0, arrived = time.monotonic(), []
    for r in deliver(grid, training(grid), [1, 2, 3], timeout=5, retries=0, needed=3, sent_to={}):
        arrived.append((int(r.content["metrics"]["node"]), time.monotonic() - t0))
    assert [n for n, _ in arrived] == [1, 2, 3]
    assert arrived[0][1] < 0.3 and arrived[2][1] >= 0.6  # node 1's reply came before node 3's was there
    assert arrived[2][1] < 0.6 + 0.5  # polled at a short interval, not Flower's 3 s
    assert grid.pulls >= 4


@pytest.mark.parametrize("retries", [0, 1])
def test_lost_replies_are_retried_to_the_nodes_that_did_not_answer(retries):
    grid = SlowGrid({1: 0.0, 2: 0.0, 3: 0.1}, lose=2)
    attempts, sent_to = [], {}
    got = list(deliver(grid, training(grid), [1, 2, 3], timeout=5, retries=retries, needed=3, sent_to=sent_to,
                       on_attempt=attempts.append))
    if retries == 0:  # the lost reply comes last, named by the message it answers
        assert attempts == [{2: "Node Unavailable"}]
        assert [r.has_error() for r in got] == [False, False, True]
        assert sent_to[got[-1].metadata.reply_to_message_id] == 2 and got[-1].metadata.src_node_id == 1
    else:  # sent again to node 2 only; every node answered once
        assert attempts == [{2: "Node Unavailable"}, {}] and grid.sent == [1, 2, 3, 2]
        assert sorted(int(r.content["metrics"]["node"]) for r in got) == [1, 2, 3]


def test_a_node_that_never_answers_is_lost_after_the_round_timeout():
    grid = SlowGrid({1: 0.0, 2: 0.0}, silent=2)
    attempts = []
    t0 = time.monotonic()
    got = list(deliver(grid, training(grid), [1, 2], timeout=0.4, retries=0, needed=2, sent_to={},
                       on_attempt=attempts.append))
    assert 0.4 <= time.monotonic() - t0 < 1.5
    assert [int(r.content["metrics"]["node"]) for r in got] == [1] and attempts == [{2: NO_REPLY}]
