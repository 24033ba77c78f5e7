"""LISA: the trainable set in every period, frozen blocks untouched, dropped state, uniform sampling, memory."""

from __future__ import annotations

import pytest
import torch

from chapters.ch4_low_rank.lisa import (
    LISA,
    active_blocks,
    adam_state_bytes,
    apply_lisa,
    count_lisa,
    sample_blocks,
)
from chapters.ch4_low_rank.lora import apply_lora
from minimal.gpt import GPT
from minimal.train import TrainConfig, default_optimizer, train
from tests import helpers
from tests.helpers import assert_refuses, tiny_config, token_batch

CFG = tiny_config(n_layer=4, n_embd=32)
IDX = token_batch()


def tiny_gpt(seed: int = 0) -> GPT:
    return helpers.tiny_gpt(seed, CFG)


def run_cfg(steps: int, lr: float = 1e-3) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=2, progress=False, log_every=0)


def moment_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


def test_trainable_set_state_and_frozen_blocks_in_every_period() -> None:
    model = tiny_gpt()
    hooks = apply_lisa(model, n_active=2, period=3, seed=1)
    always = {n for n, _ in model.named_parameters() if n.startswith(("wte.", "wpe.", "ln_f."))}
    assert always == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    phases = []

    def step_end(m: GPT, step: int, opt: torch.optim.Optimizer) -> None:
        active = active_blocks(m)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        expect = always | {n for n, _ in m.named_parameters() if n.startswith(tuple(f"h.{i}." for i in active))}
        frozen_same = all(torch.equal(p, snapshot[n]) for n, p in m.named_parameters() if n not in trainable)
        with_state = {n for n, p in m.named_parameters() if p in opt.state}
        phases.append((step, tuple(active), trainable == expect, frozen_same, with_state == trainable,
                       moment_bytes(opt) == adam_state_bytes(m, 2)))
        inner(m, step, opt)
        snapshot.update({n: p.detach().clone() for n, p in m.named_parameters()})

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    inner, hooks.step_end = hooks.step_end, step_end
    result = train(model, lambda g: (IDX, IDX), run_cfg(12), hooks)
    assert result.trainable == hooks.n_trainable == count_lisa(CFG, n_active=2)
    for step, active, exact, frozen_same, state_ok, bytes_ok in phases:
        assert len(active) == 2 and exact and frozen_same and state_ok and bytes_ok, step
    sets = [p[1] for p in phases]
    assert all(sets[t] == sets[t - 1] for t in range(12) if t % 3)  # constant inside a period
    assert len(set(sets)) > 1  # and resampled across periods


def test_sampling_is_uniform() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    draws = 2000
    for _ in range(draws):
        picked = sample_blocks(8, 2, gen)
        assert len(set(picked)) == 2
        counts[picked] += 1
    expected = draws * 2 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.48  # chi-square, 7 degrees of freedom, p = 0.01


def test_all_blocks_active_is_full_fine_tuning() -> None:
    lisa, full = tiny_gpt(), tiny_gpt()
    hooks = apply_lisa(lisa, n_active=CFG.n_layer, period=2)
    train(lisa, lambda g: (IDX, IDX), run_cfg(6), hooks)
    train(full, lambda g: (IDX, IDX), run_cfg(6))
    assert all(torch.equal(a, b) for a, b in zip(lisa.parameters(), full.parameters()))


def test_memory_against_full_training() -> None:
    model = tiny_gpt()
    d, V, T = CFG.n_embd, CFG.vocab_size, CFG.block_size
    per_period = V * d + T * d + 2 * d + (12 * d * d + 13 * d)  # wte, wpe, ln_f and one block
    assert apply_lisa(tiny_gpt(), n_active=1).n_trainable == count_lisa(CFG, 1) == per_period
    assert adam_state_bytes(model) == 8 * CFG.n_params()
    assert adam_state_bytes(model, 1) < adam_state_bytes(model, 2) < adam_state_bytes(model)


def test_it_learns() -> None:
    model = tiny_gpt()
    before = model(IDX, labels=IDX).loss.item()
    hooks = apply_lisa(model, n_active=1, period=5)
    train(model, lambda g: (IDX, IDX), run_cfg(20, lr=3e-3), hooks)
    with torch.no_grad():
        assert model(IDX, labels=IDX).loss.item() < before - 0.3


def test_first_sample_is_drawn_in_setup() -> None:
    model = tiny_gpt()
    lisa = apply_lisa(model, n_active=1, period=4, seed=2)
    assert isinstance(lisa, LISA) and all(p.requires_grad for p in model.parameters())  # the loop collects all
    params = [p for p in model.parameters() if p.requires_grad]
    lisa.setup(model, run_cfg(8), default_optimizer(params, run_cfg(8)))
    assert active_blocks(model) == sample_blocks(CFG.n_layer, 1, torch.Generator().manual_seed(2))


def test_errors() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_lisa(m, n_active=0), "n_active")
    assert_refuses(tiny_gpt(), lambda m: apply_lisa(m, n_active=5), "n_active")
    assert_refuses(tiny_gpt(), lambda m: apply_lisa(m, period=0), "period")
    stacked = tiny_gpt()
    apply_lora(stacked, r=2, targets=("c_fc",))
    assert_refuses(stacked, apply_lisa, "LISA trains whole blocks")
    model = tiny_gpt()
    hooks = apply_lisa(model)
    model.wpe.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter must be trainable"):
        train(model, lambda g: (IDX, IDX), run_cfg(2), hooks)
