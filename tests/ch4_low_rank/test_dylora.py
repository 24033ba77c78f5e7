"""DyLoRA (frozen entries and merging at the serving rank r_max: tests/test_contract.py): identity at every
rank, the trainable count and its formula, truncated forward = a rank-b LoRA, gradients only reach the sampled
components, frozen/nested updates, sampling, serving and merging at every rank after training, errors that leave
the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from chapters.ch4_low_rank.dylora import DyLoRALinear, apply_dylora, count_dylora, set_rank
from chapters.ch4_low_rank.lora import LoRALinear
from minimal.peft import count_trainable, merge_all, unmerge_all
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def layers_of(model: nn.Module) -> list[DyLoRALinear]:
    return [m for m in model.modules() if isinstance(m, DyLoRALinear)]


def randomize_B(model: nn.Module) -> None:
    with torch.no_grad():
        for m in layers_of(model):
            nn.init.normal_(m.B, std=0.05)


def test_identity_at_every_rank_and_count() -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_dylora(model, r=6, targets=("c_attn", "c_fc"))
    for b in range(1, 7):
        set_rank(model, b)
        assert torch.equal(model(idx).logits, ref)  # B = 0
    d, r, L = 64, 6, CFG.n_layer
    assert count_trainable(model).trainable == L * r * ((d + 3 * d) + (d + 4 * d))
    assert count_trainable(model).trainable == count_dylora(CFG, r=6, targets=("c_attn", "c_fc"))


def test_truncated_forward_is_a_rank_b_lora() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = DyLoRALinear(lin, r=6, alpha=12).eval()
    nn.init.normal_(layer.B)
    x = torch.randn(5, 24)
    for b in (1, 3, 6):
        layer.set_serve_rank(b)
        lora = LoRALinear(lin, r=b, alpha=12).eval()  # s = 12 / b
        with torch.no_grad():
            lora.A.copy_(layer.A[:b])
            lora.B.copy_(layer.B[:, :b])
        torch.testing.assert_close(layer(x), lora(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.delta_weight(), lora.delta_weight())
        assert torch.linalg.matrix_rank(layer.delta_weight()).item() == b
    layer.train()
    layer.train_rank = 2  # train mode uses the sampled rank, not the serving rank
    lora = LoRALinear(lin, r=2, alpha=12)
    with torch.no_grad():
        lora.A.copy_(layer.A[:2])
        lora.B.copy_(layer.B[:, :2])
    torch.testing.assert_close(layer(x), lora(x), atol=1e-6, rtol=1e-6)


def test_only_the_first_b_components_get_gradient() -> None:
    model, idx = tiny_gpt(), token_batch()
    sampler = apply_dylora(model, r=6, targets=("c_attn",), mode="nested", seed=3)
    randomize_B(model)
    model.train()
    model(idx, labels=idx).loss.backward()  # the pre-hook draws b
    b = sampler.history[-1][0]
    for m in layers_of(model):
        assert m.train_rank == b
        assert torch.count_nonzero(m.A.grad[b:]) == 0 and torch.count_nonzero(m.B.grad[:, b:]) == 0
        assert (m.A.grad[:b].abs().sum(1) > 0).all() and (m.B.grad[:, :b].abs().sum(0) > 0).all()


def test_frozen_mode_changes_only_component_b() -> None:
    model, idx = tiny_gpt(), token_batch()
    sampler = apply_dylora(model, r=6, targets=("c_attn", "c_fc"), seed=1)
    randomize_B(model)
    record = []
    inner_after_backward, inner_step_end = sampler.after_backward, sampler.step_end

    def after_backward(m: nn.Module, step: int) -> None:
        record.append([(layer.A.detach().clone(), layer.B.detach().clone()) for layer in layers_of(model)])
        inner_after_backward(m, step)

    def step_end(m: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        inner_step_end(m, step, opt)
        b = sampler.history[-1][0]
        for layer, (A, B) in zip(layers_of(model), record[-1]):
            assert layer.train_rank == b
            changed_rows = (layer.A != A).any(1).nonzero().flatten().tolist()
            changed_cols = (layer.B != B).any(0).nonzero().flatten().tolist()
            assert changed_cols == [b - 1] and changed_rows == [b - 1], (b, changed_rows, changed_cols)

    sampler.after_backward, sampler.step_end = after_backward, step_end
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup=0, weight_decay=0.1, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, sampler)  # Adam moments + weight decay: restoring is needed
    assert len(record) == 6 and len({h[0] for h in sampler.history}) > 1  # several ranks were drawn


def test_sampling_uniform_shared_or_per_module_and_eval_uses_serving_rank() -> None:
    model, idx = tiny_gpt(), token_batch()
    sampler = apply_dylora(model, r=4, r_min=2, targets=("c_attn", "c_fc"), seed=0)
    model.train()
    with torch.no_grad():
        for _ in range(200):
            model(idx)
    drawn = [h[0] for h in sampler.history]
    assert all(len(set(h)) == 1 for h in sampler.history)  # one b shared by every layer
    assert set(drawn) == {2, 3, 4} and all(drawn.count(b) > 40 for b in (2, 3, 4))
    model.eval()
    n = len(sampler.history)
    model(idx)
    assert len(sampler.history) == n and all(m.active_rank == 4 for m in layers_of(model))  # no draw in eval
    model = tiny_gpt()
    sampler = apply_dylora(model, r=4, targets=("c_attn", "c_fc"), per_module=True, seed=0)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(idx)
    assert any(len(set(h)) > 1 for h in sampler.history)


def test_after_training_every_rank_serves_and_merges() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    hooks = apply_dylora(model, r=4, alpha=8, targets=("c_attn", "c_fc"), seed=0)
    base = model(idx, labels=idx).loss.item()
    cfg = TrainConfig(steps=40, batch_size=8, lr=2e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda gen: (idx, idx), cfg, hooks)
    losses = {}
    for b in range(1, 5):
        set_rank(model, b)
        losses[b] = model(idx, labels=idx).loss.item()
        logits = model(idx).logits
        merge_all(model)
        torch.testing.assert_close(model(idx).logits, logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="unmerge"):
            set_rank(model, 1)
        unmerge_all(model)
    assert all(loss < base - 0.2 for loss in losses.values()), (base, losses)


def model_state(model: nn.Module) -> tuple:
    """(module classes, requires_grad flags, parameter values): what a failed apply must leave as it was."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return modules, flags, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bad_input_errors_leave_the_model_unchanged() -> None:
    bad = [({"targets": ["q_proj"]}, "unknown target module 'q_proj'"), ({"r": 0}, "must be a positive int"),
           ({"r": 65}, r"rank r=65 must be in \[1, 64\]"), ({"mode": "kohya"}, "mode must be"),
           ({"r": 4, "r_min": 5}, r"r_min=5 must be an int in \[1, r=4\]"), ({"dropout": 1.5}, "dropout")]
    for kwargs, match in bad:
        model = tiny_gpt()
        before = model_state(model)
        with pytest.raises(ValueError, match=match):
            apply_dylora(model, **kwargs)
        after = model_state(model)
        assert before[:2] == after[:2] and all(torch.equal(before[2][n], after[2][n]) for n in before[2]), kwargs
        assert not model._forward_pre_hooks, kwargs  # the rank sampler is not hooked in either
    model = tiny_gpt()
    apply_dylora(model, r=4)
    with pytest.raises(ValueError, match=r"b=5 must be an int in \[1, r_max=4\]"):
        set_rank(model, 5)
    with pytest.raises(ValueError, match="no DyLoRALinear"):
        set_rank(tiny_gpt(), 1)
