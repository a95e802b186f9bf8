"""`server.toml`: one file configures a federated run. Errors name the file and the field.

Every field, with its default and what it does: examples/server.toml (loaded by tests/test_examples.py, which
also checks that it names every field of FIELDS below).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3fm.phase import PhaseConfig
from m3fm.model.configs import CONFIGS, get_config
from m3fm.tasks import TASK_BY_NAME
from m3fm.tokenizer_folder import tokenizer_folder
from privacy.budget import DPSGDConfig, PrivacyConfigError
from server.secure import SecAggConfig
from transport.secure_chunks import MAX_CHUNK_VALUES

STRATEGIES = ("fedavg", "fedprox", "fedadam")
PHASES = ("pretrain", "multitask")
PHASE_FIELDS = {"rounds", "local_steps", "lr", "batch_size", "warmup_steps", "scales", "tasks", "tasks_per_step",
                "micro_batches"}
# table -> the fields it may hold; anything else is refused with the file, the table and the known names
FIELDS = {
    "": {"run", "strategy", "privacy", *PHASES},
    "run": {"name", "model", "min_sites", "expected_sites", "join_wait", "round_timeout", "round_retries",
            "evaluate_every", "site_reports", "seed", "init", "tokenizer", "out_dir", "database"},
    "strategy": {"name", "proximal_mu", "eta", "beta_1", "beta_2", "tau", "max_update_norm"},
    "pretrain": PHASE_FIELDS,
    "multitask": PHASE_FIELDS,
    "privacy": {"dp_sgd", "central_dp", "secagg"},
    "privacy.dp_sgd": {"noise_multiplier", "target_epsilon", "max_grad_norm", "delta", "physical_batch", "clipping"},
    "privacy.central_dp": {"noise_multiplier", "clipping_norm", "clipping", "delta"},
    "privacy.secagg": {"num_shares", "reconstruction_threshold", "clipping_range", "quantization_range", "timeout",
                       "chunk_values"},
}


class ServerConfigError(ValueError):
    pass


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01
    eta: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    max_update_norm: float = 1e3


@dataclass
class CentralDPConfig:
    noise_multiplier: float = 1.0
    clipping_norm: float = 10.0
    clipping: str = "server"
    delta: float = 1e-5


@dataclass
class ServerConfig:
    path: Path
    name: str = "m3fm"
    model: str = "tiny"
    min_sites: int = 2
    expected_sites: int = 0  # operational: who joins round 1 does not change what the run trains
    join_wait: float = 60.0
    round_timeout: float = 600.0
    round_retries: int = 2  # operational, like out_dir: not in training_dict, so a resume may change it
    evaluate_every: int = 1
    site_reports: bool = True
    seed: int = 0
    init: Path | None = None  # the checkpoint a fresh run starts from
    tokenizer: Path | None = None  # the run's tokenizer folder
    out_dir: Path = Path("runs")
    database: str = ""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    dp_sgd: DPSGDConfig | None = None
    central_dp: CentralDPConfig | None = None
    secagg: SecAggConfig | None = None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.out_dir / 'server.db'}"

    def run_dir(self, run_id: int) -> Path:
        """Where a run's round checkpoints and its run report go."""
        return self.out_dir / f"run-{run_id:04d}"

    @property
    def total_rounds(self) -> int:
        return sum(p.rounds for p in self.phases)

    def phase_of(self, server_round: int) -> tuple[PhaseConfig, int]:
        """Global round (1-based, continuous over phases) -> phase and round within it."""
        r = server_round
        for p in self.phases:
            if r <= p.rounds:
                return p, r
            r -= p.rounds
        raise ValueError(f"round {server_round} is past the last round {self.total_rounds}")

    def evaluates_after(self, server_round: int) -> bool:
        if server_round == self.total_rounds:
            return True
        return self.evaluate_every > 0 and server_round % self.evaluate_every == 0

    def training_dict(self) -> dict:
        """What decides the training (not where files go): hashed, so a resume can refuse a changed run."""
        d = {"name": self.name, "model": self.model, "seed": self.seed, "strategy": asdict(self.strategy),
             "phases": [asdict(p) for p in self.phases]}
        for key in ("init", "tokenizer"):  # only when set, so hashes of runs without them do not change
            if getattr(self, key) is not None:
                d[key] = str(getattr(self, key))
        for key in ("dp_sgd", "central_dp", "secagg"):  # only when set, so hashes of runs without DP do not change
            if getattr(self, key) is not None:
                d[key] = asdict(getattr(self, key))
        return d

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.training_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _take(table: dict, key: str, kind, default, where: str, check=None, why: str = ""):
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ServerConfigError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    if check is not None and not check(value):
        raise ServerConfigError(f"{where}: field {key!r} {why}, got {value!r}")
    return value


def _known(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ServerConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(allowed)}")


def _phase(d: dict, name: str, where: str, cfg_name: str) -> PhaseConfig:
    where = f"{where} [{name}]"
    _known(d, FIELDS[name], where)
    positive = (lambda v: v > 0, "must be positive")
    pc = PhaseConfig(
        name=name,
        rounds=_take(d, "rounds", int, 1, where, lambda v: v >= 0, "must be 0 or more"),
        local_steps=_take(d, "local_steps", int, 2, where, *positive),
        lr=_take(d, "lr", float, 1e-4, where, *positive),
        batch_size=_take(d, "batch_size", int, 4, where, *positive),
        warmup_steps=_take(d, "warmup_steps", int, 0, where, lambda v: v >= 0, "must be 0 or more"),
        scales=tuple(_take(d, "scales", list, [], where)),
        tasks=tuple(_take(d, "tasks", list, [], where)),
        tasks_per_step=_take(d, "tasks_per_step", int, 0, where, lambda v: v >= 0, "must be 0 or more"),
        micro_batches=_take(d, "micro_batches", int, 1, where, *positive),
    )
    scales = {s.name for s in get_config(cfg_name).scales}
    if bad := [s for s in pc.scales if s not in scales]:
        raise ServerConfigError(f"{where}: field 'scales' names {bad}, not scales of model {cfg_name!r} {sorted(scales)}")
    if bad := [t for t in pc.tasks if t not in TASK_BY_NAME]:
        raise ServerConfigError(f"{where}: field 'tasks' names unknown task(s) {bad}")
    return pc


def _secagg(t: dict, w: str) -> SecAggConfig:
    _known(t, FIELDS["privacy.secagg"], w)
    positive = (lambda v: v > 0, "must be positive")
    return SecAggConfig(num_shares=_take(t, "num_shares", float, 1.0, w, *positive),
                        reconstruction_threshold=_take(t, "reconstruction_threshold", float, 0.67, w, *positive),
                        clipping_range=_take(t, "clipping_range", float, 1.0, w, *positive),
                        quantization_range=_take(t, "quantization_range", int, 2**22, w,
                                                 lambda v: 0 < v < 2**32, "must be in (0, 2**32)"),
                        timeout=_take(t, "timeout", float, 600.0, w, *positive),
                        chunk_values=_take(t, "chunk_values", int, 2**25, w, lambda v: 0 < v <= MAX_CHUNK_VALUES,
                                           f"must be in [1, {MAX_CHUNK_VALUES}]: a chunk's masked values travel as "
                                           "int64 in one object under Flower's 2 GiB cap"))


def _privacy(d: dict, where: str) -> tuple[DPSGDConfig | None, CentralDPConfig | None]:
    _known(d, FIELDS["privacy"], f"{where} [privacy]")
    dp = central = None
    if "dp_sgd" in d:
        t, w = d["dp_sgd"], f"{where} [privacy.dp_sgd]"
        _known(t, FIELDS["privacy.dp_sgd"], w)
        positive = (lambda v: v > 0, "must be positive")
        try:
            dp = DPSGDConfig(noise_multiplier=_take(t, "noise_multiplier", float, 0.0, w, *positive),
                             target_epsilon=_take(t, "target_epsilon", float, 0.0, w, *positive),
                             max_grad_norm=_take(t, "max_grad_norm", float, 1.0, w, *positive),
                             delta=_take(t, "delta", float, 1e-5, w, lambda v: 0 < v < 1, "must be in (0, 1)"),
                             physical_batch=_take(t, "physical_batch", int, 8, w, *positive),
                             clipping=_take(t, "clipping", str, DPSGDConfig.clipping, w))
        except PrivacyConfigError as e:
            raise ServerConfigError(f"{w}: {e}") from None
    if "central_dp" in d:
        t, w = d["central_dp"], f"{where} [privacy.central_dp]"
        _known(t, FIELDS["privacy.central_dp"], w)
        central = CentralDPConfig(
            noise_multiplier=_take(t, "noise_multiplier", float, 1.0, w, lambda v: v > 0, "must be positive"),
            clipping_norm=_take(t, "clipping_norm", float, 10.0, w, lambda v: v > 0, "must be positive"),
            clipping=_take(t, "clipping", str, "server", w, lambda v: v in ("server", "client"),
                           'must be "server" or "client"'),
            delta=_take(t, "delta", float, 1e-5, w, lambda v: 0 < v < 1, "must be in (0, 1)"))
    return dp, central


def _init_path(run: dict, path: Path, where: str) -> Path | None:
    init = _take(run, "init", str, "", where)
    if not init:
        return None
    full = Path(init) if Path(init).is_absolute() else (path.parent / init).resolve()
    if not full.is_file():
        raise ServerConfigError(f"{where}: init {init!r}: no checkpoint at {full}")
    return full


def _tokenizer_path(run: dict, path: Path, where: str) -> Path | None:
    try:
        return tokenizer_folder(_take(run, "tokenizer", str, "", where), path.parent, f"{where} tokenizer")
    except ValueError as e:
        raise ServerConfigError(str(e)) from None


def load_server_config(path: str | Path) -> ServerConfig:
    path = Path(path).resolve()
    if not path.is_file():
        raise ServerConfigError(f"{path}: not found")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ServerConfigError(f"{path}: not valid TOML: {e}") from None
    _known(d, FIELDS[""], str(path))
    run, where = d.get("run", {}), f"{path} [run]"
    _known(run, FIELDS["run"], where)
    model = _take(run, "model", str, "tiny", where, lambda v: v in CONFIGS, f"must be one of {list(CONFIGS)}")
    out_dir = Path(_take(run, "out_dir", str, "runs", where))
    st, swhere = d.get("strategy", {}), f"{path} [strategy]"
    _known(st, FIELDS["strategy"], swhere)
    strategy = StrategyConfig(
        name=_take(st, "name", str, "fedavg", swhere, lambda v: v in STRATEGIES, f"must be one of {list(STRATEGIES)}"),
        proximal_mu=_take(st, "proximal_mu", float, 0.01, swhere, lambda v: v >= 0, "must be 0 or more"),
        eta=_take(st, "eta", float, 1e-2, swhere, lambda v: v > 0, "must be positive"),
        beta_1=_take(st, "beta_1", float, 0.9, swhere, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        beta_2=_take(st, "beta_2", float, 0.99, swhere, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        tau=_take(st, "tau", float, 1e-3, swhere, lambda v: v > 0, "must be positive"),
        max_update_norm=_take(st, "max_update_norm", float, 1e3, swhere, lambda v: v > 0, "must be positive"),
    )
    cfg = ServerConfig(
        path=path,
        name=_take(run, "name", str, path.stem, where, lambda v: v.strip() != "", "must not be empty"),
        model=model,
        min_sites=_take(run, "min_sites", int, 2, where, lambda v: v >= 1, "must be at least 1"),
        expected_sites=_take(run, "expected_sites", int, 0, where, lambda v: v >= 0, "must be 0 or more"),
        join_wait=_take(run, "join_wait", float, 60.0, where, lambda v: v >= 0, "must be 0 or more"),
        round_timeout=_take(run, "round_timeout", float, 600.0, where, lambda v: v > 0, "must be positive"),
        round_retries=_take(run, "round_retries", int, 2, where, lambda v: 0 <= v <= 20, "must be 0 to 20"),
        evaluate_every=_take(run, "evaluate_every", int, 1, where, lambda v: v >= 0, "must be 0 or more"),
        site_reports=_take(run, "site_reports", bool, True, where),
        seed=_take(run, "seed", int, 0, where),
        init=_init_path(run, path, where),
        tokenizer=_tokenizer_path(run, path, where),
        out_dir=out_dir if out_dir.is_absolute() else (path.parent / out_dir).resolve(),
        database=_take(run, "database", str, "", where),
        strategy=strategy,
        phases=[_phase(d.get(p, {}), p, str(path), model) for p in PHASES],
    )
    cfg.dp_sgd, cfg.central_dp = _privacy(d.get("privacy", {}), str(path))
    if "secagg" in d.get("privacy", {}):
        cfg.secagg = _secagg(d["privacy"]["secagg"], f"{path} [privacy.secagg]")
        if strategy.name != "fedavg":
            raise ServerConfigError(f"{path}: [privacy.secagg] works with [strategy] name = \"fedavg\" only (the server "
                                    "sees the sum of the updates, not the replies FedProx and FedAdam act on)")
        if cfg.central_dp is not None and cfg.central_dp.clipping != "client":
            raise ServerConfigError(f"{path}: [privacy.central_dp] with [privacy.secagg] needs clipping = \"client\" "
                                    "(the server never sees a single site's update to clip it)")
        if cfg.min_sites < 2:
            raise ServerConfigError(f"{path} [run]: min_sites must be at least 2 with [privacy.secagg]")
    if cfg.dp_sgd is not None and strategy.name == "fedprox":
        raise ServerConfigError(f"{path}: [strategy] name = \"fedprox\" with [privacy.dp_sgd] is not supported: the "
                                "proximal term would bypass DP-SGD's per-sample clipping; use fedavg or fedadam")
    if cfg.total_rounds == 0:
        raise ServerConfigError(f"{path}: [pretrain] and [multitask] both have 0 rounds; nothing to run")
    return cfg
