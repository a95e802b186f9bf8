"""Published M3FM weights (m3fm/reference.py): a state dict in the public code's format, built from the mapping
m3fm/reference.py documents (names, shapes, conventions of niuchuangnn/M3FM's state dicts) with random values,
converted by `m3fm-server import-weights`, loads strictly and every tensor lands where it should; the reference
hazard arithmetic; a run started from the converted checkpoint."""

import subprocess

import pytest
import torch

from client import channel
from client.federated import SiteNotReady
from client.service import SiteService
from client.site import SiteConfigError, load_site
from m3fm.checkpoint import load_checkpoint, read_checkpoint, write_checkpoint
from m3fm.model.configs import get_config
from m3fm.model.heads import cumulative_hazard
from m3fm.model.m3fm import M3FM
from m3fm.weights.packing import pack_state
from m3fm.model.text import TextTokenizer, load_tokenizer
from m3fm.reference import ReferenceWeightsError, convert
from server.config import ServerConfigError, load_server_config
from server.rounds import RunError, initial_weights, phase_config
from test_federation import SERVER_TOML
from test_site_service import copy_site
from transport.flower import flower_bin
from transport.protocol import TOKENIZER_KEY, EvaluateConfig


def reference_state(cfg) -> dict[str, torch.Tensor]:
    """The public code's M3FM state dict for a model of cfg's sizes: v2 heads `heart` and `cancer_risk`."""
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    D, Dt, H = cfg.img_dim, cfg.text_dim, cfg.predictor_hidden
    sd = {}
    for n, s in enumerate(cfg.scales, start=1):
        t = f"img_tokenizer.tokenizer_({s.volume[0]}, {s.volume[1]}, {s.volume[2]})."
        grid = [v // p for v, p in zip(s.volume, s.patch)]
        sd[t + "patch_embed.proj.weight"] = rand(D, 1, *s.patch)
        sd[t + "patch_embed.proj.bias"] = rand(D)
        sd[f"img_tokenizer.conv{n}.weight"] = sd[t + "patch_embed.proj.weight"].clone()  # saved twice
        sd[f"img_tokenizer.conv{n}.bias"] = sd[t + "patch_embed.proj.bias"].clone()
        sd[t + "pos_embed_spatial"] = rand(1, grid[1] * grid[2], D)
        sd[t + "pos_embed_slice"] = rand(1, grid[0], D)
        sd[t + "cls_token"] = rand(1, 1, D)
        sd[t + "pos_embed_class"] = rand(1, 1, D)

    def blocks(prefix, depth, dim):
        for i in range(depth):
            b = f"{prefix}.blocks.{i}."
            for norm in ("norm1", "norm2"):
                sd[b + norm + ".weight"], sd[b + norm + ".bias"] = rand(dim), rand(dim)
            for p in ("q", "k", "v", "proj"):
                sd[b + f"attn.{p}.weight"], sd[b + f"attn.{p}.bias"] = rand(dim, dim), rand(dim)
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rand(int(dim * cfg.mlp_ratio), dim), rand(int(dim * cfg.mlp_ratio))
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rand(dim, int(dim * cfg.mlp_ratio)), rand(dim)
        sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"] = rand(dim), rand(dim)

    blocks("encoder_img", cfg.img_depth, D)
    blocks("task_attention", cfg.fusion_depth, D)
    for k, v in M3FM(cfg).text_encoder.model.state_dict().items():  # transformers' RoBERTa names, ours alike
        sd[f"encoder_txt.{k}"] = rand(*v.shape)
    sd["encoder_txt.embeddings.position_ids"] = torch.arange(cfg.text_positions)[None]  # older transformers save it
    for name, ref_in in (("img", D), ("txt", Dt), ("task", Dt)):
        sd[f"cross_embedding_{name}.weight"], sd[f"cross_embedding_{name}.bias"] = rand(D, ref_in), rand(D)
    sd["task_registers"] = rand(1, cfg.num_registers, D)
    for head, outputs in (("heart", 2), ("cancer_risk", 7)):
        h = f"multi_task_head.{head}."
        sd[h + "transform.dense.weight"], sd[h + "transform.dense.bias"] = rand(H, D), rand(H)
        sd[h + "transform.LayerNorm.weight"], sd[h + "transform.LayerNorm.bias"] = rand(H), rand(H)
        sd[h + "decoder.weight"], sd[h + "bias"] = rand(outputs, H), rand(outputs)
    sd["multi_task_head.hazard_layer.upper_triagular_mask"] = torch.triu(torch.ones(6, 6))
    return sd


def test_import_weights_maps_every_reference_tensor_and_the_checkpoint_loads_strictly(tmp_path):
    cfg = get_config("tiny-ref")
    ref = reference_state(cfg)
    torch.save(ref, tmp_path / "model_heart.pth")
    out = tmp_path / "converted.pt"
    cmd = [flower_bin("m3fm-server"), "import-weights", str(tmp_path / "model_heart.pth"), "--config", "tiny",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "initialised" in done.stdout and "config tiny-ref" in " ".join(done.stdout.split())
    model = M3FM(get_config(read_checkpoint(out)["config"]["name"]))
    load_checkpoint(out, model)  # strict: every key, shape and dtype
    got = model.state_dict()
    scale = cfg.scales[0]
    t = f"img_tokenizer.tokenizer_({scale.volume[0]}, {scale.volume[1]}, {scale.volume[2]})."
    torch.testing.assert_close(got[f"image_encoder.patch_embed.{scale.name}.proj.weight"],
                               ref[t + "patch_embed.proj.weight"].reshape(cfg.img_dim, -1))
    torch.testing.assert_close(got[f"image_encoder.pos_embed.{scale.name}.in_plane"], ref[t + "pos_embed_spatial"])
    torch.testing.assert_close(got[f"image_encoder.pos_embed.{scale.name}.through_plane"], ref[t + "pos_embed_slice"])
    torch.testing.assert_close(got[f"image_encoder.scale_cls.{scale.name}.tokens"],
                               ref[t + "cls_token"] + ref[t + "pos_embed_class"])
    for ours, theirs in (("image_encoder.blocks.1", "encoder_img.blocks.1"),
                         ("task_encoder.blocks.0", "task_attention.blocks.0")):
        for p in ("weight", "bias"):
            torch.testing.assert_close(got[f"{ours}.attn.qkv.{p}"],
                                       torch.cat([ref[f"{theirs}.attn.{x}.{p}"] for x in "qkv"]))
        torch.testing.assert_close(got[f"{ours}.mlp.fc1.weight"], ref[f"{theirs}.mlp.fc1.weight"])
    torch.testing.assert_close(got["text_encoder.model.encoder.layer.1.attention.self.key.weight"],
                               ref["encoder_txt.encoder.layer.1.attention.self.key.weight"])
    torch.testing.assert_close(got["task_encoder.task_proj.weight"], ref["cross_embedding_task.weight"])
    torch.testing.assert_close(got["task_encoder.registers.tokens"], ref["task_registers"])
    # heads in our answer order: yes/no (No, Yes) -> (Yes, No); hazards (h1..h6, base) -> (base, h1..h6)
    torch.testing.assert_close(got["heads.yes_no.fc2.weight"], ref["multi_task_head.heart.decoder.weight"][[1, 0]])
    torch.testing.assert_close(got["heads.yes_no.fc2.bias"], ref["multi_task_head.heart.bias"][[1, 0]])
    torch.testing.assert_close(got["heads.yes_no.norm.weight"], ref["multi_task_head.heart.transform.LayerNorm.weight"])
    order = [6, 0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(got["heads.lung_cancer_risk.fc2.bias"], ref["multi_task_head.cancer_risk.bias"][order])
    assert all(not got[k].any() for k in got if k.startswith("task_encoder.task_embed."))  # the reference's token
    assert model.heads["yes_no"].norm.eps == 1e-12 and model.cfg.hazard == "reference"


def test_unknown_or_misshapen_reference_keys_are_named(tmp_path):
    cfg = get_config("tiny-ref")
    ref = reference_state(cfg)
    with pytest.raises(ReferenceWeightsError, match=r"1 reference key\(s\) map to nothing.*decoder_pred\.weight"):
        convert({**ref, "decoder_pred.weight": torch.zeros(3)}, cfg)
    _, report = convert({**ref, "decoder_pred.weight": torch.zeros(3)}, cfg, allow_extra=True)
    assert report.extra == ["decoder_pred.weight"] and "image_encoder.norm.weight" in report.mapped
    assert "mim_decoder.norm.weight" in report.initialised and "encoder_txt.embeddings.position_ids" in report.dropped
    bad = {**ref, "encoder_img.norm.weight": torch.zeros(cfg.img_dim + 1)}
    with pytest.raises(ReferenceWeightsError, match=r"encoder_img.norm.weight \(copy\) has shape \(33,\); "
                                                    r"image_encoder.norm.weight of config 'tiny-ref' has \(32,\)"):
        convert(bad, cfg)
    with pytest.raises(ReferenceWeightsError, match="does not compute as the public code does"):
        convert(ref, get_config("tiny"))


def test_the_reference_hazard_form_is_the_public_arithmetic_and_ours_stays_monotone():
    # the reference head's output (h1..h6, base), as it would come out of its decoder
    ref_out = torch.tensor([[0.5, -1.0, 0.2, 0.0, 0.3, -0.1, -2.0]])
    ours = ref_out[:, [6, 0, 1, 2, 3, 4, 5]]  # converted rows: (base, h1..h6)
    # by hand: base + h1, + h2, ...: -1.5, -2.5, -2.3, -2.3, -2.0, -2.1 (the risk falls where a hazard is negative)
    torch.testing.assert_close(cumulative_hazard(ours, "reference"),
                               torch.tensor([[-1.5, -2.5, -2.3, -2.3, -2.0, -2.1]]))
    monotone = cumulative_hazard(ours, "monotone")
    assert (monotone.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(monotone[0, 0], torch.tensor(-2.0) + torch.nn.functional.softplus(torch.tensor(0.5)))


def test_run_init_starts_a_run_from_converted_weights_and_refuses_another_configuration(tmp_path):
    """[run] init: the round-0 model is the converted checkpoint, strictly checked (a real run from one:
    tests/test_site_ranks.py's round)."""
    cfg_ref = get_config("tiny-ref")
    converted, _ = convert(reference_state(cfg_ref), cfg_ref)
    write_checkpoint(tmp_path / "converted.pt", converted, cfg_ref)
    toml = tmp_path / "server.toml"
    toml.write_text(SERVER_TOML.format(name="from-ref", strategy="fedavg", multitask_rounds=1)
                    .replace('model = "tiny"', 'model = "tiny-ref"\ninit = "converted.pt"'))
    start = initial_weights(load_server_config(toml))
    assert start.keys() == converted.keys() and all(torch.equal(start[k], converted[k]) for k in converted)
    toml.write_text(toml.read_text().replace('model = "tiny-ref"', 'model = "tiny"'))
    with pytest.raises(RunError, match=r"made for model configuration 'tiny-ref', not this run's 'tiny'"):
        initial_weights(load_server_config(toml))
    other = tmp_path / "roberta"
    TextTokenizer.build(1024).save(other)
    toml.write_text(toml.read_text().replace('model = "tiny"', f'model = "tiny-ref"\ntokenizer = "{other}"'))
    with pytest.raises(RunError, match="was trained with tokenizer"):
        write_checkpoint(tmp_path / "converted.pt", converted, cfg_ref,
                         extra={"tokenizer": load_tokenizer(cfg_ref).fingerprint})
        initial_weights(load_server_config(toml))


def test_a_site_with_another_tokenizer_refuses_the_run_naming_both(ingested, tmp_path):
    """site.toml [model] tokenizer and server.toml [run] tokenizer take a RoBERTa folder; requests carry the run's
    fingerprint, and a site whose tokenizer differs refuses instead of training on other token ids."""
    _, sites, _ = ingested
    other = tmp_path / "roberta"
    TextTokenizer.build(1024).save(other)  # a different vocabulary
    site_dir = copy_site(sites[0].site_dir, tmp_path)
    toml = site_dir / "site.toml"
    toml.write_text(toml.read_text() + f'\n[model]\ntokenizer = "{other}"\n')
    site = load_site(site_dir)
    assert site.tokenizer == other
    shipped = load_tokenizer(get_config("tiny")).fingerprint
    request = {"op": channel.EVALUATE, "config": {**EvaluateConfig("multitask", "tiny").to_config(),
                                                 TOKENIZER_KEY: shipped}}
    with pytest.raises(SiteNotReady, match=rf"the run uses tokenizer {shipped}, this site's \({other}\) is "
                                           rf"{TextTokenizer.from_files(other).fingerprint}"):
        SiteService(site_dir).handle(request, pack_state(M3FM(get_config("tiny")).state_dict()))
    run = tmp_path / "server.toml"
    run.write_text(SERVER_TOML.format(name="tok", strategy="fedavg", multitask_rounds=1)
                   .replace('model = "tiny"', f'model = "tiny"\ntokenizer = "{other}"'))
    cfg = load_server_config(run)
    assert dict(phase_config(cfg, 1))[TOKENIZER_KEY] == TextTokenizer.from_files(other).fingerprint
    (tmp_path / "empty").mkdir()
    run.write_text(run.read_text().replace(str(other), str(tmp_path / "empty")))
    with pytest.raises(ServerConfigError, match=r"\[run\] tokenizer .*empty lacks vocab.json and merges.txt"):
        load_server_config(run)
    toml.write_text(toml.read_text().replace(str(other), "nowhere"))
    with pytest.raises(SiteConfigError, match=r"site.toml: model.tokenizer 'nowhere': .* lacks vocab.json"):
        load_site(site_dir)
