"""AdaLoRA (identity at init, frozen entries and merging: tests/test_contract.py): init values, trainable set
and its formula, SVD-form update, regulariser, EMA importance, budget schedule (steps or fractions of the run),
masking of the lowest scores, the budget reached on schedule in a real training run, errors that leave the model
unchanged."""

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
    count_adalora,
    orthogonality_penalty,
)
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def layers_of(model: nn.Module) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def run(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, warmup=0, progress=False, log_every=0, **kw)


def model_state(model: nn.Module) -> tuple:
    """(module classes, requires_grad flags, parameter values): what a failed apply must leave as it was."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return modules, flags, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(before: tuple, model: nn.Module) -> None:
    after = model_state(model)
    assert before[:2] == after[:2] and all(torch.equal(before[2][n], after[2][n]) for n in before[2])


def test_init_values() -> None:
    model = tiny_gpt()
    apply_adalora(model, init_r=6, target_r=2, targets=("c_attn", "c_fc"))
    layer = model.h[0].attn.c_attn
    assert layer.A.shape == (6, 64) and layer.E.shape == (6,) and layer.B.shape == (192, 6)
    assert torch.count_nonzero(layer.E) == 0 and layer.rank() == 0
    assert 0.01 < layer.A.std().item() < 0.03 and 0.01 < layer.B.std().item() < 0.03  # N(0, 0.02^2)
    assert layer.scale == 16 / 6


def test_trainable_count_is_formula_and_only_A_E_B_train() -> None:
    model = tiny_gpt()
    apply_adalora(model, init_r=6, target_r=2, targets=("c_attn", "c_proj"))
    d, r, L = 64, 6, CFG.n_layer
    per_block = (r * (d + 3 * d) + r) + (r * (d + d) + r) + (r * (4 * d + d) + r)  # c_attn, attn/mlp c_proj
    assert count_trainable(model).trainable == L * per_block == count_adalora(CFG, 6, ("c_attn", "c_proj"))
    other = tiny_gpt()
    apply_adalora(other, init_r=3, target_r=1, targets=r"h\.1\.mlp\..*")  # a regular expression: 2 layers
    assert count_trainable(other).trainable == count_adalora(CFG, init_r=3, targets=r"h\.1\.mlp\..*")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".A", ".E", ".B")) for n in names) and len(names) == 3 * 3 * L


def test_dense_equivalence_and_masked_singular_values() -> None:
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
    masks = [budget_schedule(t, b0, bT, T, ti, tf, period=10)[1] for t in range(ti + 1, T - tf)]
    assert masks == [t % 10 == 0 for t in range(ti + 1, T - tf)]


def test_ema_importance_on_hand_computed_sequence() -> None:
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(3, 2), r=1)
    alloc = RankAllocator({"l": layer}, target_r=1, beta1=0.5, beta2=0.5)
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
    alloc = apply_adalora(model, init_r=6, target_r=2, targets=("c_attn", "c_fc"))
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
    alloc = apply_adalora(model, init_r=6, target_r=2, targets=("c_attn", "c_fc"), t_init=ti, t_final=tf, period=dt)
    record = []
    inner = alloc.step_end

    def step_end(m: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        inner(m, step, opt)
        record.append((step + 1, alloc.budget, sum(layer.rank() for layer in alloc.layers.values()),
                       {n: (layer.E != 0).clone() for n, layer in alloc.layers.items()}, len(alloc.ipt_avg)))

    alloc.step_end = step_end
    train(model, lambda gen: (idx, idx), run(T, lr=1e-2), alloc)
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


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    alloc = apply_adalora(model, init_r=8, target_r=4, targets=("c_attn", "c_fc"), t_init=5, t_final=10)
    before = model(idx, labels=idx).loss.item()
    train(model, lambda gen: (idx, idx), run(40, lr=3e-2), alloc)
    after = model(idx, labels=idx).loss.item()
    assert after < before - 0.3, (before, after)


def test_schedule_as_fractions_of_the_run_resolves_in_setup() -> None:
    model = tiny_gpt()
    alloc = apply_adalora(model, init_r=4, target_r=2, t_init=0.1, t_final=0.3, period=5)  # the registry's
    with pytest.raises(RuntimeError, match="setup"):
        alloc.budget_at(1)  # the run length is not known before setup
    for steps in (2, 10, 80, 150, 151, 999):
        alloc.setup(model, run(steps), None)
        assert (alloc.total_steps, alloc.t_init, alloc.t_final) == (steps, steps // 10, 3 * steps // 10)
    alloc = apply_adalora(tiny_gpt(), init_r=4, target_r=2, t_init=3, t_final=0.5)  # steps and a fraction
    alloc.setup(model, run(20), None)
    assert (alloc.t_init, alloc.t_final) == (3, 10)
    with pytest.raises(ValueError, match="leave no budget phase in a run of 6 steps"):
        alloc.setup(model, run(6), None)  # 3 + 3 steps


def test_bad_input_errors_leave_the_model_unchanged() -> None:
    bad = [
        ({"targets": ["q_proj"]}, "unknown target module 'q_proj'"),
        ({"init_r": 65, "target_r": 8}, r"rank r=65 must be in \[1, 64\]"),
        ({"init_r": 0}, "init_r must be a positive int"),
        ({"init_r": 4, "target_r": 5}, "target_r must be an int in"),
        ({"t_init": 1.5}, r"must be in \[0, 1\)"),
        ({"t_init": -1}, "t_init must be >= 0"),
        ({"t_init": 0.6, "t_final": 0.5}, "sum must be below 1"),
        ({"period": 0}, "period must be a positive int"),
        ({"beta1": 1.0}, "beta1 and beta2"),
        ({"orth_reg": "l2"}, "orth_reg must be"),
        ({"alpha": 0.0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in"),
    ]
    for kwargs, match in bad:
        model = tiny_gpt()
        before = model_state(model)
        with pytest.raises(ValueError, match=match):
            apply_adalora(model, **kwargs)
        assert_unchanged(before, model)
    model = tiny_gpt()
    alloc = apply_adalora(model, init_r=4, target_r=2, t_init=5, t_final=5)
    with pytest.raises(ValueError, match="leave no budget phase"):
        train(model, lambda gen: (token_batch(), token_batch()), run(10), alloc)  # checked once the run is known
    alloc.setup(model, run(20), None)
    with pytest.raises(ValueError, match="no gradient"):
        alloc.after_backward(model, 0)
