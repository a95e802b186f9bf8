"""The coordinator's round loop: phases, task-aware aggregation, a checkpoint after every round, resume.

Rounds are numbered continuously over the phases (pretraining rounds first,
then multitask rounds). Flower's `Strategy.start` restarts at round 1 and has
no phases, so this loop drives the strategy's own configure/aggregate methods
through the Grid; each round's replies are folded as they arrive (server/delivery.py, server/strategy.py) and
the round's RoundOutcome is what gets recorded. After each round the global weights and the strategy state
go to `out_dir/<run>/round-NNNN.pt` (written atomically), then the round's rows
land in the server database in one transaction: a crash loses at most the
round in flight, and `--resume` starts after the last checkpoint.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from sqlalchemy import select
from sqlalchemy.orm import Session

from m3fm.checkpoint import load_checkpoint, read_checkpoint, write_checkpoint
from m3fm.model.configs import get_config
from m3fm.weights.packing import group_of_packed, pack_state, unpack_state
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from privacy.accounting import MECHANISM as DP_SGD_MECHANISM
from server.central_dp import MECHANISM as CENTRAL_DP_MECHANISM, TaskAwareCentralDP, wrap_central_dp
from server.config import ServerConfig
from server.report import write_run_report
from server.delivery import Only, RoundAttempts, deliver, stream
from server.lifecycle import OPERATOR_NOTE
from server.store import (Checkpoint, PrivacyLedger, RejectedReply, Round, RoundTiming, Run, SiteMetric, SiteReport,
                          interrupt_attempts, last_checkpoint, latest_run, now, open_server_store)
from server.secure import secure_train_round
from server.strategy import (RoundOutcome, TaskAwareFedAvg, build_strategy, evaluate_round, train_round,
                             weighted_metrics)
from server.task_sum import array_record
from server.tensorboard import write_round
from transport.protocol import (ARRAYS, CONFIG, COUNT, DP, REPORT, REPORT_JSON, REPORT_RECORD, SITE_ID, SKIPPED,
                                TOKENIZER_KEY, EvaluateConfig, ReportConfig, RoundConfig)


class RunError(RuntimeError):
    """The run cannot go on: too few sites, a refused resume, a damaged checkpoint."""


@functools.lru_cache(maxsize=8)
def _fingerprint(model: str, folder: Path | None) -> str:
    return load_tokenizer(get_config(model), folder).fingerprint


def run_tokenizer(cfg: ServerConfig) -> str:
    """The fingerprint of the run's tokenizer ([run] tokenizer, or the shipped one): every request carries it, every
    checkpoint records it."""
    return _fingerprint(cfg.model, cfg.tokenizer)


def request_config(cfg: ServerConfig, config: dict) -> ConfigRecord:
    """A request's config, carrying the run's tokenizer (a site with another one refuses, client/federated.py)."""
    return ConfigRecord({**config, TOKENIZER_KEY: run_tokenizer(cfg)})


def initial_weights(cfg: ServerConfig) -> dict[str, torch.Tensor]:
    """A fresh run's weights: [run] init's checkpoint, checked strictly against the run's model configuration, or
    the seed's fresh model (every fresh run of one config starts from the same weights)."""
    torch.manual_seed(cfg.seed)
    model = M3FM(get_config(cfg.model))
    if cfg.init is not None:
        payload = read_checkpoint(cfg.init)
        made_for, tokenizer = payload["config"], payload["extra"].get("tokenizer")
        if made_for != model.cfg.to_dict():
            raise RunError(f"[run] init {cfg.init} was made for model configuration {made_for.get('name')!r}, not "
                           f"this run's {cfg.model!r} (converted weights: model = \"<size>-ref\")")
        if tokenizer and tokenizer != run_tokenizer(cfg):
            raise RunError(f"[run] init {cfg.init} was trained with tokenizer {tokenizer}, this run uses "
                           f"{run_tokenizer(cfg)} ([run] tokenizer: the folder it was made with)")
        load_checkpoint(cfg.init, model, payload=payload)
    return model.state_dict()


def weight_shapes(cfg: ServerConfig) -> dict[str, torch.Tensor]:
    """The model's state dict on the meta device: names, shapes and dtypes, no memory."""
    with torch.device("meta"):
        return M3FM(get_config(cfg.model)).state_dict()


def save_round(path: Path, cfg: ServerConfig, server_round: int, state: dict[str, torch.Tensor],
               strategy_state: dict[str, np.ndarray]) -> str:
    """An m3fm checkpoint (m3fm/checkpoint.py reads it) plus the round and strategy state; returns its SHA-256."""
    phase, phase_round = cfg.phase_of(server_round)
    extra = {"round": server_round, "phase": phase.name, "phase_round": phase_round, "config_hash": cfg.config_hash,
             "strategy": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in strategy_state.items()}}
    extra["tokenizer"] = run_tokenizer(cfg)  # a run started from this checkpoint must use the same
    write_checkpoint(path, state, get_config(cfg.model), step=server_round, extra=extra)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wait_for_sites(grid, n: int, timeout: float, expected: int = 0, join_wait: float = 0.0, log=None) -> list[int]:
    """Bounded wait until n SuperNodes are connected (Flower's own sampler would wait forever); then up to join_wait
    seconds more until `expected` are. Sites started together connect seconds apart: a round started on the first
    n would leave the others out until the next round, so a coordinator's first round waits for them."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RunError(f"only {len(nodes)} site(s) connected after {timeout:.0f}s; the run needs {n} (run.min_sites)")
        time.sleep(1.0)
    settled = time.monotonic() + join_wait
    while len(nodes) < expected and time.monotonic() < settled:
        time.sleep(0.25)
        nodes = list(grid.get_node_ids())
    if len(nodes) < expected and log is not None:
        log(f"{OPERATOR_NOTE}{len(nodes)} of run.expected_sites = {expected} connected after "
            f"run.join_wait = {join_wait:.0f}s; "
            "the round goes on with them, the others join the round after they connect")
    return nodes


def phase_config(cfg: ServerConfig, server_round: int) -> ConfigRecord:
    phase, phase_round = cfg.phase_of(server_round)
    return request_config(cfg, RoundConfig(
        phase=phase.name, phase_round=phase_round, rounds=phase.rounds, local_steps=phase.local_steps, lr=phase.lr,
        batch_size=phase.batch_size, model=cfg.model, warmup_steps=phase.warmup_steps, scales=tuple(phase.scales),
        tasks=tuple(phase.tasks), tasks_per_step=phase.tasks_per_step,
        micro_batches=phase.micro_batches, seed=cfg.seed, run_name=cfg.name,
        server_round=server_round, extra=dp_sgd_config(cfg)).to_config())


def dp_sgd_config(cfg: ServerConfig) -> dict:
    """The dp-* keys a site reads (privacy/dp_sgd.py); dp-plan is the run's steps and batch size per phase."""
    if cfg.dp_sgd is None:
        return {}
    plan = ",".join(f"{p.name}:{p.rounds * p.local_steps}:{p.batch_size}" for p in cfg.phases if p.rounds)
    return {**cfg.dp_sgd.to_config(), "dp-plan": plan}


def _text(flwr_id: int | None) -> str | None:
    return None if flwr_id is None else str(flwr_id)  # Flower's ids are unsigned 64-bit; SQLite's are signed


def start_or_resume(s: Session, cfg: ServerConfig, resume: bool, flwr_run_id: int | None):
    """-> run row, first round to train, global weights, strategy state."""
    run = latest_run(s, cfg.name)
    if not resume:
        run = Run(name=cfg.name, config_hash=cfg.config_hash, config=cfg.training_dict(), total_rounds=cfg.total_rounds,
                  status="running", flwr_run_ids=[_text(flwr_run_id)])
        s.add(run)
        s.commit()
        return run, 1, initial_weights(cfg), {}
    if run is None:
        raise RunError(f"--resume: the database {cfg.database_url} holds no run named {cfg.name!r}")
    if run.status == "completed":
        raise RunError(f"--resume: run {run.id} ({cfg.name!r}) already completed all {run.total_rounds} rounds")
    if run.config_hash != cfg.config_hash:
        raise RunError(f"--resume: {cfg.path} changed since run {run.id} started (config hash {run.config_hash} "
                       f"then, {cfg.config_hash} now); start a new run under another [run] name instead")
    run.status, run.error = "running", None
    run.flwr_run_ids = [*run.flwr_run_ids, _text(flwr_run_id)]
    interrupt_attempts(s, run.id, f"the coordinator stopped before the round was recorded; resumed as Flower run "
                                  f"{_text(flwr_run_id)}")
    s.commit()
    ck = last_checkpoint(s, run.id)
    if ck is None:
        return run, 1, initial_weights(cfg), {}
    path = Path(ck.path)
    if not path.is_file() or file_sha256(path) != ck.sha256:
        raise RunError(f"--resume: checkpoint {path} of round {ck.round} is missing or its SHA-256 differs from "
                       "the database's; refusing to continue from weights that are not the ones recorded")
    payload = read_checkpoint(path)
    state = {k: v.numpy() for k, v in payload["extra"]["strategy"].items()}
    return run, ck.round + 1, payload["model"], state


def run_federation(grid, cfg: ServerConfig, resume: bool = False, flwr_run_id: int | None = None, log=print) -> int:
    """Drive every remaining round of the run; returns the run's id in the server database."""
    gc.collect()
    gc.freeze()  # what exists by now lives as long as the run: later collections skip it (delivery.push)
    try:
        return _run_federation(grid, cfg, resume, flwr_run_id, log)
    finally:
        gc.unfreeze()


def _run_federation(grid, cfg: ServerConfig, resume: bool, flwr_run_id: int | None, log) -> int:
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        run, first, weights, strategy_state = start_or_resume(s, cfg, resume, flwr_run_id)
        run_id = run.id
    packed = pack_state(weights)
    arrays = array_record(packed)
    sc = cfg.strategy
    strategy = build_strategy(sc.name, {group_of_packed(k) for k in packed}, cfg.min_sites, sc.max_update_norm,
                              sc.proximal_mu, sc.eta, sc.beta_1, sc.beta_2, sc.tau)
    if cfg.central_dp is not None:
        c = cfg.central_dp
        strategy = wrap_central_dp(strategy, c.noise_multiplier, c.clipping_norm, c.clipping, cfg.min_sites, c.delta)
    strategy.load_state(strategy_state)
    with Session(engine) as s:  # name sites by node even when a reply carries no site record (a lost one)
        strategy.site_names.update({int(n): site for n, site in s.execute(
            select(SiteMetric.node_id, SiteMetric.site_id).where(SiteMetric.run_id == run_id)) if n.isdigit()})
    shapes = weight_shapes(cfg)
    log(f"run {run_id} ({cfg.name}): rounds {first}..{cfg.total_rounds}, strategy {sc.name}, model {cfg.model}")
    try:
        for rnd in range(first, cfg.total_rounds + 1):
            arrays = run_round(grid, cfg, strategy, engine, run_id, rnd, arrays, shapes, flwr_run_id, log,
                               first=rnd == first)
    except Exception as e:
        with Session(engine) as s:
            run = s.get(Run, run_id)
            run.status, run.error, run.updated_at = "failed", f"{type(e).__name__}: {e}", now()
            s.commit()
        raise
    with Session(engine) as s:
        run = s.get(Run, run_id)
        run.status, run.updated_at = "completed", now()
        s.commit()
    if cfg.site_reports:  # after "completed": a failure here never makes a trained run look unfinished
        collect_site_reports(grid, cfg, strategy, engine, run_id, arrays, log)
        html = write_run_report(engine, run_id, cfg.run_dir(run_id))[1]
        log(f"run report: {html}")
    engine.dispose()
    return run_id


def collect_site_reports(grid, cfg: ServerConfig, strategy, engine, run_id: int, arrays: ArrayRecord, log) -> int:
    """Send the final weights to every site as a `query.report` message; each keeps the model, writes its own
    report (client/report.py) and answers with its aggregates, stored in site_reports. -> reports received."""
    config = request_config(cfg, ReportConfig(model=cfg.model, run_name=cfg.name, run_id=run_id,
                                              server_round=cfg.total_rounds).to_config())
    messages = [Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node, message_type=REPORT)
                for node in grid.get_node_ids()]
    got = 0
    for reply in stream(grid, messages, cfg.round_timeout, strategy.sent_to):
        who = strategy.who(reply)
        node = who["node_id"]
        if reply.has_error():
            row = RejectedReply(run_id=run_id, round=cfg.total_rounds, kind="report", reason=reply.error.reason, **who)
        else:
            try:
                report = json.loads(str(reply.content[REPORT_RECORD][REPORT_JSON]))
                report["site_id"], report["tasks"]  # what the run report reads
                row = SiteReport(run_id=run_id, round=cfg.total_rounds, site_id=str(report["site_id"]), node_id=node,
                                 report=report)
                got += 1
            except (ValueError, KeyError, TypeError) as e:  # one malformed reply is recorded; the others still count
                row = RejectedReply(run_id=run_id, round=cfg.total_rounds, kind="report",
                                    reason=f"malformed report reply ({type(e).__name__}: {e})", **who)
        with Session(engine) as s:  # one by one: the coordinator shows each report as it lands
            s.add(row)
            s.commit()
    log(f"site reports: {got} of {len(messages)} sites")
    return got


def train_securely(grid, cfg: ServerConfig, strategy, arrays: ArrayRecord, rnd: int, nodes: list[int]) -> RoundOutcome:
    """A SecAgg+ training round (server/secure.py) -> its outcome, as train_round would give it (the sites' clear
    metrics name them); central DP's noise goes on the unmasked mean."""
    inner: TaskAwareFedAvg = getattr(strategy, "strategy", strategy)
    config = dict(phase_config(cfg, rnd))
    if isinstance(strategy, TaskAwareCentralDP):
        config[KEY_CLIPPING_NORM] = strategy.clipping_norm
    packed, contributors, done = secure_train_round(grid, cfg.secagg, arrays, config, rnd, nodes)
    inner.outcome = outcome = RoundOutcome(replies=len(nodes), contributors=contributors, rejections=[
        {"site_id": "unknown", "node_id": "", "reason": f"SecAgg+ failure: {e}"} for e in done.failures])
    usable = []
    for node, metrics in done.site_metrics:
        who = {"site_id": str(metrics.pop(SITE_ID, f"node-{node}")), "node_id": str(node)}
        if skipped := metrics.pop(SKIPPED, ""):
            outcome.skips.append({**who, "reason": str(skipped)})
        else:
            outcome.accepted.append({**who, "metrics": metrics})
            usable.append((MetricRecord(metrics), int(metrics.get(f"{COUNT}shared", 1))))
    if packed is None:
        return outcome
    outcome.arrays = array_record(packed)
    if isinstance(strategy, TaskAwareCentralDP):
        outcome.arrays = strategy.release(outcome.arrays)
    outcome.metrics = weighted_metrics(usable) if usable else None
    return outcome


def privacy_rows(strategy, outcome: RoundOutcome, run_id: int, rnd: int) -> list[PrivacyLedger]:
    """The round's ledger: each DP-SGD site's spend (from its reply), and central DP's release if any."""
    rows = []
    for a in outcome.accepted:
        m = a["metrics"]
        if f"{DP}epsilon" in m:
            rows.append(PrivacyLedger(run_id=run_id, round=rnd, site_id=a["site_id"], mechanism=DP_SGD_MECHANISM,
                                      epsilon=m[f"{DP}epsilon"], epsilon_round=m[f"{DP}epsilon-round"],
                                      delta=m[f"{DP}delta"], noise_multiplier=m[f"{DP}noise-multiplier"],
                                      sample_rate=m[f"{DP}sample-rate"], steps=int(m[f"{DP}steps"])))
    if isinstance(strategy, TaskAwareCentralDP) and strategy.releases:
        eps, before = strategy.epsilon(), strategy.epsilon(strategy.releases - 1)
        rows.append(PrivacyLedger(run_id=run_id, round=rnd, site_id="*", mechanism=CENTRAL_DP_MECHANISM, epsilon=eps,
                                  epsilon_round=eps - before, delta=strategy.delta,
                                  noise_multiplier=strategy.noise_multiplier, sample_rate=1.0, steps=strategy.releases))
    return rows


class RoundClock:
    """Seconds from the round's start to each of its marks (kept in round_timings): what a round's fixed cost is
    made of (benchmarks/round_overhead.py)."""

    def __init__(self):
        self.t0, self.marks = time.perf_counter(), {"start_unix": time.time()}  # to line up with sites' clocks

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.t0, 4)

    def arrivals(self, replies: Iterator[Message]) -> Iterator[Message]:
        """The replies as they arrive, marking the first and the last."""
        for reply in replies:
            self.marks.setdefault("first_reply", round(time.perf_counter() - self.t0, 4))
            self.mark("last_reply")
            yield reply


def run_round(grid, cfg: ServerConfig, strategy: TaskAwareFedAvg, engine, run_id: int, rnd: int,
              arrays: ArrayRecord, shapes: dict[str, torch.Tensor], flwr_run_id: int | None, log,
              first: bool = False) -> ArrayRecord:
    """One round; `first`: the first this coordinator process runs, which waits for run.expected_sites."""
    clock = RoundClock()
    phase, phase_round = cfg.phase_of(rnd)
    expected, join_wait = (cfg.expected_sites, cfg.join_wait) if first else (0, 0.0)
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.round_timeout, expected, join_wait, log)
    clock.mark("sites")
    attempts = RoundAttempts(engine, run_id, rnd, flwr_run_id)
    inner: TaskAwareFedAvg = getattr(strategy, "strategy", strategy)
    if cfg.secagg is not None:
        attempts.start(len(nodes))
        outcome = train_securely(grid, cfg, strategy, arrays, rnd, nodes)
    else:
        # the strategy samples (its own wait would block on fewer nodes than min_sites) and takes the round's
        # global weights now, before any reply is checked against them
        first = list(strategy.configure_train(rnd, arrays, phase_config(cfg, rnd), Only(grid, nodes)))
        sendings: list[list[Message]] = []

        def messages(to: list[int]) -> list[Message]:
            attempts.start(len(to))
            sendings.append(first if not sendings else [
                Message(content=first[0].content, message_type=first[0].metadata.message_type, dst_node_id=n)
                for n in to])
            return sendings[-1]

        replies = deliver(grid, messages, nodes, cfg.round_timeout, cfg.round_retries, cfg.min_sites, inner.sent_to,
                          on_attempt=lambda lost: attempts.end(lost, inner, log))
        clock.mark("configured")
        outcome = train_round(strategy, rnd, clock.arrivals(replies))  # each reply is folded as it arrives
    clock.mark("aggregated")
    problems = [RejectedReply(run_id=run_id, round=rnd, kind="rejected", **r) for r in outcome.rejections]
    problems += [RejectedReply(run_id=run_id, round=rnd, kind="skip", **r) for r in outcome.skips]
    if len(outcome.accepted) < cfg.min_sites:
        with Session(engine) as s:  # the rejections are kept even though the round is not
            s.add_all(problems)
            s.commit()
        why = "; ".join(f"{r['site_id']}: {r['reason']}" for r in outcome.rejections + outcome.skips) or "no replies"
        attempts.fail(why)
        raise RunError(f"round {rnd}: {len(outcome.accepted)} usable replies of {outcome.replies}, fewer than "
                       f"run.min_sites = {cfg.min_sites} ({why})")
    arrays = outcome.arrays
    rows = [SiteMetric(run_id=run_id, round=rnd, site_id=a["site_id"], node_id=a["node_id"], kind="train",
                       metrics=a["metrics"]) for a in outcome.accepted]
    evaluate_metrics = None
    if cfg.evaluates_after(rnd):
        wait_for_sites(grid, cfg.min_sites, cfg.round_timeout)
        config = request_config(cfg, EvaluateConfig(phase=phase.name, model=cfg.model, seed=cfg.seed).to_config())
        sent = strategy.configure_evaluate(rnd, arrays, config, grid)
        evaluate_round(strategy, rnd, stream(grid, list(sent), cfg.round_timeout, inner.sent_to))
        evaluate_metrics = dict(outcome.evaluate_metrics or {})
        for e in outcome.evaluations:
            if "metrics" in e:
                rows.append(SiteMetric(run_id=run_id, round=rnd, site_id=e["site_id"], node_id=e["node_id"],
                                       kind="evaluate", metrics=e["metrics"]))
            else:
                problems.append(RejectedReply(run_id=run_id, round=rnd, site_id=e["site_id"], node_id=e["node_id"],
                                              kind="evaluate", reason=e["error"]))
        clock.mark("evaluated")
    rows += privacy_rows(strategy, outcome, run_id, rnd)
    path = cfg.run_dir(run_id) / f"round-{rnd:04d}.pt"
    state = unpack_state({k: a.numpy() for k, a in arrays.items()}, shapes)
    sha = save_round(path, cfg, rnd, state, strategy.state())
    clock.mark("checkpointed")
    seconds = time.perf_counter() - clock.t0
    per_site = [(r.site_id, r.kind, dict(r.metrics or {})) for r in rows if isinstance(r, SiteMetric)]  # before commit
    with Session(engine) as s:
        s.add(Round(run_id=run_id, round=rnd, phase=phase.name, phase_round=phase_round, flwr_run_id=_text(flwr_run_id),
                    sites_replied=outcome.replies, sites_accepted=len(outcome.accepted),
                    train_metrics=dict(outcome.metrics or {}), evaluate_metrics=evaluate_metrics, seconds=seconds))
        s.add_all(rows + problems)
        s.add(Checkpoint(run_id=run_id, round=rnd, path=str(path), sha256=sha))
        s.add(RoundTiming(run_id=run_id, round=rnd, marks=clock.marks))
        attempts.finish(s)
        run = s.get(Run, run_id)
        run.updated_at = now()
        s.commit()
    write_round(cfg.run_dir(run_id), rnd, phase.name, outcome.metrics, evaluate_metrics, per_site, seconds,
                len(outcome.accepted), log)
    log(f"round {rnd}/{cfg.total_rounds} ({phase.name} {phase_round}/{phase.rounds}): "
        f"{len(outcome.accepted)}/{outcome.replies} sites accepted, {seconds:.1f}s")
    return arrays
