"""AdaLoRA: identity at init, trainable set, SVD-form update, regulariser, EMA importance, budget schedule,
masking of the lowest scores, the budget reached on schedule in a real training run, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.adalora import (
    RankAllocator,
    SVDLinear,
    apply_adalora,
    budget_schedule,
    orthogonality_penalty,
)
from minimal.peft import count_trainable, merge_all, unmerge_all
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def layers_of(model: nn.Module) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def test_identity_at_init_and_init_values() -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_adalora(model, total_steps=10, init_r=6, target_r=2, targets=("c_attn", "c_fc"))
    assert torch.equal(model(idx).logits, ref)  # E = 0 exactly
    layer = model.h[0].attn.c_attn
    assert layer.A.shape == (6, 64) and layer.E.shape == (6,) and layer.B.shape == (192, 6)
    assert torch.count_nonzero(layer.E) == 0 and layer.rank() == 0
    assert 0.01 < layer.A.std().item() < 0.03 and 0.01 < layer.B.std().item() < 0.03  # N(0, 0.02^2)
    assert layer.scale == 16 / 6


def test_trainable_count_is_formula_and_only_A_E_B_train() -> None:
    model = tiny_gpt()
    apply_adalora(model, total_steps=10, init_r=6, target_r=2, targets=("c_attn", "c_proj"))
    d, r, L = 64, 6, CFG.n_layer
    per_block = (r * (d + 3 * d) + r) + (r * (d + d) + r) + (r * (4 * d + d) + r)  # c_attn, attn/mlp c_proj
    assert count_trainable(model).trainable == L * per_block
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".A", ".E", ".B")) for n in names) and len(names) == 3 * 3 * L


def test_dense_equivalence_and_merge() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    layer = SVDLinear(lin, r=5, alpha=10)
    nn.init.normal_(layer.E)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ torch.diag(layer.E) @ layer.A)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight + layer.delta_weight(), lin.bias), atol=1e-5,
                               rtol=1e-5)
    with torch.no_grad():
        layer.E[[1, 3]] = 0.0
    assert layer.rank() == 3
    assert torch.linalg.matrix_rank(layer.delta_weight()).item() == 3  # a zero singular value removes a rank
    before, w0 = layer(x), lin.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)


def test_orthogonality_penalty_zero_for_orthonormal_and_decreases() -> None:
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(16, 24), r=4)
    with torch.no_grad():
        layer.A.copy_(torch.linalg.qr(torch.randn(16, 4)).Q.T)  # orthonormal rows
        layer.B.copy_(torch.linalg.qr(torch.randn(24, 4)).Q)  # orthonormal columns
    assert orthogonality_penalty([layer]).item() < 1e-6
    assert orthogonality_penalty([layer], "paper").item() < 1e-10
    with torch.no_grad():
        layer.A.mul_(2.0)  # A A^T = 4 I: ||3 I||_F = 6 for A, 0 for B
    torch.testing.assert_close(orthogonality_penalty([layer]), torch.tensor(3.0))  # mean of (6, 0)
    torch.testing.assert_close(orthogonality_penalty([layer], "paper"), torch.tensor(36.0))  # sum of squares
    fresh = SVDLinear(nn.Linear(16, 24), r=4)  # N(0, 0.02^2): far from orthonormal
    before = orthogonality_penalty([fresh])
    before.backward()
    with torch.no_grad():
        fresh.A -= 0.1 * fresh.A.grad
        fresh.B -= 0.1 * fresh.B.grad
    assert orthogonality_penalty([fresh]) < before
    with pytest.raises(ValueError, match="orth_reg must be 'code' or 'paper'"):
        orthogonality_penalty([fresh], "squared")


def test_budget_schedule_values() -> None:
    # peft's example: init 12, target 4, total 4 -> 7 and 5 at steps 1 and 2
    assert budget_schedule(1, 12, 4, 4) == (7, True)
    assert budget_schedule(2, 12, 4, 4) == (5, True)
    b0, bT, T, ti, tf = 48, 16, 110, 10, 20
    assert budget_schedule(0, b0, bT, T, ti, tf) == (b0, False)
    assert budget_schedule(ti, b0, bT, T, ti, tf) == (b0, False)  # warm-up: full budget, no mask
    assert budget_schedule(50, b0, bT, T, ti, tf)[0] == 20  # midpoint: 16 + 32 * (1/2)^3
    assert budget_schedule(T - tf, b0, bT, T, ti, tf)[0] == bT
    assert budget_schedule(T - tf + 1, b0, bT, T, ti, tf) == (bT, True)
    values = [budget_schedule(t, b0, bT, T, ti, tf)[0] for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing
    assert budget_schedule(ti + 1, b0, bT, T, ti, tf)[0] < b0  # decreasing starts right after t_init
    masks = [budget_schedule(t, b0, bT, T, ti, tf, delta_t=10)[1] for t in range(ti + 1, T - tf)]
    assert masks == [t % 10 == 0 for t in range(ti + 1, T - tf)]


def test_ema_importance_on_hand_computed_sequence() -> None:
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(3, 2), r=1)
    alloc = RankAllocator({"l": layer}, target_r=1, total_steps=10, beta1=0.5, beta2=0.5)
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        layer.E.fill_(2.0)
        layer.B.copy_(torch.tensor([[1.0], [3.0]]))
    grads_E = [0.5, -1.5, 0.25]  # sensitivity |2 g| = 1, 3, 0.5
    ipt, unc = 0.0, 0.0
    for g in grads_E:
        for p in (layer.A, layer.B):
            p.grad = torch.ones_like(p)
        layer.E.grad = torch.full((1,), g)
        alloc.update_importance()
        i = abs(2.0 * g)
        ipt = 0.5 * ipt + 0.5 * i
        unc = 0.5 * unc + 0.5 * abs(i - ipt)
    # by hand: ipt 0.5, 1.75, 1.125; unc 0.25, 0.75, 0.6875
    assert (ipt, unc) == (1.125, 0.6875)
    torch.testing.assert_close(alloc.ipt_avg["l.E"], torch.tensor([1.125]))
    torch.testing.assert_close(alloc.unc_avg["l.E"], torch.tensor([0.6875]))
    # A, B had |w * 1| every step: ipt -> |w| (1 - 0.5^3), unc from |w| - ipt
    torch.testing.assert_close(alloc.ipt_avg["l.A"], layer.A.abs().detach() * 0.875)
    score = alloc.scores()["l"]
    s_a = (alloc.ipt_avg["l.A"] * alloc.unc_avg["l.A"]).mean()
    s_b = (alloc.ipt_avg["l.B"] * alloc.unc_avg["l.B"]).mean()
    torch.testing.assert_close(score, torch.tensor([1.125 * 0.6875]) + s_a + s_b)


def test_mask_removes_exactly_the_lowest_scores() -> None:
    model = tiny_gpt()
    hooks = apply_adalora(model, total_steps=10, init_r=6, target_r=2, targets=("c_attn", "c_fc"))
    alloc = hooks.step_end.__self__
    with torch.no_grad():
        for layer in layers_of(model).values():
            layer.E.normal_()
    for seed in range(3):
        model.zero_grad()
        model(token_batch(seed), labels=token_batch(seed)).loss.backward()
        alloc.update_importance()
    kept = alloc.mask_to_budget(15)
    scores = alloc.scores()
    assert sum(int(k.sum()) for k in kept.values()) == 15
    assert sum(layer.rank() for layer in layers_of(model).values()) == 15
    kept_scores = torch.cat([scores[n][kept[n]] for n in scores])
    masked_scores = torch.cat([scores[n][~kept[n]] for n in scores])
    assert len(masked_scores) == 24 - 15 and masked_scores.max() < kept_scores.min()
    for name, layer in layers_of(model).items():
        assert torch.equal(layer.E != 0, kept[name])


def test_allocator_reaches_target_budget_on_schedule() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    T, ti, tf, dt = 30, 4, 8, 2
    hooks = apply_adalora(model, total_steps=T, init_r=6, target_r=2, targets=("c_attn", "c_fc"), t_init=ti,
                          t_final=tf, delta_t=dt)
    alloc = hooks.step_end.__self__
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    record = []

    def step_end(m: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        alloc.step_end(m, step, opt)
        record.append((step + 1, alloc.budget, sum(layer.rank() for layer in alloc.layers.values()),
                       {n: (layer.E != 0).clone() for n, layer in alloc.layers.items()}, len(alloc.ipt_avg)))

    hooks.step_end = step_end
    cfg = TrainConfig(steps=T, batch_size=8, lr=1e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, hooks)
    assert alloc.init_budget == 24 and alloc.target_budget == 8
    for t, budget, nonzero, _, _ in record:
        if t <= ti:
            assert budget == 24 and nonzero == 24  # warm-up: nothing masked
        elif t < T - tf and t % dt == 0:
            assert budget == budget_schedule(t, 24, 8, T, ti, tf)[0] and nonzero == budget, t
    assert [r[1] for r in record if ti < r[0] < T - tf and r[0] % dt == 0][-1] < 24  # the budget decreased
    final = [r for r in record if r[0] >= T - tf]
    assert all(r[2] == 8 for r in final)  # exactly the target number of singular values stays nonzero
    assert all(all(torch.equal(r[3][n], final[0][3][n]) for n in r[3]) for r in final)  # fixed mask
    assert all(r[4] == 0 for r in final)  # importance reset, no longer updated
    assert sum(layer.rank() for layer in alloc.layers.values()) == 8
    assert alloc.rank_pattern() == {n: int(m.sum()) for n, m in final[0][3].items()}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_learns_and_merges() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    hooks = apply_adalora(model, total_steps=40, init_r=8, target_r=4, targets=("c_attn", "c_fc"), t_init=5,
                          t_final=10)
    before = model(idx, labels=idx).loss.item()
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, hooks)
    after = model(idx, labels=idx).loss.item()
    assert after < before - 0.3, (before, after)
    logits = model(idx).logits
    merge_all(model)
    torch.testing.assert_close(model(idx).logits, logits, atol=1e-5, rtol=1e-5)
    unmerge_all(model)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="unknown target module 'q_proj'"):
        apply_adalora(tiny_gpt(), total_steps=10, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"rank r=65 must be in \[1, 64\]"):
        apply_adalora(tiny_gpt(), total_steps=10, init_r=65, target_r=8)
    with pytest.raises(ValueError, match="init_r must be a positive int"):
        apply_adalora(tiny_gpt(), total_steps=10, init_r=0)
    with pytest.raises(ValueError, match="target_r must be an int in"):
        apply_adalora(tiny_gpt(), total_steps=10, init_r=4, target_r=5)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        apply_adalora(tiny_gpt(), total_steps=0)
    with pytest.raises(ValueError, match="leave no budget phase"):
        apply_adalora(tiny_gpt(), total_steps=10, t_init=5, t_final=5)
    with pytest.raises(ValueError, match="beta1 and beta2"):
        apply_adalora(tiny_gpt(), total_steps=10, beta1=1.0)
    with pytest.raises(ValueError, match="orth_reg must be"):
        apply_adalora(tiny_gpt(), total_steps=10, orth_reg="l2")
    model = tiny_gpt()
    hooks = apply_adalora(model, total_steps=10, init_r=4, target_r=2)
    with pytest.raises(ValueError, match="no gradient"):
        hooks.after_backward(model, 0)
