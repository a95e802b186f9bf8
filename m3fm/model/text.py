"""RoBERTa-style text encoder, its MLM head, and the byte-level BPE tokenizer.

The encoder is RoBERTa built from configuration (never downloaded): m3fm/model/roberta.py, whose state dict is
`transformers.RobertaModel`'s. The tokenizer is a byte-level BPE from the `tokenizers` library;
its default vocabulary is trained on text this package ships (clinical
sentence formats, a radiology lexicon, the task questions and answers), never
on site data, so every site builds the same vocabulary. A local directory with
real RoBERTa files (vocab.json, merges.txt, and optionally weights) overrides
it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing

from m3fm.model.configs import M3FMConfig
from m3fm.model.roberta import Roberta, RobertaConfig
from m3fm.model.state_dict import check_state_dict
from m3fm.tasks import ALL_TASKS

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# RoBERTa's fixed ids; the encoder's position ids and padding depend on them
BOS_ID, PAD_ID, EOS_ID = 0, 1, 2


def shipped_corpus() -> list[str]:
    """The text the default vocabulary is trained on: package resources plus every task question and answer."""
    lines: list[str] = []
    for name in ("clinical_sentences.txt", "radiology_lexicon.txt"):
        lines += resources.files("m3fm.resources").joinpath(name).read_text(encoding="utf-8").splitlines()
    for task in ALL_TASKS:
        lines += [q.replace("{}", "diabetes") for q in task.questions]
        lines += list(task.answers)
    return [line for line in lines if line.strip()]


class TextTokenizer:
    """Byte-level BPE with RoBERTa's format `<s> ... </s>`, truncated and padded per call."""

    def __init__(self, tokenizer: ByteLevelBPETokenizer, source: str):
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer from {source} lacks special tokens {missing}")
        if (ids["<s>"], ids["<pad>"], ids["</s>"]) != (BOS_ID, PAD_ID, EOS_ID):
            raise ValueError(f"tokenizer from {source}: <s>, <pad>, </s> must have ids 0, 1, 2 as in RoBERTa, "
                             f"got {ids['<s>']}, {ids['<pad>']}, {ids['</s>']}")
        self.tok = tokenizer
        self.source = source
        self.mask_id = ids["<mask>"]
        self.special_ids = frozenset(ids.values())
        self.tok.post_processor = RobertaProcessing(("</s>", EOS_ID), ("<s>", BOS_ID))

    @classmethod
    def build(cls, vocab_size: int) -> "TextTokenizer":
        return _build_default(vocab_size)

    @classmethod
    def from_files(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer file {f} not found (a RoBERTa directory needs vocab.json and merges.txt)")
        return cls(ByteLevelBPETokenizer(str(vocab), str(merges)), str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary and merges: sites and server must agree on it."""
        model = json.loads(self.tok.to_str())["model"]  # vocab and merges, not the per-call padding state
        return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, T) long, mask (B, T) bool; T = longest in the batch, at most max_len."""
        self.tok.enable_truncation(max_len)
        self.tok.enable_padding(pad_id=PAD_ID, pad_token="<pad>")
        encs = self.tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool)
        return ids, mask

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tok.save_model(str(path))


@lru_cache(maxsize=4)
def _build_default(vocab_size: int) -> TextTokenizer:
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(shipped_corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    return TextTokenizer(tok, "the shipped corpus")


def load_tokenizer(cfg: M3FMConfig, path: str | Path | None = None) -> TextTokenizer:
    tok = TextTokenizer.from_files(path) if path else TextTokenizer.build(cfg.vocab_size)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer from {tok.source} has {tok.vocab_size} tokens but config {cfg.name!r} "
                         f"embeds only {cfg.vocab_size}")
    return tok


def mask_for_mlm(ids: torch.Tensor, tokenizer: TextTokenizer, prob: float = 0.15,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: of `prob` of the non-special tokens, 80% -> <mask>, 10% -> random, 10% kept.

    ids: (B, T) -> inputs (B, T), labels (B, T) with -100 where no prediction is asked.
    """
    special = torch.zeros_like(ids, dtype=torch.bool)
    for i in tokenizer.special_ids:
        special |= ids == i
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    if not chosen.any() and (~special).any():  # always ask at least one prediction
        chosen.view(-1)[(~special).view(-1).nonzero()[0]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_id
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pos] = torch.randint(len(SPECIAL_TOKENS), tokenizer.vocab_size, ids.shape, generator=generator)[random_pos]
    return inputs, labels


class TextEncoder(nn.Module):
    """RoBERTa encoder built from configuration; shared by clinical text and questions."""

    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        self.config = RobertaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.text_dim, num_hidden_layers=cfg.text_depth,
            num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_ffn,
            max_position_embeddings=cfg.text_positions, pad_token_id=PAD_ID, dropout=cfg.dropout)
        self.model = Roberta(self.config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # ids, mask: (B, T) -> (B, T, Dt)
        return self.model(ids, mask)

    def load_local_roberta(self, path: str | Path) -> None:
        """Copy weights of a local RoBERTa checkpoint directory (config.json + weights) into this encoder.

        Shapes must match exactly; a mismatch raises with the offending keys.
        """
        try:
            from transformers import RobertaModel
        except ImportError:
            msg = "reading a RoBERTa checkpoint folder needs transformers: pip install 'm3fm-fed[roberta]'"
            raise ImportError(msg) from None

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a RoBERTa directory: config.json not found")
        source = RobertaModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        state = source.state_dict()
        check_state_dict(self.model.state_dict(), state, f"RoBERTa weights in {path}")
        self.model.load_state_dict(state, strict=True)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> vocabulary logits (untied from the embeddings, which keeps
    per-sample gradients exact under Opacus and the state dict free of shared tensors)."""

    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_dim, cfg.text_dim)
        self.norm = nn.LayerNorm(cfg.text_dim, eps=1e-5)
        self.decoder = nn.Linear(cfg.text_dim, cfg.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (N, Dt) at masked positions only -> (N, V)
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))
