"""Intrinsic dimension: Fastfood against its dense matrix, z = 0 is the base, only z (and lam) train, it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from chapters.ch4_low_rank.intrinsic_dimension import (
    DenseProjection,
    FastfoodProjection,
    SubspaceModel,
    apply_intrinsic_dimension,
    d90,
    fwht,
)
from minimal.peft import count_trainable
from tests.helpers import adam_steps, tiny_gpt, token_batch


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
def test_identity_at_init_count_and_frozen(projection: str) -> None:
    base, idx = tiny_gpt(), token_batch()
    ref = base(idx).logits
    model, hooks = apply_intrinsic_dimension(base, d=40, projection=projection)
    assert torch.equal(model(idx).logits, ref)  # z = 0
    assert count_trainable(model).trainable == 40
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["z"]
    assert sum(b.numel() for b in model.buffers()) > 0 and model.config is base.config
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    adam_steps(model, idx, steps=3, lr=0.1)
    assert model.z.abs().sum() > 0
    for n, p in base.named_parameters():
        assert torch.equal(p, frozen[n]) and p.grad is None, n
    # the trained model is theta0 + P z: load those numbers into a plain GPT and get the same logits
    plain = tiny_gpt()
    plain.load_state_dict({k: v.detach() for k, v in model.effective_params().items()}, strict=False)
    assert torch.allclose(plain(idx).logits, model(idx).logits, atol=1e-5)
    assert not torch.allclose(plain(idx).logits, ref, atol=1e-4)


def test_dense_projection_columns() -> None:
    P = DenseProjection(5, 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(P.P.norm(dim=0), torch.ones(5))
    e = torch.zeros(5)
    e[2] = 1.0
    assert torch.equal(P(e), P.P[:, 2])


def test_said_counts_and_reduces_to_did() -> None:
    base, idx = tiny_gpt(), token_batch()
    m = len(list(base.named_parameters()))
    said = SubspaceModel(base, d=60, said=True, seed=3)
    assert count_trainable(said).trainable == 60 and said.z.numel() == 60 - m and said.lam.numel() == m
    did = SubspaceModel(tiny_gpt(), d=60 - m, seed=3)  # same seed, same input size: the same projections
    with torch.no_grad():
        z = torch.randn(60 - m)
        said.z.copy_(z), did.z.copy_(z)
    assert torch.allclose(said(idx).logits, did(idx).logits, atol=1e-6)  # lam = 1
    said(idx, labels=idx).loss.backward()
    assert said.lam.grad is not None and said.lam.grad.abs().sum() > 0


def test_exclude_keeps_tensors_at_theta0() -> None:
    model = SubspaceModel(tiny_gpt(), d=30, exclude=("wte", "wpe"))
    assert "wte.weight" not in model.names and "h.0.attn.c_attn.weight" in model.names
    with torch.no_grad():
        model.z.normal_()
    eff = model.effective_params()
    assert "wte.weight" not in eff and not torch.equal(eff["h.0.attn.c_attn.weight"],
                                                        model.base.h[0].attn.c_attn.weight)


def test_learns_and_generates() -> None:
    base, idx = tiny_gpt(), token_batch()
    model, _ = apply_intrinsic_dimension(base, d=200)
    losses = adam_steps(model, idx, steps=25, lr=0.1)
    assert losses[-1] < losses[0] - 0.5, losses[::5]
    out = model.generate(idx[:1, :4], 3, temperature=0.0)
    assert out.shape == (1, 7)


def test_d90() -> None:
    scores = {10: 0.2, 100: 0.7, 1000: 0.86, 10000: 0.9}
    assert d90(scores, full_score=0.95) == 1000  # 0.9 * 0.95 = 0.855
    assert d90(scores, full_score=1.2) is None


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="subspace dimension"):
        apply_intrinsic_dimension(tiny_gpt(), d=0)
    with pytest.raises(ValueError, match="SAID scalars"):
        SubspaceModel(tiny_gpt(), d=10, said=True)  # 26 tensors need 26 scalars
    with pytest.raises(ValueError, match="unknown projection"):
        apply_intrinsic_dimension(tiny_gpt(), projection="sparse")
    with pytest.raises(ValueError, match="leaves no parameter"):
        SubspaceModel(tiny_gpt(), d=10, exclude=("",))
    with pytest.raises(TypeError, match="GPT"):
        apply_intrinsic_dimension(nn.Linear(2, 2))
