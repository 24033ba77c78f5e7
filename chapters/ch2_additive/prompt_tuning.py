"""Prompt tuning: learn a few input embeddings, keep the whole language model frozen.

Paper: Brian Lester, Rami Al-Rfou, Noah Constant, "The Power of Scale for Parameter-Efficient Prompt
Tuning", EMNLP 2021, arXiv 2104.08691 (code: google-research/prompt-tuning).

Idea: prepend P trainable "virtual token" vectors to the embedded input. Nothing inside the network
changes; the frozen model reads the soft prompt the way it reads any other token.

    X_e = wte[x]                      [T, d]   the real tokens (frozen embedding)
    H_0 = [S ; X_e] + wpe[0 : P+T]    [P+T, d] S in R^{P x d} is the soft prompt, the only trained tensor
    loss = CE over the real targets only (the P prompt rows get label -100 and are never predicted)

What trains: S, P*d numbers.

Choices (the paper used T5 with relative positions; this is a GPT with absolute ones):
- positions: the prompt takes positions 0..P-1 and the real tokens P..P+T-1, as in Hugging Face `peft`,
  so P + T must fit in block_size (a longer input is an error, never silently cut);
- the loss is peft's: labels are padded with P values of -100 in front, so the last prompt position
  predicts the first real token when labels[:, 0] is a target (our task batches mask it anyway);
- logits: the model returns only the T real positions ([B, T, V], aligned with idx, unlike peft's P+T),
  so every evaluation that reads `model(idx).logits` works unchanged;
- initialisation: "random" is the paper's uniform [-0.5, 0.5] (peft uses N(0, 1)); "vocab" copies rows
  of wte for ids drawn from the first `population` ids (the paper samples the 5,000 most frequent tokens;
  our BPE ids grow roughly with merge order, peft samples the whole vocabulary), never a special token
  (a drawn special id is drawn again among the ordinary ones: it is no word to start from); "text" embeds an init
  text with the shipped tokenizer, cut or repeated to P tokens (peft's TEXT rule);
- dtype and device: the prompt takes those of wte (it is drawn in float32 on the CPU first, so the random
  init is the same for every dtype and device).

Mechanism: `apply_prompt_tuning` adds the prompt to the model as `model.soft_prompt` and installs two
forward hooks, so `model(idx, labels=...)`, `model(idx).logits` and `model.generate(...)` all see the
prompt while `minimal/gpt.py` stays untouched. During cached generation the prompt is prepended on the
first call only; later calls find it in the key/value cache. Everything is checked and the prompt built
and initialised before the model changes. `count_prompt_tuning` is the trainable count as a formula of the
GPTConfig.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch2_additive/prompt_tuning.py
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig, GPTOutput

INITS = ("random", "vocab", "text")
# the shipped tokenizer's vocabulary size and its special tokens, the last ids (minimal/tokenizer.py: VOCAB_SIZE,
# N_SPECIAL), repeated here so that the "vocab" init needs no tokenizer; a test checks that they agree
SHIPPED_VOCAB_SIZE, SHIPPED_N_SPECIAL = 2048, 16


class SoftPrompt(nn.Module):
    """P trainable embeddings that a forward pre-hook prepends to every input of the model."""

    def __init__(self, n_tokens: int, n_embd: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_tokens, n_embd))  # [P, d]
        self.handles: list = []  # the two hook handles, removed by remove_prompt_tuning

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    def prepend(self, model: GPT, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook: idx [B, T] -> inputs_embeds [B, P+T, d]; labels get P values of -100 in front."""
        if kwargs.get("cache") is not None:
            return None  # a later generation step: the prompt is already in the key/value cache
        idx = args[0] if args else kwargs.pop("idx", None)
        x = model.wte(idx) if idx is not None else kwargs.pop("inputs_embeds")  # [B, T, d]
        B, T, _ = x.shape
        P = self.n_tokens
        if P + kwargs.get("position_offset", 0) + T > model.config.block_size:
            raise ValueError(
                f"prompt tuning: {P} prompt tokens + {T} input tokens exceed block_size "
                f"{model.config.block_size}; shorten the input to at most {model.config.block_size - P} tokens"
            )
        prompt = self.weight.to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # [B, P, d]
        kwargs["inputs_embeds"] = torch.cat([prompt, x], dim=1)  # [B, P+T, d]
        labels = kwargs.get("labels")
        if labels is not None:
            pad = labels.new_full((B, P), -100)  # [B, P]
            kwargs["labels"] = torch.cat([pad, labels], dim=1)  # [B, P+T]
        return (), kwargs

    def drop_prompt_rows(self, model: GPT, args: tuple, kwargs: dict, out: GPTOutput) -> GPTOutput:
        """Forward hook: keep the T real positions of logits and hidden states (the cache keeps all P+T)."""
        if kwargs.get("cache") is not None:
            return out
        P = self.n_tokens
        out.logits = out.logits[:, P:]  # [B, T, V]
        if out.hidden_states is not None:
            out.hidden_states = [h[:, P:] for h in out.hidden_states]  # each [B, T, d]
        return out


def _first_special_id(vocab_size: int) -> int:
    """Ids from here on are special tokens (<|endoftext|>, <|pad|>, ...) for the shipped tokenizer's vocabulary."""
    return SHIPPED_VOCAB_SIZE - SHIPPED_N_SPECIAL if vocab_size == SHIPPED_VOCAB_SIZE else vocab_size


@torch.no_grad()
def init_prompt(
    prompt: SoftPrompt,
    wte: nn.Embedding,
    init: str = "vocab",
    init_text: str | None = None,
    population: int = 5000,
    generator: torch.Generator | None = None,
) -> None:
    """Fill the soft prompt: "random" U(-0.5, 0.5), "vocab" sampled wte rows, "text" embedded init_text."""
    P = prompt.n_tokens
    if init == "random":
        prompt.weight.copy_(torch.empty(prompt.weight.shape).uniform_(-0.5, 0.5, generator=generator))
    elif init == "vocab":
        if population <= 0:
            raise ValueError(f"population must be positive, got {population}")
        ids = torch.randint(0, min(population, wte.num_embeddings), (P,), generator=generator)  # [P]
        ordinary = _first_special_id(wte.num_embeddings)
        while bool((bad := ids >= ordinary).any()):  # a special token is not a word: draw those again
            ids[bad] = torch.randint(0, min(population, ordinary), (int(bad.sum()),), generator=generator)
        prompt.weight.copy_(wte.weight[ids.to(wte.weight.device)])
    elif init == "text":
        if not init_text:
            raise ValueError('init="text" needs a non-empty init_text')
        from minimal.tokenizer import get_tokenizer

        ids = get_tokenizer().encode(init_text)
        ids = (ids * math.ceil(P / len(ids)))[:P]  # cut, or repeat and cut, to P tokens (as peft)
        if max(ids) >= wte.num_embeddings:
            raise ValueError(f"init_text has token id {max(ids)} outside the model's vocabulary {wte.num_embeddings}")
        prompt.weight.copy_(wte.weight[torch.tensor(ids, device=wte.weight.device)])
    else:
        raise ValueError(f"unknown prompt init {init!r}; choose one of {INITS}")


def apply_prompt_tuning(
    model: GPT,
    n_tokens: int = 20,
    init: str = "vocab",
    init_text: str | None = None,
    population: int = 5000,
    seed: int = 0,
) -> Hooks:
    """Freeze `model`, attach a trainable soft prompt of n_tokens vectors, and hook it into forward."""
    if not hasattr(model, "config") or not isinstance(getattr(model, "wte", None), nn.Embedding):
        raise TypeError(f"prompt tuning needs a GPT (model.config, embedding model.wte), got {type(model).__name__}")
    if hasattr(model, "soft_prompt"):
        raise ValueError("this model already has a soft prompt; call remove_prompt_tuning(model) first")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if n_tokens >= model.config.block_size:
        raise ValueError(f"n_tokens ({n_tokens}) leaves no room for input in block_size {model.config.block_size}")
    w = model.wte.weight
    prompt = SoftPrompt(n_tokens, model.config.n_embd).to(w.device, w.dtype)
    init_prompt(prompt, model.wte, init, init_text, population, torch.Generator().manual_seed(seed))
    freeze_base(model)
    model.soft_prompt = prompt  # registered: it trains, counts and saves with the model
    prompt.handles = [
        model.register_forward_pre_hook(prompt.prepend, with_kwargs=True),
        model.register_forward_hook(prompt.drop_prompt_rows, with_kwargs=True),
    ]
    return Hooks()


def remove_prompt_tuning(model: GPT) -> SoftPrompt:
    """Detach the soft prompt (hooks and parameter) and return it; the model is the plain base again."""
    if not hasattr(model, "soft_prompt"):
        raise ValueError("this model has no soft prompt to remove")
    prompt = model.soft_prompt
    for handle in prompt.handles:
        handle.remove()
    del model.soft_prompt
    return prompt


@torch.no_grad()
def nearest_tokens(model: GPT, k: int = 1) -> torch.Tensor:
    """The paper's probe: ids [P, k] of the wte rows with the highest cosine similarity to each prompt vector."""
    if not hasattr(model, "soft_prompt"):
        raise ValueError("this model has no soft prompt")
    s = nn.functional.normalize(model.soft_prompt.weight, dim=-1)  # [P, d]
    e = nn.functional.normalize(model.wte.weight, dim=-1)  # [V, d]
    return (s @ e.T).topk(k, dim=-1).indices  # [P, k]


def count_prompt_tuning(config: GPTConfig, n_tokens: int = 20) -> int:
    """P d: one trainable d-vector per virtual token."""
    return n_tokens * config.n_embd
