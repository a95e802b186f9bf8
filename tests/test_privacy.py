"""Patient-level DP-SGD at a site and site-level central DP at the server (in-process; the real processes:
test_deployment.py)."""

import dataclasses
import json
import math
import shutil
import tomllib
from collections import defaultdict

import numpy as np
import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from client.app import app as client_app
from client.report import privacy_spent
from client.federated import open_site, train_round
from m3fm.data.datasets import PretrainDataset, QADataset, SiteData
from m3fm.model.configs import get_config
from m3fm.weights.packing import group_of_packed, pack_state
from m3fm.tasks import get_task
from privacy.accounting import PrivacyLedger, epsilon_of, noise_for_target
from privacy.dp_sgd import PatientSampler
from server.central_dp import wrap_central_dp
from server.cli import app as server_cli
from server.config import ServerConfigError, load_server_config
from server.rounds import phase_config, run_federation
from server.store import PrivacyLedger as LedgerRow, RejectedReply, open_server_store
from server.strategy import build_strategy
from sim.inprocess_grid import InProcessGrid
from test_strategy import REF, filled, reply

PRIVATE_TOML = """
[run]
name = "{name}"
model = "tiny"
min_sites = {min_sites}
round_timeout = 30
out_dir = "runs"
[pretrain]
rounds = 1
local_steps = 2
[multitask]
rounds = 1
local_steps = 2
{privacy}
"""
DP_SGD = "[privacy.dp_sgd]\nnoise_multiplier = 1.3\nmax_grad_norm = 1.0\ndelta = 1e-5\nphysical_batch = 4\n"


def private_toml(tmp_path, privacy=DP_SGD, name="dp", min_sites=2):
    path = tmp_path / "server.toml"
    path.write_text(PRIVATE_TOML.format(name=name, min_sites=min_sites, privacy=privacy))
    return load_server_config(path)


@pytest.fixture
def fresh_ledgers(ingested):
    """Each test starts with sites that never spent any privacy budget, and leaves them so."""
    _, sites, _ = ingested
    clear = lambda: [shutil.rmtree(s.work_dir / "privacy", ignore_errors=True) for s in sites]  # noqa: E731
    clear()
    yield sites
    clear()


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def patient_entries(site, cfg, rnd: int, sigma: float) -> list[tuple]:
    """The accountant entries a private round must charge, worked out here from the site's database: per key (scale
    or task), Poisson rate 1 / ceil(patients with items of the key / batch 4) and the steps the key trains."""
    pc = phase_config(cfg, rnd)
    data = SiteData(site.database_url, site.work_dir, get_config(cfg.model))
    if pc["phase"] == "pretrain":
        ds = PretrainDataset(data, "train")
    else:
        ds = QADataset(data, "train")
    patients = defaultdict(set)
    for i, key in enumerate(ds.keys):
        patients[key].add(data.patient_of(ds.exam_id(i)))
    keys = sorted(k for k in patients if ds.keys.count(k) >= site.min_cell_size)
    steps = [keys[s % len(keys)] for s in range(2)]  # local_steps 2, round robin from the phase's first step
    return [(sigma, 1 / math.ceil(len(patients[k]) / 4), steps.count(k)) for k in sorted(set(steps))]


def test_site_epsilon_is_per_patient_and_opacus_accountant_over_rounds_and_processes(fresh_ledgers, tiny_model,
                                                                                     tmp_path):
    site = fresh_ledgers[0]
    cfg = private_toml(tmp_path)
    packed = pack_state(tiny_model.state_dict())
    history = []
    for rnd in (1, 2):  # pretraining, then multitask: each call builds a new accountant from the site's disk
        weights, result = train_round(open_site(site, cfg.model), packed, dict(phase_config(cfg, rnd)))
        assert not result.skipped and weights is not None
        metrics = result.to_metrics()
        entries = patient_entries(site, cfg, rnd, 1.3)
        history += entries
        assert metrics["dp.sample-rate"] == pytest.approx(max(q for _, q, _ in entries))
        assert metrics["dp.noise-multiplier"] == 1.3 and metrics["dp.steps"] == 2
        assert metrics["dp.epsilon"] == pytest.approx(opacus_epsilon(history, 1e-5), rel=1e-9)
        assert metrics["dp.epsilon-round"] > 0
    ledger = PrivacyLedger(site.work_dir)  # what the next client process will load
    assert sum(h[2] for h in ledger.history) == 4
    assert [(r["round"], r["unit"]) for r in ledger.rounds] == [(1, "patient"), (2, "patient")]
    assert ledger.epsilon(1e-5) == pytest.approx(opacus_epsilon(history, 1e-5))


def test_patients_are_the_sampling_unit_whatever_their_number_of_items():
    """A patient with ten items is sampled as often as one with one item (rate q), and a step never takes two items
    of one patient: the bound the accountant's per-patient epsilon rests on."""
    units = {"emphysema": [[10 * p + j for j in range(1 + 9 * (p % 2))] for p in range(40)]}  # 1 or 10 items each
    sampler = PatientSampler(units, batch_size=8, seed=3)
    q, steps = sampler.rate["emphysema"], 3000
    assert q == 1 / math.ceil(40 / 8)
    picked = np.zeros(40)
    for _ in range(steps):
        items = sampler.sample("emphysema")
        owners = [i // 10 for i in items]
        assert len(set(owners)) == len(owners)  # one item per sampled patient
        picked[owners] += 1
    rate = picked / steps
    few, many = rate[0::2], rate[1::2]
    assert abs(few.mean() - q) < 0.01 and abs(many.mean() - q) < 0.01  # the item count does not raise the rate
    assert sampler.entries(1.1) == [[1.1, q, steps]]


@pytest.mark.parametrize("clipping", ["hooks", "fast"])
def test_dp_sgd_changes_the_weights_within_the_clipped_noisy_step(fresh_ledgers, tiny_model, tmp_path, clipping):
    site = fresh_ledgers[1]
    cfg = private_toml(tmp_path, privacy=DP_SGD + f'clipping = "{clipping}"\n')
    packed = pack_state(tiny_model.state_dict())
    opened = open_site(site, cfg.model)
    weights, result = train_round(opened, packed, dict(phase_config(cfg, 2)))  # multitask round
    # a step sets only its task's parameters trainable; the round leaves every multitask parameter trainable again
    assert all(p.requires_grad for n, p in opened.model.named_parameters() if not n.startswith(("mim_", "mlm_")))
    moved = {group_of_packed(k) for k in packed if not np.array_equal(packed[k], weights[k])}
    assert "shared" in moved and any(k.startswith("head:") for k in moved)
    assert not moved & {"mim", "mlm"}  # frozen outside their phase: no noise on weights no data touched
    # two steps train two of the site's tasks (one task a step): only those tasks' embeddings and predictors move,
    # every other task's stay exactly as they were (no noise-only steps on them)
    trained = sorted(k[len("items.task:"):] for k in result.to_metrics() if k.startswith("items.task:"))[:2]
    assert {g for g in moved if g.startswith("task:")} == {f"task:{t}" for t in trained}
    assert {g for g in moved if g.startswith("head:")} == {f"head:{get_task(t).head}" for t in trained}
    assert all(np.isfinite(w).all() for w in weights.values())


def test_a_site_at_its_ceiling_refuses_and_its_own_delta_wins(fresh_ledgers, tiny_model, tmp_path):
    site = dataclasses.replace(fresh_ledgers[0], privacy={"max_epsilon": 0.05, "delta": 1e-7})
    cfg = private_toml(tmp_path)
    packed = pack_state(tiny_model.state_dict())
    weights, result = train_round(open_site(site, cfg.model), packed, dict(phase_config(cfg, 1)))
    skipped = result.skipped
    assert weights is None and "past the site's max_epsilon 0.05" in skipped and "delta 1e-07" in skipped
    assert not (site.work_dir / "privacy" / "accountant.json").exists()  # nothing spent
    strict = dataclasses.replace(fresh_ledgers[0], privacy={"require_dp": True})
    plain = load_server_config(private_toml(tmp_path, privacy="", name="plain").path)
    _, result = train_round(open_site(strict, plain.model), packed, dict(phase_config(plain, 1)))
    assert "trains only under DP-SGD" in result.skipped


def test_a_ledger_with_item_level_rounds_is_not_extended_as_if_per_patient(fresh_ledgers, tiny_model, tmp_path):
    """An accountant file from the item-level DP-SGD this replaced bounds items, not patients: the site refuses to
    add per-patient rounds to it (naming the file and what to do), and its report does not call it a bound."""
    site = fresh_ledgers[0]
    path = site.work_dir / "privacy" / "accountant.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {"history": [[1.1, 0.25, 2]], "rounds": [{"run": "old", "round": 1, "phase": "pretrain", "at": 0.0,
                                                    "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 2,
                                                    "delta": 1e-5, "epsilon": 0.5, "epsilon_before": 0.0}]}
    path.write_text(json.dumps(old))
    cfg = private_toml(tmp_path)
    weights, result = train_round(open_site(site, cfg.model), pack_state(tiny_model.state_dict()),
                                  dict(phase_config(cfg, 1)))
    assert weights is None and str(path) in result.skipped and "item-level" in result.skipped
    assert json.loads(path.read_text()) == old  # nothing added, nothing lost
    assert "not a bound" in privacy_spent(site)["mechanism"]


def test_server_records_a_skipping_site_continues_and_fills_the_ledger(fresh_ledgers, tmp_path):
    sites = fresh_ledgers
    capped = tmp_path / "capped"  # the third site with a tight ceiling of its own
    capped.mkdir()
    doc = tomllib.loads((sites[2].site_dir / "site.toml").read_text())
    doc["privacy"] = {"max_epsilon": 0.05}
    doc["storage"] = {"work_dir": str(sites[2].work_dir)}
    (capped / "site.toml").write_text(tomli_w.dumps(doc))
    nodes = {1: {"site-dir": str(sites[0].site_dir)}, 2: {"site-dir": str(sites[1].site_dir)},
             3: {"site-dir": str(capped)}}
    cfg = private_toml(tmp_path, min_sites=2)
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        skips = s.scalars(select(RejectedReply).where(RejectedReply.run_id == run_id)).all()
        rows = s.scalars(select(LedgerRow).where(LedgerRow.run_id == run_id)).all()
    assert {(r.round, r.site_id, r.kind) for r in skips} == {(1, sites[2].site_id, "skip"), (2, sites[2].site_id, "skip")}
    assert all("max_epsilon" in r.reason for r in skips)
    assert {(r.round, r.site_id) for r in rows} == {(1, sites[0].site_id), (1, sites[1].site_id),
                                                    (2, sites[0].site_id), (2, sites[1].site_id)}
    for site in sites[:2]:  # the ledger's last row is the site's own accountant on its disk
        last = max((r for r in rows if r.site_id == site.site_id), key=lambda r: r.round)
        assert last.epsilon == pytest.approx(PrivacyLedger(site.work_dir).epsilon(1e-5))
        assert last.mechanism == "dp-sgd per patient" and last.steps == 2
    shown = CliRunner().invoke(server_cli, ["status", "--database", cfg.database_url], terminal_width=200)
    assert shown.exit_code == 0 and "privacy spent" in shown.stdout
    assert all(s.site_id in shown.stdout for s in sites)  # the capped site appears among the skips


def test_noise_for_a_target_epsilon_meets_it_over_the_plan():
    plan = [(0.25, 10), (0.1, 20)]
    sigma = noise_for_target(3.0, 1e-5, plan)
    assert epsilon_of([(sigma, q, n) for q, n in plan], 1e-5) <= 3.0
    assert epsilon_of([(sigma - 0.01, q, n) for q, n in plan], 1e-5) > 3.0


def test_privacy_config_errors_name_the_field(tmp_path):
    with pytest.raises(ServerConfigError, match=r"\[privacy.dp_sgd\].*exactly one of"):
        private_toml(tmp_path, privacy="[privacy.dp_sgd]\nnoise_multiplier = 1.0\ntarget_epsilon = 2.0\n")
    with pytest.raises(ServerConfigError, match=r"\[privacy.central_dp\]: field 'clipping'"):
        private_toml(tmp_path, privacy='[privacy.central_dp]\nclipping = "both"\n')


# ---- central DP ----

def central(noise=1.0, clip=1.0, clipping="server"):
    s = build_strategy("fedavg", {"shared", "head:yes_no", "head:lung_rads", "scale:lung"}, 1, 1e9)
    dp = wrap_central_dp(s, noise, clip, clipping, num_sites=3, delta=1e-5)
    dp.current_arrays = ArrayRecord({k: Array(v.copy()) for k, v in REF.items()})  # what configure_train sets
    s.reference = {k: v.copy() for k, v in REF.items()}
    return dp


def test_central_dp_clips_every_reply_and_adds_noise_calibrated_per_group():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    ref = {k: np.zeros(20_000, np.float32) for k in REF}
    ref["head:lung_rads"] += 5.0
    dp = central(noise=0.5, clip=2.0)
    dp.current_arrays = ArrayRecord({k: Array(v.copy()) for k, v in ref.items()})
    dp.strategy.reference = ref
    updates = [{k: v + 3.0 for k, v in ref.items()}, {k: v - 1.0 for k, v in ref.items()},
               {k: v + 0.001 for k, v in ref.items()}]
    counts = [{"shared": 5, "head:yes_no": 5}, {"shared": 50, "head:yes_no": 50}, {"shared": 1, "scale:lung": 1}]
    replies = [reply(i + 1, u, c) for i, (u, c) in enumerate(zip(updates, counts))]
    clipped, clip = [], dp.strategy.clip_reply

    def clip_and_record(msg):  # the strategy lets a reply's arrays go once folded: read them as clipping leaves them
        clip(msg)
        clipped.append({k: msg.content["arrays"][k].numpy() - ref[k] for k in ref})

    dp.strategy.clip_reply = clip_and_record
    out, _ = dp.aggregate_train(1, replies)
    assert len(clipped) == 3 and all(r.content.get("arrays") is None for r in replies)
    for update in clipped:  # the wrapper replaced each reply's arrays by the clipped ones
        assert np.linalg.norm(np.concatenate(list(update.values()))) <= 2.0 * (1 + 1e-5)
    out = {k: a.numpy() for k, a in out.items()}
    for key, sites in (("shared", [0, 1, 2]), ("head:yes_no", [0, 1]), ("scale:lung", [2])):
        mean = ref[key] + sum(clipped[i][key] for i in sites) / len(sites)  # each site once, whatever its count
        noise = out[key] - mean
        assert noise.std() == pytest.approx(0.5 * 2.0 / len(sites), rel=0.05)  # sigma * C / sites that trained it
        assert abs(noise.mean()) < 0.05
    np.testing.assert_array_equal(out["head:lung_rads"], ref["head:lung_rads"])  # nobody trained it: no noise
    assert dp.releases == 1 and dp.epsilon() == pytest.approx(opacus_epsilon([(0.5, 1.0, 1)], 1e-5))
    resumed = central(noise=0.5, clip=2.0)
    resumed.load_state(dp.state())  # the round checkpoint carries the release count
    assert resumed.releases == 1


def test_central_dp_drops_error_replies_instead_of_the_whole_round():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    dp = central()
    good = filled(shared=0.1, head_yes_no=0.1)
    out, _ = dp.aggregate_train(1, [reply(1, good, {"shared": 4, "head:yes_no": 4}), reply(2, None, {}, error="boom")])
    assert out is not None and [r["site_id"] for r in dp.rejections] == ["node-2"]  # an error names no site
    assert [a["site_id"] for a in dp.accepted] == ["site-1"]


def test_client_side_clipping_bounds_the_sites_update(fresh_ledgers, tiny_model, tmp_path):
    site = fresh_ledgers[0]
    cfg = private_toml(tmp_path, privacy='[privacy.central_dp]\nclipping = "client"\nclipping_norm = 0.01\n')
    packed = pack_state(tiny_model.state_dict())
    config = dict(phase_config(cfg, 1))
    config["clipping_norm"] = 0.01  # what DifferentialPrivacyClientSideFixedClipping.configure_train adds
    grid = InProcessGrid(client_app, {1: {"site-dir": str(site.site_dir)}})
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in packed.items()}),
                              "config": ConfigRecord(config)}), dst_node_id=1, message_type="train.pretrain")
    out = grid.send_and_receive([msg])[0]
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    update = np.concatenate([out.content["arrays"][k].numpy() - packed[k] for k in packed])
    assert 0 < np.linalg.norm(update) <= 0.01 * (1 + 1e-5)


def test_central_dp_run_writes_epsilon_per_round_to_the_ledger(ingested, tmp_path):
    _, sites, _ = ingested
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites[:2])}
    cfg = private_toml(tmp_path, privacy="[privacy.central_dp]\nnoise_multiplier = 2.0\nclipping_norm = 5.0\n",
                       name="cdp")
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    with Session(open_server_store(cfg.database_url)) as s:
        rows = s.scalars(select(LedgerRow).where(LedgerRow.run_id == run_id).order_by(LedgerRow.round)).all()
    assert [(r.round, r.site_id, r.mechanism, r.steps) for r in rows] == [(1, "*", "central-dp per site", 1),
                                                                         (2, "*", "central-dp per site", 2)]
    for r in rows:
        assert r.epsilon == pytest.approx(opacus_epsilon([(2.0, 1.0, r.steps)], 1e-5))
    assert rows[1].epsilon_round == pytest.approx(rows[1].epsilon - rows[0].epsilon)
