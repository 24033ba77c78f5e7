"""SoRA (identity at init, frozen entries and merging: tests/test_contract.py): the soft-threshold (and the
released quirk), trainable set and its formula, the exact gate updates (code form and paper form), zero gates =
lower rank, pruning to a plain LoRA, the schedule over the run (read in setup), errors that leave the model
unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import LoRALinear
from chapters.ch4_low_rank.sora import (
    SoRALinear,
    apply_sora,
    count_sora,
    official_threshold,
    prune_sora,
    rank_pattern,
    soft_threshold,
    xi_schedule,
)
from minimal.peft import count_trainable
from minimal.train import TrainConfig, default_optimizer, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def sora_layers(model: nn.Module) -> list[SoRALinear]:
    return [m for m in model.modules() if isinstance(m, SoRALinear)]


def test_soft_threshold_exact_and_official_quirk() -> None:
    xi = 0.25
    z = torch.tensor([-1.0, -0.5, -0.375, -0.25, -0.125, 0.0, 0.125, 0.25, 0.375, 0.5, 1.0])
    assert torch.equal(soft_threshold(z, xi), torch.tensor([-0.75, -0.25, -0.125, 0, 0, 0, 0, 0, 0.125, 0.25, 0.75]))
    assert soft_threshold(torch.tensor(0.75), 0.5).item() == 0.25  # scalar case
    # the released three-edit version: 1.5 xi -> 0 (T_xi gives 0.5 xi), |z| == xi kept, >= 2 xi shrunk by xi
    assert torch.equal(official_threshold(z, xi), torch.tensor([-0.75, -0.25, 0, -0.25, 0, 0, 0, 0.25, 0, 0.25, 0.75]))
    assert official_threshold(torch.tensor([1.5 * xi]), xi).item() == 0.0
    assert soft_threshold(torch.tensor([1.5 * xi]), xi).item() == 0.5 * xi


def test_gates_and_trainable_count() -> None:
    model = tiny_gpt()
    apply_sora(model, r=6, targets=("c_attn", "c_fc"))
    layer = model.h[0].attn.c_attn
    assert layer.g.shape == (6,) and torch.count_nonzero(layer.g) == 6 and layer.rank() == 6
    d, r, L = 64, 6, CFG.n_layer
    assert count_trainable(model).trainable == L * ((r * (d + 3 * d) + r) + (r * (d + 4 * d) + r))
    assert count_trainable(model).trainable == count_sora(CFG, r=6, targets=("c_attn", "c_fc"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B", ".g")) for n in names) and len(names) == 3 * 2 * L


def test_dense_form_and_zero_gates_lower_the_rank() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = SoRALinear(lin, r=6, alpha=12)
    nn.init.normal_(layer.B)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ torch.diag(layer.g) @ layer.A)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight + layer.delta_weight(), lin.bias), atol=1e-5,
                               rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.delta_weight()).item() == 6
    with torch.no_grad():
        layer.g[[0, 2, 5]] = 0.0
    assert layer.rank() == 3 and torch.linalg.matrix_rank(layer.delta_weight()).item() == 3
    # with the gates folded into B, SoRA is a LoRA: B diag(g) in place of B
    lora = LoRALinear(lin, r=6, alpha=12)
    with torch.no_grad():
        lora.A.copy_(layer.A)
        lora.B.copy_(layer.B * layer.g)
    torch.testing.assert_close(lora(x), layer(x), atol=1e-6, rtol=1e-6)


def test_code_form_adam_then_threshold_exact() -> None:
    model, idx = tiny_gpt(), token_batch()
    hooks = apply_sora(model, r=4, xi=0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = hooks.make_optimizer(params, TrainConfig(lr=0.1, weight_decay=0.01))
    gate_group = optimizer.param_groups[-1]
    assert gate_group["weight_decay"] == 0.0 and {id(p) for p in gate_group["params"]} == {
        id(m.g) for m in sora_layers(model)}
    loop = default_optimizer([p for p in params if p.dim() == 2], TrainConfig(lr=0.1, weight_decay=0.01))
    for ours, theirs in zip(optimizer.param_groups[:-1], loop.param_groups, strict=True):  # A, B: the loop's AdamW
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    model(idx, labels=idx).loss.backward()
    optimizer.step()
    after_adam = [m.g.detach().clone() for m in sora_layers(model)]
    hooks.step_end(model, 0, optimizer)
    for m, g in zip(sora_layers(model), after_adam):
        assert torch.equal(m.g, soft_threshold(g, 0.3))
        assert not ((m.g != 0) & (m.g.abs() < 0.3)).any()
    assert sum(m.rank() for m in sora_layers(model)) < 4 * CFG.n_layer  # N(0,1) gates: some fall under 0.3


def test_paper_form_proximal_gradient_step_exact() -> None:
    model, idx = tiny_gpt(), token_batch()
    hooks = apply_sora(model, r=4, xi=2.0, update="proximal")
    with torch.no_grad():
        for m in sora_layers(model):
            nn.init.normal_(m.B, std=0.1)  # so the gates get a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = hooks.make_optimizer(params, TrainConfig(lr=0.05))
    gate_ids = {id(m.g) for m in sora_layers(model)}
    assert not any(id(p) in gate_ids for group in optimizer.param_groups for p in group["params"])
    model(idx, labels=idx).loss.backward()
    before = [(m.g.detach().clone(), m.g.grad.clone()) for m in sora_layers(model)]
    assert all(grad.abs().max() > 0 for _, grad in before)
    hooks.step_end(model, 0, optimizer)
    eta = 0.05
    for m, (g, grad) in zip(sora_layers(model), before):
        assert torch.equal(m.g, soft_threshold(g - eta * grad, eta * 2.0))  # T_{eta xi}(g - eta grad)
        assert m.g.grad is None


def test_training_prunes_gates_and_prune_sora_keeps_outputs() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    hooks = apply_sora(model, r=8, targets=("c_attn", "c_fc"), xi=0.02)
    before = model(idx, labels=idx).loss.item()
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, hooks)
    after = model(idx, labels=idx).loss.item()
    assert after < before - 0.3, (before, after)  # it learns
    ranks = rank_pattern(model)
    assert 0 < sum(ranks.values()) < 8 * 4  # some gates pruned to exactly zero, not all
    for m in sora_layers(model):
        assert not ((m.g != 0) & (m.g.abs() < 0.02)).any()
    logits = model(idx).logits
    assert prune_sora(model) == ranks
    assert not sora_layers(model)
    torch.testing.assert_close(model(idx).logits, logits, atol=1e-5, rtol=1e-5)
    pruned_count = sum(ranks[n] * (64 + (192 if n.endswith("c_attn") else 256)) for n in ranks if ranks[n])
    assert count_trainable(model).trainable == pruned_count  # nnz(g) (in + out) per layer


def test_sparsifying_schedule() -> None:
    assert xi_schedule(1e-3, 4e-3, 4) == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert xi_schedule(1e-3, 8e-3, 4, "log_linear") == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3])
    model = tiny_gpt()
    updater = apply_sora(model, r=2, xi=0.1, xi_max=0.4, n_phases=4)
    with pytest.raises(RuntimeError, match="run length"):
        updater.xi_at(0)  # the phases need cfg.steps, which setup reads
    updater.setup(model, TrainConfig(steps=40), None)
    assert [updater.xi_at(s) for s in (0, 9, 10, 25, 39)] == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.4])
    updater.setup(model, TrainConfig(steps=80), None)
    assert [updater.xi_at(s) for s in (19, 20, 79)] == pytest.approx([0.1, 0.2, 0.4])


def model_state(model: nn.Module) -> tuple:
    """(module classes, requires_grad flags, parameter values): what a failed apply must leave as it was."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return modules, flags, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bad_input_errors_leave_the_model_unchanged() -> None:
    bad = [({"targets": ["q_proj"]}, "unknown target module 'q_proj'"), ({"r": 0}, r"rank r=0 must be in \[1, 64\]"),
           ({"update": "sgd"}, "update must be 'adam'"), ({"xi": -1.0}, "need xi >= 0"),
           ({"xi": 0.1, "xi_max": 0.01}, "xi_max"), ({"n_phases": 0}, "n_phases must be >= 1"),
           ({"alpha": -1.0}, "alpha")]
    for kwargs, match in bad:
        model = tiny_gpt()
        before = model_state(model)
        with pytest.raises(ValueError, match=match):
            apply_sora(model, **kwargs)
        after = model_state(model)
        assert before[:2] == after[:2] and all(torch.equal(before[2][n], after[2][n]) for n in before[2]), kwargs
    with pytest.raises(ValueError, match="schedule must be"):
        xi_schedule(0.1, 0.2, 3, "cosine")
    with pytest.raises(ValueError, match="no SoRALinear"):
        prune_sora(tiny_gpt())
