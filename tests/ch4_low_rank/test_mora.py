"""MoRA: budget rule and count, each operator family against its dense update built by hand, learning, refused
applies. (Identity at init, frozen entries and merge equivalence are checked in tests/test_contract.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.mora import KINDS, MoRALinear, apply_mora, budget_error, count_mora, mora_rank
from minimal.peft import count_trainable
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def random_layer(kind: str, in_f: int = 64, out_f: int = 192, r_hat: int | None = None) -> MoRALinear:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(in_f, out_f), r=8, kind=kind, r_hat=r_hat)
    with torch.no_grad():
        layer.M.normal_()
    return layer


def rotation_matrix(R: int, b: int) -> torch.Tensor:
    """The RoPE map of chunk b as an explicit [R, R] matrix: pairs (k, k + R/2) turn by b 10000^(-2k/R)."""
    h = R // 2
    rot = torch.zeros(R, R, dtype=torch.float64)
    for k in range(h):
        t = b * 10000 ** (-2 * k / R)
        rot[k, k], rot[k, k + h] = math.cos(t), -math.sin(t)
        rot[k + h, k + h], rot[k + h, k] = math.cos(t), math.sin(t)
    return rot


def dense_update(kind: str, M: torch.Tensor, in_f: int, out_f: int) -> torch.Tensor:
    """Each family's dW [out, in] written out from its definition (no code shared with the module)."""
    M = M.double()
    R = M.shape[0]
    c = math.ceil(in_f / R)
    pad = c * R - in_f
    if kind == "truncation":
        dw = torch.zeros(out_f, in_f, dtype=torch.float64)
        dw[:R, :R] = M
        return dw
    if kind == "sharing":
        dw = torch.zeros(out_f, in_f, dtype=torch.float64)
        for i in range(out_f):
            for j in range(in_f):
                dw[i, j] = M[i % R, j % R] + (M[i % R, (in_f + j) % R] if j < pad else 0.0)
        return dw
    blocks = [M @ rotation_matrix(R, b) if kind == "rotation" else M for b in range(c)]
    big = torch.block_diag(*blocks)  # [c R, c R] acting on the wrap-padded input
    folded = big[:, :in_f].clone()
    folded[:, :pad] += big[:, in_f:]  # padded entry in_f + j is a copy of x_j
    return folded[[i % (c * R) for i in range(out_f)]]  # concatenated chunks tiled/cut to out


def test_budget_rule() -> None:
    assert mora_rank(64, 192, 8) == 45 and mora_rank(64, 192, 8, "rotation") == 44  # sqrt(2048) = 45.25
    assert mora_rank(64, 64, 4) == 23 and mora_rank(256, 64, 8) == 51  # sqrt(512) = 22.6, sqrt(2560) = 50.6
    for kind in KINDS:
        assert budget_error(64, 192, 8, kind) < 0.06
    assert budget_error(4096, 4096, 8) < 0.001


@pytest.mark.parametrize("kind", KINDS)
def test_count(kind: str) -> None:
    model = tiny_gpt()
    apply_mora(model, r=4, kind=kind, targets=("c_attn", "c_proj"))
    shapes = [(64, 192), (64, 64), (256, 64)]  # (in, out) of c_attn, attn.c_proj, mlp.c_proj
    assert count_trainable(model).trainable == CFG.n_layer * sum(mora_rank(i, o, 4, kind) ** 2 for i, o in shapes)
    assert count_trainable(model).trainable == count_mora(CFG, 4, kind, ("c_attn", "c_proj"))
    fixed = tiny_gpt()
    apply_mora(fixed, kind=kind, targets=("c_fc",), r_hat=16)
    assert count_trainable(fixed).trainable == count_mora(CFG, kind=kind, targets=("c_fc",), r_hat=16) == 2 * 256
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"M"}
    layer = model.h[0].attn.c_attn
    assert [n for n, _ in layer.named_parameters() if not n.startswith("base.")] == ["M"]  # maps are parameter-free


@pytest.mark.parametrize("kind", KINDS)
def test_delta_equals_dense_update_and_forward(kind: str) -> None:
    layer = random_layer(kind)  # in 64, out 192, R 45 (44 for rotation): two chunks, one wrapped
    dense = dense_update(kind, layer.M.detach(), 64, 192).float()
    assert torch.allclose(layer.delta_weight(), dense, atol=1e-5)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), F.linear(x, layer.base.weight + dense, layer.base.bias), atol=1e-4)


def test_family_structure() -> None:
    R = 16
    trunc = random_layer("truncation").delta_weight()
    assert torch.count_nonzero(trunc[45:]) == 0 and torch.count_nonzero(trunc[:, 45:]) == 0
    shared = random_layer("sharing").delta_weight()
    assert torch.linalg.matrix_rank(shared.detach(), rtol=1e-4) <= 45
    reshape = random_layer("reshaping", 64, 64, r_hat=R)  # 4 chunks, no padding
    dw, M = reshape.delta_weight().detach(), reshape.M.detach()
    assert torch.allclose(dw, torch.block_diag(M, M, M, M))  # identical diagonal blocks
    rot = random_layer("rotation", 64, 64, r_hat=R)
    dw, M = rot.delta_weight().detach(), rot.M.detach()
    assert torch.allclose(dw[:R, :R], M)  # chunk 0 is not rotated
    assert not torch.allclose(dw[R:2 * R, R:2 * R], M, atol=1e-3)  # the others are: blocks differ
    assert torch.count_nonzero(dw[:R, R:]) == 0
    assert torch.linalg.matrix_rank(dw, rtol=1e-4) == 64 > R  # rank above R


@pytest.mark.parametrize("kind", ("sharing", "rotation"))
def test_learns(kind: str) -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_mora(model, r=4, kind=kind, targets=("c_attn", "c_fc"))
    losses = adam_steps(model, idx, steps=25, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_bad_input() -> None:
    lin = nn.Linear(64, 192)
    with pytest.raises(ValueError, match="unknown MoRA kind"):
        MoRALinear(lin, kind="type1")
    with pytest.raises(ValueError, match=r"R=91 \(from r=32\) exceeds min\(in, out\)=64"):
        MoRALinear(lin, r=32)
    with pytest.raises(ValueError, match="positive int"):
        MoRALinear(lin, r=0)
    with pytest.raises(ValueError, match="even R"):
        MoRALinear(lin, kind="rotation", r_hat=15)
    with pytest.raises(ValueError, match="r_hat"):
        MoRALinear(lin, r_hat=0)
    assert_refuses(tiny_gpt(), lambda m: apply_mora(m, targets=("q_proj",)), "unknown target")
    assert_refuses(tiny_gpt(), lambda m: apply_mora(m, kind="type6"), "unknown MoRA kind")
    # c_attn R=64 fits; mlp.c_proj R=72 > 64: the layers built before it change nothing
    assert_refuses(tiny_gpt(), lambda m: apply_mora(m, r=16, targets=("c_attn", "c_proj")), "exceeds")
