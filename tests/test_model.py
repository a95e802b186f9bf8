import pytest
import torch

from m3fm.model.ctvit import patchify, voxel_size_embedding
from m3fm.model.heads import cumulative_hazard, hazard_targets
from m3fm.model.m3fm import M3FM
from m3fm.data.collate import collate_qa
from m3fm.tasks import TASKS
from sim.toy_batches import toy_qa_samples


def images(cfg, scale, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, *cfg.scale(scale).volume, generator=g), torch.tensor([[1.25, 0.7, 0.7]] * b)


def test_ctvit_output_shapes_at_every_scale(tiny_model, tiny_cfg):
    for sc in tiny_cfg.scales:
        x, vs = images(tiny_cfg, sc.name)
        out = tiny_model.image_encoder(x, vs, sc.name)
        assert out.shape == (2, 1 + sc.num_patches, tiny_cfg.img_dim)


def test_wrong_shape_names_the_scale(tiny_model, tiny_cfg):
    x, vs = images(tiny_cfg, "heart")
    with pytest.raises(ValueError, match="scale 'chest' expects images of shape"):
        tiny_model.image_encoder(x, vs, "chest")


@pytest.mark.parametrize("task", [t.name for t in TASKS])
def test_every_task_answers_with_its_answer_space(tiny_model, tiny_cfg, tokenizer, task):
    batch = collate_qa(toy_qa_samples(tiny_cfg, task, 3), tokenizer, tiny_cfg)
    out, task_logits = tiny_model(batch)
    t = next(t for t in TASKS if t.name == task)
    assert out.shape == (3, t.num_outputs) and torch.isfinite(out).all()
    assert task_logits.shape[0] == 3


def test_voxel_size_changes_the_output(tiny_model, tiny_cfg):
    tiny_model.eval()
    x, vs = images(tiny_cfg, "lung")
    a = tiny_model.image_encoder(x, vs, "lung")
    b = tiny_model.image_encoder(x, vs * torch.tensor([2.0, 1.0, 1.0]), "lung")
    assert not torch.allclose(a, b, atol=1e-4)
    emb = voxel_size_embedding(torch.tensor([[32.0, 8.0, 8.0], [16.0, 8.0, 8.0]]), 32)
    assert emb.shape == (2, 32) and not torch.allclose(emb[0], emb[1])


def test_patchify_orders_cubes_slice_major():
    img = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    p = patchify(img, (2, 2, 2))
    assert p.shape == (1, 8, 8)
    assert torch.equal(p[0, 0], img[0, 0, :2, :2, :2].reshape(-1))
    assert torch.equal(p[0, 4], img[0, 0, 2:, :2, :2].reshape(-1))  # second slab of slices starts at cube 4


def test_token_mask_restricts_attention(tiny_model, tiny_cfg):
    tiny_model.eval()
    x, vs = images(tiny_cfg, "nodule")
    L = tiny_cfg.scale("nodule").num_patches
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, : L // 2] = True
    a = tiny_model.image_encoder(x, vs, "nodule", mask)
    x2 = x.clone()
    x2[:, :, 2:] = 5.0  # grid (2, 4, 3): the masked-out second half of tokens is the second slab of slices
    b = tiny_model.image_encoder(x2, vs, "nodule", mask)
    assert torch.allclose(a[:, : 1 + L // 2], b[:, : 1 + L // 2], atol=1e-5), "tokens may not see outside the mask"
    x2[:, :, :2] = 5.0
    assert not torch.allclose(a[:, 0], tiny_model.image_encoder(x2, vs, "nodule", mask)[:, 0], atol=1e-3)


def test_masking_keeps_the_configured_fraction(tiny_model, tiny_cfg):
    x, vs = images(tiny_cfg, "chest", b=3)
    L = tiny_cfg.scale("chest").num_patches
    latent, mask, ids_restore = tiny_model.forward_encoder(x, vs, "chest", 0.75)
    keep = round(L * 0.25)
    assert latent.shape == (3, 1 + keep, tiny_cfg.img_dim)
    assert (mask.sum(dim=1) == L - keep).all()
    assert tiny_cfg.mask_ratio == 0.85
    latent, mask, _ = tiny_model.forward_encoder(x, vs, "chest", tiny_cfg.mask_ratio)
    assert abs(mask.mean().item() - 0.85) <= 1.0 / L


def test_mim_loss_ignores_visible_cubes(tiny_model, tiny_cfg):
    x, vs = images(tiny_cfg, "heart")
    loss, pred, mask = tiny_model.forward_mim(x, vs, "heart")
    pred = pred.detach()
    visible = mask == 0
    changed_visible = pred.clone()
    changed_visible[visible] += 10.0
    same = tiny_model.forward_loss(x, changed_visible, mask, "heart")
    assert torch.allclose(same, tiny_model.forward_loss(x, pred, mask, "heart"))
    changed_masked = pred.clone()
    changed_masked[~visible] += 10.0
    assert tiny_model.forward_loss(x, changed_masked, mask, "heart") > same + 1.0


def test_per_sample_mlm_is_each_records_mean_over_its_masked_tokens(tiny_model, tiny_cfg):
    """DP's per-sample MLM sends only each record's masked positions through the vocabulary layer; its value and
    its gradients must be the full-sequence definition's, for records with many, few and no masked tokens."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny_cfg.vocab_size, (4, 40), generator=g)
    mask = torch.ones(4, 40, dtype=torch.long)
    mask[2, 30:] = 0
    labels = torch.full((4, 40), -100)
    for b, n in enumerate((3, 12, 0, 1)):
        pos = torch.randperm(40, generator=g)[:n]
        labels[b, pos] = ids[b, pos]
    params = list(tiny_model.text_encoder.parameters()) + list(tiny_model.mlm_head.parameters())
    got = tiny_model.forward_mlm(ids, mask, labels, per_sample=True)
    logits = tiny_model.mlm_head(tiny_model.text_encoder(ids, mask))  # (B, T, V): every position
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    want = tokens.sum(1) / (labels != -100).sum(1).clamp(min=1)
    assert torch.allclose(got, want, atol=1e-6) and got[2] == 0 and (got[[0, 1, 3]] > 1).all()
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5])  # a per-sample weighting, as clipping applies
    grads = [torch.autograd.grad((x * weights).sum(), params) for x in (got, want)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_mim_can_reconstruct_selected_slices_only():
    from m3fm.model.configs import get_config
    from m3fm.model.mae import target_slices

    base = get_config("base")
    assert target_slices(base.scale("lung"), base.mim_target_slices) == [2, 6, 10, 14]
    assert target_slices(base.scale("nodule"), base.mim_target_slices) == [0, 1, 2, 3]


def test_hazards_give_non_decreasing_risk():
    out = torch.randn(1000, 7) * 10
    risk = torch.sigmoid(cumulative_hazard(out))
    assert (risk[:, 1:] >= risk[:, :-1]).all()


def test_model_risk_is_non_decreasing(tiny_model, tiny_cfg, tokenizer):
    tiny_model.eval()
    for name in ("lung_cancer_risk", "cvd_mortality"):
        batch = collate_qa(toy_qa_samples(tiny_cfg, name, 6), tokenizer, tiny_cfg)
        risk = tiny_model.predict(batch)
        assert risk.shape == (6, 6) and (risk[:, 1:] >= risk[:, :-1]).all()


def test_hazard_targets_respect_censoring():
    y, mask = hazard_targets(torch.tensor([2.3, 2.3, 9.0]), torch.tensor([1, 0, 1]))
    assert y[0].tolist() == [0, 0, 1, 1, 1, 1] and mask[0].tolist() == [1] * 6  # cancer in year 3
    assert y[1].tolist() == [0] * 6 and mask[1].tolist() == [1, 1, 0, 0, 0, 0]  # censored after 2.3 years
    assert y[2].tolist() == [0] * 6 and mask[2].tolist() == [1] * 6  # event after the horizon


def test_missing_modalities_are_left_out(tiny_model, tiny_cfg, tokenizer):
    batch = collate_qa(toy_qa_samples(tiny_cfg, "emphysema", 2), tokenizer, tiny_cfg)
    batch.text_ids = batch.text_mask = None
    out, _ = tiny_model(batch)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_activation_checkpointing_gives_the_same_gradients(tiny_cfg, tokenizer):
    import dataclasses

    torch.manual_seed(0)
    plain = M3FM(tiny_cfg)
    ckpt = M3FM(dataclasses.replace(tiny_cfg, act_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = collate_qa(toy_qa_samples(tiny_cfg, "nodule_presence", 2), tokenizer, tiny_cfg)
    for m in (plain, ckpt):
        out, logits = m(batch)
        sum(m.forward_task_loss(batch, out, logits)).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), n
