"""VeRA: one shared frozen random pair, d and b per layer; the update's formula, init, sharing, merge,
save/load with and without the projection, count formula, refused applies, dtypes, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.vera import VeRALinear, VeRAProjection, apply_vera, count_vera, projection_names
from minimal.peft import count_trainable, load_adapter, merge_all, save_adapter, unmerge_all
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
TARGETS = ("c_attn", "c_proj")  # [192, 64], attn.c_proj [64, 64], mlp.c_proj [64, 256]


def layers(model: nn.Module) -> list[VeRALinear]:
    return [m for m in model.modules() if isinstance(m, VeRALinear)]


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Random d and b (b is zero at init), so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers(model):
            m.b.copy_(0.1 * torch.randn(m.b.shape, generator=g))
            m.d.copy_(torch.randn(m.d.shape, generator=g))


def test_count_formula_and_only_d_b_train() -> None:
    model = tiny_gpt()
    apply_vera(model, r=16, targets=TARGETS)
    assert count_trainable(model).trainable == count_vera(CFG, r=16, targets=TARGETS)
    assert count_vera(CFG, r=16, targets=TARGETS) == 2 * ((16 + 192) + (16 + 64) + (16 + 64))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"h.{i}.{m}.{v}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
                     for v in "db"}


def test_init_is_identity_with_d_initial_and_zero_b() -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_vera(model, r=16, targets=TARGETS, d_initial=0.3)
    assert torch.equal(model(idx).logits, ref)  # b = 0 exactly
    for m in layers(model):
        assert torch.equal(m.d, torch.full((16,), 0.3)) and torch.count_nonzero(m.b) == 0
        assert torch.count_nonzero(m.delta_weight()) == 0
    model(idx, labels=idx).loss.backward()  # b = 0: only b gets a gradient at the first step
    layer = model.h[0].attn.c_attn
    assert layer.b.grad.abs().max() > 0 and torch.count_nonzero(layer.d.grad) == 0


def test_one_pair_is_shared_and_drawn_as_peft_does() -> None:
    model = tiny_gpt()
    apply_vera(model, r=16, targets=TARGETS, projection_seed=5)
    proj = model.h[0].attn.c_attn.proj
    assert all(m.proj is proj for m in layers(model))
    assert proj.A.shape == (16, 256) and proj.B.shape == (192, 16)  # the largest in (mlp.c_proj), out (c_attn)
    assert projection_names(model) == ["h.0.attn.c_attn.proj.A", "h.0.attn.c_attn.proj.B"]
    assert [n for n, _ in model.named_buffers() if n.endswith(("proj.A", "proj.B"))] == projection_names(model)
    assert not any(p.requires_grad for p in proj.parameters()) and not proj.A.requires_grad
    A_l, B_l = model.h[1].mlp.c_proj.sliced()  # [r, 256], [64, r]: views of the one pair
    assert A_l.data_ptr() == proj.A.data_ptr() and B_l.data_ptr() == proj.B.data_ptr()
    A_l, B_l = model.h[1].attn.c_attn.sliced()
    assert torch.equal(A_l, proj.A[:, :64]) and torch.equal(B_l, proj.B)
    # peft's draw: float32 CPU generator seeded with the key, A first; U(+-sqrt(6 / fan_in))
    g = torch.Generator().manual_seed(5)
    A = torch.empty(16, 256).uniform_(-math.sqrt(6 / 256), math.sqrt(6 / 256), generator=g)
    B = torch.empty(192, 16).uniform_(-math.sqrt(6 / 16), math.sqrt(6 / 16), generator=g)
    assert torch.equal(proj.A, A) and torch.equal(proj.B, B)
    other = tiny_gpt()
    apply_vera(other, r=16, targets=TARGETS, projection_seed=6)
    assert not torch.equal(other.h[0].attn.c_attn.proj.A, proj.A)


def test_the_shared_pair_never_moves_in_training() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_vera(model, r=16, targets=TARGETS)
    randomize(model)
    proj = model.h[0].attn.c_attn.proj
    A, B = proj.A.clone(), proj.B.clone()
    model.train()
    adam_steps(model, idx, steps=3)
    assert torch.equal(proj.A, A) and torch.equal(proj.B, B)


def test_delta_is_diag_b_B_diag_d_A_and_forward_is_dense() -> None:
    model = tiny_gpt()
    apply_vera(model, r=16, targets=TARGETS)
    randomize(model)
    for layer in (model.h[0].attn.c_attn, model.h[1].mlp.c_proj):
        A, B = layer.sliced()
        dense = torch.diag(layer.b) @ B @ torch.diag(layer.d) @ A  # [out, in]
        torch.testing.assert_close(layer.delta_weight(), dense)
        x = torch.randn(2, 5, layer.base.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + dense, layer.base.bias))
    layer = model.h[0].attn.c_attn.double()  # exact arithmetic for the rank: rank(dW) = r for random d, b
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 16


def test_merge_equals_unmerged_and_unmerge_restores_W0() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_vera(model, r=16, targets=TARGETS)
    randomize(model)
    w0 = model.h[0].attn.c_attn.base.weight.clone()
    unmerged = model(idx).logits
    assert merge_all(model) == 6
    torch.testing.assert_close(model(idx).logits, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_all(model)
    torch.testing.assert_close(model.h[0].attn.c_attn.base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_projection", [False, True])
def test_save_load_round_trip(tmp_path, with_projection: bool) -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_vera(model, r=16, targets=TARGETS, projection_seed=3)
    model.train()
    adam_steps(model, idx, steps=2)
    model.eval()
    extra = projection_names(model) if with_projection else ()
    save_adapter(model, tmp_path, {"method": "vera"}, extra=extra)
    fresh = tiny_gpt()
    apply_vera(fresh, r=16, targets=TARGETS, projection_seed=3)
    assert not torch.equal(fresh(idx).logits, model(idx).logits)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(idx).logits, model(idx).logits)
    other = tiny_gpt()  # another seed: other A and B, refused whether they were saved or not
    apply_vera(other, r=16, targets=TARGETS, projection_seed=4)
    with pytest.raises(ValueError, match="projection_seed"):
        load_adapter(other, tmp_path)


def test_bad_arguments_leave_the_model_unchanged() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, r=0), "positive int")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, r=2.0), "positive int")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, d_initial=0.0), "d_initial")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, d_initial=float("nan")), "d_initial")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, dropout=1.0), "dropout")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, projection_seed="0"), "projection_seed")
    assert_refuses(tiny_gpt(), lambda m: apply_vera(m, targets=("c_attn", "nope")), "unknown target")
    small = VeRAProjection(4, 64, 64)
    with pytest.raises(ValueError, match="too small"):
        VeRALinear(nn.Linear(64, 192), small)
    with pytest.raises(ValueError, match="dtype"):
        VeRALinear(nn.Linear(64, 64).double(), small)


def test_stacking_on_other_layers_keeps_the_first_adapter() -> None:
    model = tiny_gpt()
    apply_vera(model, r=16, targets=("c_attn",))
    first = [n for n, p in model.named_parameters() if p.requires_grad]
    apply_vera(model, r=8, targets=("c_fc",), projection_seed=1)  # a second, independent pair
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in first)
    assert model.h[0].mlp.c_fc.proj is not model.h[0].attn.c_attn.proj
    assert_refuses(model, lambda m: apply_vera(m, targets=("c_attn",)), "already have an adapter")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_forward_backward_in_the_models_dtype(dtype: torch.dtype) -> None:
    model, idx = tiny_gpt().to(dtype), token_batch()
    apply_vera(model, r=16, targets=TARGETS)
    randomize(model)
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {dtype}
    model(idx, labels=idx).loss.backward()
    for m in layers(model):
        assert m.d.grad.dtype == dtype and torch.isfinite(m.d.grad).all() and m.d.grad.abs().max() > 0


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_vera(model, r=64, targets=TARGETS)
    model.train()
    losses = adam_steps(model, idx, steps=30, lr=3e-2)
    assert losses[-1] < losses[0] - 0.3, losses[::5]
