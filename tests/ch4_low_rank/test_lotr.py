"""LoTR: shared Tucker-2 factors, per-layer cores, count formula, dense update, learning, refused applies.
(Identity at init, frozen entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lotr import LoTRLinear, TuckerFactors, apply_lotr, count_lotr
from minimal.gpt import GPT
from minimal.peft import count_trainable
from tests import helpers
from tests.helpers import adam_steps, assert_refuses, tiny_config, token_batch

CFG = tiny_config(n_layer=3)


def tiny_gpt(seed: int = 0) -> GPT:
    return helpers.tiny_gpt(seed, CFG)


def randomize_cores(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoTRLinear):
                m.G.copy_(torch.randn(m.G.shape, generator=g))


def lotr_layers(model: GPT, name: str = "attn.c_attn") -> list[LoTRLinear]:
    return [model.get_submodule(f"h.{i}.{name}") for i in range(CFG.n_layer)]


def test_sharing_count_and_orthonormal_init() -> None:
    model = tiny_gpt()
    apply_lotr(model, r=4, targets=("c_attn", "c_fc"))
    layers = lotr_layers(model)
    assert all(m.factors is layers[0].factors for m in layers)
    assert len({m.factors.U.data_ptr() for m in layers}) == 1 and len({m.G.data_ptr() for m in layers}) == 3
    assert layers[0].factors is not model.h[0].mlp.c_fc.factors  # one pair per projection type
    # per type: r (in + out) + N r^2;  c_attn: 4 * 256 + 3 * 16, c_fc: 4 * 320 + 3 * 16
    assert count_trainable(model).trainable == count_lotr(CFG, 4, ("c_attn", "c_fc")) == 1072 + 1328
    one = tiny_gpt()
    apply_lotr(one, r=2, targets=r"h\.[01]\.attn\.c_attn")  # 2 of the 3 layers: U, V once, 2 cores
    assert count_trainable(one).trainable == count_lotr(CFG, 2, r"h\.[01]\.attn\.c_attn") == 2 * 256 + 2 * 4
    lora_equivalent = 3 * 4 * (256 + 320)  # LoRA r=4 on the same layers
    assert count_trainable(model).trainable < lora_equivalent
    U, V = layers[0].factors.U.detach(), layers[0].factors.V.detach()
    assert torch.allclose(U.T @ U, torch.eye(4), atol=1e-5) and torch.allclose(V.T @ V, torch.eye(4), atol=1e-5)


def test_delta_is_tucker_and_forward_is_dense() -> None:
    model = tiny_gpt()
    apply_lotr(model, r=4, alpha=8.0, targets=("c_attn",), init="normal")
    randomize_cores(model)
    layers = lotr_layers(model)
    U, V = layers[0].factors.U.detach(), layers[0].factors.V.detach()
    x = torch.randn(2, 5, 64)
    for m in layers:
        dense = 2.0 * U @ m.G.detach() @ V.T  # s = alpha / r = 2
        assert torch.allclose(m.delta_weight(), dense, atol=1e-5)
        assert torch.allclose(m(x), F.linear(x, m.base.weight + dense, m.base.bias), atol=1e-4)
    # the stacked updates [N, out, in] have multilinear rank (r, r) in the out and in modes
    stack = torch.stack([m.delta_weight().detach() for m in layers])  # [3, 192, 64]
    assert torch.linalg.matrix_rank(stack.permute(1, 0, 2).reshape(192, -1), rtol=1e-4) == 4
    assert torch.linalg.matrix_rank(stack.permute(2, 0, 1).reshape(64, -1), rtol=1e-4) == 4
    assert torch.linalg.matrix_rank(stack.reshape(3, -1), rtol=1e-4) == 3  # distinct cores


def test_shared_factor_gradient_is_sum_over_layers() -> None:
    shared, idx = tiny_gpt(), token_batch()
    apply_lotr(shared, r=4, targets=("c_attn",))
    randomize_cores(shared)
    layers = lotr_layers(shared)
    separate = tiny_gpt()
    apply_lotr(separate, r=4, targets=("c_attn",))
    with torch.no_grad():  # give every layer of the second model its own copy of the same numbers
        for i, m in enumerate(lotr_layers(separate)):
            own = TuckerFactors(192, 64, 4)
            own.U.copy_(layers[i].factors.U), own.V.copy_(layers[i].factors.V)
            m.factors = own
            m.G.copy_(layers[i].G)
    assert torch.allclose(shared(idx).logits, separate(idx).logits, atol=1e-6)
    shared(idx, labels=idx).loss.backward()
    separate(idx, labels=idx).loss.backward()
    for p in ("U", "V"):
        total = sum(getattr(m.factors, p).grad for m in lotr_layers(separate))
        assert total.abs().max() > 0
        assert torch.allclose(getattr(layers[0].factors, p).grad, total, atol=1e-6)


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_lotr(model, r=8, targets=("c_attn", "c_fc"))
    losses = adam_steps(model, idx, steps=25, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_bad_input() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_lotr(m, r=65), r"rank r=65 must be in \[1, 64\]")
    assert_refuses(tiny_gpt(), lambda m: apply_lotr(m, r=0), "rank r=0")
    assert_refuses(tiny_gpt(), lambda m: apply_lotr(m, r=2.5), "int", TypeError)
    assert_refuses(tiny_gpt(), lambda m: apply_lotr(m, init="tucker"), "unknown LoTR init")
    assert_refuses(tiny_gpt(), lambda m: apply_lotr(m, targets=("q_proj",)), "unknown target")
    with pytest.raises(ValueError, match="do not fit"):
        LoTRLinear(nn.Linear(64, 64), TuckerFactors(192, 64, 4))
    with pytest.raises(ValueError, match="alpha"):
        LoTRLinear(nn.Linear(64, 64), TuckerFactors(64, 64, 4), alpha=-1.0)
