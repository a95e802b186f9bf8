"""The ClientApp handlers and the server's round loop, in-process (the real processes: test_deployment.py)."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.app import app as client_app
from m3fm.weights.groups import parameter_group
from m3fm.weights.packing import pack_state
from server.config import ServerConfigError, load_server_config
from server.lifecycle import OPERATOR_NOTE, OperatorNotes
from server.rounds import RunError, phase_config, run_federation, wait_for_sites
from server.store import Checkpoint, RejectedReply, Round, RoundAttempt, Run, SiteMetric, open_server_store
from server.strategy import reply_problem
from sim.inprocess_grid import InProcessGrid

SERVER_TOML = """
[run]
name = "{name}"
model = "tiny"
min_sites = 2
round_timeout = 30
out_dir = "runs"
[strategy]
name = "{strategy}"
[pretrain]
rounds = 1
local_steps = 2
[multitask]
rounds = {multitask_rounds}
local_steps = 1
"""


def server_toml(tmp_path, name="t", strategy="fedavg", multitask_rounds=1):
    path = tmp_path / "server.toml"
    path.write_text(SERVER_TOML.format(name=name, strategy=strategy, multitask_rounds=multitask_rounds))
    return load_server_config(path)


def call(site, message_type, packed, config):
    grid = InProcessGrid(client_app, {1: {"site-dir": str(site.site_dir)}})
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in packed.items()}),
                              "config": ConfigRecord(config)}), dst_node_id=1, message_type=message_type)
    return grid.send_and_receive([msg])[0]


def test_clientapp_trains_each_phase_and_evaluates_returning_only_aggregates(ingested, tiny_model, tmp_path):
    _, sites, _ = ingested
    cfg = server_toml(tmp_path, multitask_rounds=1)
    packed = pack_state(tiny_model.state_dict())
    groups = {parameter_group(k) for k in tiny_model.state_dict()}
    site = sites[2]  # labels for CVD tasks only
    for rnd, action in ((1, "train.pretrain"), (2, "train.multitask")):
        reply = call(site, action, packed, dict(phase_config(cfg, rnd)))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content["site"]["site_id"] == site.site_id and not reply.content["site"]["skipped"]
        metrics = reply.content["metrics"]
        assert reply_problem(reply.content, packed, groups, 1e6) is None  # same groups, sizes, dtypes; finite
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        assert any(not np.array_equal(arrays[k], packed[k]) for k in packed)  # it trained
        counts = {k[2:]: v for k, v in metrics.items() if k.startswith("n.")}
        if action == "train.pretrain":
            assert counts["shared"] == counts["mim"] > 0 and "head:yes_no" not in counts
        else:  # a CVD-only site trains the heart scale and its heads, never the nodule or lung scales
            tasks = {k[len("items.task:"):] for k in metrics if k.startswith("items.task:")}
            assert tasks == {"cvd_diagnosis", "cvd_mortality", "clinical_history", "clinical_number"}
            assert "scale:heart" in counts and "scale:nodule" not in counts and "mim" not in counts
            np.testing.assert_array_equal(arrays["scale:nodule"], packed["scale:nodule"])
        assert all(v >= site.min_cell_size for k, v in metrics.items() if k.startswith(("n.", "items.")))
    reply = call(site, "evaluate", packed, {"phase": "multitask", "model": "tiny", "split": "train"})
    metrics = dict(reply.content["metrics"])
    assert "loss:cvd_mortality" in metrics and metrics["items.task:cvd_mortality"] >= site.min_cell_size
    assert "arrays" not in reply.content


def test_a_site_never_ingested_answers_with_an_error_naming_the_command(tmp_path, tiny_model):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.toml").write_text('site_id = "h1"\ntasks = ["covid19"]\n[ingest]\nmodel_config = "tiny"\n')
    grid = InProcessGrid(client_app, {1: {"site-dir": str(site_dir)}})
    cfg = server_toml(tmp_path)
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in pack_state(tiny_model.state_dict()).items()}),
                              "config": phase_config(cfg, 1)}), dst_node_id=1, message_type="train.pretrain")
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "never ingested" in reply.error.reason and "m3fm-client ingest" in reply.error.reason


class FailingGrid(InProcessGrid):
    """Delivers normally until round `fail_at`, then the connection to the SuperLink is lost (a crash)."""

    def __init__(self, *a, fail_at: int, **kw):
        super().__init__(*a, **kw)
        self.fail_at = fail_at

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].content["config"].get("server-round", 0) >= self.fail_at:
            raise ConnectionError("coordinator lost")
        return super().push_messages(messages)


def test_rounds_checkpoint_and_a_resumed_run_continues_without_repeating_a_round(ingested, tmp_path):
    _, sites, _ = ingested
    cfg = server_toml(tmp_path, name="resumable", strategy="fedadam", multitask_rounds=2)
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    with pytest.raises(ConnectionError):
        run_federation(FailingGrid(client_app, nodes, fail_at=2), cfg, flwr_run_id=11, log=lambda *_: None)
    with pytest.raises(RunError, match="changed since run"):
        changed = server_toml(tmp_path / "..", name="resumable", strategy="fedavg", multitask_rounds=2)
        changed.out_dir, changed.database = cfg.out_dir, cfg.database_url
        run_federation(InProcessGrid(client_app, nodes), changed, resume=True, log=lambda *_: None)
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, resume=True, flwr_run_id=12, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        run = s.get(Run, run_id)
        assert run.status == "completed" and run.flwr_run_ids == ["11", "12"]
        rounds = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round)).all()
        assert [(r.round, r.phase, r.phase_round, r.flwr_run_id) for r in rounds] == [
            (1, "pretrain", 1, "11"), (2, "multitask", 1, "12"), (3, "multitask", 2, "12")]
        assert all(r.sites_accepted == 3 for r in rounds)
        assert len(s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()) == 3
        per_site = s.scalars(select(SiteMetric).where(SiteMetric.run_id == run_id, SiteMetric.kind == "train")).all()
        assert sorted({m.site_id for m in per_site}) == [s.site_id for s in sites]
        assert not s.scalars(select(RejectedReply)).all()
        attempts = s.scalars(select(RoundAttempt).where(RoundAttempt.run_id == run_id)
                             .order_by(RoundAttempt.round, RoundAttempt.attempt)).all()
        # round 2 went out once before the crash: that attempt is recorded as interrupted, the resumed one counted
        assert [(a.round, a.attempt, a.outcome, a.flwr_run_id) for a in attempts] == [
            (1, 1, "ok", "11"), (2, 1, "interrupted", "11"), (2, 2, "ok", "12"), (3, 1, "ok", "12")]
    # every round's metrics also went to TensorBoard event files in the run's folder, the resumed rounds included
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cfg.run_dir(run_id) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("round/sites")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("round/sites")] == [3.0, 3.0, 3.0]
    assert any(t.startswith("pretrain/train/") for t in tags) and any(t.startswith("multitask/train/") for t in tags)
    assert {t.split("/")[1] for t in tags if t.startswith("site/")} == {s.site_id for s in sites}
    with pytest.raises(RunError, match="already completed"):
        run_federation(InProcessGrid(client_app, nodes), cfg, resume=True, log=lambda *_: None)


def test_a_round_with_too_few_usable_replies_fails_the_run_and_keeps_the_reasons(ingested, tmp_path):
    _, sites, _ = ingested
    cfg = server_toml(tmp_path, name="short")
    cfg.min_sites = 3
    nodes = {1: {"site-dir": str(sites[0].site_dir)}, 2: {"site-dir": str(sites[1].site_dir)},
             3: {"site-dir": str(tmp_path / "nowhere")}}
    with pytest.raises(RunError, match="2 usable replies of 3, fewer than run.min_sites = 3"):
        run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        assert s.scalars(select(Run)).one().status == "failed"
        (bad,) = s.scalars(select(RejectedReply)).all()
        assert bad.kind == "rejected" and "site.toml: not found" in bad.reason


class LossyGrid(InProcessGrid):
    """The SuperLink's answer for a node whose heartbeat lapsed: node `lose`'s first training reply of round
    `at` is a NODE_UNAVAILABLE error sent by the SuperLink itself (src_node_id 1), though the site trained."""

    def __init__(self, *a, lose: int, at: int, **kw):
        super().__init__(*a, **kw)
        self.lose, self.at, self.lost = lose, at, 0

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for i, r in enumerate(replies):
            sent = next(m for m in self.sent if m.metadata.message_id == r.metadata.reply_to_message_id)
            if (sent.metadata.dst_node_id == self.lose and sent.metadata.message_type.startswith("train.")
                    and sent.content["config"]["server-round"] == self.at and not self.lost):
                self.lost += 1
                replies[i] = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                                     reply_to=sent)
                replies[i].metadata.__dict__["_src_node_id"] = 1
        return replies


@pytest.mark.parametrize("retries", [0, 2])
def test_a_reply_lost_in_transport_is_retried_and_named_by_its_site(ingested, tmp_path, retries):
    _, sites, _ = ingested
    cfg = server_toml(tmp_path, name=f"lossy-{retries}")
    cfg.min_sites, cfg.round_retries, cfg.site_reports = 3, retries, False
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    grid = LossyGrid(client_app, nodes, lose=2, at=2)
    if retries == 0:  # as before: the round fails, and the lost reply names the site, not the SuperLink (node 1)
        with pytest.raises(RunError, match="2 usable replies of 3"):
            run_federation(grid, cfg, log=lambda *_: None)
    else:
        run_federation(grid, cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        attempts = [(a.round, a.attempt, a.outcome, a.sent, a.lost) for a in
                    s.scalars(select(RoundAttempt).order_by(RoundAttempt.round, RoundAttempt.attempt))]
        rejected = [(r.site_id, r.node_id) for r in s.scalars(select(RejectedReply))]
        detail = s.scalars(select(RoundAttempt.detail).where(RoundAttempt.lost > 0)).one()
        rounds = [(r.round, r.sites_accepted) for r in s.scalars(select(Round).order_by(Round.round))]
    engine.dispose()
    assert sites[1].site_id in detail and "(node 2)" in detail and "Node Unavailable" in detail
    if retries == 0:
        assert attempts == [(1, 1, "ok", 3, 0), (2, 1, "failed", 3, 1)] and rounds == [(1, 3)]
        assert rejected == [(sites[1].site_id, "2")]
    else:  # sent again to the one node that had not answered; every site counted once
        assert attempts == [(1, 1, "ok", 3, 0), (2, 1, "retried", 3, 1), (2, 2, "ok", 1, 0)]
        assert rounds == [(1, 3), (2, 3)] and rejected == []
        assert sum(m.metadata.dst_node_id == 2 and m.metadata.message_type == "train.multitask"
                   for m in grid.sent) == 2


class JoiningGrid:
    """Node i connects `after[i]` seconds from now, as SuperNodes started together do."""

    def __init__(self, *after: float):
        self.t0, self.after = time.monotonic(), after

    def get_node_ids(self):
        return [i + 1 for i, a in enumerate(self.after) if time.monotonic() - self.t0 >= a]


def test_a_coordinators_first_round_waits_for_the_expected_sites_and_no_longer_than_join_wait():
    said = []
    # without expected_sites a round starts as soon as min_sites are in: site 2, a second later, misses it
    assert wait_for_sites(JoiningGrid(0, 1.0), 1, 30) == [1]
    t0 = time.monotonic()
    assert wait_for_sites(JoiningGrid(0, 1.0, 1.5), 1, 30, expected=3, join_wait=20, log=said.append) == [1, 2, 3]
    assert time.monotonic() - t0 < 5 and said == []  # it stops waiting once all are in, not at join_wait
    t0 = time.monotonic()
    assert wait_for_sites(JoiningGrid(0, 0.3, 60), 1, 30, expected=3, join_wait=1.0, log=said.append) == [1, 2]
    assert 1.0 <= time.monotonic() - t0 < 5 and "2 of run.expected_sites = 3" in said[0]  # bounded, and said
    with pytest.raises(RunError, match="only 1 site"):  # min_sites is still a hard floor
        wait_for_sites(JoiningGrid(0, 60), 2, 1.0, expected=2, join_wait=10)


def test_the_coordinator_repeats_each_operator_note_of_the_serverapps_output_once(tmp_path):
    """serverapp.log grows while the ServerApp runs (Flower's log lines among ours); a line still being written is
    left for the next look, and only lines meant for the operator come back, without their prefix."""
    log, said = tmp_path / "serverapp.log", []
    notes = OperatorNotes(log)
    assert notes.new() == []  # the stream has not started yet
    with open(log, "ab") as f:
        f.write(b"\x1b[92mINFO \x1b[0m:      configure_train: Sampled 1 nodes\n")
        f.write(f"{OPERATOR_NOTE}1 of run.expected_sites = 2 connected\nround 1/2 (pretrain 1/1): 1/1\n".encode())
        f.write(f"{OPERATOR_NOTE}round 2: 1 reply lost in tr".encode())
        f.flush()
        said += notes.new()
        f.write(b"ansport (site-02 (node 7): [Errno 111] refused)\n")
        f.flush()
        said += notes.new()
    assert said == ["1 of run.expected_sites = 2 connected",
                    "round 2: 1 reply lost in transport (site-02 (node 7): [Errno 111] refused)"]
    assert notes.new() == []


def test_server_toml_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "server.toml"
    for text, expected in (("[run]\nmodel = 'giant'\n", "[run]: field 'model' must be one of"),
                           ("[strategy]\nname = 'krum'\n", "[strategy]: field 'name' must be one of"),
                           ("[pretrain]\nrounds = -1\n", "[pretrain]: field 'rounds' must be 0 or more"),
                           ("[multitask]\ntasks = ['astrology']\n", "unknown task(s) ['astrology']"),
                           ("[run]\nmin_site = 2\n", "unknown field(s) ['min_site']"),
                           ("[pretrain]\nrounds = 0\n[multitask]\nrounds = 0\n", "nothing to run")):
        path.write_text(text)
        with pytest.raises(ServerConfigError) as e:
            load_server_config(path)
        assert str(path) in str(e.value) and expected in str(e.value)


def test_a_stopped_run_reads_back_as_stopped_and_its_open_attempt_is_closed(tmp_path):
    """The coordinator's end_run on a run still 'running' (the `flwr stop` path): the row it returns is readable
    after its session closed (it once raised DetachedInstanceError, so the coordinator recorded itself as failed),
    and the round attempt left open is closed as interrupted."""
    from server.coordinator import end_run

    engine = open_server_store(f"sqlite:///{tmp_path / 'server.db'}")
    with Session(engine) as s:
        run = Run(name="r", config_hash="h", config={}, total_rounds=3, status="running", flwr_run_ids=["77"])
        s.add(run)
        s.flush()
        s.add(RoundAttempt(run_id=run.id, round=2, attempt=1, flwr_run_id="77", sent=2, outcome="running"))
        s.commit()
    row = end_run(engine, 77, "stopped", "stopped by `flwr stop`")
    assert (row.status, row.error) == ("stopped", "stopped by `flwr stop`")
    assert end_run(engine, 77, "failed", "later").status == "stopped"  # a stop outranks the failure it caused
    with Session(engine) as s:
        attempt = s.scalars(select(RoundAttempt)).one()
        assert attempt.outcome == "interrupted" and "ended (stopped)" in attempt.detail
