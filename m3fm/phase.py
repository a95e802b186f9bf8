"""One training phase's settings ([pretrain] and [multitask] of server.toml), kept free of torch: the coordinator's
commands (`m3fm-server status`, `enroll`, a refused `run`) read the server configuration and answer in about a
second instead of importing torch and transformers (7 s on a 2-core machine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PhaseConfig:
    name: str  # "pretrain" or "multitask"
    rounds: int = 1
    local_steps: int = 2
    lr: float = 2e-4
    batch_size: int = 4
    warmup_steps: int = 0
    scales: tuple[str, ...] = ()  # pretraining: empty means every scale of the model configuration
    tasks: tuple[str, ...] = ()  # multitask: empty means every task the site has labels for
    tasks_per_step: int = 0  # micro-batches (one task each) per optimizer step; 0: every task
    micro_batches: int = 1  # pretraining: micro-batches (batch_size crops of one scale each, scales in turn) per step

    def train_config(self):
        from m3fm.train import TrainConfig  # torch: the coordinator's commands read this class without it

        return TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.rounds * self.local_steps)
