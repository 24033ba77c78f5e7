import pytest
import torch

from chapters.ch2_additive.prefix_tuning import (
    apply_prefix_tuning,
    consolidate_prefix,
    count_prefix_tuning,
    prefix_from_tokens,
    remove_prefix_tuning,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, trainable_names
from minimal.tokenizer import get_tokenizer

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
P = 4


def tiny(seed: int = 0, config: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_trainable_counts_match_the_formulas():
    L, d = CFG.n_layer, CFG.n_embd
    model = tiny()
    apply_prefix_tuning(model, n_tokens=P)
    want = P * d + d * d + d + 2 * L * d * d + 2 * L * d
    assert count_trainable(model).trainable == count_prefix_tuning(CFG, P) == want
    assert all(n.startswith("prefix_encoder.") for n in trainable_names(model))
    consolidate_prefix(model)
    assert trainable_names(model) == ["prefix_encoder.prefix"]
    assert count_trainable(model).trainable == 2 * P * L * d == count_prefix_tuning(CFG, P, projection=False)
    model = tiny()
    apply_prefix_tuning(model, n_tokens=P, projection=False)
    assert count_trainable(model).trainable == 2 * P * L * d
    model = tiny()
    apply_prefix_tuning(model, n_tokens=P, hidden=16)
    want = P * d + d * 16 + 16 + 16 * 2 * L * d + 2 * L * d
    assert count_trainable(model).trainable == count_prefix_tuning(CFG, P, hidden=16) == want


def test_real_word_prefix_reproduces_the_concatenated_run():
    base, model = tiny(), tiny()
    z = torch.tensor([5, 17, 42, 99])  # the "real words", P = 4
    x = ids()
    apply_prefix_tuning(model, n_tokens=P, projection=False)
    with torch.no_grad():
        model.prefix_encoder.prefix.copy_(prefix_from_tokens(model, z))
    want = base(torch.cat([z.expand(2, -1), x], dim=1)).logits[:, P:]  # [B, T, V]
    torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)
    # the manual attention path agrees too
    model.set_fast_attention(False)
    torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)
    # and so does generation: continuing x after the prefix is continuing z + x on the base
    got = model.generate(x, 6, temperature=0.0)
    ref = base.generate(torch.cat([z.expand(2, -1), x], dim=1), 6, temperature=0.0)[:, P:]
    assert torch.equal(got, ref)
    assert torch.equal(got, model.generate(x, 6, temperature=0.0, use_cache=False))
    # with positions 0..T-1 the same prefix no longer reproduces it (the convention matters)
    other = tiny()
    apply_prefix_tuning(other, n_tokens=P, projection=False, shift_positions=False)
    with torch.no_grad():
        other.prefix_encoder.prefix.copy_(model.prefix_encoder.prefix)
    assert (other(x).logits - want).abs().max() > 1e-2


def test_prefix_seen_from_first_token_and_causality():
    base, model = tiny(), tiny()
    apply_prefix_tuning(model, n_tokens=P, shift_positions=False)
    x = ids()
    out = model(x).logits
    assert (out[:, 0] - base(x).logits[:, 0]).abs().max() > 1e-3  # position 0 already reads the prefix
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % CFG.vocab_size
    torch.testing.assert_close(model(y).logits[:, :5], out[:, :5], rtol=0, atol=1e-6)
    assert (model(y).logits[:, 5:] - out[:, 5:]).abs().max() > 1e-4


def test_consolidate_keeps_the_function_and_removal_restores_base():
    base, model = tiny(), tiny()
    apply_prefix_tuning(model, n_tokens=P)
    x = ids()
    before = model(x).logits
    consolidate_prefix(model)
    assert not hasattr(model.prefix_encoder, "mlp")
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)
    remove_prefix_tuning(model)
    assert torch.equal(model(x).logits, base(x).logits)


def test_real_word_init_from_text():
    enc = get_tokenizer()
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    text = "the movie was"
    tok = torch.tensor((enc.encode(text) * P)[:P])
    model = tiny(config=cfg)
    apply_prefix_tuning(model, n_tokens=P, projection=False, init_text=text)
    torch.testing.assert_close(model.prefix_encoder.prefix, prefix_from_tokens(model, tok), rtol=0, atol=0)
    model = tiny(config=cfg)
    torch.manual_seed(0)
    apply_prefix_tuning(model, n_tokens=P, projection=True, init_text=text, init_steps=0)
    target = prefix_from_tokens(model, tok)
    untrained = (model.prefix_encoder.flat() - target).pow(2).mean()
    model = tiny(config=cfg)
    apply_prefix_tuning(model, n_tokens=P, projection=True, init_text=text, init_steps=200)
    fitted = (model.prefix_encoder.flat() - target).pow(2).mean()
    assert fitted < 0.1 * untrained  # the MLP was regressed onto the real-word keys/values


def test_dtype_follows_the_model():
    for dtype in (torch.bfloat16, torch.float64):
        model = tiny().to(dtype)
        apply_prefix_tuning(model, n_tokens=P)
        assert {p.dtype for p in model.prefix_encoder.parameters()} == {dtype}
        assert all(k.dtype == dtype for kv in model.prefix_encoder.kv() for k in kv)


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_prefix_tuning(m, n_tokens=0), "n_tokens")
    refuses(tiny(), lambda m: apply_prefix_tuning(m, n_tokens=CFG.block_size), "n_tokens")
    refuses(tiny(), lambda m: apply_prefix_tuning(m, n_tokens=P, hidden=0), "hidden")
    refuses(torch.nn.Linear(2, 2), apply_prefix_tuning, "GPT", TypeError)
    refuses(tiny(), lambda m: apply_prefix_tuning(m, n_tokens=P, init_text="zzzz qqqq"), "vocabulary")
    model = tiny()
    apply_prefix_tuning(model, n_tokens=P, projection=False)
    refuses(model, lambda m: apply_prefix_tuning(m, n_tokens=P), "already has a prefix")
    with pytest.raises(ValueError, match="no reparameterisation MLP"):
        consolidate_prefix(model)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(ids(T=CFG.block_size - P + 1))
    model(ids(T=CFG.block_size - P))
    with pytest.raises(ValueError, match="supplies prefix_kv"):
        model(ids(), prefix_kv=model.prefix_encoder.kv())
    with pytest.raises(ValueError, match="ids must be"):
        prefix_from_tokens(model, torch.tensor([]))
    with pytest.raises(ValueError, match="no prefix"):
        remove_prefix_tuning(tiny())
