"""LoraHub: composition rule, w=0 / w=e_k, gradient-free objective, the ES optimiser, the L1 term, errors."""

from __future__ import annotations

import pytest
import torch

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from chapters.ch4_low_rank.lorahub import (
    compose,
    composed_delta,
    es_minimize,
    l1_term,
    load_lora_state,
    lora_state,
    lorahub,
    lorahub_objective,
)
from minimal.gpt import GPT, GPTConfig
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
IDX = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))


def lora_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "c_fc"))
    return model


def random_modules(model: GPT, k: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    base = lora_state(model)
    return [{n: 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(k)]


def test_composition_mixes_factors_not_updates() -> None:
    model = lora_gpt()
    modules = random_modules(model)
    w = torch.tensor([0.5, -1.0, 0.0])
    load_lora_state(model, compose(modules, w))
    layer, s = model.h[0].attn.c_attn, 2.0
    A = 0.5 * modules[0]["h.0.attn.c_attn.A"] - modules[1]["h.0.attn.c_attn.A"]
    B = 0.5 * modules[0]["h.0.attn.c_attn.B"] - modules[1]["h.0.attn.c_attn.B"]
    torch.testing.assert_close(layer.delta_weight(), s * B @ A)  # the module equals the independent mix
    torch.testing.assert_close(composed_delta(modules, w, s)["h.0.attn.c_attn"], s * B @ A)
    updates = [s * m["h.0.attn.c_attn.B"] @ m["h.0.attn.c_attn.A"] for m in modules]
    summed = 0.5 * updates[0] - updates[1]  # the weighted sum of the updates, computed one by one
    torch.testing.assert_close(composed_delta(modules, w, s, rule="deltas")["h.0.attn.c_attn"], summed)
    assert (layer.delta_weight() - summed).abs().max() > 1e-3  # the two rules differ


def test_zero_weights_give_the_base_and_unit_weights_give_one_module() -> None:
    torch.manual_seed(0)
    base_logits = GPT(CFG).eval()(IDX).logits
    model = lora_gpt()
    modules = random_modules(model)
    load_lora_state(model, compose(modules, [0.0, 0.0, 0.0]))
    torch.testing.assert_close(model(IDX).logits, base_logits, atol=1e-6, rtol=0)
    load_lora_state(model, modules[1])
    single = model(IDX).logits
    load_lora_state(model, compose(modules, [0.0, 1.0, 0.0]))
    assert torch.equal(model(IDX).logits, single)


def test_objective_has_no_backward_and_l1_term() -> None:
    model = lora_gpt()
    modules = random_modules(model)
    w = torch.tensor([0.3, -0.6, 0.9])
    assert l1_term(w) == pytest.approx(0.05 * 0.6)
    value = lorahub_objective(model, modules, w, [(IDX, IDX)])
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        loss = model(IDX, labels=IDX).loss.item()
    assert value == pytest.approx(loss + 0.03, abs=1e-6)


def test_es_finds_the_minimum_of_a_quadratic() -> None:
    target = torch.tensor([0.7, -0.4, 1.0])
    calls = []

    def f(x: torch.Tensor) -> float:
        calls.append(x)
        assert (x >= -1.5).all() and (x <= 1.5).all()
        return ((x - target) ** 2).sum().item()

    result = es_minimize(f, 3, budget=60, seed=0)
    assert result.evaluations == len(calls) == 60 and len(result.history) == 60
    assert result.best_f == min(result.history) and result.history[0] == pytest.approx(1.65)  # w = 0 first
    assert result.best_f < 0.1  # a few dozen evaluations: within about 0.3 of the minimum
    longer = es_minimize(f, 3, budget=300, seed=0)
    assert longer.best_f < 1e-3 and (longer.best_x - target).abs().max() < 0.03
    assert longer.history[:60] == result.history  # the same search, continued


def test_lorahub_picks_the_useful_module() -> None:
    model = lora_gpt()
    modules = random_modules(model, k=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_(0, 0.02)
    cfg = TrainConfig(steps=15, batch_size=4, lr=2e-2, warmup=0, progress=False, log_every=0)
    train(model, lambda g: (IDX, IDX), cfg)  # module 1 learns the few-shot batch
    modules[1] = lora_state(model)
    base = lorahub_objective(model, modules, torch.zeros(3), [(IDX, IDX)])
    result = lorahub(model, modules, [(IDX, IDX)], budget=30, seed=0)
    assert result.evaluations == 30 and result.best_f < base - 0.3
    assert result.best_x[1].abs() == result.best_x.abs().max()
    with torch.no_grad():  # the best composition is what the model holds now
        now = model(IDX, labels=IDX).loss.item() + l1_term(result.best_x)
    assert now == pytest.approx(result.best_f, abs=1e-5)


def test_errors() -> None:
    model = lora_gpt()
    modules = random_modules(model)
    with pytest.raises(ValueError, match="one weight per module"):
        compose(modules, [1.0, 2.0])
    bad = dict(modules[1])
    bad["h.0.attn.c_attn.A"] = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="module 1 does not match"):
        compose([modules[0], bad], [1.0, 1.0])
    with pytest.raises(ValueError, match="rule"):
        composed_delta(modules, [1.0, 0.0, 0.0], 2.0, rule="concat")
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state(model, {"h.0.attn.c_attn.A": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora_state(GPT(CFG))
    with pytest.raises(ValueError, match="budget"):
        es_minimize(lambda x: 0.0, 3, budget=0)
