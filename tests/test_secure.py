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
from m3fm.model.packing import pack_state
from transport.protocol import PACKED_ORDER_KEY, TRAINED_MARK_KEY
from server.config import ServerConfigError, load_server_config
from server.rounds import phase_config, run_federation
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


def test_secagg_round_equals_the_plain_task_aware_mean_and_the_server_never_sees_one_site(ingested, tiny_model,
                                                                                           tmp_path):
    _, sites, _ = ingested
    cfg = secure_toml(tmp_path, multitask=1)
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    grid = InProcessGrid(client_app, nodes)
    packed = pack_state(tiny_model.state_dict())
    config = dict(phase_config(cfg, 2))  # multitask: the sites hold different tasks, so heads differ per site
    out, contributors, done = secure_train_round(grid, cfg.secagg, ArrayRecord({k: Array(v) for k, v in packed.items()}),
                                                 config, 2, list(nodes))
    assert out is not None and len(done.site_metrics) == 3 and not done.failures
    # what each site computed, replayed in the clear (training is deterministic for a given config)
    plain = [secure_update(open_site(site, cfg.model), packed,
                           {**config, PACKED_ORDER_KEY: ",".join(packed), TRAINED_MARK_KEY: 0.5})[:2] for site in sites]
    step = 2 * 0.5 / 2**22  # SecAgg+ quantization step at clipping_range 0.5
    for i, key in enumerate(packed):
        k = sum(int(ind[i][0] > 0) for _, ind in plain)
        assert contributors[key] == k
        expected = packed[key] if k == 0 else packed[key] + sum(u[i] for u, _ in plain) / k
        np.testing.assert_allclose(out[key], expected, atol=4 * step * len(sites) / max(k, 1) + 1e-7)
    assert 0 < contributors["shared"] == 3 and min(contributors.values()) < 3  # task-aware: some head not everywhere
    # nothing the server received holds a site's update: only masked integer vectors, no weights
    masked = []
    for reply in grid.received:
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        for rec in reply.content.config_records.values():
            for value in rec.values():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    try:
                        masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in value]))
                    except Exception:  # noqa: BLE001 - key shares and ciphertexts are not arrays
                        continue
    assert len(masked) == 3
    for updates, indicators in plain:
        q = np.concatenate([a.ravel() for a in quantize(updates + indicators, 0.5, 2**22)])
        for m in masked:
            assert m.shape[0] >= q.shape[0]
            assert np.mean(m[:q.shape[0]] == q) < 0.01  # masked: indistinguishable from uniform noise


def test_secagg_run_with_central_dp_records_rounds_and_epsilon(ingested, tmp_path):
    _, sites, _ = ingested
    extra = '[privacy.central_dp]\nclipping = "client"\nnoise_multiplier = 1.0\nclipping_norm = 0.5\n'
    cfg = secure_toml(tmp_path, name="sa-dp", multitask=1, extra=extra)
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)}
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    with Session(open_server_store(cfg.database_url)) as s:
        rounds = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round)).all()
        trained = {(m.round, m.site_id) for m in s.scalars(select(SiteMetric).where(SiteMetric.kind == "train"))}
        ledger = s.scalars(select(PrivacyLedger).where(PrivacyLedger.run_id == run_id)).all()
    assert [(r.round, r.sites_accepted) for r in rounds] == [(1, 3), (2, 3)]
    assert trained == {(r, s.site_id) for r in (1, 2) for s in sites}
    assert [(r.round, r.site_id, r.steps) for r in ledger] == [(1, "*", 1), (2, "*", 2)]


def test_secagg_config_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ServerConfigError, match='"fedavg" only'):
        secure_toml(tmp_path, strategy="fedadam")
    with pytest.raises(ServerConfigError, match='clipping = "client"'):
        secure_toml(tmp_path, name="b", extra='[privacy.central_dp]\nclipping = "server"\n')
