"""Intrinsic dimension: Fastfood against its dense matrix, z = 0 is the base, the model changed in place (theta0
kept, frozen), only z (and lam) train, bake, stacking, refused applies, it learns."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from chapters.ch4_low_rank.intrinsic_dimension import (
    DenseProjection,
    FastfoodProjection,
    apply_intrinsic_dimension,
    bake,
    count_intrinsic_dimension,
    d90,
    fwht,
)
from chapters.ch4_low_rank.lora import apply_lora, count_lora
from minimal.hooks import Hooks
from minimal.peft import count_trainable, merge_all, trainable_names
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_fwht_is_hadamard() -> None:
    H = fwht(torch.eye(16, dtype=torch.float64))
    assert torch.equal(H, sylvester(16))
    assert torch.equal(H @ H, 16 * torch.eye(16, dtype=torch.float64))  # unnormalised: H H = n I
    x = torch.randn(3, 2048, dtype=torch.float64)  # above the base case: split as H_a (x) H_b recursively
    assert torch.allclose(fwht(x), x @ sylvester(2048), atol=1e-9)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.ones(12))


def test_fastfood_equals_its_explicit_matrix_and_is_linear() -> None:
    d, D = 20, 100  # LL = 128
    P = FastfoodProjection(d, D, torch.Generator().manual_seed(0)).double()
    LL = P.B.shape[0]
    assert LL == 128
    H = sylvester(LL)
    perm = torch.eye(LL, dtype=torch.float64)[P.Pi]
    explicit = (H @ torch.diag(P.G) @ perm @ H @ torch.diag(P.B))[:D, :d] / P.nu  # [D, d]
    columns = torch.stack([P(e) for e in torch.eye(d, dtype=torch.float64)], dim=1)  # P applied to basis vectors
    assert torch.allclose(columns, explicit, atol=1e-10)
    u, v = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    assert torch.allclose(P(2 * u - 3 * v), 2 * P(u) - 3 * P(v), atol=1e-10)
    w = torch.randn(50, d, dtype=torch.float64)
    ratios = torch.stack([P(row).norm() / row.norm() for row in w])
    assert 0.7 < ratios.mean() < 1.3 and ratios.std() < 0.3  # |P v| ~ |v|
    same = FastfoodProjection(d, D, torch.Generator().manual_seed(0)).double()
    assert torch.equal(same(u), P(u))  # seeded: deterministic


def test_small_tensor_reads_all_of_z() -> None:
    P = FastfoodProjection(300, 64, torch.Generator().manual_seed(0))  # d > D: padded to 512, z not truncated
    z = torch.zeros(300)
    z[299] = 1.0
    assert P.B.shape[0] == 512 and P(z).abs().sum() > 0


@pytest.mark.parametrize("projection", ("fastfood", "dense"))
def test_in_place_theta0_kept_count_and_bake(projection: str) -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    hooks = apply_intrinsic_dimension(model, d=40, projection=projection)
    assert type(hooks) is Hooks
    assert torch.equal(model(idx).logits, ref)  # z = 0
    assert torch.equal(model.wte.parametrizations.weight.original, tiny_gpt().wte.weight)
    assert count_trainable(model).trainable == 40 == count_intrinsic_dimension(CFG, d=40)
    assert trainable_names(model) == ["subspace.z"]
    assert all(parametrize.is_parametrized(m, "weight") for m in (model.wte, model.h[1].mlp.c_fc, model.ln_f))
    assert not model.h[0].attn.c_attn.parametrizations.weight.original.requires_grad  # theta0, stored as it was
    adam_steps(model, idx, steps=3, lr=0.1)
    assert model.subspace.z.abs().sum() > 0
    # every weight is theta0 + P z, computed on access
    lin = model.h[0].attn.c_attn
    theta0, offset = lin.parametrizations.weight.original, lin.parametrizations.weight[0]
    assert torch.equal(lin.weight, theta0 + offset.projection(model.subspace.z).view_as(theta0))
    # bake writes theta0 + P z into plain parameters: a plain GPT with the same names and the same logits
    trained = model(idx).logits
    bake(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules()) and not hasattr(model, "subspace")
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in tiny_gpt().named_parameters())
    assert torch.allclose(model(idx).logits, trained, atol=1e-6)
    assert not torch.allclose(trained, ref, atol=1e-4)


def test_dense_projection_columns() -> None:
    P = DenseProjection(5, 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(P.P.norm(dim=0), torch.ones(5))
    e = torch.zeros(5)
    e[2] = 1.0
    assert torch.equal(P(e), P.P[:, 2])


def test_said_counts_and_reduces_to_did() -> None:
    said, did, idx = tiny_gpt(), tiny_gpt(), token_batch()
    m = len(list(said.named_parameters()))
    apply_intrinsic_dimension(said, d=60, said=True, seed=3)
    assert count_trainable(said).trainable == 60 == count_intrinsic_dimension(CFG, d=60)
    assert said.subspace.z.numel() == 60 - m and said.subspace.lam.numel() == m
    apply_intrinsic_dimension(did, d=60 - m, seed=3)  # same seed, same input size: the same projections
    with torch.no_grad():
        z = torch.randn(60 - m)
        said.subspace.z.copy_(z), did.subspace.z.copy_(z)
    assert torch.allclose(said(idx).logits, did(idx).logits, atol=1e-6)  # lam = 1
    said(idx, labels=idx).loss.backward()
    assert said.subspace.lam.grad is not None and said.subspace.lam.grad.abs().sum() > 0


def test_exclude_keeps_tensors_at_theta0() -> None:
    model = tiny_gpt()
    apply_intrinsic_dimension(model, d=30, exclude=("wte", "wpe"))
    assert not parametrize.is_parametrized(model.wte) and parametrize.is_parametrized(model.h[0].attn.c_attn)
    with torch.no_grad():
        model.subspace.z.normal_()
    lin = model.h[0].attn.c_attn
    assert not torch.equal(lin.weight, lin.parametrizations.weight.original)
    assert torch.equal(model.wte.weight, tiny_gpt().wte.weight)


def test_stacking_with_lora_both_ways() -> None:
    idx = token_batch()
    first = tiny_gpt()  # LoRA first: its A, B keep training as they are; only the frozen tensors are projected
    apply_lora(first, r=2, targets=("c_attn",))
    lora_names = set(trainable_names(first))
    apply_intrinsic_dimension(first, d=20)
    assert set(trainable_names(first)) == lora_names | {"subspace.z"}
    assert not parametrize.is_parametrized(first.h[0].attn.c_attn)  # the LoRALinear: A and B are not projected
    assert parametrize.is_parametrized(first.h[0].attn.c_attn.base, "weight")
    assert count_trainable(first).trainable == count_lora(CFG, 2, ("c_attn",)) + 20
    second = tiny_gpt()  # the subspace first, then LoRA around a parametrized linear: z keeps training
    apply_intrinsic_dimension(second, d=20)
    apply_lora(second, r=2, targets=("c_fc",))
    assert count_trainable(second).trainable == count_lora(CFG, 2, ("c_fc",)) + 20
    for model in (first, second):
        model(idx, labels=idx).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        second.subspace.z.normal_()
        second.h[0].mlp.c_fc.B.normal_()
    before = second(idx).logits
    merge_all(second)  # writes into a parametrized weight: theta0 <- (theta0 + P z + s B A) - P z
    assert torch.allclose(second(idx).logits, before, atol=1e-5)


def test_learns_and_generates() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_intrinsic_dimension(model, d=200)
    losses = adam_steps(model, idx, steps=25, lr=0.1)
    assert losses[-1] < losses[0] - 0.5, losses[::5]
    out = model.generate(idx[:1, :4], 3, temperature=0.0)
    assert out.shape == (1, 7)


def test_d90() -> None:
    scores = {10: 0.2, 100: 0.7, 1000: 0.86, 10000: 0.9}
    assert d90(scores, full_score=0.95) == 1000  # 0.9 * 0.95 = 0.855
    assert d90(scores, full_score=1.2) is None


def test_bad_input() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_intrinsic_dimension(m, d=0), "subspace dimension")
    # 26 tensors need 26 scalars
    assert_refuses(tiny_gpt(), lambda m: apply_intrinsic_dimension(m, d=10, said=True), "SAID scalars")
    assert_refuses(tiny_gpt(), lambda m: apply_intrinsic_dimension(m, projection="sparse"), "unknown projection")
    assert_refuses(tiny_gpt(), lambda m: apply_intrinsic_dimension(m, d=10, exclude=("",)), "leaves no parameter")
    model = tiny_gpt()
    apply_intrinsic_dimension(model, d=10)
    assert_refuses(model, lambda m: apply_intrinsic_dimension(m, d=10), "already has")
