import random

import pytest
import torch

from m3fm.data.collate import clinical_text, collate_pretrain, collate_qa
from m3fm.model.m3fm import M3FM
from m3fm.train import TrainConfig, build_optimizer, lr_at, multitask_step, param_groups, pretrain_step
from sim.toy_batches import toy_pretrain_samples, toy_qa_samples


def test_tiny_model_overfits_a_fixed_pretraining_batch(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    tc = TrainConfig(lr=2e-3, total_steps=10_000, grad_clip=None)
    opt = build_optimizer(model, tc)
    batch = collate_pretrain(toy_pretrain_samples(tiny_cfg, "chest", 4), tokenizer, tiny_cfg)
    logs = [pretrain_step(model, opt, batch, tokenizer, tc, s, torch.Generator().manual_seed(0)) for s in range(80)]
    first, last = logs[0], logs[-1]
    assert last["loss"] <= 0.5 * first["loss"], (first, last)
    assert last["mim"] < first["mim"] and last["mlm"] < first["mlm"]


def test_tiny_model_overfits_a_fixed_multitask_batch(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    tc = TrainConfig(lr=2e-3, total_steps=10_000)
    opt = build_optimizer(model, tc)
    tasks = ["nodule_presence", "nodule_size", "lung_cancer_risk", "cvd_diagnosis", "lung_rads", "clinical_number"]
    micro = [collate_qa(toy_qa_samples(tiny_cfg, t, 4), tokenizer, tiny_cfg) for t in tasks]
    logs = [multitask_step(model, opt, micro, tc, s) for s in range(60)]
    assert logs[-1]["loss"] <= 0.5 * logs[0]["loss"], (logs[0], logs[-1])
    assert set(logs[-1]["tasks"]) == set(tasks)


def test_micro_batch_must_hold_one_task(tiny_cfg, tokenizer):
    mixed = toy_qa_samples(tiny_cfg, "emphysema", 2) + toy_qa_samples(tiny_cfg, "consolidation", 2)
    with pytest.raises(ValueError, match="one task"):
        collate_qa(mixed, tokenizer, tiny_cfg)


def test_cosine_schedule_with_warmup():
    tc = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, total_steps=110)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.5) and lr_at(110, tc) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 120))


def test_layer_wise_decay_and_no_decay_groups(tiny_model, tiny_cfg):
    groups = param_groups(tiny_model, 0.05, 0.95)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    depth = tiny_cfg.img_depth
    assert scale_of[id(named["image_encoder.patch_embed.chest.proj.weight"])] == pytest.approx(0.95 ** (depth + 1))
    assert scale_of[id(named["image_encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.95 ** depth)
    assert scale_of[id(named["heads.yes_no.fc1.weight"])] == 1.0
    assert scale_of[id(named["text_encoder.model.embeddings.word_embeddings.weight"])] < \
        scale_of[id(named["text_encoder.model.encoder.layer.1.attention.self.query.weight"])]
    assert wd_of[id(named["image_encoder.pos_embed.chest.in_plane"])] == 0.0
    assert wd_of[id(named["image_encoder.blocks.0.norm1.weight"])] == 0.0
    assert wd_of[id(named["image_encoder.blocks.0.attn.qkv.weight"])] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_clinical_elements_are_dropped_at_random_only_in_training():
    sentences = [f"Element {i}." for i in range(2000)]
    kept = clinical_text(sentences, 0.8, random.Random(0)).count("Element")
    assert 1500 < kept < 1700
    assert clinical_text(sentences, 0.8, None).count("Element") == 2000


def test_tasks_on_the_same_images_with_opposite_answers_are_told_apart(tiny_cfg, tokenizer):
    """Emphysema and consolidation share the chest crop and the yes/no predictor; here the same images carry
    opposite answers for the two. A model that ignores which question it was asked cannot fit both (it once
    did: the <TASK> token was the question's <s> output, the same vector for every question with a text encoder
    trained from scratch, and emphysema came out inverted at a site; issue 14)."""
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    tc = TrainConfig(lr=2e-3, total_steps=10_000)
    opt = build_optimizer(model, tc)
    emphysema = toy_qa_samples(tiny_cfg, "emphysema", 8)
    flipped = [{**s, "task": "consolidation", "question": "Is there consolidation?", "answer": 1 - s["answer"]}
               for s in emphysema]
    micro = [collate_qa(emphysema, tokenizer, tiny_cfg), collate_qa(flipped, tokenizer, tiny_cfg)]
    for step in range(80):  # 40 fitted both in 3-4 of 6 seeds (a seed's luck); 80 in 6 of 6
        multitask_step(model, opt, micro, tc, step)
    model.eval()
    for mb in micro:
        yes = model.predict(mb)[:, 0]
        assert torch.equal(yes > 0.5, mb.target == 0), (mb.task, yes, mb.target)
