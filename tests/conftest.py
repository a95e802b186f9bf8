import pytest
import torch

from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    return load_tokenizer(tiny_cfg)


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return M3FM(tiny_cfg)
