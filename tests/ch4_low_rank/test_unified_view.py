"""Unified view: prefix attention == gated attention (the paper's identity), parallel adapters, MAM adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.unified_view import (
    ParallelAdapter,
    apply_mam_adapter,
    apply_parallel_adapter,
    apply_scaled_parallel_adapter,
    count_mam_adapter,
    count_parallel_adapter,
    count_scaled_parallel_adapter,
    gated_prefix_attention,
    prefix_attention,
)
from minimal.gpt import GPT
from minimal.peft import count_trainable
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def test_prefix_attention_is_gated_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(2, 4, 5, 16, generator=g, dtype=torch.float64) for _ in range(2))
    joint = prefix_attention(q, k, v, pk, pv)
    gated, lam = gated_prefix_attention(q, k, v, pk, pv)
    assert torch.allclose(joint, gated, atol=1e-12)
    # lam is the softmax mass the joint attention puts on the l prefix slots
    s = torch.cat([pk, k], dim=-2)
    scores = (q @ s.transpose(-2, -1)) / 4.0  # sqrt(16)
    scores[..., 5:] = scores[..., 5:].masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(lam.squeeze(-1), scores.softmax(-1)[..., :5].sum(-1), atol=1e-12)
    assert (lam > 0).all() and (lam < 1).all()
    # and the two terms are the two separate attentions
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    over_prefix = (q @ pk.transpose(-2, -1) / 4.0).softmax(-1) @ pv
    assert torch.allclose(gated, (1 - lam) * plain + lam * over_prefix, atol=1e-12)


def test_gated_form_matches_the_gpt_attention_with_a_prefix() -> None:
    model = tiny_gpt()
    attn = model.h[0].attn
    x = torch.randn(2, 9, 64)
    pk, pv = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)
    out, _ = attn(x, prefix=(pk, pv))  # the model's own path (concatenated keys, one softmax)
    q, k, v = (t.view(2, 9, 4, 16).transpose(1, 2) for t in attn.c_attn(x).split(64, dim=2))  # [B, H, T, hd]
    gated, lam = gated_prefix_attention(q, k, v, pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1))
    assert torch.allclose(attn.c_proj(gated.transpose(1, 2).reshape(2, 9, 64)), out, atol=1e-5)
    assert lam.shape == (2, 4, 9, 1)


@pytest.mark.parametrize("where", ("mlp", "attn"))
def test_parallel_adapter_identity_count_and_input(where: str) -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_parallel_adapter(model, bottleneck=8, where=where)
    assert torch.equal(model(idx).logits, ref)  # W_up = 0
    assert count_trainable(model).trainable == count_parallel_adapter(CFG, 8) == 2 * (2 * 8 * 64 + 8 + 64)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"h.{i}.{where}.parallel_adapter.{lin}.{w}" for i in range(2) for lin in ("down", "up")
        for w in ("weight", "bias")}
    sub = getattr(model.h[1], where)
    with torch.no_grad():
        sub.parallel_adapter.up.weight.normal_()
    seen = {}
    sub.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    model(idx)
    x = seen["x"]  # the sublayer's input (ln_1 / ln_2 of the residual stream), read by the adapter too
    base = sub(x) if where == "mlp" else sub(x)[0]
    with torch.no_grad():
        sub.parallel_handle.remove()
        plain = sub(x) if where == "mlp" else sub(x)[0]
    a = sub.parallel_adapter
    manual = a.up(torch.relu(a.down(x)))
    assert torch.allclose(base, plain + manual, atol=1e-6)
    assert not torch.allclose(manual, torch.zeros_like(manual))


def test_scaled_parallel_adapter_is_linear_in_scale() -> None:
    outs = {}
    x = torch.randn(3, 64)
    for s in (1.0, 4.0):
        torch.manual_seed(0)
        a = ParallelAdapter(64, 8, scale=s)
        with torch.no_grad():
            a.up.weight.normal_()
        outs[s] = a(x)
    assert torch.allclose(outs[4.0], 4 * outs[1.0], atol=1e-5)
    model = tiny_gpt()
    apply_scaled_parallel_adapter(model, bottleneck=8)
    assert model.h[0].mlp.parallel_adapter.scale == 4.0
    assert count_trainable(model).trainable == count_scaled_parallel_adapter(CFG, 8)


def test_mam_adapter() -> None:
    model, idx = tiny_gpt(), token_batch()
    ref = model(idx).logits
    apply_mam_adapter(model, n_tokens=5, bottleneck=8)
    assert count_trainable(model).trainable == count_mam_adapter(CFG, 5, 8) == 2 * 5 * 64 * 2 + 2 * (2 * 8 * 64 + 72)
    assert model.mam_prefix.kv.shape == (2, 2, 4, 5, 16)
    assert not torch.allclose(model(idx).logits, ref, atol=1e-4)  # prefix tuning is not identity at init
    # the hook passes the prefix and shifts positions: same as calling the plain forward by hand
    plain = GPT.forward(model, idx, prefix_kv=model.mam_prefix.layers(), position_offset=5).logits
    assert torch.equal(model(idx).logits, plain)
    losses = adam_steps(model, idx, steps=25, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]
    out = model.generate(idx[:1, :4], 3, temperature=0.0)  # works with the KV cache (prefix every step)
    assert out.shape == (1, 7)


def test_parallel_adapter_learns() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_scaled_parallel_adapter(model, bottleneck=8)
    losses = adam_steps(model, idx, steps=25, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_bad_input() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_parallel_adapter(m, bottleneck=0), "bottleneck")
    assert_refuses(tiny_gpt(), lambda m: apply_parallel_adapter(m, bottleneck=65), "bottleneck")
    assert_refuses(tiny_gpt(), lambda m: apply_parallel_adapter(m, where="ln_1"), "unknown place")
    assert_refuses(tiny_gpt(), lambda m: apply_parallel_adapter(m, scale=0.0), "scale")
    assert_refuses(tiny_gpt(), lambda m: apply_parallel_adapter(m, activation="swish"), "activation")
    with pytest.raises(ValueError, match="activation"):
        ParallelAdapter(64, 8, activation="swish")
    with pytest.raises(TypeError, match="GPT"):
        apply_parallel_adapter(nn.Linear(3, 3))
    model = tiny_gpt()
    apply_parallel_adapter(model)
    assert_refuses(model, apply_parallel_adapter, "already have")
    assert_refuses(tiny_gpt(), lambda m: apply_mam_adapter(m, n_tokens=32), "n_tokens")
    assert_refuses(tiny_gpt(), lambda m: apply_mam_adapter(m, bottleneck=0), "bottleneck")
    model = tiny_gpt()
    apply_mam_adapter(model)
    assert_refuses(model, apply_mam_adapter, "already has")
    with pytest.raises(ValueError, match="supplies prefix_kv"):
        model(token_batch(), prefix_kv=model.mam_prefix.layers())
