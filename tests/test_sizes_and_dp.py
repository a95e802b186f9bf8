import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from m3fm.data.collate import collate_qa
from m3fm.model.configs import CONFIGS, SIZES, get_config
from m3fm.model.m3fm import M3FM, count_parameters
import privacy.grad_samplers  # noqa: F401  (registers the closed-form per-sample gradients, as privacy/dp_sgd.py does)
from sim.toy_batches import toy_qa_samples

# millions, from the issue (public-code counting: CTViT + tokenizers + RoBERTa-base + task encoder + heads)
TARGETS = {"base": 252, "large": 496, "huge": 857}


@pytest.mark.parametrize("name", list(TARGETS))
def test_paper_sizes_within_ten_percent(name):
    counts = count_parameters(get_config(name))
    assert abs(counts["total"] / 1e6 - TARGETS[name]) / TARGETS[name] < 0.10, counts
    assert abs(counts["text_encoder"] / 1e6 - 124) < 2


def test_sizes_grow_with_the_configuration():
    totals = [count_parameters(get_config(n))["total"] for n in SIZES]
    assert totals == sorted(totals)


def dense_table(rows, num_rows: int) -> torch.Tensor:
    """EmbeddingRows as (n, V, D): what autograd's gradient of a per-item copy of the table would be."""
    n, length, dim = rows.grads.shape
    out = rows.grads.new_zeros(n * num_rows, dim)
    offsets = torch.arange(n)[:, None] * num_rows
    return out.index_add_(0, (rows.ids + offsets).reshape(-1), rows.grads.reshape(-1, dim)).view(n, num_rows, dim)


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
    # the position tables, CLS tokens, registers and task embeddings take privacy/grad_samplers.py's closed forms,
    # not Opacus's torch.func fallback, and those are checked below with the rest
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())
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


@pytest.mark.parametrize("clipping", ["hooks", "fast"])
def test_the_private_step_equals_a_per_patient_reference_loop(tiny_cfg, tokenizer, clipping):
    """The clipped, noised update of one private step (privacy/dp_sgd.py Clipping + Opacus's optimizer) equals a slow
    reference: for each sampled patient's item alone, its gradient, clipped to C over every parameter of the step,
    summed, plus N(0, sigma^2 C^2) per parameter, divided by the expected batch. One micro-batch of five patients
    and a second of two, accumulated into one step as a site does; C is the median item's gradient norm."""
    from m3fm.train import TrainConfig, qa_loss
    from privacy.budget import DPSGDConfig
    from privacy.dp_sgd import Clipping

    sigma, expected = 0.7, 6.5
    tc = TrainConfig()
    samples = toy_qa_samples(tiny_cfg, "nodule_presence", 7, seed=3)
    micro = [collate_qa(samples[:5], tokenizer, tiny_cfg), collate_qa(samples[5:], tokenizer, tiny_cfg)]
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if not n.startswith(("mim_decoder.", "mlm_head."))]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)

    # reference: one patient at a time, plain autograd
    per_patient = []
    for sample in samples:
        model.zero_grad(set_to_none=True)
        qa_loss(model, collate_qa([sample], tokenizer, tiny_cfg), tc)[0].backward()
        per_patient.append({n: (model.get_parameter(n).grad if model.get_parameter(n).grad is not None
                                else torch.zeros_like(start[n])).clone() for n in names})
    norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))) for grads in per_patient]
    C = sorted(norms)[3]  # the median: some items are clipped, some are not
    assert min(norms) < C < max(norms)
    total = {n: sum(g[n] * min(1.0, C / (norm + 1e-6)) for g, norm in zip(per_patient, norms)) for n in names}
    torch.manual_seed(11)
    if clipping == "hooks":  # one draw over the step's parameters, flattened in the optimizer's order
        sizes = [start[n].numel() for n in names]
        flat = torch.normal(0.0, sigma * C, size=(sum(sizes),))
        noise = {n: v.view_as(start[n]) for n, v in zip(names, flat.split(sizes))}
    else:  # Opacus's own optimizer: a draw per parameter
        noise = {n: torch.normal(0.0, sigma * C, size=start[n].shape) for n in names}
    reference = {n: start[n] - (total[n] + noise[n]) / expected for n in names}  # SGD with lr 1

    model.zero_grad(set_to_none=True)
    dp = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=C, clipping=clipping)
    private = Clipping(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0), sigma, dp)
    private.optimizer.expected_batch_size = expected
    for j, mb in enumerate(micro):
        private.backward(qa_loss(model, mb, tc, per_sample=True)[0])
        fc1 = model.get_parameter("heads.yes_no.fc1.weight")
        # hooks mode: a Linear weight's batch gradient, which the optimizer would overwrite, is never computed
        assert (fc1.grad is None and fc1.grad_sample is not None) if clipping == "hooks" else fc1.grad is not None
        if j == 0:
            private.optimizer.signal_skip_step(True)
        if j == (0 if clipping == "hooks" else 1):  # the same noise draws, in the optimizer's parameter order:
            torch.manual_seed(11)  # hooks draws the step's noise at its first micro-batch, Opacus's at the last
        private.optimizer.step()
        private.optimizer.zero_grad(set_to_none=True)
    if clipping == "hooks":  # every module takes per-item leaves (privacy/per_sample_layers.py): no Opacus hook
        assert not list(private.module.iterate_submodules(model))
    private.close()
    assert not any("forward" in vars(m) for m in model.modules())  # plain Linear and LayerNorm for the next round
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_current_grad_sample") for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names  # the optimizer's order
    for n in names:
        assert torch.allclose(model.get_parameter(n).detach(), reference[n], atol=2e-6, rtol=1e-4), n
    assert not torch.equal(model.get_parameter("heads.yes_no.fc1.weight"), start["heads.yes_no.fc1.weight"])


@pytest.mark.parametrize("autocast", [False, True])
def test_per_item_rows_are_each_items_own_gradient_beside_a_module_opacus_hooks(autocast):
    """The per-item gradients a private backward pass leaves for the DP optimizer are each item's own gradient:
    Linear's inputs and output gradients (one called twice, a narrow one whose norms are made from the rows, a wide
    one whose norms are not), LayerNorm's per-item leaves, an Embedding's looked-up rows with a padding row, and a
    module left to Opacus's hooks (Conv1d) at the same scale, against one backward pass per item; and the norms and
    clipped sums the optimizer takes from them equal those of the dense per-item gradients. Under bf16 autocast (a
    GPU site's training) Linear's products, and so their gradients, are bf16."""
    import torch.nn.functional as F
    from privacy.budget import DPSGDConfig
    from privacy.dp_sgd import Clipping
    from privacy.per_sample_layers import EmbeddingRows, LinearInputs

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = torch.nn.Embedding(9, 8, padding_idx=0), torch.nn.Conv1d(8, 8, 3, padding=1)
            self.norm, self.fc, self.out = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 40)

        def forward(self, ids):  # ids: (n, L) -> (n, 40)
            x = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (n, L, 8)
            return self.out(self.fc(self.fc(self.norm(x))).mean(1))  # fc called twice: its rows hold the sum

    torch.manual_seed(0)
    model, ids, target = Net(), torch.randint(0, 9, (5, 6)), torch.randint(0, 40, (5,))
    ids[:, -2:] = 0  # padding
    reference = []
    for i in range(5):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids[i:i + 1]), target[i:i + 1]).backward()
        reference.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not reference[0][:8 * 9].view(9, 8)[0].any()  # the padding row has no gradient
    model.zero_grad(set_to_none=True)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    private = Clipping(model, torch.optim.SGD(model.parameters(), lr=1.0), 1.0, dp)
    assert [type(m) for m in private.module.iterate_submodules(model)] == [torch.nn.Conv1d]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = F.cross_entropy(model(ids).float(), target, reduction="none")
    private.backward(losses)
    assert model.fc.weight.grad is None and model.out.weight.grad is None  # no batch gradient made
    reference = torch.stack(reference)
    per_item = [private.optimizer.per_item(p) for p in model.parameters()]
    assert isinstance(per_item[0], EmbeddingRows) and per_item[0].ids.shape == (5, 6)  # the rows looked up, no table
    looked_up, per_item[0] = per_item[0], dense_table(per_item[0], 9)
    assert (looked_up.ids[:, :, None] == looked_up.ids[:, None, :]).sum() > 5 * 6 + 5 * 2  # ids repeat within items
    # norms from the rows' Gram matrix over equal ids, the clipped sum scattered: those of the dense table
    torch.testing.assert_close(looked_up.square_norms(), per_item[0].float().square().sum((1, 2)))
    factor, table = torch.rand(5), torch.full((9, 8), 7.0)
    looked_up.add_into(table, factor)  # onto what the sum holds (the step's noise, earlier micro-batches)
    torch.testing.assert_close(table, 7.0 + torch.einsum("i,ivd->vd", factor, per_item[0].float()))
    fc, out = model.fc.weight.grad_sample, model.out.weight.grad_sample
    assert isinstance(fc, LinearInputs) and fc.a.shape == (5, 2 * 6, 8)  # both calls' tokens
    assert not fc.ghost() and out.ghost()  # 40 outputs of one token: norms from the Gram matrices
    tol = dict(rtol=0.02, atol=1e-3) if autocast else {}
    for inputs in (fc, out):
        dense = inputs.rows().float()  # (n, out, in)
        torch.testing.assert_close(inputs.square_norms(), dense.square().sum((1, 2)), **tol)
        weight = torch.full(dense.shape[1:], 7.0)
        inputs.add_into(weight, factor)
        torch.testing.assert_close(weight, 7.0 + torch.einsum("i,ioj->oj", factor, dense), **tol)
    per_item = [g.rows() if isinstance(g, LinearInputs) else g for g in per_item]
    rows = torch.cat([g.float().reshape(5, -1) for g in per_item], dim=1)
    if autocast:  # bf16 products: within bf16's precision of the fp32 gradients
        assert fc.g.dtype == torch.bfloat16 and fc.rows().dtype == torch.bfloat16
        assert torch.allclose(rows, reference, rtol=0.05, atol=0.02 * reference.abs().max())
    else:
        assert torch.allclose(rows, reference, atol=1e-6)
    private.close()


def test_the_private_clipped_sum_is_the_same_under_activation_checkpointing(tiny_cfg, tokenizer):
    """large and huge checkpoint their blocks: the blocks' Linear calls run again in the backward pass, and those
    recomputed calls' outputs get no gradient. The clipped sum a private step takes is the same with and without."""
    import dataclasses

    from m3fm.train import TrainConfig, qa_loss
    from privacy.budget import DPSGDConfig
    from privacy.dp_sgd import Clipping

    samples = toy_qa_samples(tiny_cfg, "nodule_presence", 4, seed=3)
    sums = []
    for checkpointed in (False, True):
        cfg = dataclasses.replace(tiny_cfg, act_checkpoint=checkpointed)
        torch.manual_seed(0)
        model = M3FM(cfg)
        model.train()
        private = Clipping(model, torch.optim.SGD(model.parameters(), lr=1.0), 0.0,  # no noise: the sum alone
                           DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.5))
        private.optimizer.expected_batch_size = 1
        private.backward(qa_loss(model, collate_qa(samples, tokenizer, cfg), TrainConfig(), per_sample=True)[0])
        private.optimizer.clip_and_accumulate()  # the clipped sum, onto a zero draw
        sums.append(private.optimizer.summed.clone())
        private.close()
    assert sums[0].abs().sum() > 0
    torch.testing.assert_close(sums[1], sums[0])
