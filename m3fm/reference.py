"""Weights of the public M3FM code (niuchuangnn/M3FM, inference only) as this project's model.

The public code ships task fine-tunes of its `models/m3fm.py` M3FM as plain state dicts. `convert` maps every
tensor of one onto our model in its reference form ("<size>-ref", m3fm/model/configs.py's `reference_form`: the
question's <s> output as the <TASK> token, per-scale CLS tokens, raw hazards, the predictors' epsilon), so that the
converted model answers as the reference does; each rule was traced in the public repository's `models/` and
config files:

  img_tokenizer.tokenizer_(S, H, W).patch_embed.proj    Conv3d, kernel = stride -> patch_embed.<scale>.proj Linear
                                                         (weight reshaped to (D, voxels); the scale found by volume)
  img_tokenizer.tokenizer_(...).pos_embed_spatial/slice  -> pos_embed.<scale>.in_plane / through_plane
  img_tokenizer.tokenizer_(...).cls_token + pos_embed_class -> scale_cls.<scale>.tokens (their sum: we add no CLS
                                                         position, and both add the size embedding to every token)
  img_tokenizer.conv1..conv4                             aliases of the tokenizers' convolutions (checked, dropped)
  encoder_img.blocks.i.attn.{q,k,v}                      -> image_encoder.blocks.i.attn.qkv (concatenated)
  encoder_img.*, encoder_txt.*                           -> image_encoder.*, text_encoder.model.* (same names)
  cross_embedding_{img,txt,task}, task_registers         -> task_encoder.{image,text,task}_proj, registers.tokens
  task_attention.*                                       -> task_encoder.* (q, k, v fused as above)
  multi_task_head.<head>[_0].transform.dense / LayerNorm -> heads.<ours>.fc1 / norm
  multi_task_head.<head>[_0].decoder.weight, .bias       -> heads.<ours>.fc2, rows put in our answer order:
                                                         yes/no (No, Yes) -> (Yes, No); hazards (h1..h6, base) ->
                                                         (base, h1..h6)
  multi_task_head.hazard_layer.upper_triagular_mask      a constant (checked, dropped)

What the reference lacks is initialised as usual (the MIM decoder, the MLM head, the task-ID predictor, the heads
of tasks the file does not carry), except the per-task vectors of the <TASK> token, which start at zero so that
the token is the reference's. No Flower here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from m3fm.model.configs import M3FMConfig
from m3fm.model.m3fm import M3FM

# the public code's head names -> ours, and where each of our outputs sits in the reference's output
HEADS = {"heart": "yes_no", "cancer_risk": "lung_cancer_risk"}
ANSWER_ORDER = {"yes_no": [1, 0], "lung_cancer_risk": [6, 0, 1, 2, 3, 4, 5]}
TEXT_BUFFERS = ("encoder_txt.embeddings.position_ids", "encoder_txt.embeddings.token_type_ids")
TOKENIZER = re.compile(r"img_tokenizer\.tokenizer_\((\d+), (\d+), (\d+)\)\.(.+)")
QKV = re.compile(r"(.+\.attn)\.([qkv])\.(weight|bias)")


class ReferenceWeightsError(ValueError):
    """A reference state dict that cannot be converted: the message names the keys."""


@dataclass
class Conversion:
    """What `convert` did: our key -> (reference keys, transform); our keys initialised; reference keys dropped
    as constants or aliases; reference keys left over (unknown)."""
    mapped: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"mapped": len(self.mapped), "initialised": len(self.initialised), "dropped": len(self.dropped),
                "extra": self.extra}


def convert(ref: dict[str, torch.Tensor], cfg: M3FMConfig, heads: dict[str, str] | None = None,
            allow_extra: bool = False, seed: int = 0) -> tuple[dict[str, torch.Tensor], Conversion]:
    """A reference state dict -> (our state dict for `cfg`, which must be a reference form, and the report).
    ReferenceWeightsError names any tensor that does not fit, and any unknown key unless allow_extra."""
    if not (cfg.cls_per_scale and cfg.hazard == "reference" and cfg.question_pooling == "first"
            and not cfg.task_image_summary):
        raise ReferenceWeightsError(f"config {cfg.name!r} does not compute as the public code does; convert into "
                                    f"its reference form ('<size>-ref', m3fm/model/configs.py reference_form)")
    heads = {**HEADS, **(heads or {})}
    torch.manual_seed(seed)
    ours = M3FM(cfg).state_dict()
    out = {k: v.clone() for k, v in ours.items()}
    report = Conversion()
    scales = {s.volume: s.name for s in cfg.scales}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    cls: dict[str, dict[str, torch.Tensor]] = {}

    def put(key: str, value: torch.Tensor, sources: list[str], how: str) -> None:
        if key not in ours:
            raise ReferenceWeightsError(f"{', '.join(sources)} -> {key}: no such key in config {cfg.name!r}")
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ReferenceWeightsError(f"{', '.join(sources)} ({how}) has shape {tuple(value.shape)}; {key} of "
                                        f"config {cfg.name!r} has {tuple(ours[key].shape)}")
        out[key] = value.to(ours[key].dtype).clone()
        report.mapped[key] = (sources, how)

    for k, v in ref.items():
        if k in TEXT_BUFFERS or k == "multi_task_head.hazard_layer.upper_triagular_mask":
            if k.endswith("upper_triagular_mask") and not torch.equal(v, torch.triu(torch.ones_like(v))):
                raise ReferenceWeightsError(f"{k} is not the upper-triangular ones it always is")
            report.dropped.append(k)
        elif re.fullmatch(r"img_tokenizer\.conv\d\.(weight|bias)", k):
            report.dropped.append(k)  # checked below: an alias of a tokenizer's convolution
        elif m := TOKENIZER.fullmatch(k):
            volume, rest = tuple(int(g) for g in m.groups()[:3]), m.group(4)
            if volume not in scales:
                raise ReferenceWeightsError(f"{k}: no scale of config {cfg.name!r} has volume {volume}; its scales: "
                                            f"{ {s.name: s.volume for s in cfg.scales} }")
            scale = scales[volume]
            if rest == "patch_embed.proj.weight":
                put(f"image_encoder.patch_embed.{scale}.proj.weight", v.reshape(v.shape[0], -1), [k], "Conv3d -> Linear")
            elif rest == "patch_embed.proj.bias":
                put(f"image_encoder.patch_embed.{scale}.proj.bias", v, [k], "copy")
            elif rest in ("pos_embed_spatial", "pos_embed_slice"):
                part = "in_plane" if rest == "pos_embed_spatial" else "through_plane"
                put(f"image_encoder.pos_embed.{scale}.{part}", v, [k], "copy")
            elif rest in ("cls_token", "pos_embed_class"):
                cls.setdefault(scale, {})[k] = v
            else:
                report.extra.append(k)
        elif m := QKV.fullmatch(k):
            qkv.setdefault(f"{m.group(1)}.qkv.{m.group(3)}", {})[m.group(2)] = (k, v)
        elif (target := _renamed(k, heads)) is not None:
            key, rows = target
            put(key, v[rows] if rows is not None else v, [k], "rows in our answer order" if rows else "copy")
        else:
            report.extra.append(k)
    for fused, parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ReferenceWeightsError(f"{fused}: the reference holds only {sorted(parts)} of q, k, v")
        put((_renamed(fused, {}) or (fused, None))[0], torch.cat([parts[p][1] for p in "qkv"], 0), [parts[p][0] for p in "qkv"], "cat(q, k, v)")
    for scale, pair in sorted(cls.items()):
        if len(pair) != 2:
            raise ReferenceWeightsError(f"scale {scale}: the reference holds {sorted(pair)}, not a CLS token and its "
                                        "position")
        put(f"image_encoder.scale_cls.{scale}.tokens", sum(pair.values()), sorted(pair), "cls_token + pos_embed_class")
    _check_aliases(ref, report)
    for key in out:
        if key.startswith("task_encoder.task_embed.") and key not in report.mapped:
            out[key].zero_()  # the reference's <TASK> token has no per-task vector
    report.initialised = sorted(k for k in ours if k not in report.mapped)
    if report.extra and not allow_extra:
        shown = ", ".join(report.extra[:10]) + (f" and {len(report.extra) - 10} more" if len(report.extra) > 10 else "")
        raise ReferenceWeightsError(f"{len(report.extra)} reference key(s) map to nothing in config {cfg.name!r}: "
                                    f"{shown} (--allow-extra converts the rest and reports them)")
    return out, report


def _renamed(k: str, heads: dict[str, str]) -> tuple[str, list[int] | None] | None:
    """A reference key copied under another name -> (our key, rows to take or None); None when not one of those."""
    for ref_prefix, our_prefix in (("encoder_img.", "image_encoder."), ("encoder_txt.", "text_encoder.model."),
                                   ("task_attention.", "task_encoder."), ("cross_embedding_img.", "task_encoder.image_proj."),
                                   ("cross_embedding_txt.", "task_encoder.text_proj."),
                                   ("cross_embedding_task.", "task_encoder.task_proj.")):
        if k.startswith(ref_prefix):
            return our_prefix + k[len(ref_prefix):], None
    if k == "task_registers":
        return "task_encoder.registers.tokens", None
    if m := re.fullmatch(r"multi_task_head\.(\w+?)(?:_0)?\.(transform\.dense|transform\.LayerNorm|decoder|bias)"
                         r"(?:\.(weight|bias))?", k):
        head, part, param = m.groups()
        if head not in heads:
            return None
        ours = heads[head]
        if part == "bias" or part == "decoder":
            return f"heads.{ours}.fc2.{'bias' if part == 'bias' else 'weight'}", ANSWER_ORDER.get(ours)
        return f"heads.{ours}.{'fc1' if part == 'transform.dense' else 'norm'}.{param}", None
    return None


def _check_aliases(ref: dict[str, torch.Tensor], report: Conversion) -> None:
    """img_tokenizer.convN must be one of the tokenizers' convolutions (the reference saves each twice)."""
    for k in (k for k in ref if re.fullmatch(r"img_tokenizer\.conv\d\.(weight|bias)", k)):
        kind = k.rsplit(".", 1)[1]
        if not any(torch.equal(ref[k], v) for t, v in ref.items() if TOKENIZER.fullmatch(t)
                   and t.endswith(f"patch_embed.proj.{kind}")):
            raise ReferenceWeightsError(f"{k} equals none of the tokenizers' convolutions (it is an alias of one)")


def check_heads(spec: list[str]) -> dict[str, str]:
    """--head REF=OURS options -> {reference head: our head}, only heads whose answer order is known."""
    heads = {}
    for item in spec:
        ref_head, _, ours = item.partition("=")
        if not ref_head or ours not in ANSWER_ORDER:
            raise ReferenceWeightsError(f"--head {item!r}: give REFERENCE_HEAD=OURS with OURS one of "
                                        f"{', '.join(ANSWER_ORDER)} (the heads whose reference answer order is known)")
        heads[ref_head] = ours
    return heads
