"""Model configurations: tiny/small for CPU work, and the paper's base/large/huge.

Sizes follow the paper (Methods) and the public M3FM code: CTViT of 12/24/32
layers at width 768/1024/1280 (12/16/16 heads), a RoBERTa-base text encoder
(12 x 768), a 4-layer task encoder at the image width with 16 heads, 2-layer
MLP predictors with hidden width 1024, and a 2-block MIM decoder.

`python -m m3fm.model` prints every configuration with its parameter
count per component, counted on the meta device (nothing is allocated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageScale:
    """One input scale of the multi-scale CT tokenizer: volume and patch in voxels (S, H, W)."""

    name: str
    volume: tuple[int, int, int]
    patch: tuple[int, int, int]

    def __post_init__(self):
        for v, p in zip(self.volume, self.patch):
            if v % p:
                raise ValueError(f"scale {self.name!r}: volume {self.volume} is not a multiple of patch {self.patch}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(v // p for v, p in zip(self.volume, self.patch))

    @property
    def num_patches(self) -> int:
        s, h, w = self.grid
        return s * h * w

    @property
    def patch_voxels(self) -> int:
        s, h, w = self.patch
        return s * h * w


# The paper's four scales (Methods; public code config files): nodule slabs,
# one lung (cancer risk), heart (CVD), both lungs (other chest findings).
PAPER_SCALES = (
    ImageScale("nodule", (16, 448, 320), (4, 16, 16)),
    ImageScale("lung", (128, 448, 320), (16, 16, 16)),
    ImageScale("heart", (128, 192, 224), (16, 16, 16)),
    ImageScale("chest", (128, 320, 448), (16, 16, 16)),
)


@dataclass(frozen=True)
class M3FMConfig:
    name: str
    # CTViT image encoder
    img_dim: int = 768
    img_depth: int = 12
    img_heads: int = 12
    scales: tuple[ImageScale, ...] = PAPER_SCALES
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    # masked image modeling decoder (pretraining only)
    dec_dim: int = 512
    dec_depth: int = 2
    dec_heads: int = 16
    mask_ratio: float = 0.85
    # slices of each cube the decoder reconstructs (paper: "only some selected
    # slices ... were predicted" to save memory); None reconstructs every slice
    mim_target_slices: int | None = 4
    # RoBERTa-style text encoder
    vocab_size: int = 50265
    text_dim: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    clinical_len: int = 160
    question_len: int = 50
    # RoBERTa's position table (514) so off-the-shelf RoBERTa weights load; ids start at pad_id + 1 = 2
    text_positions: int = 514
    # how the question becomes the <TASK> token: "mean" pools the question's encoded tokens; "first" takes its
    # <s> output as the public M3FM code does, which only tells questions apart with a pretrained text encoder
    # (MLM never masks <s>, so from scratch it is the same vector for every question: issue 14)
    question_pooling: str = "mean"
    # whether the <TASK> token also holds the image's CLS output: without it the token starts blind to the image
    # and must learn to find it among a hundred clinical-text tokens, and a fresh model answered from the text
    # shortcut (issue 14: emphysema, which the crop's mean separates, reached test AUC 0.95 within 400 steps in 2 of
    # 4 seeds without it, in 4 of 4 within 300 with it; benchmarks/task_token.py). False: the public code's token
    task_image_summary: bool = True
    # task encoder (fusion) and predictors; the task width equals img_dim as in the paper
    fusion_depth: int = 4
    fusion_heads: int = 16
    num_registers: int = 3
    predictor_hidden: int = 1024
    predictor_norm_eps: float = 1e-6  # the public code's predictors use 1e-12 (a difference of about 1e-6)
    # the lung-cancer-risk head's hazards: "monotone" passes the yearly hazards through a softplus, so risk never
    # falls with time; "reference" adds them raw, as the public code does (its ReLU is defined but never applied)
    hazard: str = "monotone"
    # one CLS token (and CLS position) per image scale, as the public code keeps; False: one CLS for all scales
    cls_per_scale: bool = False
    dropout: float = 0.1
    # recompute block activations in backward to save memory on large models
    act_checkpoint: bool = False

    def __post_init__(self):
        if self.hazard not in ("monotone", "reference"):
            raise ValueError(f"config {self.name!r}: hazard must be 'monotone' or 'reference', got {self.hazard!r}")
        if self.question_pooling not in ("mean", "first"):
            raise ValueError(f"config {self.name!r}: question_pooling must be 'mean' or 'first', "
                             f"got {self.question_pooling!r}")
        if self.text_positions < max(self.clinical_len, self.question_len) + 2:
            raise ValueError(f"config {self.name!r}: text_positions {self.text_positions} cannot hold "
                             f"{max(self.clinical_len, self.question_len)} tokens (RoBERTa needs length + 2)")

    def scale(self, name: str) -> ImageScale:
        for s in self.scales:
            if s.name == name:
                return s
        raise KeyError(f"config {self.name!r} has no image scale {name!r}; scales: {[s.name for s in self.scales]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "M3FMConfig":
        d = dict(d)
        d["scales"] = tuple(ImageScale(s["name"], tuple(s["volume"]), tuple(s["patch"])) for s in d["scales"])
        return cls(**d)


def m3fm_tiny() -> M3FMConfig:
    """Seconds per step on a CPU core: tests and CI."""
    return M3FMConfig(
        name="tiny", img_dim=32, img_depth=2, img_heads=2,
        scales=(
            ImageScale("nodule", (4, 32, 24), (2, 8, 8)),
            ImageScale("lung", (16, 32, 24), (8, 8, 8)),
            ImageScale("heart", (16, 24, 24), (8, 8, 8)),
            ImageScale("chest", (16, 24, 32), (8, 8, 8)),
        ),
        drop_path=0.0, dec_dim=32, dec_heads=2, mim_target_slices=None,
        vocab_size=2048, text_dim=32, text_depth=2, text_heads=2, text_ffn=64,
        clinical_len=96, question_len=24, text_positions=98,
        fusion_depth=2, fusion_heads=2, predictor_hidden=64, dropout=0.0,
    )


def m3fm_small() -> M3FMConfig:
    """Demo size: real patch sizes on smaller crops; trains on a laptop CPU or one small GPU."""
    return M3FMConfig(
        name="small", img_dim=192, img_depth=4, img_heads=3,
        scales=(
            ImageScale("nodule", (8, 128, 96), (4, 16, 16)),
            ImageScale("lung", (64, 128, 96), (16, 16, 16)),
            ImageScale("heart", (64, 96, 96), (16, 16, 16)),
            ImageScale("chest", (64, 96, 128), (16, 16, 16)),
        ),
        drop_path=0.0, dec_dim=128, dec_heads=4, mim_target_slices=None,
        vocab_size=8192, text_dim=192, text_depth=4, text_heads=3, text_ffn=768,
        clinical_len=160, question_len=50, text_positions=162,
        fusion_depth=2, fusion_heads=4, predictor_hidden=256, dropout=0.1,
    )


def m3fm_base() -> M3FMConfig:
    return M3FMConfig(name="base", img_dim=768, img_depth=12, img_heads=12)


def m3fm_large() -> M3FMConfig:
    return M3FMConfig(name="large", img_dim=1024, img_depth=24, img_heads=16, act_checkpoint=True)


def m3fm_huge() -> M3FMConfig:
    # 16 heads of width 80, as in the public code
    return M3FMConfig(name="huge", img_dim=1280, img_depth=32, img_heads=16, act_checkpoint=True)


def reference_form(cfg: M3FMConfig) -> M3FMConfig:
    """The same size, computing as the public M3FM code does, so its converted weights answer as there
    (m3fm/reference.py): the <TASK> token is the question's <s> output alone, per-scale CLS tokens, raw hazards,
    the predictors' LayerNorm epsilon. Named "<name>-ref"."""
    return dataclasses.replace(cfg, name=f"{cfg.name}-ref", question_pooling="first", task_image_summary=False,
                               cls_per_scale=True, hazard="reference", predictor_norm_eps=1e-12)


SIZES = {"tiny": m3fm_tiny, "small": m3fm_small, "base": m3fm_base, "large": m3fm_large, "huge": m3fm_huge}
CONFIGS = {**SIZES, **{f"{name}-ref": (lambda make=make: reference_form(make())) for name, make in SIZES.items()}}


def get_config(name: str) -> M3FMConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise KeyError(f"unknown model configuration {name!r}; choose one of {', '.join(CONFIGS)}") from None
