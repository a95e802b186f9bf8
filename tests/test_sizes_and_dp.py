import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from m3fm.data.collate import collate_qa
from m3fm.model.configs import CONFIGS, get_config
from m3fm.model.m3fm import M3FM, count_parameters
from sim.toy_batches import toy_qa_samples

# millions, from the issue (public-code counting: CTViT + tokenizers + RoBERTa-base + task encoder + heads)
TARGETS = {"base": 252, "large": 496, "huge": 857}


@pytest.mark.parametrize("name", list(TARGETS))
def test_paper_sizes_within_ten_percent(name):
    counts = count_parameters(get_config(name))
    assert abs(counts["total"] / 1e6 - TARGETS[name]) / TARGETS[name] < 0.10, counts
    assert abs(counts["text_encoder"] / 1e6 - 124) < 2


def test_sizes_grow_with_the_configuration():
    totals = [count_parameters(get_config(n))["total"] for n in CONFIGS]
    assert totals == sorted(totals)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_opacus_validator_is_clean(name):
    with torch.device("meta"):
        model = M3FM(get_config(name))
    assert ModuleValidator.validate(model, strict=False) == []


def test_opacus_per_sample_gradients_match_batch_gradient(tiny_cfg, tokenizer):
    """DP-SGD needs exact per-sample gradients: their sum must equal the ordinary batch gradient."""
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    model.train()  # Opacus records activations in training mode; tiny has no dropout, so passes agree
    batch = collate_qa(toy_qa_samples(tiny_cfg, "nodule_presence", 3), tokenizer, tiny_cfg)
    out, _ = model(batch)
    torch.nn.functional.cross_entropy(out, batch.target, reduction="sum").backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="sum")
    out, _ = gsm(batch)
    torch.nn.functional.cross_entropy(out, batch.target, reduction="sum").backward()
    checked = 0
    for n, p in model.named_parameters():
        if n in reference and p.grad_sample is not None:
            assert p.grad_sample.shape[0] == 3, n
            assert torch.allclose(p.grad_sample.sum(0), reference[n], atol=1e-5, rtol=1e-4), n
            checked += 1
    # image encoder (incl. position tables and CLS), text encoder, task encoder and the head all covered
    for prefix in ("image_encoder.pos_embed", "image_encoder.cls_token", "image_encoder.blocks", "text_encoder",
                   "task_encoder.registers", "heads.yes_no"):
        assert any(n.startswith(prefix) and model.get_parameter(n).grad_sample is not None
                   for n in reference), prefix
    assert checked > 20
