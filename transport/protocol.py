"""The wire protocol between the coordinator and a site, in one place: message types, record names, config keys,
metric prefixes, and the typed values they carry. No Flower and no torch here: the coordinator (server/), the
hospital (client/) and the site's warm service (client/service.py) all import it, and none imports the others.

A training round: the coordinator sends `train.<phase>` with records ARRAYS (the packed global weights, one vector
per parameter group, m3fm/weights/packing.py) and CONFIG (RoundConfig.to_config()). The site answers with SITE
({site_id, skipped}) and, when it trained, ARRAYS and METRICS (LocalRound.to_metrics()). SecAgg+ rounds are plain
`train` messages (server/secure.py); evaluation is `evaluate`; after the last round `query.report` asks each site
for its report, answered in REPORT ({json}).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# message types
TRAIN = "train"  # a SecAgg+ round: the legacy fit message that secaggplus_mod answers in stages
EVALUATE = "evaluate"
REPORT = "query.report"


def train_type(phase: str) -> str:
    """`train.pretrain`, `train.multitask`: the ClientApp routes on it (@app.train("pretrain"))."""
    return f"{TRAIN}.{phase}"


# record names
ARRAYS, METRICS, CONFIG, SITE, REPORT_RECORD = "arrays", "metrics", "config", "site", "report"
SITE_ID, SKIPPED, REPORT_JSON = "site_id", "skipped", "json"  # fields of SITE and REPORT_RECORD

# metric keys and prefixes
COUNT = "n."  # "n.<group>": the site's sample count for a parameter group ("n.shared": the shared trunk)
ITEMS = "items."  # "items.<task or objective>": items seen (training) or scored (evaluation)
LOSS = "loss."  # "loss.<task or objective>": mean training loss
DP = "dp."  # DP-SGD spend of the round (privacy/dp_sgd.py): per site, kept in the ledger, never averaged
NUM_EXAMPLES, STEPS, SECONDS = "num-examples", "steps", "seconds"  # SECONDS: the local training itself
TIME = "time."  # where a site's reply time went besides training (benchmarks/round_overhead.py):
CLIENTAPP_AGE = "time.clientapp"  # the ClientApp process's age when it asked the service (start, imports, task pull)
SERVICE_TIME = "time.service"  # the service's whole request: weights in, training, weights out
RELAY_TIME = "time.relay"  # the relay's request to the service, channel transfers included
CLIENTAPP_STARTED = "time.clientapp-started"  # when the ClientApp process started (Unix time, s)
RELAY_ANSWERED = "time.relay-answered"  # when the relay had the service's answer (Unix time, s)

# node config keys (what `m3fm-client start` gives its SuperNode) and the simulation's run config key
SITE_DIR, SERVICE_SOCKET = "site-dir", "service-socket"  # the site folder; its warm service's channel
SIM_SITES = "sim-sites"  # comma-separated site folders; virtual SuperNode i serves entry i (Ray simulation)

# keys SecAgg+ rounds add to the round config (server/secure.py)
PACKED_ORDER_KEY = "packed-keys"  # the order of the packed vectors inside the legacy Parameters
TRAINED_MARK_KEY = "trained-mark"  # the value a site sends as its "I trained this group" indicator
# central DP's client-side clipping norm: Flower's own key (flwr KEY_CLIPPING_NORM, which fixedclipping_mod reads),
# named here for the site's service, which imports no Flower; tests/test_secure.py checks the two agree
CLIPPING_NORM_KEY = "clipping_norm"
CHUNK_KEY = "secagg-chunk"  # which chunk of the packed update this SecAgg+ instance sums (transport/secure_chunks.py)
# the run's tokenizer (m3fm/model/text.py fingerprint) in every request's config: a site whose own differs refuses
TOKENIZER_KEY = "tokenizer"
CHUNK_VALUES_KEY = "secagg-chunk-values"  # values per chunk (the last may be shorter)
# the ArrayRecord a site's collect-stage reply carries its masked vector in (transport/masked_arrays.py)
MASKED_ARRAYS_KEY = "secagg-masked"


def split_list(value) -> tuple[str, ...]:
    return tuple(x for x in str(value or "").split(",") if x)


@dataclass
class RoundConfig:
    """What a site needs to run one training round; its keys travel in the CONFIG record."""
    phase: str  # pretrain | multitask
    phase_round: int  # 1-based round within the phase
    rounds: int  # rounds of the phase
    local_steps: int
    lr: float
    batch_size: int
    model: str  # m3fm/model/configs.py name
    warmup_steps: int = 0
    scales: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    tasks_per_step: int = 0
    micro_batches: int = 1
    seed: int = 0
    run_name: str = ""
    server_round: int = 0
    proximal_mu: float = 0.0
    extra: dict = field(default_factory=dict)  # dp-* keys (privacy/budget.py), SecAgg+ and clipping keys

    def to_config(self) -> dict:
        return {"phase": self.phase, "phase-round": self.phase_round, "rounds": self.rounds,
                "local-steps": self.local_steps, "lr": self.lr, "batch-size": self.batch_size,
                "warmup-steps": self.warmup_steps, "scales": ",".join(self.scales), "tasks": ",".join(self.tasks),
                "tasks-per-step": self.tasks_per_step,
                "micro-batches": self.micro_batches, "model": self.model, "seed": self.seed,
                "run-name": self.run_name, "server-round": self.server_round, "proximal-mu": self.proximal_mu,
                **self.extra}

    @classmethod
    def from_config(cls, config: dict) -> "RoundConfig":
        return cls(phase=str(config["phase"]), phase_round=int(config["phase-round"]), rounds=int(config["rounds"]),
                   local_steps=int(config["local-steps"]), lr=float(config["lr"]),
                   batch_size=int(config["batch-size"]), model=str(config["model"]),
                   warmup_steps=int(config.get("warmup-steps", 0)), scales=split_list(config.get("scales")),
                   tasks=split_list(config.get("tasks")), tasks_per_step=int(config.get("tasks-per-step", 0)),
                   micro_batches=int(config.get("micro-batches", 1)),
                   seed=int(config.get("seed", 0)), run_name=str(config.get("run-name", "")),
                   server_round=int(config.get("server-round", 0)),
                   proximal_mu=float(config.get("proximal-mu", 0.0)),
                   extra={k: v for k, v in config.items() if k not in ROUND_KEYS})


ROUND_KEYS = frozenset(RoundConfig("", 0, 0, 0, 0.0, 0, "").to_config())  # what is not `extra`


@dataclass
class EvaluateConfig:
    phase: str
    model: str
    seed: int = 0
    split: str = "val"

    def to_config(self) -> dict:
        return {"phase": self.phase, "model": self.model, "seed": self.seed, "split": self.split}

    @classmethod
    def from_config(cls, config: dict) -> "EvaluateConfig":
        return cls(str(config["phase"]), str(config["model"]), int(config.get("seed", 0)),
                   str(config.get("split", "val")))


@dataclass
class ReportConfig:
    model: str
    run_name: str
    run_id: int
    server_round: int
    split: str = "test"
    threshold: float = 0.5

    def to_config(self) -> dict:
        return {"model": self.model, "run-name": self.run_name, "run-id": self.run_id,
                "server-round": self.server_round, "split": self.split, "threshold": self.threshold}

    @classmethod
    def from_config(cls, config: dict) -> "ReportConfig":
        return cls(str(config["model"]), str(config.get("run-name", "")), int(config.get("run-id", 0)),
                   int(config.get("server-round", 0)), str(config.get("split", "test")),
                   float(config.get("threshold", 0.5)))


@dataclass
class LocalRound:
    """A site's training round, as it leaves the site (besides its weights): sample counts per parameter group,
    items and mean loss per task or objective, DP-SGD spend (already `dp.`-prefixed), or why it did not train."""
    counts: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    skipped: str = ""  # non-empty: the site did not train, and this is why (no weights travel)

    def to_metrics(self) -> dict:
        metrics = {NUM_EXAMPLES: int(self.counts.get("shared", 0)), STEPS: self.steps, SECONDS: self.seconds}
        metrics.update(self.privacy)
        metrics.update({f"{COUNT}{g}": int(n) for g, n in self.counts.items()})
        metrics.update({f"{ITEMS}{k}": int(n) for k, n in self.items.items()})
        metrics.update({f"{LOSS}{k}": float(v) for k, v in self.loss.items()})
        return metrics


def counts_of(metrics) -> dict[str, int]:
    """The `n.<group>` sample counts of a reply's metrics (values as sent: the coordinator checks their types)."""
    return {k[len(COUNT):]: v for k, v in metrics.items() if k.startswith(COUNT)}
