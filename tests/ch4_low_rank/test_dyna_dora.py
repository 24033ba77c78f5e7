"""Dynamic-rank DoRA (Mao et al.; identity at init, frozen entries and merging: tests/test_contract.py): init,
trainable count and its formula, closed-form importance, DEM, the cubic pruning schedule over the run (read in
setup), pruning of the lowest scores to the global budget on schedule, pruned components inert, errors that leave
the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.dyna_dora import ComponentLinear, apply_dyna_dora, count_dyna_dora, pruned_count
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def test_init_and_trainable_count() -> None:
    model = tiny_gpt()
    apply_dyna_dora(model, r=4, targets=("c_attn", "c_fc"))
    layer = model.h[0].attn.c_attn
    assert layer.r == 6 and layer.A.shape == (6, 64) and layer.B.shape == (192, 6)  # r' = ceil(1.5 * 4)
    assert layer.A.abs().max() > 0 and layer.B.abs().max() > 0 and layer.rank() == 0
    d, r, L = 64, 6, CFG.n_layer
    assert count_trainable(model).trainable == L * ((r * (d + 3 * d) + r) + (r * (d + 4 * d) + r))
    assert count_trainable(model).trainable == count_dyna_dora(CFG, r=4, targets=("c_attn", "c_fc"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B", ".c")) for n in names) and len(names) == 3 * 2 * L
    other = tiny_gpt()
    apply_dyna_dora(other, r=2, init_r=5, targets=["c_proj"])
    assert count_trainable(other).trainable == count_dyna_dora(CFG, r=2, init_r=5, targets=["c_proj"])


def test_dense_form_importance_closed_form_and_pruned_components_inert() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = ComponentLinear(lin, r=5, alpha=10)
    nn.init.normal_(layer.c)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ torch.diag(layer.c) @ layer.A)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight + layer.delta_weight(), lin.bias), atol=1e-5,
                               rtol=1e-5)
    total = torch.linalg.matrix_norm(layer.B @ torch.diag(layer.c) @ layer.A)
    brute = torch.stack([torch.linalg.matrix_norm(layer.c[i] * torch.outer(layer.B[:, i], layer.A[i]))
                         for i in range(5)]) / total
    torch.testing.assert_close(layer.component_importance(), brute.detach(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        layer.c[[1, 4]] = 0.0
    assert layer.component_importance()[[1, 4]].abs().max() == 0
    y = layer(x)
    keep = [0, 2, 3]
    small = ComponentLinear(lin, r=3, alpha=6)  # same s = 2
    with torch.no_grad():
        small.A.copy_(layer.A[keep])
        small.B.copy_(layer.B[:, keep])
        small.c.copy_(layer.c[keep])
    torch.testing.assert_close(small(x), y, atol=1e-6, rtol=1e-6)  # removing pruned rows/columns changes nothing


def test_dem_zero_for_constant_vectors_and_grad_to_A_B_only() -> None:
    layer = ComponentLinear(nn.Linear(8, 6), r=3)
    with torch.no_grad():
        layer.A.copy_(torch.arange(3.0).view(3, 1).expand(3, 8))  # every row constant
        layer.B.fill_(0.7)
    assert layer.dem().item() == 0.0
    torch.manual_seed(0)
    layer = ComponentLinear(nn.Linear(8, 6), r=3)
    dem = layer.dem()
    assert dem.item() > 0
    expected = (layer.A.var(1, unbiased=False) + layer.B.var(0, unbiased=False)).mean()
    torch.testing.assert_close(dem, expected)
    dem.backward()
    assert layer.A.grad.abs().max() > 0 and layer.B.grad.abs().max() > 0 and layer.c.grad is None


def test_pruning_schedule_cubic() -> None:
    n, budget, ts, te = 48, 32, 10, 50  # r' = 12, r = 8 on 4 matrices: p_max = 1/3
    assert pruned_count(0, n, budget, ts, te) == pruned_count(ts, n, budget, ts, te) == 0
    assert pruned_count(30, n, budget, ts, te) == 2  # 16 * (1/2)^3
    assert pruned_count(te, n, budget, ts, te) == pruned_count(te + 7, n, budget, ts, te) == 16
    counts = [pruned_count(t, n, budget, ts, te) for t in range(60)]
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    assert pruned_count(11, n, budget, ts, te) == 0 and pruned_count(11, n, budget, ts, te, min_one=True) == 1


def test_prunes_lowest_scores_to_the_budget_on_schedule() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    T = 40  # window [6, 20], prune every 4 steps
    pruner = apply_dyna_dora(model, r=2, targets=("c_attn", "c_fc"), period=4, alpha=8)
    assert (pruner.t_start, pruner.t_end, pruner.n_total, pruner.budget) == (None, None, 12, 8)  # until setup
    record = []
    inner = pruner.step_end

    def step_end(m: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        inner(m, step, opt)
        zeros = {n: (layer.c == 0).clone() for n, layer in pruner.layers.items()}
        scores = {n: s.clone() for n, s in pruner.scores.items()}
        dem = pruner.extra_loss(m)
        record.append((step + 1, zeros, scores, 0.0 if dem is None else dem.item()))

    pruner.step_end = step_end
    before = model(idx, labels=idx).loss.item()
    cfg = TrainConfig(steps=T, batch_size=8, lr=2e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, pruner)
    assert (pruner.t_start, pruner.t_end) == (6, 20)  # 0.15 and 0.5 of the 40 steps, set in setup
    assert model(idx, labels=idx).loss.item() < before - 0.3  # it learns
    prune_steps = [t for t in range(6, 21) if (t - 6) % 4 == 0 or t == 20]
    assert prune_steps == [6, 10, 14, 18, 20]
    for t, zeros, scores, _ in record:
        n_zero = sum(int(z.sum()) for z in zeros.values())
        if t in prune_steps:
            assert n_zero == pruned_count(t, 12, 8, 6, 20), t
            if n_zero:  # the pruned ones are the lowest EMA scores
                flat_s = torch.cat(list(scores.values()))
                flat_z = torch.cat(list(zeros.values()))
                assert flat_s[flat_z].max() <= flat_s[~flat_z].min()
        if t >= 20:
            assert n_zero == 4 and all(torch.equal(zeros[n], record[19][1][n]) for n in zeros)  # final mask fixed
    assert sum(pruner.rank_pattern().values()) == 8  # r_target x number of matrices
    dem = [r[3] for r in record]
    assert all(d > 0 for d in dem[:19]) and all(d == 0 for d in dem[19:])  # DEM off once pruning ends


def model_state(model: nn.Module) -> tuple:
    """(module classes, requires_grad flags, parameter values): what a failed apply must leave as it was."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return modules, flags, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bad_input_errors_leave_the_model_unchanged() -> None:
    bad = [({"targets": ["q_proj"]}, "unknown target module 'q_proj'"),
           ({"r": 0}, "target rank r must be a positive int"), ({"r": 64}, r"rank r=96 must be in \[1, 64\]"),
           ({"r": 4, "init_r": 2}, "init_r=2 must be an int >= the target rank r=4"),
           ({"start_ratio": 0.6, "end_ratio": 0.5}, "start_ratio < end_ratio"), ({"period": 0}, "period must be"),
           ({"beta": 1.0}, "0 < beta < 1"), ({"alpha": 0.0}, "alpha must be positive")]
    for kwargs, match in bad:
        model = tiny_gpt()
        before = model_state(model)
        with pytest.raises(ValueError, match=match):
            apply_dyna_dora(model, **kwargs)
        after = model_state(model)
        assert before[:2] == after[:2] and all(torch.equal(before[2][n], after[2][n]) for n in before[2]), kwargs
    model = tiny_gpt()
    pruner = apply_dyna_dora(model)
    with pytest.raises(RuntimeError, match="setup"):
        pruner.step_end(model, 0, None)
    with pytest.raises(ValueError, match="pruning window"):  # known once the run length is: 1 step is too short
        train(model, lambda gen: (token_batch(), token_batch()), TrainConfig(steps=1, warmup=0, progress=False), pruner)


def test_importance_scores_are_an_exponential_moving_average() -> None:
    model = tiny_gpt()
    pruner = apply_dyna_dora(model, r=2, targets=("c_attn",), period=4, alpha=8, beta=0.9)
    with torch.no_grad():
        for layer in pruner.layers.values():
            layer.B.normal_()
            layer.c.uniform_(0.5, 1.5)
    u = {n: layer.component_importance(pruner.eps).clone() for n, layer in pruner.layers.items()}
    assert all(bool((v > 0).all()) for v in u.values())
    pruner.update_scores()
    pruner.update_scores()
    for n, v in u.items():  # S = 0 -> 0.1 u -> 0.9 * 0.1 u + 0.1 u
        torch.testing.assert_close(pruner.scores[n], 0.1 * v * 1.9)
