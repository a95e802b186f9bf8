"""The privacy settings: [privacy.dp_sgd] of a run and a site's own ceiling in site.toml.

Plain configuration, no torch or Opacus, so reading a site.toml or a server.toml
stays quick; the mechanism that uses them is privacy/dp_sgd.py.
"""

from __future__ import annotations

from dataclasses import dataclass


class PrivacyConfigError(ValueError):
    pass


CLIPPING = ("hooks", "fast")


@dataclass
class DPSGDConfig:
    """[privacy.dp_sgd] of server.toml: one of noise_multiplier or target_epsilon."""
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0  # 0: derived from target_epsilon over the run's whole plan
    target_epsilon: float = 0.0
    physical_batch: int = 8  # items per forward pass; memory, not privacy
    # how Opacus bounds each item's gradient: "hooks" (per-sample gradients kept, clipped, summed) or "fast"
    # (Opacus's fast gradient clipping: per-sample gradient norms only, then a second backward pass of the
    # clipped losses: less memory, more compute). Opacus's ghost clipping refuses this model: the text encoder
    # runs twice a forward pass (question and clinical text), which it treats as parameter tying.
    clipping: str = "hooks"

    def __post_init__(self):
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise PrivacyConfigError("[privacy.dp_sgd] needs exactly one of noise_multiplier > 0 or target_epsilon > 0")
        if self.max_grad_norm <= 0 or not 0 < self.delta < 1 or self.physical_batch < 1:
            raise PrivacyConfigError("[privacy.dp_sgd] needs max_grad_norm > 0, 0 < delta < 1, physical_batch >= 1")
        if self.clipping not in CLIPPING:
            raise PrivacyConfigError(f"[privacy.dp_sgd] clipping must be one of {', '.join(CLIPPING)}, "
                                     f"got {self.clipping!r}")

    def to_config(self) -> dict:
        return {"dp-noise-multiplier": self.noise_multiplier, "dp-target-epsilon": self.target_epsilon,
                "dp-max-grad-norm": self.max_grad_norm, "dp-delta": self.delta,
                "dp-physical-batch": self.physical_batch, "dp-clipping": self.clipping}

    @classmethod
    def from_config(cls, config: dict) -> "DPSGDConfig | None":
        """The round config's dp-* keys (server/rounds.py puts them there), or None when DP-SGD is off."""
        if "dp-max-grad-norm" not in config:
            return None
        return cls(max_grad_norm=float(config["dp-max-grad-norm"]), delta=float(config["dp-delta"]),
                   noise_multiplier=float(config["dp-noise-multiplier"]),
                   target_epsilon=float(config["dp-target-epsilon"]),
                   physical_batch=int(config["dp-physical-batch"]),
                   clipping=str(config.get("dp-clipping", "hooks")))


@dataclass
class SiteBudget:
    """A site's own ceiling ([privacy] in site.toml); it wins over the run's settings.
    require_dp: the site refuses rounds without DP-SGD."""
    max_epsilon: float | None
    delta: float | None
    require_dp: bool = False

    @classmethod
    def from_site(cls, privacy: dict, where: str) -> "SiteBudget":
        eps, delta = privacy.get("max_epsilon"), privacy.get("delta")
        if eps is not None and (not isinstance(eps, (int, float)) or eps <= 0):
            raise PrivacyConfigError(f"{where}: privacy.max_epsilon must be a positive number, got {eps!r}")
        if delta is not None and (not isinstance(delta, float) or not 0 < delta < 1):
            raise PrivacyConfigError(f"{where}: privacy.delta must be a number between 0 and 1, got {delta!r}")
        require = privacy.get("require_dp", False)
        if not isinstance(require, bool):
            raise PrivacyConfigError(f"{where}: privacy.require_dp must be true or false, got {require!r}")
        return cls(None if eps is None else float(eps), delta, require)

    def delta_for(self, dp: DPSGDConfig) -> float:
        return dp.delta if self.delta is None else min(dp.delta, self.delta)
