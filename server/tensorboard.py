"""Per-round metrics as TensorBoard event files, so researchers compare runs side by side
(`tensorboard --logdir OUT_DIR`): OUT_DIR/run-NNNN/tensorboard/. Optional: `pip install 'm3fm-fed[tensorboard]'`;
without the package a run logs once that it is writing none. The scalars are the ones the run database records
for the round (the sites' aggregates, never more), under tags

  PHASE/train/METRIC             the round's aggregate training metrics (losses, items, epsilon, ...)
  PHASE/evaluate/METRIC          the federated evaluation's aggregate, where it ran
  site/SITE/train|evaluate/METRIC each site's reply
  round/seconds, round/sites     the round's wall time and the sites it accepted
"""

from __future__ import annotations

from pathlib import Path

_writers: dict[Path, object] = {}  # one writer (one event file) per run folder for the ServerApp's lifetime
_missing_said = False  # the package is absent: said once, not every round


def _writer(folder: Path):
    if folder not in _writers:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        _writers[folder] = SummaryWriter(str(folder))
    return _writers[folder]


def _numbers(metrics: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_round(run_dir: Path, rnd: int, phase: str, train: dict | None, evaluate: dict | None,
                per_site: list[tuple[str, str, dict]], seconds: float, sites: int, log=print) -> bool:
    """per_site: (site_id, "train" or "evaluate", metrics). -> whether event files were written."""
    global _missing_said
    try:
        w = _writer(Path(run_dir) / "tensorboard")
    except ImportError:
        if not _missing_said:
            _missing_said = True
            log("tensorboard is not installed: no event files (pip install 'm3fm-fed[tensorboard]')")
        return False
    for kind, metrics in (("train", train), ("evaluate", evaluate)):
        for k, v in _numbers(metrics).items():
            w.add_scalar(f"{phase}/{kind}/{k}", v, rnd)
    for site_id, kind, metrics in per_site:
        for k, v in _numbers(metrics).items():
            w.add_scalar(f"site/{site_id}/{kind}/{k}", v, rnd)
    w.add_scalar("round/seconds", seconds, rnd)
    w.add_scalar("round/sites", sites, rnd)
    w.flush()
    return True
