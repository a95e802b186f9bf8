"""What a site does when the coordinator asks: train a phase's round, or evaluate. No Flower here.

Each request loads the site's ingested data (the database and cached crops,
never raw DICOM), puts the global weights in a fresh model, runs m3fm/local.py
and returns what may leave the site: weights, sample counts per parameter
group and per task, losses and aggregate metrics. The ClientApp
(client/app.py) only converts these to and from Flower records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from client.site import SiteConfig, load_site
from m3fm.data.datasets import SiteData
from m3fm.data.store import IngestRun
from m3fm.local import (PhaseConfig, local_evaluate, local_multitask, local_pretrain, multitask_population,
                        pretrain_population)
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.packing import group_of_packed, pack_state, unpack_state
from transport.protocol import TRAINED_MARK_KEY
from m3fm.model.text import TextTokenizer, load_tokenizer
from privacy.dp_local import private_multitask, private_pretrain
from privacy.budget import DPSGDConfig, SiteBudget
from privacy.dp_sgd import PrivacyLedger, sample_rate


class SiteNotReady(RuntimeError):
    """The site cannot take part: never ingested, or ingested for another model configuration."""


def ensure_ingested(site: SiteConfig) -> dict:
    """The summary of the site's last finished ingestion, or SiteNotReady saying what to run."""
    db = site.work_dir / "site.db"
    hint = f"run `m3fm-client ingest {site.site_dir}` first"
    if not db.is_file():
        raise SiteNotReady(f"site {site.site_id} was never ingested (no database at {db}); {hint}")
    engine = create_engine(site.database_url)
    try:
        with Session(engine) as s:
            last = s.scalars(select(IngestRun).where(IngestRun.finished_at.is_not(None))
                             .order_by(IngestRun.id.desc())).first()
    except OperationalError as e:
        raise SiteNotReady(f"site {site.site_id}: {db} is not a site database ({e.orig}); {hint}") from None
    finally:
        engine.dispose()
    if last is None:
        raise SiteNotReady(f"site {site.site_id}: ingestion never finished (database {db}); {hint}")
    return last.summary or {}


def site_for(node_config: dict, run_config: dict) -> SiteConfig:
    """The site a SuperNode serves: its own `site-dir`, or in simulation the partition's entry of `sim-sites`."""
    if "site-dir" in node_config:
        return load_site(Path(str(node_config["site-dir"])))
    sites = [p for p in str(run_config.get("sim-sites", "")).split(",") if p]
    if "partition-id" in node_config and sites:
        return load_site(Path(sites[int(node_config["partition-id"]) % len(sites)]))
    raise SiteNotReady("this SuperNode serves no site: start it with `m3fm-client start --site SITE_DIR`")


@dataclass
class OpenSite:
    site: SiteConfig
    data: SiteData
    model: M3FM
    tokenizer: TextTokenizer


def open_site(site: SiteConfig, model_name: str, packed: dict[str, np.ndarray]) -> OpenSite:
    ensure_ingested(site)
    cfg = get_config(model_name)
    data = SiteData(site.database_url, site.work_dir, cfg)
    if not data.series and not data.exams:
        raise SiteNotReady(f"site {site.site_id} has no cached crops for model {model_name!r} (it was ingested for "
                           f"{site.model_config!r}); set [ingest] model_config = \"{model_name}\" in site.toml and "
                           "run m3fm-client ingest again")
    model = M3FM(cfg)
    model.load_state_dict(unpack_state(packed, model.state_dict()), strict=True)  # unpack checks every group
    want = site.device.get("type", "cuda" if torch.cuda.is_available() else "cpu")
    model.to(torch.device(want))
    return OpenSite(site, data, model, load_tokenizer(cfg))


def phase_from(config: dict) -> PhaseConfig:
    split = lambda v: tuple(x for x in str(v or "").split(",") if x)  # noqa: E731
    return PhaseConfig(name=str(config["phase"]), rounds=int(config["rounds"]), local_steps=int(config["local-steps"]),
                       lr=float(config["lr"]), batch_size=int(config["batch-size"]),
                       warmup_steps=int(config.get("warmup-steps", 0)), scales=split(config.get("scales")),
                       tasks=split(config.get("tasks")), tasks_per_step=int(config.get("tasks-per-step", 0)))


def train_round(site: SiteConfig, packed: dict[str, np.ndarray], config: dict):
    """Packed global weights in -> (packed new weights or None when the site did not train, metrics, reason it
    did not train or None)."""
    pc = phase_from(config)
    dp = DPSGDConfig.from_config(config)
    budget = SiteBudget.from_site(site.privacy, str(site.site_dir / "site.toml"))
    if dp is None and budget.require_dp:
        return None, {}, (f"site {site.site_id} trains only under DP-SGD (privacy.require_dp in its site.toml) and "
                          "this run has no [privacy.dp_sgd]")
    o = open_site(site, str(config["model"]), packed)
    seed, phase_round = int(config.get("seed", 0)), int(config["phase-round"])
    if dp is None:
        run = {"pretrain": local_pretrain, "multitask": local_multitask}[pc.name]
        out = run(o.model, o.data, o.tokenizer, pc, phase_round, site.min_cell_size, seed=seed,
                  proximal_mu=float(config.get("proximal-mu", 0.0)))
    else:
        run = {"pretrain": private_pretrain, "multitask": private_multitask}[pc.name]
        where = (str(config.get("run-name", "")), int(config.get("server-round", 0)))
        out = run(o.model, o.data, o.tokenizer, pc, phase_round, site.min_cell_size, dp, budget,
                  PrivacyLedger(site.work_dir), where, seed=seed, plan=dp_plan(o, config, site.min_cell_size))
    if not out["trained"]:
        return None, {}, out["reason"]
    metrics = {"num-examples": out["counts"]["shared"], "steps": out["steps"], "seconds": out["seconds"]}
    metrics.update(out.get("privacy", {}))
    metrics.update({f"n.{g}": n for g, n in out["counts"].items()})
    metrics.update({f"items.{k}": n for k, n in out["items"].items()})
    metrics.update({f"loss.{k}": v for k, v in out["loss"].items()})
    return pack_state(o.model.state_dict()), metrics, None


def secure_update(site: SiteConfig, packed: dict[str, np.ndarray], config: dict
                  ) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """What a site sends into SecAgg+ (server/secure.py): its update per packed group, zero for groups it did not
    train, then one 0/mark "trained it" indicator per group. -> (updates, indicators) in the order of `packed`,
    clear metrics."""
    weights, metrics, skipped = train_round(site, packed, config)
    trained = {k[len("n."):] for k, v in metrics.items() if k.startswith("n.") and v > 0}
    updates = [weights[k] - v if group_of_packed(k) in trained else np.zeros_like(v)  # skipped: nothing trained
               for k, v in packed.items()]
    mark = float(config.get(TRAINED_MARK_KEY, 1.0))  # within SecAgg+'s clipping range, or it would be clipped
    indicators = [np.array([mark if group_of_packed(k) in trained else 0.0], dtype=np.float32) for k in packed]
    return updates, indicators, {**metrics, "site_id": site.site_id, "skipped": skipped or ""}


def dp_plan(o: OpenSite, config: dict, min_items: int) -> list[tuple[float, int]] | None:
    """For noise derived from a target epsilon: this site's (sample rate, steps) over the run's whole plan
    (`dp-plan`: PHASE:STEPS:BATCH per phase)."""
    if not float(config.get("dp-target-epsilon", 0)) or not config.get("dp-plan"):
        return None
    plan, scales = [], phase_from(config).scales if config["phase"] == "pretrain" else ()
    for part in str(config["dp-plan"]).split(","):
        phase, steps, batch = part.split(":")
        pc = PhaseConfig(phase, batch_size=int(batch), scales=scales if phase == "pretrain" else ())
        _, per_key = (pretrain_population(o.data, pc, o.model, 1, min_items) if phase == "pretrain"
                      else multitask_population(o.data, pc, 1, min_items))
        if items := sum(per_key.values()):
            plan.append((sample_rate(items, int(batch)), int(steps)))
    return plan


def evaluate_round(site: SiteConfig, packed: dict[str, np.ndarray], config: dict) -> dict:
    o = open_site(site, str(config["model"]), packed)
    out = local_evaluate(o.model, o.data, o.tokenizer, str(config["phase"]), site.min_cell_size,
                         split=str(config.get("split", "val")))
    metrics = {"num-examples": sum(out["items"].values())}
    metrics.update({f"items.{k}": n for k, n in out["items"].items()})
    metrics.update(out["metrics"])
    return metrics
