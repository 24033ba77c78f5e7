"""Shared by the TabLLM tests: a tiny GPT over the shipped tokenizer, and a toy table with a known rule."""

from __future__ import annotations

import torch

from chapters.ch5_applications import tabllm_recipe as R
from minimal.data import get_tokenizer
from tests.helpers import tiny_config, tiny_gpt

VOCAB = get_tokenizer().n_vocab  # 2048


def lm(seed: int = 0):
    """A tiny random GPT over the shipped tokenizer's vocabulary, with room for the TabLLM prompts."""
    return tiny_gpt(seed, tiny_config(vocab_size=VOCAB, block_size=128))


def toy_table(n: int = 60, seed: int = 0) -> R.Table:
    """Two classes; column 0 is high exactly for class 1, column 1 is low for class 1, column 2 is noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    X[:, 0] += 2.0 * y
    X[:, 1] -= 2.0 * y
    return R.Table("toy", ("size", "shade", "noise"), X, y, ("small", "large"), "Is this thing")
