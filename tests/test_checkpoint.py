import dataclasses

import pytest
import torch

from m3fm.checkpoint import CheckpointMismatchError, load_checkpoint, read_checkpoint, save_checkpoint
from m3fm.data.collate import collate_qa
from m3fm.model.m3fm import M3FM
from m3fm.train import TrainConfig, build_optimizer, multitask_step
from sim.toy_batches import toy_qa_samples


def trained(tiny_cfg, tokenizer):
    torch.manual_seed(1)
    model = M3FM(tiny_cfg)
    opt = build_optimizer(model, TrainConfig())
    multitask_step(model, opt, [collate_qa(toy_qa_samples(tiny_cfg, "emphysema", 2), tokenizer, tiny_cfg)],
                   TrainConfig(), 0)
    return model, opt


def test_round_trip_is_exact(tmp_path, tiny_cfg, tokenizer):
    model, opt = trained(tiny_cfg, tokenizer)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, tiny_cfg, opt, step=7, extra={"round": 3})
    fresh = M3FM(tiny_cfg)
    fresh_opt = build_optimizer(fresh, TrainConfig())
    payload = load_checkpoint(path, fresh, fresh_opt)
    assert payload["step"] == 7 and payload["extra"] == {"round": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    saved_state = opt.state_dict()["state"]
    for idx, st in fresh_opt.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved_state[idx]["exp_avg"])
    assert list(tmp_path.iterdir()) == [path], "no temporary file is left behind"


def test_mismatched_checkpoint_names_the_keys(tmp_path, tiny_cfg, tokenizer):
    model, _ = trained(tiny_cfg, tokenizer)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, tiny_cfg)
    wider = M3FM(dataclasses.replace(tiny_cfg, predictor_hidden=tiny_cfg.predictor_hidden * 2))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, wider)
    assert "shape of heads.yes_no.fc1.weight" in str(err.value)

    state = model.state_dict()
    state.pop("task_encoder.norm.bias")
    state["stray.weight"] = torch.zeros(1)
    state["heads.lung_rads.fc2.bias"] = state["heads.lung_rads.fc2.bias"].double()
    torch.save({**read_checkpoint(path), "model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "bad.pt", M3FM(tiny_cfg))
    msg = str(err.value)
    assert "missing key task_encoder.norm.bias" in msg and "unexpected key stray.weight" in msg
    assert "dtype of heads.lung_rads.fc2.bias" in msg


def test_unreadable_checkpoint_names_the_file(tmp_path, tiny_cfg):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(bad, M3FM(tiny_cfg))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt", M3FM(tiny_cfg))
