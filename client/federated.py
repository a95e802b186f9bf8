"""What a site does when the coordinator asks: train a phase's round, or evaluate. No Flower here.

A site is opened once (`open_site`: its ingested data - the database and
cached crops, never raw DICOM -, tokenizer and model; client/service.py keeps
it warm between rounds). Each request loads the global weights into that
model, runs m3fm/local.py and returns what may leave the site: weights, sample
counts per parameter group and per task, losses and aggregate metrics
(transport/protocol.py's LocalRound). The ClientApp (client/app.py) only
relays these to and from Flower records.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from client.site import SiteConfig
from m3fm.data.datasets import SiteData
from m3fm.data.store import IngestRun
from m3fm.distributed import Ranks
from m3fm.local import (PhaseConfig, local_evaluate, local_multitask, local_pretrain, multitask_population,
                        pretrain_population)
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.weights.packing import group_of_packed, pack_state, unpack_state
from m3fm.model.text import TextTokenizer, load_tokenizer
from privacy.budget import DPSGDConfig, SiteBudget
from privacy.accounting import PrivacyLedger
from transport.protocol import (CHUNK_VALUES_KEY, CLIPPING_NORM_KEY, ITEMS, NUM_EXAMPLES, SITE_ID, SKIPPED,
                                TOKENIZER_KEY, TRAINED_MARK_KEY, EvaluateConfig, LocalRound, RoundConfig)
from transport.secure_chunks import MAX_CHUNK_VALUES, ChunkedUpdate


class SiteNotReady(RuntimeError):
    """The site cannot take part: never ingested, or ingested for another model configuration."""


def ensure_ingested(site: SiteConfig) -> dict:
    """The summary of the site's last finished ingestion, or SiteNotReady saying what to run."""
    return last_ingest(site)[1]


def last_ingest(site: SiteConfig) -> tuple[int, dict]:
    """(id, summary) of the site's last finished ingestion; a new id means the site's data changed."""
    db = site.work_dir / "site.db"
    hint = f"run `m3fm-client ingest {site.site_dir}` first"
    if not db.is_file():
        raise SiteNotReady(f"site {site.site_id} was never ingested (no database at {db}); {hint}")
    engine = create_engine(site.database_url)
    try:
        with Session(engine) as s:
            last = s.scalars(select(IngestRun).where(IngestRun.finished_at.is_not(None))
                             .order_by(IngestRun.id.desc())).first()
            if last is None:
                raise SiteNotReady(f"site {site.site_id}: ingestion never finished (database {db}); {hint}")
            return last.id, last.summary or {}
    except OperationalError as e:
        raise SiteNotReady(f"site {site.site_id}: {db} is not a site database ({e.orig}); {hint}") from None
    finally:
        engine.dispose()


@dataclass
class OpenSite:
    """A site opened for training: its data, tokenizer and one model on its device (client/service.py keeps one
    between rounds). Each request loads the incoming global weights into `model`."""
    site: SiteConfig
    data: SiteData
    model: M3FM
    tokenizer: TextTokenizer
    ranks: Ranks | None = None  # one of the site's local ranks (client/ranks.py); None: the site trains alone


def uses_cuda(site: SiteConfig, world: int = 1) -> bool:
    """[device] type in site.toml (auto: CUDA when there is one); SiteNotReady when it asks for more GPUs than the
    machine has (one per rank)."""
    if site.device_type == "cpu" or (site.device_type == "auto" and not torch.cuda.is_available()):
        return False
    if torch.cuda.device_count() < world:
        raise SiteNotReady(f"site {site.site_id} trains on {world} CUDA device(s) ({site.site_dir / 'site.toml'} "
                           f"[device], or --devices), this machine has {torch.cuda.device_count()}")
    return True


def site_device(site: SiteConfig, ranks: Ranks | None = None) -> torch.device:
    """Where the site's model lives: rank r of a site with several ranks trains on GPU r."""
    if not uses_cuda(site, ranks.world if ranks is not None else 1):
        return torch.device("cpu")
    return torch.device("cuda", ranks.rank if ranks is not None else 0)


def open_site(site: SiteConfig, model_name: str, ranks: Ranks | None = None) -> OpenSite:
    ensure_ingested(site)
    cfg = get_config(model_name)
    data = SiteData(site.database_url, site.work_dir, cfg)
    if not data.series and not data.exams:
        raise SiteNotReady(f"site {site.site_id} has no cached crops for model {model_name!r} (it was ingested for "
                           f"{site.model_config!r}); set [ingest] model_config = \"{model_name}\" in site.toml and "
                           "run m3fm-client ingest again")
    model = M3FM(cfg).to(site_device(site, ranks))
    return OpenSite(site, data, model, load_tokenizer(cfg, site.tokenizer), ranks)


def check_tokenizer(o: OpenSite, config: dict) -> None:
    """The run's tokenizer (its fingerprint in the request) must be this site's: another one gives the same text
    other token ids, and the model would train and answer on nonsense."""
    want = str(config.get(TOKENIZER_KEY, ""))
    if want and want != o.tokenizer.fingerprint:
        raise SiteNotReady(f"site {o.site.site_id}: the run uses tokenizer {want}, this site's ({o.tokenizer.source}) "
                           f"is {o.tokenizer.fingerprint}; set [model] tokenizer in {o.site.site_dir / 'site.toml'} "
                           "to the run's folder (vocab.json, merges.txt)")


def load_weights(o: OpenSite, packed: dict[str, np.ndarray]) -> None:
    """The global weights into the warm model, and whatever the last request left behind undone: a phase freezes
    parameters it does not train (privacy/dp_local.py), evaluation switches to eval mode, and gradients would hold memory between rounds."""
    o.model.load_state_dict(unpack_state(packed, o.model.state_dict()), strict=True)  # unpack checks every group
    o.model.train()  # as a freshly built model is (an evaluation leaves it in eval mode; Opacus insists)
    for p in o.model.parameters():
        p.requires_grad_(True)
        p.grad = None


def round_config(config: dict) -> tuple[RoundConfig, PhaseConfig]:
    rc = RoundConfig.from_config(config)
    return rc, PhaseConfig(name=rc.phase, rounds=rc.rounds, local_steps=rc.local_steps, lr=rc.lr,
                           batch_size=rc.batch_size, warmup_steps=rc.warmup_steps, scales=rc.scales, tasks=rc.tasks,
                           tasks_per_step=rc.tasks_per_step, micro_batches=rc.micro_batches)


def train_round(o: OpenSite, packed: dict[str, np.ndarray], config: dict, send: bool = True
                ) -> tuple[dict[str, np.ndarray] | None, LocalRound]:
    """Packed global weights in -> (packed new weights, or None when the site did not train; the round's result,
    whose `skipped` says why it did not). send=False: a site's rank other than 0, whose weights nobody reads (rank
    0's are the same), so they are not packed."""
    site = o.site
    rc, pc = round_config(config)
    dp = DPSGDConfig.from_config(config)
    budget = SiteBudget.from_site(site.privacy, str(site.site_dir / "site.toml"))
    if dp is None and budget.require_dp:
        return None, LocalRound(skipped=f"site {site.site_id} trains only under DP-SGD (privacy.require_dp in its "
                                        "site.toml) and this run has no [privacy.dp_sgd]")
    load_weights(o, packed)
    # under DP-SGD the noise comes from torch's generator too: it must stay unpredictable, never seeded from the run
    with round_rng(o, rc) if dp is None else nullcontext():
        out = _train(o, rc, pc, dp, budget, config)
    if not out["trained"]:
        return None, LocalRound(skipped=out["reason"])
    result = LocalRound(counts=out["counts"], items=out["items"], loss=out["loss"], privacy=out.get("privacy", {}),
                        steps=out["steps"], seconds=out["seconds"])
    return (pack_state(o.model.state_dict()) if send else None), result


@contextmanager
def round_rng(o: OpenSite, rc: RoundConfig):
    """Torch's global generator (dropout, drop path) seeded from the run's seed, the site and the round, and put
    back afterwards: a round trains the same whether the site's model is warm or freshly built. Plain training
    only (see train_round)."""
    device = next(o.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{rc.seed}|{o.site.site_id}|{rc.phase}|{rc.phase_round}".encode()))
        yield


def _train(o: OpenSite, rc: RoundConfig, pc: PhaseConfig, dp: DPSGDConfig | None, budget: SiteBudget,
           config: dict) -> dict:
    site = o.site
    if dp is None:
        run = {"pretrain": local_pretrain, "multitask": local_multitask}[pc.name]
        return run(o.model, o.data, o.tokenizer, pc, rc.phase_round, site.min_cell_size, seed=rc.seed,
                   proximal_mu=rc.proximal_mu, ranks=o.ranks)
    from privacy.dp_local import private_multitask, private_pretrain  # Opacus: only rounds under DP-SGD import it

    run = {"pretrain": private_pretrain, "multitask": private_multitask}[pc.name]
    return run(o.model, o.data, o.tokenizer, pc, rc.phase_round, site.min_cell_size, dp, budget,
               PrivacyLedger(site.work_dir), (rc.run_name, rc.server_round), seed=rc.seed,
               plan=dp_plan(o, config, site.min_cell_size), ranks=o.ranks)


def secure_update(o: OpenSite, packed: dict[str, np.ndarray], config: dict) -> tuple[ChunkedUpdate, dict]:
    """What a site sends into SecAgg+ (server/secure.py), chunk by chunk: its update per packed group, zero for
    groups it did not train, flattened in packed order, and a 0/mark "trained it" mark per group. -> (the update,
    saved in the site's work folder until its last chunk is sent; clear metrics). With central DP's client-side
    clipping (`clipping_norm` in the config) the whole update is scaled to that L2 norm at most before any chunk
    leaves (FlatClip, as Flower's clip_inputs_inplace; per chunk it would bound each chunk, not the site)."""
    weights, result = train_round(o, packed, config)
    trained = {g for g, n in result.counts.items() if n > 0}
    update = ChunkedUpdate.create(secure_folder(o), secure_round_id(config), [(k, v.size) for k, v in packed.items()],
                                  int(config.get(CHUNK_VALUES_KEY, MAX_CHUNK_VALUES)))
    offset = 0
    for k, v in packed.items():
        if group_of_packed(k) in trained:  # skipped: nothing trained, the zeros stay
            np.subtract(weights[k].reshape(-1), v.reshape(-1), out=update.flat[offset:offset + v.size],
                        casting="unsafe")
        offset += v.size
    if CLIPPING_NORM_KEY in config:
        update.flat *= min(1.0, float(config[CLIPPING_NORM_KEY]) / max(float(np.linalg.norm(update.flat)), 1e-12))
    mark = float(config.get(TRAINED_MARK_KEY, 1.0))  # within SecAgg+'s clipping range, or it would be clipped
    update.marks = {k: mark if group_of_packed(k) in trained else 0.0 for k in packed}
    update.save()
    return update, {**result.to_metrics(), SITE_ID: o.site.site_id, SKIPPED: result.skipped}


def secure_folder(o: OpenSite) -> Path:
    return o.site.work_dir / "secagg"


def secure_round_id(config: dict) -> tuple[str, int]:
    """Which round a SecAgg+ chunk belongs to: later chunks are answered only from that round's update."""
    rc = RoundConfig.from_config(config)
    return rc.run_name, rc.server_round


def dp_plan(o: OpenSite, config: dict, min_items: int) -> list[tuple[float, int]] | None:
    """For noise derived from a target epsilon: this site's (patient sampling rate, steps) per key over the run's
    whole plan (`dp-plan`: PHASE:STEPS:BATCH per phase)."""
    if not float(config.get("dp-target-epsilon", 0)) or not config.get("dp-plan"):
        return None
    from privacy.dp_local import key_plan

    plan, scales = [], round_config(config)[1].scales if config["phase"] == "pretrain" else ()
    for part in str(config["dp-plan"]).split(","):
        phase, steps, batch = part.split(":")
        pc = PhaseConfig(phase, batch_size=int(batch), scales=scales if phase == "pretrain" else ())
        ds, per_key = (pretrain_population(o.data, pc, o.model, 1, min_items) if phase == "pretrain"
                       else multitask_population(o.data, pc, 1, min_items))
        if per_key:
            plan += key_plan(o.data, ds, per_key, int(batch), int(steps))[2]
    return plan


def evaluate_round(o: OpenSite, packed: dict[str, np.ndarray], config: dict) -> dict:
    ec = EvaluateConfig.from_config(config)
    load_weights(o, packed)
    out = local_evaluate(o.model, o.data, o.tokenizer, ec.phase, o.site.min_cell_size, split=ec.split)
    metrics = {NUM_EXAMPLES: sum(out["items"].values())}
    metrics.update({f"{ITEMS}{k}": n for k, n in out["items"].items()})
    metrics.update(out["metrics"])
    return metrics
