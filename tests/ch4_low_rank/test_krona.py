"""KronA and KAdaptation: kron structure against the dense update, counts, sharing, refused applies, learning.
(Identity at init, frozen entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.krona import (
    KAdaptationLinear,
    KronALinear,
    apply_kadaptation,
    apply_krona,
    count_kadaptation,
    count_krona,
    kron_shapes,
)
from minimal.peft import count_trainable
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Random values in every zero-initialised factor, so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for p in (m.B,) if isinstance(m, KronALinear) else (m.v,) if isinstance(m, KAdaptationLinear) else ():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


APPLY = {"krona": lambda m: apply_krona(m, targets=("c_attn", "c_fc")),
         "kadaptation": lambda m: apply_kadaptation(m, n=4, r=2, targets=("c_attn", "c_fc"))}


def test_krona_count_and_trainable_set() -> None:
    model = tiny_gpt()
    apply_krona(model, targets=("c_attn", "c_fc"))
    # c_attn [192, 64]: A [12, 8], B [16, 8]; c_fc [256, 64]: A [16, 8], B [16, 8]
    assert kron_shapes(192, 64) == ((12, 8), (16, 8)) and kron_shapes(256, 64) == ((16, 8), (16, 8))
    assert count_trainable(model).trainable == count_krona(CFG, targets=("c_attn", "c_fc"))
    assert count_trainable(model).trainable == 2 * (12 * 8 + 16 * 8 + 16 * 8 + 16 * 8)
    other = tiny_gpt()
    apply_krona(other, a_shape=(8, 8), targets=("attn.c_proj",))  # [64, 64]: A [8, 8], B [8, 8]
    assert count_trainable(other).trainable == count_krona(CFG, (8, 8), ("attn.c_proj",)) == 2 * (64 + 64)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"h.{i}.{m}.{f}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc") for f in "AB"}


def test_krona_delta_is_kron_and_forward_is_dense() -> None:
    torch.manual_seed(0)
    layer = KronALinear(nn.Linear(64, 192), a_shape=(12, 4), scale=2.0)
    with torch.no_grad():
        layer.B.normal_()
    A, B = layer.A.detach(), layer.B.detach()  # [12, 4], [16, 16]
    dense = 2.0 * torch.kron(A, B)
    assert torch.allclose(layer.delta_weight(), dense)
    assert torch.isclose(dense[5 * 16 + 3, 2 * 16 + 7], 2.0 * A[5, 2] * B[3, 7])  # the index rule
    x = torch.randn(3, 5, 64)
    ref = F.linear(x, layer.base.weight + dense, layer.base.bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(layer.branch(x), x @ dense.T, atol=1e-5)  # reshape forward == kron matmul
    # rank(kron(A, B)) = rank(A) rank(B): 4 * 16 = 64, full rank although only 12*4 + 16*16 numbers train
    assert torch.linalg.matrix_rank(dense.double()) == 64


def test_kadaptation_delta_is_sum_of_krons_and_forward_is_dense() -> None:
    model = tiny_gpt()
    apply_kadaptation(model, n=4, r=2, scale=3.0, targets=("c_attn",))
    randomize(model)
    layer = model.h[1].attn.c_attn
    A, u, v = layer.slow.A.detach(), layer.u.detach(), layer.v.detach()
    dense = 3.0 * sum(torch.kron(A[i], u[i] @ v[i].T) for i in range(4))  # [192, 64]
    assert torch.allclose(layer.delta_weight(), dense, atol=1e-7)
    x = torch.randn(2, 7, 64)
    assert torch.allclose(layer(x), F.linear(x, layer.base.weight + dense, layer.base.bias), atol=1e-5)
    exact = sum(torch.kron(A[i].double(), u[i].double() @ v[i].double().T) for i in range(4))
    assert torch.linalg.matrix_rank(exact) == 4 * 4 * 2  # rank <= sum_i rank(A_i) r, reached for random factors


def test_kadaptation_shares_slow_weights_and_sums_their_gradients() -> None:
    shared, separate, idx = tiny_gpt(), tiny_gpt(), token_batch()
    apply_kadaptation(shared, n=4, r=2, targets=("c_attn",))
    apply_kadaptation(separate, n=4, r=2, targets=("c_attn",), share=False)
    randomize(shared)
    a0, a1 = shared.h[0].attn.c_attn, shared.h[1].attn.c_attn
    assert a0.slow is a1.slow and a0.slow.A.data_ptr() == a1.slow.A.data_ptr()
    assert a0.u.data_ptr() != a1.u.data_ptr()
    assert separate.h[0].attn.c_attn.slow is not separate.h[1].attn.c_attn.slow
    with torch.no_grad():  # the unshared model gets the same numbers, A copied into each layer
        for i in range(2):
            s, t = shared.h[i].attn.c_attn, separate.h[i].attn.c_attn
            t.slow.A.copy_(s.slow.A), t.u.copy_(s.u), t.v.copy_(s.v)
    # count: n^3 once (shared) vs once per layer; fast factors r (in + out) per layer
    assert count_trainable(shared).trainable == count_kadaptation(CFG, 4, 2, ("c_attn",)) == 64 + 2 * 2 * 256
    assert count_trainable(separate).trainable == count_kadaptation(CFG, 4, 2, ("c_attn",), share=False)
    assert count_trainable(separate).trainable == 2 * 64 + 2 * 2 * 256
    both = tiny_gpt()
    apply_kadaptation(both, n=4, r=2, targets=("c_attn", "c_proj"))  # 3 projection types, 6 layers
    assert count_trainable(both).trainable == count_kadaptation(CFG, 4, 2, ("c_attn", "c_proj"))
    shared(idx, labels=idx).loss.backward()
    separate(idx, labels=idx).loss.backward()
    g = separate.h[0].attn.c_attn.slow.A.grad + separate.h[1].attn.c_attn.slow.A.grad
    assert g.abs().max() > 0
    assert torch.allclose(a0.slow.A.grad, g, atol=1e-6)


@pytest.mark.parametrize("method", sorted(APPLY))
def test_learns(method: str) -> None:
    model, idx = tiny_gpt(), token_batch()
    APPLY[method](model)
    model.train()
    losses = adam_steps(model, idx, steps=30, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_bad_input() -> None:
    lin = nn.Linear(64, 192)
    with pytest.raises(ValueError, match="does not factor"):
        KronALinear(lin, a_shape=(5, 8))  # 5 does not divide 192
    with pytest.raises(ValueError, match="does not factor"):
        KronALinear(lin, a_shape=(12, 7))
    with pytest.raises(ValueError, match="two positive ints"):
        KronALinear(lin, a_shape=(0, 8))
    with pytest.raises(ValueError, match="scale"):
        KronALinear(lin, scale=0.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        KronALinear(nn.Conv1d(3, 3, 1))
    assert_refuses(tiny_gpt(), lambda m: apply_krona(m, targets=("q_proj",)), "unknown target")
    assert_refuses(tiny_gpt(), lambda m: apply_kadaptation(m, n=5), "must divide")
    # fast factors of c_attn are [48, r] and [16, r]
    assert_refuses(tiny_gpt(), lambda m: apply_kadaptation(m, n=4, r=17), "rank r=17")
    assert_refuses(tiny_gpt(), lambda m: apply_kadaptation(m, n=0), "positive int")
    # c_attn (192 rows) fits A [12, 8], attn.c_proj (64 rows) does not: the c_attn layers built first change nothing
    assert_refuses(tiny_gpt(), lambda m: apply_krona(m, a_shape=(12, 8), targets=("c_attn", "c_proj")),
                   "does not factor")
    assert_refuses(tiny_gpt(), lambda m: apply_kadaptation(m, n=3, targets=("c_attn", "c_proj")), "must divide")
