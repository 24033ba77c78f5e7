"""PiSSA and MiLoRA: exact init (to the weight dtype's rounding), which singular components, the residual in a new
frozen layer (the original untouched), count formula, conversion to a plain LoRA, unload, refused applies, learning.
(Identity at init, frozen entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.pissa import (
    PiSSALinear,
    apply_milora,
    apply_pissa,
    component_indices,
    count_milora,
    count_pissa,
)
from minimal.peft import count_trainable, merge_all, unload
from minimal.train import TrainConfig, train
from tests.helpers import assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def make_layer(which: str, r: int = 4, alpha: float | None = None) -> tuple[PiSSALinear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    W0 = lin.weight.detach().clone()
    return PiSSALinear(lin, r=r, alpha=alpha, which=which), W0


@pytest.mark.parametrize("apply", [apply_pissa, apply_milora])
def test_branch_is_not_zero_at_init(apply) -> None:
    model = tiny_gpt()
    apply(model, r=4, targets=("c_attn", "c_fc"))
    layer = model.h[0].attn.c_attn
    assert torch.count_nonzero(layer.B) > 0  # unlike LoRA: the output stays the base's because W_res = W0 - s B A


@pytest.mark.parametrize("which", ["principal", "minor", "middle", "random"])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_residual_plus_branch_is_W0(which: str, alpha: float | None) -> None:
    layer, W0 = make_layer(which, alpha=alpha)
    assert layer.scale == (1.0 if alpha is None else 4.0)
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), W0, atol=1e-5, rtol=0)
    assert not torch.allclose(layer.base.weight, W0, atol=1e-3)  # the base layer now holds the residual


@pytest.mark.parametrize("which", ["principal", "minor"])
def test_residual_is_exact_in_float64_and_the_original_layer_is_untouched(which: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48, dtype=torch.float64)
    W0 = lin.weight.detach().clone()
    layer = PiSSALinear(lin, r=4, alpha=8.0, which=which)  # s = 2
    assert layer.A.dtype == layer.B.dtype == layer.base.weight.dtype == torch.float64
    assert (layer.base.weight + layer.delta_weight() - W0).abs().max() < 1e-15  # float64 rounding, not float32's
    assert torch.equal(lin.weight, W0) and layer.base is not lin  # W_res lives in a new frozen layer
    assert layer.base.bias is lin.bias and not layer.base.weight.requires_grad


def test_bfloat16_init_is_in_the_weight_dtype() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    layer = PiSSALinear(lin, r=4)
    assert {layer.A.dtype, layer.B.dtype, layer.base.weight.dtype} == {torch.bfloat16}
    W0 = lin.weight.float()
    # one bfloat16 rounding of W_res (relative 2^-8) away from W0, nothing like float32's exactness
    assert (layer.base.weight.float() + layer.delta_weight().float() - W0).abs().max() <= 2**-8 * W0.abs().max()


def test_pissa_takes_principal_components() -> None:
    layer, W0 = make_layer("principal", alpha=16.0)  # s = 4: sigma is divided by s before the square root
    sigma = torch.linalg.svdvals(W0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], sigma[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight)[0], sigma[4], atol=1e-5, rtol=1e-5)
    # A A^T and B^T B are diagonal, equal to diag(sigma_1..r / s)
    torch.testing.assert_close(layer.A @ layer.A.T, torch.diag(sigma[:4] / 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.B.T @ layer.B, torch.diag(sigma[:4] / 4), atol=1e-5, rtol=1e-5)
    assert layer.component_index.tolist() == [0, 1, 2, 3]


def test_milora_takes_smallest_components() -> None:
    layer, W0 = make_layer("minor")
    U, sigma, _ = torch.linalg.svd(W0, full_matrices=False)  # k = 32
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], sigma[-4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight)[0], sigma[0], atol=1e-5, rtol=1e-5)
    cos = U[:, :-4].T @ (layer.B / layer.B.norm(dim=0))  # [k-r, r]: B's columns are orthogonal to the top k-r
    assert cos.abs().max() < 1e-5
    assert layer.component_index.tolist() == [28, 29, 30, 31]


def test_component_indices() -> None:
    assert component_indices(10, 3, "principal").tolist() == [0, 1, 2]
    assert component_indices(10, 3, "minor").tolist() == [7, 8, 9]
    assert component_indices(10, 4, "middle").tolist() == [3, 4, 5, 6]
    rand = component_indices(10, 4, "random", torch.Generator().manual_seed(0))
    assert rand.tolist() == sorted(set(rand.tolist())) and len(rand) == 4 and rand.max() < 10
    with pytest.raises(ValueError, match="which must be one of"):
        component_indices(10, 3, "largest")


def test_trainable_count_and_init_gradients() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_pissa(model, r=4, targets=("c_attn", "c_proj"))
    d, r = CFG.n_embd, 4
    assert count_trainable(model).trainable == CFG.n_layer * r * ((d + 3 * d) + (d + d) + (4 * d + d))
    assert count_pissa(CFG, r, ("c_attn", "c_proj")) == count_trainable(model).trainable
    milora = tiny_gpt()
    apply_milora(milora, r=2, targets=("c_fc",))
    assert count_milora(CFG, 2, ("c_fc",)) == count_trainable(milora).trainable == CFG.n_layer * 2 * (d + 4 * d)
    assert all(n.endswith((".A", ".B")) for n, p in model.named_parameters() if p.requires_grad)
    model(idx, labels=idx).loss.backward()
    layer = model.h[0].attn.c_attn
    assert layer.A.grad.abs().max() > 0 and layer.B.grad.abs().max() > 0  # unlike LoRA, A moves at once


def test_lora_equivalent_and_merge_of_the_residual() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    W0 = lin.weight.detach().clone()
    layer = PiSSALinear(lin, r=4, alpha=8.0)
    with torch.no_grad():  # pretend training moved A and B
        layer.A.add_(0.1 * torch.randn_like(layer.A))
        layer.B.add_(0.1 * torch.randn_like(layer.B))
    x = torch.randn(6, 32)
    out = layer(x)
    W_res = layer.base.weight.detach().clone()
    A2, B2 = layer.lora_equivalent()  # rank-2r LoRA on the original W0, same scale
    assert A2.shape == (8, 32) and B2.shape == (48, 8)
    torch.testing.assert_close(W0 + layer.scale * B2 @ A2, W_res + layer.delta_weight(), atol=1e-5, rtol=0)
    torch.testing.assert_close(F.linear(x, W0 + layer.scale * B2 @ A2, lin.bias), out, atol=1e-5, rtol=1e-5)
    layer.merge()  # W_res + s B A
    torch.testing.assert_close(layer.base.weight, W_res + layer.delta_weight(), atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W_res, atol=1e-6, rtol=0)


def test_model_unload_keeps_function() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_milora(model, r=4, targets=("c_attn",))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PiSSALinear):
                m.B.mul_(3.0)
    adapted = model(idx).logits
    assert merge_all(model) == CFG.n_layer
    unload(model)  # already merged: the plain model keeps W_res + s B A
    assert all(type(b.attn.c_attn) is nn.Linear for b in model.h)
    torch.testing.assert_close(model(idx).logits, adapted, atol=1e-5, rtol=1e-5)


def test_bad_input_errors() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_pissa(m, which="top"), "which must be one of")
    assert_refuses(tiny_gpt(), lambda m: apply_pissa(m, r=0), "rank r=0")
    assert_refuses(tiny_gpt(), lambda m: apply_milora(m, r=65, targets=("c_attn", "c_proj")), "rank r=65")
    assert_refuses(tiny_gpt(), lambda m: apply_pissa(m, targets=["attn"]), "unknown target module 'attn'")


@pytest.mark.parametrize("apply", [apply_pissa, apply_milora])
def test_learns(apply) -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    apply(model, r=8, targets=("c_attn", "c_fc"))
    before = model(idx, labels=idx).loss.item()
    train(model, lambda gen: (idx, idx), TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup=0, progress=False,
                                                     log_every=0))
    assert model(idx, labels=idx).loss.item() < before - 0.3
