"""ReLoRA: function kept across a restart, optimizer-state pruning, jagged schedule (on the loop's own lr),
rank growth, warm start, the trainable count and its formula, errors that leave the model unchanged."""

from __future__ import annotations

import pytest
import torch

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from chapters.ch4_low_rank.relora import (
    apply_relora,
    count_relora,
    jagged_cosine_lr,
    merge_and_reinit,
    prune_optimizer_state,
    restart_steps,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable
from minimal.train import TrainConfig, lr_at, train
from tests.helpers import tiny_gpt, token_batch

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
IDX = token_batch()


def run_cfg(steps: int, lr: float = 5e-3) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=2, progress=False, log_every=0)


def test_merge_and_reinit_keeps_the_function() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4, targets=("c_attn", "c_fc"))
    g = torch.Generator().manual_seed(3)
    layer = model.h[0].attn.c_attn
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(0.05 * torch.randn(m.B.shape, generator=g))
    before = model(IDX).logits
    w0, a0, delta = layer.base.weight.clone(), layer.A.clone(), layer.delta_weight().clone()
    assert merge_and_reinit(model) == 4
    torch.testing.assert_close(model(IDX).logits, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, w0 + delta)
    assert torch.count_nonzero(layer.B) == 0 and not torch.equal(layer.A, a0)  # fresh A, B = 0


def test_prune_optimizer_state_modes() -> None:
    torch.manual_seed(0)
    lora, other = torch.randn(20, 30, requires_grad=True), torch.randn(30, requires_grad=True)
    opt = torch.optim.AdamW([lora, other], lr=1e-2)
    lora.grad, other.grad = torch.randn(20, 30), torch.randn(30)
    opt.step()
    keys = {k: set(s) for k, s in zip(("lora", "other"), (opt.state[lora], opt.state[other]))}
    other_state = {k: v.clone() for k, v in opt.state[other].items()}
    kept = opt.state[lora]["exp_avg"].abs().flatten().sort().values[-60:]  # the largest 10%
    prune_optimizer_state(opt, [lora], "magnitude", 0.9)
    for name in ("exp_avg", "exp_avg_sq"):
        t = opt.state[lora][name]
        assert (t == 0).float().mean() >= 0.9 and torch.count_nonzero(t) > 0
    assert torch.equal(opt.state[lora]["exp_avg"].abs().flatten().sort().values[-60:], kept)
    assert set(opt.state[lora]) == keys["lora"] and set(opt.state[other]) == keys["other"]
    assert opt.state[lora]["step"].item() == 1  # counters kept
    assert all(torch.equal(opt.state[other][k], v) for k, v in other_state.items())
    m, v = opt.state[lora]["exp_avg"], opt.state[lora]["exp_avg_sq"]
    assert torch.equal(m == 0, v == 0)  # one mask for both moments: never a first moment over a zero second
    opt.step()
    prune_optimizer_state(opt, [lora], "random", 0.5, torch.Generator().manual_seed(0), joint=False)
    m, v = opt.state[lora]["exp_avg"], opt.state[lora]["exp_avg_sq"]
    assert ((m != 0) & (v == 0)).any()  # the released code's independent masks: m / (0 + eps) is possible
    prune_optimizer_state(opt, [lora], "full")
    assert torch.count_nonzero(opt.state[lora]["exp_avg_sq"]) == 0
    with pytest.raises(ValueError, match="prune mode"):
        prune_optimizer_state(opt, [lora], "lottery")


def test_jagged_schedule() -> None:
    cfg = TrainConfig(steps=120, lr=1e-3, warmup=10)
    restarts = restart_steps(120, 40)
    assert restarts == [40, 80] and restart_steps(120, 40, warm_start=5) == [5, 45, 85]
    lr = [jagged_cosine_lr(t, cfg, restarts, 5) for t in range(120)]
    for t_k in restarts:
        assert lr[t_k] == 0.0 and lr[t_k + 5] == pytest.approx(lr_at(t_k + 5, cfg))
        assert lr[t_k + 2] == pytest.approx(0.4 * lr_at(t_k + 5, cfg))
    assert all(lr[t] == lr_at(t, cfg) for t in range(40) if t not in range(40, 45))
    assert lr[9] == pytest.approx(1e-3)  # end of the first warmup: peak


def test_training_restarts_keep_function_and_prune_state() -> None:
    model = tiny_gpt()
    hooks = apply_relora(model, r=4, period=5, restart_warmup=2, prune_ratio=0.9, train_rest=True)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    checks = []

    def step_end(m: GPT, step: int, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            before = m(IDX).logits
        ln_state = {k: v.clone() for k, v in opt.state[m.ln_f.weight].items()}
        hooks_step_end(m, step, opt)
        if step + 1 in (5, 10):
            with torch.no_grad():
                after = m(IDX).logits
            zeros = min((opt.state[p][k] == 0).float().mean().item()
                        for layer in layers for p in (layer.A, layer.B) for k in ("exp_avg", "exp_avg_sq"))
            ln_same = all(torch.equal(opt.state[m.ln_f.weight][k], v) for k, v in ln_state.items())
            checks.append(((after - before).abs().max().item(), zeros, ln_same,
                           all(torch.count_nonzero(layer.B) == 0 for layer in layers),
                           opt.param_groups[0]["lr_scale"]))

    hooks_step_end, hooks.step_end = hooks.step_end, step_end
    train(model, lambda g: (IDX, IDX), run_cfg(12), hooks)
    assert len(checks) == 2
    for diff, zeros, ln_same, b_zero, scale in checks:
        assert diff < 1e-5 and zeros >= 0.9 and ln_same and b_zero and scale == 0.0


def test_accumulated_update_exceeds_the_lora_rank() -> None:
    model = tiny_gpt()
    w0 = model.h[0].attn.c_attn.weight.detach().clone()
    hooks = apply_relora(model, r=1, period=3, restart_warmup=1, prune="full")
    train(model, lambda g: (IDX, IDX), run_cfg(13, lr=1e-2), hooks)
    layer = model.h[0].attn.c_attn
    total = layer.base.weight.detach() + layer.delta_weight().detach() - w0
    assert torch.linalg.matrix_rank(total, rtol=1e-4).item() >= 3  # 4 cycles of rank 1


def test_frozen_base_between_restarts_and_it_learns() -> None:
    model = tiny_gpt()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = model(IDX, labels=IDX).loss.item()
    hooks = apply_relora(model, r=8, targets=("c_attn", "c_fc"), period=10, restart_warmup=2)
    train(model, lambda g: (IDX, IDX), run_cfg(30, lr=1e-2), hooks)
    params = dict(model.named_parameters())
    untouched = [n for n in ref if "c_attn" not in n and "c_fc" not in n]
    assert all(torch.equal(params[n], ref[n]) for n in untouched)
    assert torch.equal(params["h.0.attn.c_attn.base.bias"], ref["h.0.attn.c_attn.bias"])
    assert not torch.equal(params["h.0.attn.c_attn.base.weight"], ref["h.0.attn.c_attn.weight"])  # 2 merges
    with torch.no_grad():
        assert model(IDX, labels=IDX).loss.item() < before - 0.3


def test_warm_start_trains_full_rank_first() -> None:
    model = tiny_gpt()
    hooks = apply_relora(model, r=4, period=10, restart_warmup=2, warm_start=3)
    layer = model.h[0].attn.c_attn
    assert layer.base.weight.requires_grad
    seen = []

    def step_end(m: GPT, step: int, opt: torch.optim.Optimizer) -> None:
        inner(m, step, opt)
        if step == 1:  # inside the warm start: W moved, the branch did not
            seen.append(not torch.equal(layer.base.weight, w_init) and torch.count_nonzero(layer.B) == 0)
        if step == 2:  # warm start over: W frozen and its optimizer state dropped
            seen.append(not layer.base.weight.requires_grad and layer.base.weight not in opt.state)

    w_init = layer.base.weight.detach().clone()
    inner, hooks.step_end = hooks.step_end, step_end
    train(model, lambda g: (IDX, IDX), run_cfg(8), hooks)
    assert seen == [True, True] and torch.count_nonzero(layer.B) > 0


def test_trainable_count_formula() -> None:
    for kw in ({}, {"warm_start": 3}, {"train_rest": True}, {"warm_start": 3, "train_rest": True},
               {"r": 2, "targets": ("c_proj",)}):
        model = tiny_gpt()
        apply_relora(model, **kw)
        assert count_trainable(model).trainable == count_relora(CFG, **kw)
    model = tiny_gpt(config=GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False))
    apply_relora(model, r=4, train_rest=True)
    assert count_trainable(model).trainable == count_relora(model.config, r=4, train_rest=True)


def model_state(model: torch.nn.Module) -> tuple:
    """(module classes, requires_grad flags, parameter values): what a failed apply must leave as it was."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return modules, flags, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_errors_leave_the_model_unchanged() -> None:
    bad = [({"period": 0}, "period"), ({"period": 5, "restart_warmup": 5}, "restart_warmup"),
           ({"prune": "none"}, "prune must be"), ({"prune_ratio": 1.5}, "prune_ratio"), ({"r": 0}, "rank"),
           ({"warm_start": -1}, "warm_start"), ({"targets": ["q_proj"]}, "unknown target module")]
    for kwargs, match in bad:
        model = tiny_gpt()
        before = model_state(model)
        with pytest.raises((ValueError, TypeError), match=match):
            apply_relora(model, **kwargs)
        after = model_state(model)
        assert before[:2] == after[:2] and all(torch.equal(before[2][n], after[2][n]) for n in before[2]), kwargs
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_and_reinit(tiny_gpt())
    model = tiny_gpt()
    hooks = apply_relora(model, warm_start=10)
    with pytest.raises(ValueError, match="warm_start"):
        train(model, lambda g: (IDX, IDX), run_cfg(5), hooks)  # checked in setup, once the run length is known
    with pytest.raises(RuntimeError, match="setup"):
        hooks.step_end(model, 0, None)
