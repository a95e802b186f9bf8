"""CTViT: multi-scale 3D CT vision transformer with physical voxel-size embedding.

A volume of one configured scale is cut into non-overlapping cubes; each scale
has its own linear patch embedding and its own learned position tables (an
in-plane table tiled over slices plus a through-plane table, summed). A
sine-cosine embedding of the physical patch size (voxel spacing x patch voxels,
split over s/h/w) is added to every token, so the same weights read crops of
any spacing without resampling to a common grid.

Learned tensors (CLS token, position tables) live in small modules whose
forward takes the batch, so Opacus can compute per-sample gradients for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from m3fm.model.configs import ImageScale, M3FMConfig


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch for whole samples."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, D); attn_mask: (B, N) bool, True where a key may be attended to
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, d)
        mask = None if attn_mask is None else attn_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (ViT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | None, act_checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        if act_checkpoint and blk.training and torch.is_grad_enabled():
            x = checkpoint(blk, x, attn_mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask)
    return x


def patchify(imgs: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """imgs: (B, 1, S, H, W) -> (B, L, ps*ph*pw), cubes in (s', h', w') raster order."""
    B, C, S, H, W = imgs.shape
    ps, ph, pw = patch
    x = imgs.reshape(B, C, S // ps, ps, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, s', h', w', ps, ph, pw, C)
    return x.reshape(B, (S // ps) * (H // ph) * (W // pw), ps * ph * pw * C)


class PatchEmbed(nn.Module):
    """Linear embedding of flattened cubes (a Conv3d with kernel = stride, written as a Linear)."""

    def __init__(self, patch: tuple[int, int, int], dim: int):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Linear(math.prod(patch), dim)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(imgs, self.patch))  # (B, L, D)


class FactorizedPosEmbed(nn.Module):
    """Learned in-plane (H'W') table tiled over slices + through-plane (S') table, summed."""

    def __init__(self, grid: tuple[int, int, int], dim: int):
        super().__init__()
        s, h, w = grid
        self.in_plane = nn.Parameter(torch.zeros(1, h * w, dim))
        self.through_plane = nn.Parameter(torch.zeros(1, s, dim))
        nn.init.trunc_normal_(self.in_plane, std=0.02)
        nn.init.trunc_normal_(self.through_plane, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S'*H'*W', D)
        s, hw = self.through_plane.shape[1], self.in_plane.shape[1]
        pos = self.in_plane.repeat(1, s, 1) + self.through_plane.repeat_interleave(hw, dim=1)
        return x + pos


class PrependTokens(nn.Module):
    """Learned tokens (CLS, registers) put in front of a sequence."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, num, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (B,) real values -> (B, dim) as [sin, cos] over MAE frequencies 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2))
    out = pos.float()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=-1)


def voxel_size_embedding(patch_mm: torch.Tensor, dim: int) -> torch.Tensor:
    """patch_mm: (B, 3) physical extent of one cube in mm (s, h, w) -> (B, dim).

    The width is split as in the public code: h and w get dim//6*2 each, s the rest.
    """
    dim_hw = dim // 6 * 2
    dim_s = dim - 2 * dim_hw
    return torch.cat([sincos_1d(dim_s, patch_mm[:, 0]), sincos_1d(dim_hw, patch_mm[:, 1]),
                      sincos_1d(dim_hw, patch_mm[:, 2])], dim=-1)


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """Per-sample random masking by argsort of uniform noise (MAE).

    x: (B, L, D) -> kept (B, L_keep, D), mask (B, L) with 1 = masked, ids_restore (B, L)
    """
    B, L, D = x.shape
    len_keep = max(1, int(round(L * (1 - mask_ratio))))
    # noise drawn on the generator's device, so a CPU generator can fix masks of a CUDA batch
    noise = torch.rand(B, L, generator=generator, device=generator.device if generator else x.device).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class CTViT(nn.Module):
    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.img_dim
        self.patch_embed = nn.ModuleDict({s.name: PatchEmbed(s.patch, cfg.img_dim) for s in cfg.scales})
        self.pos_embed = nn.ModuleDict({s.name: FactorizedPosEmbed(s.grid, cfg.img_dim) for s in cfg.scales})
        if cfg.cls_per_scale:  # its own group per scale (m3fm/weights/groups.py), like the scale's tokenizer
            self.scale_cls = nn.ModuleDict({s.name: PrependTokens(1, cfg.img_dim) for s in cfg.scales})
        else:
            self.cls_token = PrependTokens(1, cfg.img_dim)
        rates = [cfg.drop_path * i / max(cfg.img_depth - 1, 1) for i in range(cfg.img_depth)]  # linear 0 -> drop_path
        self.blocks = nn.ModuleList(Block(cfg.img_dim, cfg.img_heads, cfg.mlp_ratio, 0.0, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.img_dim, eps=1e-6)
        self.act_checkpoint = cfg.act_checkpoint
        self.apply(init_weights)

    def check_input(self, imgs: torch.Tensor, voxel_size: torch.Tensor, scale: str) -> ImageScale:
        sc = self.cfg.scale(scale)
        if imgs.ndim != 5 or imgs.shape[1] != 1 or tuple(imgs.shape[-3:]) != sc.volume:
            raise ValueError(f"scale {scale!r} expects images of shape (B, 1, {', '.join(map(str, sc.volume))}), "
                             f"got {tuple(imgs.shape)}")
        if voxel_size.shape != (imgs.shape[0], 3):
            raise ValueError(f"voxel_size must be (B, 3) mm per voxel (s, h, w), got {tuple(voxel_size.shape)}")
        return sc

    def embed(self, imgs: torch.Tensor, voxel_size: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs: (B, 1, S, H, W), voxel_size: (B, 3) mm -> patch tokens with positions (B, L, D),
        voxel-size embedding (B, 1, D) to add to every token, CLS included."""
        sc = self.check_input(imgs, voxel_size, scale)
        x = self.pos_embed[scale](self.patch_embed[scale](imgs))
        patch_mm = voxel_size.float() * torch.tensor(sc.patch, dtype=torch.float32, device=imgs.device)
        size = voxel_size_embedding(patch_mm, self.dim).to(x.dtype)[:, None, :]
        return x, size

    def prepend_cls(self, x: torch.Tensor, scale: str) -> torch.Tensor:
        return (self.scale_cls[scale] if self.cfg.cls_per_scale else self.cls_token)(x)

    def forward(self, imgs: torch.Tensor, voxel_size: torch.Tensor, scale: str,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, 1 + L, D), CLS first. token_mask: (B, L) bool restricts attention (e.g. to a lung box)."""
        x, size = self.embed(imgs, voxel_size, scale)
        x = self.prepend_cls(x, scale) + size
        attn_mask = None
        if token_mask is not None:
            attn_mask = torch.cat([torch.ones_like(token_mask[:, :1]), token_mask], dim=1).bool()
        return self.norm(run_blocks(self.blocks, x, attn_mask, self.act_checkpoint))

    def forward_masked(self, imgs: torch.Tensor, voxel_size: torch.Tensor, scale: str, mask_ratio: float,
                       generator: torch.Generator | None = None):
        """MAE encoder: -> latent (B, 1 + L_keep, D), mask (B, L) 1 = masked, ids_restore (B, L)."""
        x, size = self.embed(imgs, voxel_size, scale)
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)
        x = self.prepend_cls(x, scale) + size
        return self.norm(run_blocks(self.blocks, x, None, self.act_checkpoint)), mask, ids_restore
