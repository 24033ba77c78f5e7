"""MELoRA: block-diagonal update, equivalent rank n r for r (in + out) numbers, count, learning, refused applies.
(Identity at init, frozen entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.melora import MELoRALinear, apply_melora, count_melora
from minimal.peft import count_trainable
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def random_layer(n: int, r: int, out_f: int = 192, in_f: int = 64, seed: int = 0) -> MELoRALinear:
    torch.manual_seed(seed)
    layer = MELoRALinear(nn.Linear(in_f, out_f), n=n, r=r, alpha=2.0 * r)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def test_count_and_trainable_set() -> None:
    model = tiny_gpt()
    apply_melora(model, n=4, r=2, targets=("c_attn", "c_proj"))
    per_block = 2 * (256 + 128 + 320)  # r (in + out) for c_attn, attn.c_proj, mlp.c_proj, whatever n is
    assert count_trainable(model).trainable == CFG.n_layer * per_block == count_melora(CFG, 2, ("c_attn", "c_proj"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"h.{i}.{m}.{f}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj") for f in "AB"}


def test_delta_is_block_diagonal_with_rank_n_r() -> None:
    layer = random_layer(n=4, r=2)
    s = layer.scale
    A, B = layer.A.detach(), layer.B.detach()  # [4, 2, 16], [4, 48, 2]
    dense = torch.zeros(192, 64)
    for i in range(4):  # the dense update written out block by block
        dense[48 * i:48 * (i + 1), 16 * i:16 * (i + 1)] = s * B[i] @ A[i]
    dw = layer.delta_weight()
    assert torch.allclose(dw, dense, atol=1e-6)
    off = torch.ones(192, 64, dtype=torch.bool)
    for i in range(4):
        off[48 * i:48 * (i + 1), 16 * i:16 * (i + 1)] = False
    assert torch.count_nonzero(dw[off]) == 0  # off-diagonal blocks exactly zero
    assert torch.linalg.matrix_rank(dw.detach(), rtol=1e-4) == 4 * 2  # equivalent rank n r ...
    assert layer.A.numel() + layer.B.numel() == 2 * (192 + 64)  # ... for the budget of a rank-r LoRA
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), F.linear(x, layer.base.weight + dense, layer.base.bias), atol=1e-5)
    assert torch.allclose(layer.branch(x), layer.branch_loop(x), atol=1e-6)


def test_n_equal_one_is_lora() -> None:
    layer = random_layer(n=1, r=3)
    A, B = layer.A[0].detach(), layer.B[0].detach()  # [3, 64], [192, 3]
    assert torch.allclose(layer.delta_weight(), layer.scale * B @ A, atol=1e-6)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach(), rtol=1e-4) == 3


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_melora(model, n=4, r=2, targets=("c_attn", "c_fc"))
    model.train()
    losses = adam_steps(model, idx, steps=30, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_bad_input() -> None:
    lin = nn.Linear(64, 192)
    with pytest.raises(ValueError, match="divisor"):
        MELoRALinear(lin, n=5)  # 5 divides neither 64 nor 192
    with pytest.raises(ValueError, match="divisor"):
        MELoRALinear(lin, n=0)
    with pytest.raises(ValueError, match=r"mini-rank r=17 must be in \[1, 16\]"):
        MELoRALinear(lin, n=4, r=17)
    with pytest.raises(ValueError, match="mini-rank"):
        MELoRALinear(lin, n=4, r=0)
    with pytest.raises(TypeError, match="int"):
        MELoRALinear(lin, n=4, r=2.0)
    with pytest.raises(ValueError, match="alpha"):
        MELoRALinear(lin, alpha=0.0)
    assert_refuses(tiny_gpt(), lambda m: apply_melora(m, targets=("q_proj",)), "unknown target")
    assert_refuses(tiny_gpt(), lambda m: apply_melora(m, n=3, targets=("c_attn", "c_proj")), "divisor")
    assert_refuses(tiny_gpt(), lambda m: apply_melora(m, n=4, r=17), "mini-rank")


def test_scale_is_alpha_over_r_of_one_mini_lora_not_of_the_whole_block() -> None:
    layer = random_layer(n=4, r=2)  # alpha = 4
    assert layer.scale == 4.0 / 2
    A, B = layer.A.detach(), layer.B.detach()
    torch.testing.assert_close(layer.delta_weight()[:48, :16], (4.0 / 2) * B[0] @ A[0], atol=1e-6, rtol=1e-5)
