"""Masked image modeling on multi-scale CT (MAE adapted to CTViT; paper Fig. 8b).

The encoder sees the visible 15% of cubes; a 2-block decoder with its own
per-scale position tables and per-scale linear de-tokenizers reconstructs the
masked cubes. The target is each cube's voxels normalized by the cube's own
mean and variance; the loss is the MSE over masked cubes only. To save memory
the decoder may reconstruct only some evenly spaced slices of each cube, as
the paper did ("only some selected slices ... were predicted").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from m3fm.model.configs import ImageScale, M3FMConfig
from m3fm.model.ctvit import Block, FactorizedPosEmbed, init_weights, patchify, run_blocks


def target_slices(scale: ImageScale, num: int | None) -> list[int]:
    """Indices of the slices within a cube that the decoder reconstructs."""
    depth = scale.patch[0]
    if num is None or num >= depth:
        return list(range(depth))
    step = depth / num
    return [int(step * i + step / 2) for i in range(num)]


def mim_target(imgs: torch.Tensor, scale: ImageScale, slices: list[int]) -> torch.Tensor:
    """imgs: (B, 1, S, H, W) -> per-cube normalized voxels of the target slices (B, L, len(slices)*ph*pw)."""
    x = patchify(imgs, scale.patch)  # (B, L, ps*ph*pw)
    B, L, _ = x.shape
    ps, ph, pw = scale.patch
    x = x.reshape(B, L, ps, ph * pw)[:, :, slices].reshape(B, L, -1)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1e-6) ** 0.5


class MIMDecoder(nn.Module):
    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.img_dim, cfg.dec_dim)
        # the learned mask token, written as a bias-free Linear on the mask indicator so that
        # Opacus computes its per-sample gradient with its own Linear rule
        self.mask_token = nn.Linear(1, cfg.dec_dim, bias=False)
        self.pos_embed = nn.ModuleDict({s.name: FactorizedPosEmbed(s.grid, cfg.dec_dim) for s in cfg.scales})
        self.blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.slices = {s.name: target_slices(s, cfg.mim_target_slices) for s in cfg.scales}
        self.pred = nn.ModuleDict({s.name: nn.Linear(cfg.dec_dim, len(self.slices[s.name]) * s.patch[1] * s.patch[2])
                                   for s in cfg.scales})
        self.apply(init_weights)
        nn.init.normal_(self.mask_token.weight, std=0.02)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor,
                        scale: str) -> torch.Tensor:
        """latent: (B, 1 + L_keep, De), mask/ids_restore: (B, L) -> prediction (B, L, P)."""
        x = self.embed(latent)  # (B, 1 + L_keep, Dd)
        B, L = ids_restore.shape
        cls, visible = x[:, :1], x[:, 1:]
        # put visible tokens back in place (zeros at masked positions), then add the mask token there
        padded = torch.cat([visible, visible.new_zeros(B, L - visible.shape[1], visible.shape[2])], dim=1)
        full = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, padded.shape[2]))
        full = full + self.mask_token(mask.unsqueeze(-1).to(full.dtype))
        x = torch.cat([cls, self.pos_embed[scale](full)], dim=1)
        x = self.norm(run_blocks(self.blocks, x, None, self.cfg.act_checkpoint))
        return self.pred[scale](x[:, 1:])

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, scale: str,
                     reduce: bool = True) -> torch.Tensor:
        """MSE on per-cube normalized voxels, averaged over masked cubes only -> () or, reduce=False, (B,)."""
        target = mim_target(imgs, self.cfg.scale(scale), self.slices[scale])
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
        per_sample = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # per sample first (see heads.hazard_loss)
        return per_sample.mean() if reduce else per_sample
