"""Secure aggregation (Flower's SecAgg+ workflow and secaggplus_mod) in-process; through the real processes in
test_deployment.py."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.app import app as client_app
from client.federated import open_site, secure_update
from m3fm.weights.packing import pack_state
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, clip_inputs_inplace
from transport.protocol import (CHUNK_VALUES_KEY, CLIPPING_NORM_KEY, MASKED_ARRAYS_KEY, PACKED_ORDER_KEY,
                                TRAINED_MARK_KEY)
from transport.secure_chunks import MAX_CHUNK_VALUES, ChunkedUpdate, chunk_plan
from server.config import ServerConfigError, load_server_config
from server.rounds import phase_config, run_federation
from privacy.accounting import MECHANISM as DP_SGD_MECHANISM
from server.central_dp import MECHANISM as CENTRAL_MECHANISM
from server.secure import secure_train_round
from server.store import PrivacyLedger, Round, SiteMetric, open_server_store
from sim.inprocess_grid import InProcessGrid

TOML = """
[run]
name = "{name}"
model = "tiny"
min_sites = 3
round_timeout = 60
out_dir = "runs"
[strategy]
name = "{strategy}"
[pretrain]
rounds = 1
local_steps = 1
[multitask]
rounds = {multitask}
local_steps = 1
[privacy.secagg]
clipping_range = 0.5
{extra}
"""


def secure_toml(tmp_path, name="sa", strategy="fedavg", multitask=0, extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(TOML.format(name=name, strategy=strategy, multitask=multitask, extra=extra))
    return load_server_config(path)


CHUNK = 100_000  # the tiny model's 375,703 values travel in 4 chunks, one SecAgg+ instance each


def replay(sites, cfg, packed, config, **extra):
    """What each site computed for a secure round, replayed in the clear (training is deterministic for a given
    config) -> [(update, clear metrics)]."""
    config = {**config, PACKED_ORDER_KEY: ",".join(packed), TRAINED_MARK_KEY: 0.5, CHUNK_VALUES_KEY: CHUNK, **extra}
    return [secure_update(open_site(site, cfg.model), packed, config) for site in sites]


def expected_round(packed, updates, sites_of_chunk):
    """The task-aware mean, chunk by chunk over the sites that completed each chunk -> (weights, contributors)."""
    out, contributors = {k: v.copy() for k, v in packed.items()}, {}
    for c, segments in enumerate(updates[0].plan):
        for seg in segments:
            summed = [u for i, u in enumerate(updates) if i in sites_of_chunk(c) and u.marks[seg.key] > 0]
            contributors[seg.key] = min(len(summed), contributors.get(seg.key, len(summed)))
            offset = sum(v.size for k, v in packed.items() if list(packed).index(k) < list(packed).index(seg.key))
            if summed:
                part = sum(u.flat[offset + seg.start:offset + seg.stop].astype(np.float64) for u in summed)
                out[seg.key][seg.start:seg.stop] += (part / len(summed)).astype(np.float32)
    return out, contributors


def masked_vectors(grid) -> list[np.ndarray]:
    """Every integer vector the server received from a site in SecAgg+'s collect stage (no weights otherwise): as
    uint32 Arrays on the wire (transport/masked_arrays.py), or int64 bytes where the workflow reads them."""
    masked = []
    for reply in grid.received:
        assert all(len(r) == 0 for k, r in reply.content.array_records.items() if k != MASKED_ARRAYS_KEY)
        if MASKED_ARRAYS_KEY in reply.content.array_records:
            rec = reply.content.array_records[MASKED_ARRAYS_KEY]
            masked.append(np.concatenate([a.numpy().ravel() for a in rec.values()]))
            assert masked[-1].dtype == np.uint32
        for rec in reply.content.config_records.values():
            for value in rec.values():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    try:
                        masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in value]))
                    except Exception:  # noqa: BLE001 - key shares and ciphertexts are not arrays
                        continue
    return masked


def test_secagg_round_in_chunks_equals_the_plain_task_aware_mean_and_the_server_never_sees_one_site(
        ingested, tiny_model, tmp_path):
    _, sites, _ = ingested
    cfg = secure_toml(tmp_path, multitask=1, extra=f"chunk_values = {CHUNK}\n")
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    grid = InProcessGrid(client_app, nodes)
    packed = pack_state(tiny_model.state_dict())
    config = dict(phase_config(cfg, 2))  # multitask: the sites hold different tasks, so heads differ per site
    out, contributors, done = secure_train_round(grid, cfg.secagg, ArrayRecord({k: Array(v) for k, v in packed.items()}),
                                                 config, 2, list(nodes))
    assert out is not None and len(done.site_metrics) == 3 and not done.failures
    plain = replay(sites, cfg, packed, config)
    chunks = len(plain[0][0].plan)
    assert chunks == 4
    expected, trained = expected_round(packed, [u for u, _ in plain], lambda c: {0, 1, 2})
    assert contributors == trained
    step = 2 * 0.5 / 2**22  # SecAgg+ quantization step at clipping_range 0.5
    for key in packed:
        np.testing.assert_allclose(out[key], expected[key], atol=4 * step * len(sites) + 1e-7)
    assert 0 < contributors["shared"] == 3 and min(contributors.values()) < 3  # task-aware: some head not everywhere
    # the weights went out once (chunk 0), and nothing the server received holds a site's update: only masked
    # integer vectors, a chunk each, none longer than a chunk and its marks
    carrying = [m for m in grid.sent if sum(len(a.data) for r in m.content.array_records.values() for a in r.values())
                > 4 * sum(v.size for v in packed.values())]
    assert len(carrying) == 3
    masked = masked_vectors(grid)
    assert len(masked) == 3 * chunks and max(len(m) for m in masked) <= CHUNK + len(packed)
    for update, _ in plain:
        for c in range(chunks):
            q = np.concatenate([a.ravel() for a in quantize(update.chunk(c), 0.5, 2**22)])
            for m in masked:
                if len(m) == len(q):
                    assert np.mean(m == q) < 0.01  # masked: indistinguishable from uniform noise
    # central DP's client-side clipping bounds the site's whole update (not each chunk), as Flower's FlatClip would
    parts = [np.array(plain[0][0].flat)]  # before the replay below writes site 0's update again
    clipped, _ = replay(sites[:1], cfg, packed, config, **{CLIPPING_NORM_KEY: 1e-3})[0]
    clip_inputs_inplace(parts, 1e-3)
    np.testing.assert_allclose(clipped.flat, parts[0], rtol=1e-5, atol=1e-9)
    assert np.linalg.norm(clipped.flat) == pytest.approx(1e-3, rel=1e-4)


def round_equals_the_plain_mean_of_those_left(grid, sites, cfg, tiny_model, sites_of_chunk):
    """A secure round 2 over every node of grid; asserts it completed and equals, chunk by chunk, the plain
    task-aware mean over sites_of_chunk(c) (indices into sites) within the quantization step -> its strategy."""
    packed = pack_state(tiny_model.state_dict())
    config = dict(phase_config(cfg, 2))
    out, contributors, done = secure_train_round(grid, cfg.secagg, ArrayRecord({k: Array(v) for k, v in packed.items()}),
                                                 config, 2, grid.get_node_ids())
    assert out is not None
    plain = replay(sites, cfg, packed, config)
    expected, trained = expected_round(packed, [u for u, _ in plain], sites_of_chunk)
    assert contributors == trained
    for key in packed:
        np.testing.assert_allclose(out[key], expected[key], atol=4 * 2 * 0.5 / 2**22 * len(sites) + 1e-7)
    return done


def test_a_site_lost_part_way_leaves_its_earlier_chunks_and_the_round_completes(ingested, tiny_model, tmp_path):
    """SecAgg+'s dropout handling, chunk by chunk: node 2 vanishes when chunk 2's masked vectors are collected
    (after the keys were shared, so the others' shares must remove its masks). Chunks 0-1 are the mean over 3 sites, chunks 2-3 over the 2 others,
    and no chunk was summed twice (a second sum over fewer sites would give away the lost site's part)."""
    _, sites, _ = ingested
    cfg = secure_toml(tmp_path, multitask=1, extra=f"chunk_values = {CHUNK}\n")
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    collects = {n: 0 for n in nodes}

    def flaky(msg, ctx):
        if msg.content.config_records["secaggplus_configs"]["stage"] == "collect_masked_vectors":
            collects[ctx.node_id] += 1
            if ctx.node_id == 2 and collects[2] >= 3:
                raise ConnectionError("site 2 went away")
        return client_app(msg, ctx)

    done = round_equals_the_plain_mean_of_those_left(InProcessGrid(flaky, nodes), sites, cfg, tiny_model,
                                                     lambda c: {0, 1, 2} if c < 2 else {0, 2})
    assert len(done.failures) == 1 and "site 2 went away" in str(done.failures[0])
    assert collects == {1: 4, 2: 3, 3: 4}  # node 2 was not asked again after chunk 2


def test_a_site_lost_before_sharing_keys_does_not_halt_the_round(ingested, tiny_model, tmp_path):
    """A site dead when the round starts (its setup message fails) never shared its keys, so nobody holds shares
    of it and no vector carries a mask with it. Flower's workflow still listed it as dead at unmasking and every
    site failed asking for its shares (KeyError in secaggplus_mod._unmask): through the real processes a hospital
    that went down between rounds cost the whole round. The round now completes over the others."""
    _, sites, _ = ingested
    cfg = secure_toml(tmp_path, multitask=1, extra=f"chunk_values = {CHUNK}\n")
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    asked = {n: 0 for n in nodes}

    def down(msg, ctx):
        asked[ctx.node_id] += 1
        if ctx.node_id == 2:
            raise ConnectionError("site 2 is down")
        return client_app(msg, ctx)

    done = round_equals_the_plain_mean_of_those_left(InProcessGrid(down, nodes), sites, cfg, tiny_model,
                                                     lambda c: {0, 2})
    assert len(done.failures) == 1 and "site 2 is down" in str(done.failures[0])
    assert asked[2] == 1 and asked[1] == asked[3] == 4 * 4  # 4 stages of 4 chunks; node 2 only at chunk 0's setup


def test_chunk_plan_splits_keys_across_chunks_and_a_saved_update_answers_only_its_round(tmp_path):
    plan = chunk_plan([("a", 5), ("b", 0), ("c", 7)], 4)
    assert [[(s.key, s.start, s.stop, s.at) for s in chunk] for chunk in plan] == [
        [("a", 0, 4, 0)], [("a", 4, 5, 0), ("c", 0, 3, 1)], [("c", 3, 7, 0)]]
    with pytest.raises(ValueError, match="2 GiB"):
        chunk_plan([("a", 5)], MAX_CHUNK_VALUES + 1)
    update = ChunkedUpdate.create(tmp_path, ("r", 1), [("a", 5), ("b", 0), ("c", 7)], 4)
    update.flat[:] = np.arange(12)
    update.marks = {"a": 0.5, "b": 0.0, "c": 0.0}
    assert ChunkedUpdate.load(tmp_path, ("r", 1)) is None  # not saved yet: never answered from
    update.save()
    assert ChunkedUpdate.load(tmp_path, ("r", 2)) is None  # another round's
    again = ChunkedUpdate.load(tmp_path, ("r", 1))  # what another process of the site reads
    assert [list(v) for v in again.chunk(1)] == [[4, 5, 6, 7], [0.5, 0.0]]
    with pytest.raises(ValueError, match="3 chunk"):
        again.chunk(3)
    again.discard()
    assert list(tmp_path.iterdir()) == []
    assert CLIPPING_NORM_KEY == KEY_CLIPPING_NORM  # the site's service reads Flower's key under our name


def test_secagg_with_patient_level_dp_sgd_and_central_dp_fills_the_ledger(ingested, tmp_path):
    """DP-SGD at the sites, SecAgg+ over their clipped updates in chunks and central DP's noise on the unmasked
    mean, together: every site trains every round, each site's spend travels in clear with chunk 0 (an aggregate it
    reports) and the ledger holds a per-patient row per site and round and the central release per round."""
    _, sites, _ = ingested
    extra = (f'chunk_values = {CHUNK}\n[privacy.central_dp]\nclipping = "client"\nnoise_multiplier = 1.0\n'
             'clipping_norm = 0.5\n[privacy.dp_sgd]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\n')
    cfg = secure_toml(tmp_path, name="sa-dp", multitask=1, extra=extra)
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    with Session(open_server_store(cfg.database_url)) as s:
        rounds = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round)).all()
        trained = {(m.round, m.site_id) for m in s.scalars(select(SiteMetric).where(SiteMetric.kind == "train"))}
        ledger = s.scalars(select(PrivacyLedger).where(PrivacyLedger.run_id == run_id)).all()
    assert [(r.round, r.sites_accepted) for r in rounds] == [(1, 3), (2, 3)]
    assert trained == {(r, s.site_id) for r in (1, 2) for s in sites}
    assert sorted((r.round, r.site_id, r.mechanism) for r in ledger) == sorted(
        [(rnd, site.site_id, DP_SGD_MECHANISM) for rnd in (1, 2) for site in sites]
        + [(rnd, "*", CENTRAL_MECHANISM) for rnd in (1, 2)])
    assert [r.steps for r in ledger if r.site_id == "*"] == [1, 2]
    assert all(0 < r.epsilon < float("inf") for r in ledger)


def test_secagg_config_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ServerConfigError, match='"fedavg" only'):
        secure_toml(tmp_path, strategy="fedadam")
    with pytest.raises(ServerConfigError, match='clipping = "client"'):
        secure_toml(tmp_path, name="b", extra='[privacy.central_dp]\nclipping = "server"\n')


def test_masked_vector_survives_flowers_transport_where_equal_records_inflate_as_one_object():
    """The deployment engine sends a reply as content-addressed objects; the emptied secaggplus ConfigRecord and
    the empty fitres.metrics are one object after inflation, so restoring the vector into it in place broke the
    collect stage (recorddict_to_fitres saw a list in the metrics). In-process grids never deflate, so only this
    round trip shows it."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    from transport.masked_arrays import masked_vectors_as_arrays, masked_vectors_as_bytes

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    vector = np.arange(1000, dtype=np.int64) * 4_000_000  # values up to ~2**32, as SecAgg+ leaves them
    content = compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), Parameters([], ""), 0, {}), keep_input=True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(vector)]})
    instruction = Message(RecordDict(), dst_node_id=1, message_type="train")
    reply = masked_vectors_as_arrays(instruction, None, lambda m, c: Message(content, reply_to=instruction))
    assert reply.content.array_records[MASKED_ARRAYS_KEY]["0"].dtype == "uint32"  # 4 bytes a value on the wire
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
    arrived = inflate_object_from_contents(reply.object_id, contents)
    restored = masked_vectors_as_bytes(arrived)
    assert compat.recorddict_to_fitres(restored.content, keep_input=True).metrics == {}
    (data,) = restored.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    np.testing.assert_array_equal(bytes_to_ndarray(data), vector)
    assert bytes_to_ndarray(data).dtype == np.int64


def test_lean_collect_stage_masks_exactly_as_flower_in_blocks(monkeypatch):
    """transport/lean_masking.py: secaggplus_mod's quantize-and-mask steps, in blocks and in place, give the very
    integers Flower's give (the coordinator regenerates the masks with Flower's pseudo_rand_gen to unmask), for
    blocks that split arrays unevenly, a 0-d array and a 2-d one."""
    from flwr.common.secure_aggregation import ndarrays_arithmetic as flower_arith
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from transport import lean_masking
    from transport.lean_masking import LEAN, MaskDraw

    monkeypatch.setattr(lean_masking, "QUANTIZE_BLOCK", 7)
    monkeypatch.setattr(lean_masking, "MASK_BLOCK", 5)
    dims = [(1,), (), (23,), (4, 6)]
    for seed in (b"abcd" * 8, bytes(range(32))):
        drawn = LEAN["parameters_addition"]([np.zeros(d, np.int64) for d in dims], MaskDraw(seed, 2**32, dims))
        assert all(np.array_equal(a, b) for a, b in zip(drawn, pseudo_rand_gen(seed, 2**32, dims)))

    def collect(quantize_, rand_gen, add, subtract, mod):  # secaggplus_mod._collect_masked_vectors' arithmetic
        np.random.seed(3)  # its stochastic rounding draws from NumPy's global generator
        update = [np.float32(0.2), np.linspace(-1.5, 1.5, 23, dtype=np.float32),
                  np.random.default_rng(1).normal(0, 0.3, (4, 6)).astype(np.float32)]
        q = flower_arith.factor_combine(12, quantize_(update, 1.0, 2**22))
        shapes = [a.shape for a in q]
        q = add(q, rand_gen(b"\x01" * 32, 2**32, shapes))
        for k, seed in enumerate((b"\x02" * 32, b"\x03" * 32)):
            pairwise = rand_gen(seed, 2**32, shapes)
            q = add(q, pairwise) if k else subtract(q, pairwise)
        return mod(q, 2**32)

    flower = collect(quantize, pseudo_rand_gen, flower_arith.parameters_addition,
                     flower_arith.parameters_subtraction, flower_arith.parameters_mod)
    lean = collect(LEAN["quantize"], LEAN["pseudo_rand_gen"], LEAN["parameters_addition"],
                   LEAN["parameters_subtraction"], LEAN["parameters_mod"])
    assert [a.dtype for a in lean] == [a.dtype for a in flower] and [a.shape for a in lean] == [a.shape for a in flower]
    assert all(np.array_equal(a, b) for a, b in zip(lean, flower))
    assert any(np.any(a != 0) for a in lean[2:])


def test_site_and_coordinator_use_the_lean_masking():
    import importlib

    from transport.lean_masking import LEAN, WORKFLOW_NAMES, lean_unmasking, secaggplus_module

    assert client_app is not None and all(getattr(secaggplus_module(), n) is fn for n, fn in LEAN.items())
    lean_unmasking()  # as secure_train_round does; the round tests above run through it
    workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert all(getattr(workflow, n) is LEAN[n] for n in WORKFLOW_NAMES)
