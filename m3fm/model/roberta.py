"""A RoBERTa encoder (Liu et al. 2019) in plain PyTorch, with `transformers.RobertaModel`'s module names, so its
state dict is RoBERTa's (and the public M3FM code's `encoder_txt.*`) key for key and shape for shape.

Why not transformers' own: importing `RobertaModel` took about 4 s on a 2-core machine (5.4 s -> 9.5 s for a site
service's imports), paid by every site service, rank and ServerApp start, for ~60 lines of model. transformers is
still what reads a local RoBERTa checkpoint folder (TextEncoder.load_local_roberta), and tests/test_text.py holds
this encoder's outputs to RobertaModel's on the same weights. Attention is PyTorch's SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RobertaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pad_token_id: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02


class RobertaEmbeddings(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, padding_idx=c.pad_token_id)
        self.token_type_embeddings = nn.Embedding(1, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.pad = c.pad_token_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) -> (B, T, D). Positions count real tokens from pad + 1 (fairseq's make_positions); a padding
        # token sits at position pad, whose row never trains
        real = ids.ne(self.pad).int()
        positions = torch.cumsum(real, dim=1).type_as(real) * real + self.pad
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions.long())))


class RobertaSelfAttention(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.heads, self.p = c.num_attention_heads, c.dropout
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D), keep: (B, 1, 1, T) True where a key is a real token -> (B, T, D)
        B, T, D = x.shape
        q, k, v = (f(x).view(B, T, self.heads, D // self.heads).transpose(1, 2) for f in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, T, D)


class RobertaSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual); RobertaOutput is the same after the feed-forward layer."""

    def __init__(self, c: RobertaConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class RobertaAttention(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.self = RobertaSelfAttention(c)
        self.output = RobertaSelfOutput(c, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class RobertaIntermediate(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class RobertaLayer(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.attention = RobertaAttention(c)
        self.intermediate = RobertaIntermediate(c)
        self.output = RobertaSelfOutput(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class RobertaEncoder(nn.Module):
    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.layer = nn.ModuleList([RobertaLayer(c) for _ in range(c.num_hidden_layers)])


class Roberta(nn.Module):
    """RobertaModel without the pooler: embeddings, then the layers; initialised as transformers does (normal(0,
    0.02) weights, zero biases, zero padding rows, unit LayerNorms)."""

    def __init__(self, c: RobertaConfig):
        super().__init__()
        self.embeddings = RobertaEmbeddings(c)
        self.encoder = RobertaEncoder(c)
        self.apply(lambda m: _init(m, c.initializer_range))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # ids, mask: (B, T) -> last hidden state (B, T, D)
        x, keep = self.embeddings(ids), mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def _init(m: nn.Module, std: float) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=std)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=std)
        if m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
