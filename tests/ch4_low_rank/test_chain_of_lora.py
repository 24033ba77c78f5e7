"""Chain of LoRA: function kept at every knot, fresh optimizer state, W_final = W0 + sum of links, M=1 is LoRA,
the trainable count and its formula, errors that leave the model unchanged."""

from __future__ import annotations

import pytest
import torch

from chapters.ch4_low_rank.chain_of_lora import apply_chain_of_lora, count_chain_of_lora, knot_steps, tie_knot
from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train
from tests.helpers import tiny_gpt, token_batch

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
IDX = token_batch()


def run_cfg(steps: int, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=2, progress=False, log_every=0)


def test_knot_steps() -> None:
    assert knot_steps(120, 3) == [40, 80]
    assert knot_steps(10, 3) == [4, 8] and knot_steps(10, 1) == []


def test_chain_keeps_function_at_each_knot_and_sums_the_links() -> None:
    model = tiny_gpt()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc"))}
    hooks = apply_chain_of_lora(model, r=2, targets=("c_attn", "c_fc"), links=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    deltas = {n: torch.zeros_like(w) for n, w in w0.items()}
    knots = []

    def step_end(m: GPT, step: int, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            before = m(IDX).logits
        links = {n: layer.delta_weight().detach().clone() for n, layer in layers.items()}
        inner(m, step, opt)
        if step + 1 in (4, 8):  # a knot: the link is merged and restarted
            with torch.no_grad():
                diff = (m(IDX).logits - before).abs().max().item()
            fresh = all(layer.A not in opt.state and layer.B not in opt.state and torch.count_nonzero(layer.B) == 0
                        for layer in layers.values())
            knots.append((diff, fresh))
            for n in deltas:
                deltas[n] += links[n]

    inner, hooks.step_end = hooks.step_end, step_end
    train(model, lambda g: (IDX, IDX), run_cfg(10), hooks)
    assert [k[1] for k in knots] == [True, True] and all(k[0] < 1e-5 for k in knots)
    for n, layer in layers.items():
        total = layer.base.weight.detach() + layer.delta_weight().detach() - w0[n]  # W_final - W0
        torch.testing.assert_close(total, deltas[n] + layer.delta_weight().detach(), atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(total, rtol=1e-4).item() > 2  # more than one link's rank r = 2


def test_one_link_is_lora() -> None:
    results = []
    for chain in (True, False):
        model = tiny_gpt()
        torch.manual_seed(5)
        if chain:
            hooks = apply_chain_of_lora(model, r=4, targets=("c_attn",), links=1)
        else:
            hooks = apply_lora(model, r=4, targets=("c_attn",))
        train(model, lambda g: (IDX, IDX), run_cfg(6), hooks)
        results.append(model(IDX).logits)
    assert torch.equal(results[0], results[1])


def test_frozen_tensors_and_it_learns() -> None:
    model = tiny_gpt()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = model(IDX, labels=IDX).loss.item()
    hooks = apply_chain_of_lora(model, r=8, targets=("c_attn", "c_fc"), links=3, link_warmup=2)
    train(model, lambda g: (IDX, IDX), run_cfg(30), hooks)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], ref[n]) for n in ref if "c_attn" not in n and "c_fc" not in n)
    assert torch.equal(params["h.1.mlp.c_fc.base.bias"], ref["h.1.mlp.c_fc.bias"])
    with torch.no_grad():
        assert model(IDX, labels=IDX).loss.item() < before - 0.3


def test_tie_knot_directly_and_errors() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4, targets=("c_proj",))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_(0, 0.05)
    before = model(IDX).logits
    assert tie_knot(model) == 4
    torch.testing.assert_close(model(IDX).logits, before, atol=1e-5, rtol=0)
    for kwargs, match in (({"links": 0}, "links"), ({"link_warmup": -1}, "link_warmup"), ({"r": 65}, "rank"),
                          ({"targets": ["q_proj"]}, "unknown target module")):
        model = tiny_gpt()
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=match):
            apply_chain_of_lora(model, **kwargs)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())  # the model is as it was
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    model = tiny_gpt()
    hooks = apply_chain_of_lora(model, links=3, link_warmup=4)
    with pytest.raises(RuntimeError, match="setup"):
        hooks.step_end(model, 0, None)
    with pytest.raises(ValueError, match="shorter than a link"):
        train(model, lambda g: (IDX, IDX), run_cfg(10), hooks)  # checked in setup, once the run length is known
    assert knot_steps(2, 3) == [1]  # a run shorter than the chain: one link per step


def test_trainable_count_formula() -> None:
    for kw in ({}, {"r": 3, "targets": ("c_attn", "c_proj")}, {"r": 2, "targets": r"h\.0\.mlp\.c_fc"}):
        model = tiny_gpt()
        apply_chain_of_lora(model, **kw)
        assert count_trainable(model).trainable == count_chain_of_lora(CFG, **kw)
