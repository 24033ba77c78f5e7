"""Proxy-tuning: steer a big frozen model at decoding time with a small tuned model's logit difference.

Paper: Alisa Liu, Xiaochuang Han, Yizhong Wang, Yulia Tsvetkov, Yejin Choi, Noah A. Smith, "Tuning Language
Models by Proxy", COLM 2024, arXiv 2401.08565 (code: alisawuffles/proxy-tuning).

Idea: fine-tune only a small model (the "expert"); keep its untuned copy (the "anti-expert"). At every
decoding step add what tuning changed in the small model to the big model's next-token scores. The big
model is never trained; it may even be a black box that only returns logits.

    z_t = log p_B(. | x_<t) + alpha (log p_E(. | x_<t) - log p_A(. | x_<t))      [V]
    p~(x_t | x_<t) = softmax(z_t)   i.e.   p~ is proportional to p_B (p_E / p_A)^alpha

The combination is done in log-probability space: each model's logits go through log_softmax first, so a
constant added to any model's logits changes nothing, and with expert == anti-expert z_t is exactly
log p_B. The released code adds raw logits; the two differ by a per-position constant, so p~ is the same.

What trains: nothing here (0 parameters of the big model). The expert is the anti-expert fine-tuned on the
task with any method, before proxy-tuning.

Choices:
- `ProxyTuned` is an nn.Module that looks like a GPT to `minimal.evaluate.evaluate_task` and `perplexity`:
  forward(idx, labels=None) -> GPTOutput whose `.logits` are z (log-probabilities, not renormalised),
  generate(...) with the same arguments as GPT.generate, `config` (the base model's), parameters();
- temperature and top-k are applied after combining (greedy = temperature 0); each model keeps its own
  key/value cache during generation;
- all three models must share the vocabulary. A different size is a ValueError; `truncate_vocab=True`
  instead drops the extra trailing entries of the larger models (the released code truncates the expert's
  extra chat tokens). The expert's own prompt format (a chat template in the paper) is not modelled here:
  all three read the same ids;
- z is computed in float32, or in the models' own dtype when that is wider (float64 stays float64).

Copy: minimal/gpt.py, chapters/ch2_additive/proxy_tuning.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimal.gpt import GPT, GPTConfig, GPTOutput


class ProxyTuned(nn.Module):
    """base + alpha (expert - anti_expert) in log-probability space, at every position."""

    def __init__(self, base: GPT, expert: GPT, anti_expert: GPT, alpha: float = 1.0,
                 truncate_vocab: bool = False) -> None:
        super().__init__()
        for role, m in (("base", base), ("expert", expert), ("anti_expert", anti_expert)):
            if not isinstance(m, GPT):
                raise TypeError(f"proxy-tuning: {role} must be a minimal.gpt.GPT, got {type(m).__name__}")
        sizes = {"base": base.config.vocab_size, "expert": expert.config.vocab_size,
                 "anti_expert": anti_expert.config.vocab_size}
        if len(set(sizes.values())) > 1 and not truncate_vocab:
            raise ValueError(f"proxy-tuning needs one vocabulary, got vocab sizes {sizes}; "
                             "pass truncate_vocab=True to cut every model to the smallest")
        self.base, self.expert, self.anti_expert = base, expert, anti_expert
        self.alpha = float(alpha)
        self.vocab_size = min(sizes.values())

    @property
    def config(self) -> GPTConfig:
        """The base model's config, with the shortest block_size of the three (every model sees the ids)."""
        block = min(m.config.block_size for m in (self.base, self.expert, self.anti_expert))
        c = self.base.config
        return GPTConfig(vocab_size=self.vocab_size, block_size=block, n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=c.n_embd, dropout=c.dropout, bias=c.bias, layer_norm_epsilon=c.layer_norm_epsilon)

    def combine(self, s_base: torch.Tensor, s_expert: torch.Tensor, s_anti: torch.Tensor) -> torch.Tensor:
        """Logits [..., V_i] of the three models -> z [..., V] = log p_B + alpha (log p_E - log p_A)."""
        V = self.vocab_size
        dtype = torch.promote_types(torch.promote_types(s_base.dtype, s_expert.dtype), s_anti.dtype)
        dtype = torch.promote_types(dtype, torch.float32)  # bfloat16 logits are combined in float32
        lp_b, lp_e, lp_a = (s[..., :V].to(dtype).log_softmax(-1) for s in (s_base, s_expert, s_anti))
        return lp_b + self.alpha * (lp_e - lp_a)  # [..., V]

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None,
                cache: list | None = None) -> GPTOutput:
        """idx [B, T] -> GPTOutput(logits=z [B, T, V]); `cache` is the (base, expert, anti) caches of a
        previous call. labels give the loss of p~ (same convention as GPT.forward)."""
        caches = cache or (None, None, None)
        outs = [m(idx, cache=c) for m, c in zip((self.base, self.expert, self.anti_expert), caches)]
        z = self.combine(*(o.logits for o in outs))  # [B, T, V]
        loss = None
        if labels is not None:
            B, T = idx.shape
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: position t predicts labels[t+1]
            loss = F.cross_entropy(z.view(B * T, -1), targets.reshape(-1), ignore_index=-100)
        return GPTOutput(logits=z, loss=loss, cache=[o.cache for o in outs])

    # The decoding loop is GPT's own: it only calls self(idx, cache=...) and reads self.config.block_size,
    # so with the combined scores above it samples from p~ (temperature 0: greedy).
    generate = GPT.generate


def proxy_model(base: GPT, expert: GPT, anti_expert: GPT, alpha: float = 1.0,
                truncate_vocab: bool = False) -> ProxyTuned:
    """The proxy-tuned model (usable wherever a GPT is evaluated). In eval mode; nothing is trained."""
    return ProxyTuned(base, expert, anti_expert, alpha, truncate_vocab).eval()


def gap_closed(proxy_score: float, base_score: float, tuned_score: float) -> float:
    """(proxy - base) / (tuned - base): the share of the gain of tuning the big model directly."""
    if tuned_score == base_score:
        raise ValueError("the directly tuned model scores the same as the base: the gap is zero")
    return (proxy_score - base_score) / (tuned_score - base_score)
