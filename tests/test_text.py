import subprocess
import sys

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from m3fm.checkpoint import CheckpointMismatchError
from m3fm.model.text import BOS_ID, EOS_ID, PAD_ID, TextEncoder, TextTokenizer, load_tokenizer, mask_for_mlm


def test_tokenizer_has_roberta_format(tokenizer):
    ids, mask = tokenizer.encode(["Is there emphysema?", "Predict the lung cancer risk over six years."], 50)
    assert ids[0, 0] == BOS_ID and EOS_ID in ids[0].tolist() and ids[0, -1] == PAD_ID
    assert mask[0].sum() < mask[1].sum() and mask[1].all()
    long_ids, _ = tokenizer.encode(["word " * 500], 24)
    assert long_ids.shape == (1, 24) and long_ids[0, -1] == EOS_ID


def test_default_vocabulary_is_the_same_in_every_process(tokenizer):
    code = "from m3fm.model.configs import get_config; from m3fm.model.text import load_tokenizer; " \
           "print(load_tokenizer(get_config('tiny')).fingerprint)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == tokenizer.fingerprint


def test_local_vocabulary_overrides_the_default(tmp_path, tokenizer, tiny_cfg):
    tokenizer.save(tmp_path)
    local = load_tokenizer(tiny_cfg, tmp_path)
    text = ["The patient had COPD diagnosed at 61.0 years old."]
    assert torch.equal(local.encode(text, 96)[0], tokenizer.encode(text, 96)[0])
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        TextTokenizer.from_files(tmp_path / "nowhere")


def test_mlm_masking_spares_special_tokens(tokenizer):
    ids, _ = tokenizer.encode(["The patient is 68.0 years old. Gender is Female. Current smoker."] * 8, 96)
    inputs, labels = mask_for_mlm(ids, tokenizer, 0.3, torch.Generator().manual_seed(0))
    picked = labels != -100
    assert picked.any() and not any(((ids == i) & picked).any() for i in tokenizer.special_ids)
    assert (inputs[picked] == tokenizer.mask_id).float().mean() > 0.6
    assert torch.equal(inputs[~picked], ids[~picked])


def transformers_config(enc: TextEncoder) -> RobertaConfig:
    """The encoder's configuration as transformers' RobertaConfig (one token type, RoBERTa's special ids)."""
    c = enc.config
    return RobertaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=1, layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def test_local_roberta_weights_load_strictly(tmp_path, tiny_cfg):
    enc = TextEncoder(tiny_cfg)
    source = RobertaModel(transformers_config(enc), add_pooling_layer=False)
    source.save_pretrained(tmp_path / "roberta")
    enc.load_local_roberta(tmp_path / "roberta")
    for k, v in source.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v), k
    other = RobertaConfig(**{**transformers_config(enc).to_dict(), "hidden_size": 48, "intermediate_size": 96})
    RobertaModel(other, add_pooling_layer=False).save_pretrained(tmp_path / "wrong")
    with pytest.raises(CheckpointMismatchError, match="embeddings.word_embeddings.weight"):
        enc.load_local_roberta(tmp_path / "wrong")


def test_paper_text_encoder_has_robertas_shapes():
    """The paper starts from off-the-shelf RoBERTa: base-size configs must accept its weights as they are."""
    from m3fm.model.configs import get_config

    with torch.device("meta"):
        enc = TextEncoder(get_config("base"))
        # roberta-base as published: 50265 tokens, 514 positions, one token type
        roberta = RobertaModel(RobertaConfig(max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
                               add_pooling_layer=False)
    ours = {k: v.shape for k, v in enc.model.state_dict().items()}
    theirs = {k: v.shape for k, v in roberta.state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("train", [False, True])
def test_the_text_encoder_computes_what_transformers_roberta_computes_on_the_same_weights(tiny_cfg, train):
    """m3fm/model/roberta.py against transformers.RobertaModel: same state dict keys and shapes, same last hidden
    state over padded batches, and in training mode (dropout off: its masks are drawn differently) the same
    gradients."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, dropout=0.0)
    torch.manual_seed(0)
    ours = TextEncoder(cfg)
    theirs = RobertaModel(transformers_config(ours), add_pooling_layer=False)
    assert {k: v.shape for k, v in ours.model.state_dict().items()} == \
           {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.model.state_dict(), strict=True)
    ours.train(train), theirs.train(train)
    ids = torch.randint(5, cfg.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    ids[1, 12:], mask[1, 12:] = PAD_ID, 0  # padded rows, as the tokenizer pads
    ids[2, 5:], mask[2, 5:] = PAD_ID, 0
    a = ours(ids, mask)
    b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if train:
        (a * mask[..., None]).square().sum().backward()
        (b * mask[..., None]).square().sum().backward()
        got = dict(ours.model.named_parameters())
        for k, p in theirs.named_parameters():
            torch.testing.assert_close(got[k].grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)
