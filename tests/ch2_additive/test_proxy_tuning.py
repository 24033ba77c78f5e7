import pytest
import torch

from chapters.ch2_additive.proxy_tuning import ProxyTuned, gap_closed, proxy_model
from minimal.gpt import GPT, GPTConfig
from minimal.train import TrainConfig, train

BIG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
SMALL = GPTConfig(vocab_size=101, block_size=32, n_layer=1, n_head=2, n_embd=32)


def gpt(cfg: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def ids(B: int = 3, T: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_expert_equal_to_anti_expert_gives_the_base_exactly():
    base, small = gpt(BIG, 0), gpt(SMALL, 1)
    proxy = proxy_model(base, small, small)
    x = ids()
    assert torch.equal(proxy(x).logits, base(x).logits.log_softmax(-1))
    assert torch.equal(proxy.generate(x, 8, temperature=0), base.generate(x, 8, temperature=0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(proxy.generate(x, 8, temperature=1.0, top_k=20, generator=g1),
                       base.generate(x, 8, temperature=1.0, top_k=20, generator=g2))


def test_alpha_zero_is_the_base_and_base_as_anti_expert_gives_the_expert():
    base, expert, anti = gpt(BIG, 0), gpt(SMALL, 2), gpt(SMALL, 3)
    x = ids()
    assert torch.equal(proxy_model(base, expert, anti, alpha=0.0)(x).logits, base(x).logits.log_softmax(-1))
    proxy = proxy_model(base, expert, base)  # anti-expert == base, alpha 1: the expert's distribution
    torch.testing.assert_close(proxy(x).logits, expert(x).logits.log_softmax(-1), rtol=0, atol=1e-5)


def test_arithmetic_is_in_log_probability_space():
    base, expert, anti = gpt(BIG, 0), gpt(SMALL, 2), gpt(SMALL, 3)
    x, alpha = ids(), 0.7
    proxy = proxy_model(base, expert, anti, alpha=alpha)
    lp = [m(x).logits.log_softmax(-1) for m in (base, expert, anti)]
    z = proxy(x).logits
    torch.testing.assert_close(z, lp[0] + alpha * (lp[1] - lp[2]), rtol=0, atol=1e-6)
    # p~ is proportional to p_B (p_E / p_A)^alpha
    p = [t.exp() for t in lp]
    want = p[0] * (p[1] / p[2]) ** alpha
    torch.testing.assert_close(z.softmax(-1), want / want.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    # a constant added to one model's logits changes nothing (raw-logit arithmetic would change z)
    s = [m(x).logits for m in (base, expert, anti)]
    torch.testing.assert_close(proxy.combine(s[0], s[1] + 5.0, s[2]), z, rtol=0, atol=1e-5)
    assert (z.softmax(-1) - base(x).logits.softmax(-1)).abs().max() > 1e-3  # the experts do steer


def test_cached_and_uncached_generation_agree_and_loss_matches_logits():
    proxy = proxy_model(gpt(BIG, 0), gpt(SMALL, 2), gpt(SMALL, 3))
    x = ids()
    assert torch.equal(proxy.generate(x, 10, temperature=0), proxy.generate(x, 10, temperature=0, use_cache=False))
    out = proxy(x, labels=x)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_proxy_steers_the_base_toward_what_the_expert_learned():
    base, anti = gpt(BIG, 0), gpt(SMALL, 1)
    expert = gpt(SMALL, 1)
    seq = torch.arange(10, 26).repeat(4, 1)  # a fixed sequence the base has never seen
    train(expert, lambda g: (seq, seq), TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup=0, progress=False,
                                                    log_every=0))
    before = base(seq, labels=seq).loss.item()
    proxy = proxy_model(base, expert, anti)
    assert proxy(seq, labels=seq).loss.item() < before - 1.0
    prompt = seq[:1, :4]
    assert proxy.generate(prompt, 6, temperature=0)[0, 4:].tolist() == list(range(14, 20))
    assert all(p.grad is None for m in (proxy.base, proxy.anti_expert) for p in m.parameters())
    assert gap_closed(0.8, 0.5, 0.9) == pytest.approx(0.75)


def test_it_plugs_into_evaluate_like_a_gpt():
    proxy = proxy_model(gpt(BIG, 0), gpt(SMALL, 2), gpt(SMALL, 3))
    assert isinstance(proxy, torch.nn.Module) and proxy.config.vocab_size == 101
    assert next(proxy.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="block_size"):
        proxy.generate(ids(T=30), 5)


def test_errors():
    base, small = gpt(BIG, 0), gpt(SMALL, 1)
    other = gpt(GPTConfig(vocab_size=120, block_size=32, n_layer=1, n_head=2, n_embd=32), 2)
    with pytest.raises(ValueError, match="one vocabulary.*'expert': 120"):
        proxy_model(base, other, small)
    proxy = proxy_model(base, other, small, truncate_vocab=True)
    assert proxy(ids()).logits.shape == (3, 6, 101)
    with pytest.raises(TypeError, match="expert must be a minimal.gpt.GPT"):
        ProxyTuned(base, torch.nn.Linear(2, 2), small)
    with pytest.raises(ValueError, match="temperature"):
        proxy_model(base, small, small).generate(ids(), 2, temperature=-1)
    with pytest.raises(ValueError, match="gap is zero"):
        gap_closed(0.5, 0.5, 0.5)


def test_scores_are_combined_in_float32_or_wider():
    x = ids()
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        base, small = gpt(BIG, 0).to(dtype), gpt(SMALL, 1).to(dtype)
        z = proxy_model(base, small, small)(x).logits
        assert z.dtype == want
        assert torch.equal(z, base(x).logits.to(want).log_softmax(-1))
