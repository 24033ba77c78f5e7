"""LoRA+: the parameter groups (B at lr * ratio through the loop's lr_scale), ratio = 1 is plain LoRA, the
first AdamW step moves B ratio times as far, a short run in the shared loop, count formula, refused applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora, count_lora
from chapters.ch4_low_rank.lora_plus import LoRAPlus, apply_lora_plus, count_lora_plus
from minimal.hooks import Hooks
from minimal.peft import count_trainable
from minimal.train import TrainConfig, lr_at, train
from tests.helpers import assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
TARGETS = ("c_attn", "c_proj")


def batches(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 101, (4, 16), generator=g)
    return idx, idx


def randomize_B(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B, so that A gets a gradient at the first step too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(0.05 * torch.randn(m.B.shape, generator=g))


def test_count_is_loras() -> None:
    model = tiny_gpt()
    hooks = apply_lora_plus(model, r=4, targets=TARGETS)
    assert isinstance(hooks, LoRAPlus) and isinstance(hooks, Hooks)
    assert count_trainable(model).trainable == count_lora_plus(CFG, r=4, targets=TARGETS)
    assert count_lora_plus(CFG, r=4, targets=TARGETS) == count_lora(CFG, r=4, targets=TARGETS)


def test_parameter_groups() -> None:
    model = tiny_gpt()
    hooks = apply_lora_plus(model, r=4, targets=TARGETS, ratio=8.0)
    model.ln_f.requires_grad_(True)  # something else that trains: LayerNorm vectors
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    opt = hooks.make_optimizer(params, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == cfg.betas
    fast, slow, vectors = opt.param_groups
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 6
    assert {id(p) for p in fast["params"]} == {id(m.B) for m in lora}
    assert fast["lr_scale"] == 8.0 and fast["lr"] == pytest.approx(8e-3) and fast["weight_decay"] == 0.1
    assert {id(p) for p in slow["params"]} == {id(m.A) for m in lora}
    assert "lr_scale" not in slow and slow["lr"] == 1e-3 and slow["weight_decay"] == 0.1
    assert {id(p) for p in vectors["params"]} == {id(model.ln_f.weight), id(model.ln_f.bias)}
    assert vectors["lr"] == 1e-3 and vectors["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    with pytest.raises(ValueError, match="none of its B"):
        hooks.make_optimizer([m.A for m in lora], cfg)


def trained(ratio: float | None, steps: int, randomize: bool = False) -> nn.Module:
    """LoRA (ratio=None: the loop's default AdamW) or LoRA+ trained `steps` steps in the shared loop."""
    model = tiny_gpt()
    torch.manual_seed(1)
    hooks = apply_lora(model, r=4, targets=TARGETS) if ratio is None else \
        apply_lora_plus(model, r=4, targets=TARGETS, ratio=ratio)
    if randomize:
        randomize_B(model)
    train(model, batches, TrainConfig(steps=steps, warmup=0, lr=1e-3, progress=False, log_every=0), hooks=hooks)
    return model


def test_ratio_one_is_plain_lora() -> None:
    lora, plus = trained(None, steps=3), trained(1.0, steps=3)
    for (n, p), (m, q) in zip(lora.named_parameters(), plus.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_first_step_moves_B_ratio_times_as_far_and_A_the_same() -> None:
    one, plus = trained(1.0, steps=1, randomize=True), trained(16.0, steps=1, randomize=True)
    model = tiny_gpt()
    torch.manual_seed(1)
    apply_lora(model, r=4, targets=TARGETS)
    randomize_B(model)
    init = dict(model.named_parameters())
    p1, p16 = dict(one.named_parameters()), dict(plus.named_parameters())
    for n in (n for n in init if n.endswith((".A", ".B"))):
        d1, d16 = p1[n] - init[n], p16[n] - init[n]
        assert d1.abs().max() > 0, n
        factor = 16.0 if n.endswith(".B") else 1.0  # Adam's first step is lr * g / |g|: it scales with lr only
        torch.testing.assert_close(d16, factor * d1, rtol=1e-4, atol=1e-7, msg=n)


def test_short_run_in_the_loop_keeps_the_ratio_under_the_schedule() -> None:
    model = tiny_gpt()
    hooks = apply_lora_plus(model, r=4, targets=TARGETS, ratio=16.0)
    seen = []
    hooks.setup = lambda model, cfg, optimizer: seen.append(optimizer)
    cfg = TrainConfig(steps=12, warmup=3, lr=2e-3, progress=False, log_every=0)
    idx = token_batch()
    result = train(model, lambda g: (idx, idx), cfg, hooks=hooks)  # one batch: the loss must fall
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    fast, slow = seen[0].param_groups[:2]
    assert slow["lr"] == pytest.approx(lr_at(cfg.steps - 1, cfg))  # the last step's scheduled lr
    assert fast["lr"] == pytest.approx(16.0 * slow["lr"])


def test_bad_arguments_leave_the_model_unchanged() -> None:
    for ratio in (0.0, -1.0, float("nan"), float("inf"), True, "16"):
        assert_refuses(tiny_gpt(), lambda m, ratio=ratio: apply_lora_plus(m, ratio=ratio), "ratio")
    assert_refuses(tiny_gpt(), lambda m: apply_lora_plus(m, r=0), r"rank r=0")
    assert_refuses(tiny_gpt(), lambda m: apply_lora_plus(m, targets=("c_attn", "nope")), "unknown target")
    model = tiny_gpt()
    apply_lora(model, r=4, targets=("c_attn",))
    assert_refuses(model, lambda m: apply_lora_plus(m, targets=("c_attn",)), "already have an adapter")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_forward_backward_in_the_models_dtype(dtype: torch.dtype) -> None:
    model, idx = tiny_gpt().to(dtype), token_batch()
    hooks = apply_lora_plus(model, r=4, targets=TARGETS)
    randomize_B(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model(idx, labels=idx).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in params)
    opt = hooks.make_optimizer(params, TrainConfig(lr=1e-3))
    opt.step()
