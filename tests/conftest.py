"""Shared fixtures: a tiny random GPT (fast, no files needed) and the seed discipline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from minimal.gpt import GPT, GPTConfig  # noqa: E402
from tests.helpers import assert_refuses  # noqa: E402


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture
def tiny_gpt(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture
def refuses():
    """refuses(model, apply, match): apply(model) raises (ValueError by default) and changes nothing."""
    return assert_refuses
