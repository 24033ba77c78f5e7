"""LoHa: the Hadamard update, its rank r^2 from 2 r (in + out) numbers, init (A2 = 0, only A2 moves first),
merge, save/load, count formula, refused applies, dtypes, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.loha import LoHaLinear, apply_loha, count_loha
from minimal.peft import count_trainable, load_adapter, merge_all, save_adapter, unmerge_all
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
TARGETS = ("c_attn", "c_fc")  # [192, 64] and [256, 64]


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Random values in the zero factor A2, so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoHaLinear):
                m.A2.copy_(0.2 * torch.randn(m.A2.shape, generator=g))


def test_count_formula_and_trainable_set() -> None:
    model = tiny_gpt()
    apply_loha(model, r=4, targets=TARGETS)
    assert count_trainable(model).trainable == count_loha(CFG, r=4, targets=TARGETS)
    assert count_loha(CFG, r=4, targets=TARGETS) == 2 * (2 * 4 * (192 + 64) + 2 * 4 * (256 + 64))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"h.{i}.{m}.{f}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc") for f in ("A1", "B1", "A2", "B2")}


def test_identity_at_init_and_only_A2_gets_a_gradient() -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_loha(model, r=4, alpha=8, targets=TARGETS)
    assert torch.equal(model(idx).logits, ref)  # A2 = 0 exactly
    layer = model.h[0].attn.c_attn
    assert layer.B1.shape == (192, 4) and layer.A1.shape == (4, 64) and layer.scale == 2.0
    assert torch.count_nonzero(layer.A2) == 0 and all(p.abs().min() > 0 for p in (layer.B1, layer.A1, layer.B2))
    model(idx, labels=idx).loss.backward()
    assert layer.A2.grad.abs().max() > 0
    for p in (layer.B1, layer.A1, layer.B2):  # each is multiplied by B2 A2 = 0 or by A2 = 0
        assert torch.count_nonzero(p.grad) == 0


def test_delta_is_scaled_hadamard_and_forward_is_dense() -> None:
    torch.manual_seed(0)
    layer = LoHaLinear(nn.Linear(64, 192), r=3, alpha=6.0)
    with torch.no_grad():
        layer.A2.normal_()
    B1, A1, B2, A2 = (p.detach() for p in (layer.B1, layer.A1, layer.B2, layer.A2))
    dense = 2.0 * (B1 @ A1) * (B2 @ A2)
    torch.testing.assert_close(layer.delta_weight(), dense)
    assert torch.isclose(dense[5, 7], 2.0 * (B1[5] @ A1[:, 7]) * (B2[5] @ A2[:, 7]))
    # the face-splitting form: [out, r^2] @ [r^2, in], so rank <= r^2
    left = (B1[:, :, None] * B2[:, None, :]).reshape(192, 9)  # B1[o, i] B2[o, j]
    right = (A1[:, None, :] * A2[None, :, :]).reshape(9, 64)  # A1[i, n] A2[j, n]
    torch.testing.assert_close(2.0 * left @ right, dense)
    assert torch.linalg.matrix_rank(layer.double().delta_weight()) == 9  # r^2 = 9 from 2 pairs of rank 3
    layer.float()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + dense, layer.base.bias))


def test_merge_equals_unmerged_and_unmerge_restores_W0() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_loha(model, r=4, targets=TARGETS)
    randomize(model)
    w0 = model.h[1].mlp.c_fc.base.weight.clone()
    unmerged = model(idx).logits
    assert merge_all(model) == 4
    torch.testing.assert_close(model(idx).logits, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_all(model)
    torch.testing.assert_close(model.h[1].mlp.c_fc.base.weight, w0, atol=1e-6, rtol=0)


def test_save_load_round_trip(tmp_path) -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_loha(model, r=4, targets=TARGETS)
    model.train()
    adam_steps(model, idx, steps=2)
    model.eval()
    save_adapter(model, tmp_path, {"method": "loha", "r": 4})
    fresh = tiny_gpt()
    apply_loha(fresh, r=4, targets=TARGETS)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(idx).logits, model(idx).logits)
    other = tiny_gpt()
    apply_loha(other, r=4, alpha=4, targets=TARGETS)
    with pytest.raises(ValueError, match="alpha"):
        load_adapter(other, tmp_path)


def test_bad_arguments_leave_the_model_unchanged() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, r=0), r"rank r=0 must be in \[1, 64\]")
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, r=65, targets=TARGETS), r"rank r=65")
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, alpha=0.0), "alpha")
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, alpha=float("inf")), "alpha")
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, targets=("c_attn", "nope")), "unknown target")
    assert_refuses(tiny_gpt(), lambda m: apply_loha(m, r=2.0), "must be an int", error=TypeError)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_forward_backward_in_the_models_dtype(dtype: torch.dtype) -> None:
    model, idx = tiny_gpt().to(dtype), token_batch()
    apply_loha(model, r=4, targets=TARGETS)
    randomize(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model(idx, labels=idx).loss.backward()
    for m in model.modules():
        if isinstance(m, LoHaLinear):
            for p in (m.B1, m.A1, m.B2, m.A2):
                assert p.grad.dtype == dtype and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_loha(model, r=4, targets=TARGETS)
    model.train()
    losses = adam_steps(model, idx, steps=30, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]
