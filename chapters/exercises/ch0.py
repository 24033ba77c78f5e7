"""Checkers for chapter 0's exercises (`ch0_minimal_gpt.ipynb`): parameter count, BPE merge, causal mask,
answer-only labels. Each compares the student's function with the library on several seeded inputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, equal, run

# ----------------------------------------------------------------------------------- parameter count

# (vocab_size, block_size, n_layer, n_head, n_embd, bias): small, so the checker builds each model quickly
CONFIGS = ((2048, 128, 4, 4, 128, True), (2048, 128, 2, 2, 64, True), (300, 16, 3, 2, 24, True),
           (50, 7, 1, 1, 8, True), (300, 16, 3, 2, 24, False), (97, 33, 2, 4, 32, False))


@checker("ch0.param_count")
def check_param_count(count: Callable[[Any], int]) -> None:
    """count(cfg) must equal the number of parameters of GPT(cfg), counted from its tensors."""
    from minimal.gpt import GPT, GPTConfig

    for V, T, L, H, d, bias in CONFIGS:
        cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=d, bias=bias)
        got = run(count, cfg, what=f"count(GPTConfig(V={V}, T={T}, L={L}, d={d}, bias={bias}))")
        if isinstance(got, bool) or not isinstance(got, int):
            raise Mismatch(f"the count should be an int, got {got!r}")
        want = sum(p.numel() for p in GPT(cfg).parameters())  # a tied tensor is counted once
        if got != want:
            hint = ""
            if got - want == V * d:
                hint = " (the output head is tied to wte: it adds no parameters)"
            elif not bias and got > want:
                hint = " (with bias=False neither the linears nor the LayerNorms have a bias)"
            raise Mismatch(f"V={V}, T={T}, L={L}, d={d}, bias={bias}: GPT has {want:,} parameters, "
                           f"you counted {got:,}{hint}")


# ----------------------------------------------------------------------------------- BPE merge


def merge_cases() -> list[tuple[list[int], tuple[int, int], int]]:
    """Hand-picked edge cases (overlaps, ends, no occurrence), then seeded random lists of few symbols."""
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([1, 1, 1], (1, 1), 9), ([1, 1, 1, 1], (1, 1), 9), ([], (1, 2), 9),
             ([1], (1, 2), 9), ([2, 1], (1, 2), 9), ([3, 1, 2], (1, 2), 9), ([5, 5, 6, 5, 5, 5], (5, 5), 7)]
    rng = random.Random(0)
    for n in (5, 12, 40):
        for _ in range(6):
            ids = [rng.randrange(4) for _ in range(n)]
            cases.append((ids, (rng.randrange(4), rng.randrange(4)), 256 + rng.randrange(50)))
    return cases


@checker("ch0.merge_pair")
def check_merge_pair(merge: Callable[[list[int], tuple[int, int], int], list[int]]) -> None:
    """merge(ids, pair, new_id) must equal minimal.tokenizer.merge_pair and leave `ids` unchanged."""
    from minimal.tokenizer import merge_pair

    for ids, pair, new_id in merge_cases():
        given = list(ids)
        got = run(merge, given, pair, new_id, what=f"merge({ids}, {pair}, {new_id})")
        if given != ids:
            raise Mismatch(f"merge({ids}, {pair}, {new_id}) changed its input list to {given}; return a new list")
        equal(list(got) if isinstance(got, (list, tuple)) else got, merge_pair(ids, pair, new_id),
              f"merge({ids}, {pair}, {new_id})")


# ----------------------------------------------------------------------------------- causal mask

# (queries T, cached keys C): C > 0 is one decoding step of generate() with a KV cache
MASK_CASES = ((5, 0), (1, 0), (3, 4), (1, 6), (4, 2))


def attention_with_mask(attn: torch.nn.Module, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
                        mask: torch.Tensor) -> torch.Tensor:
    """The attention module's computation with a given bool mask [T, S] (True: the query may see the key)."""
    B, T, d = x.shape
    H = attn.n_head
    q, k, v = (t.view(B, T, H, d // H).transpose(1, 2) for t in attn.c_attn(x).split(d, dim=2))  # [B, H, T, hd]
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B, H, S, hd]
    att = (q @ k.transpose(-2, -1)) / (d // H) ** 0.5  # [B, H, T, S]
    y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v  # [B, H, T, hd]
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, d))


@checker("ch0.causal_mask")
def check_causal_mask(make_mask: Callable[[int, int], torch.Tensor]) -> None:
    """make_mask(T, S) is used as the mask of the library's attention (with and without a KV cache); the output
    must equal `CausalSelfAttention.forward`."""
    from minimal.gpt import CausalSelfAttention, GPTConfig

    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_layer=1, n_head=2, n_embd=16)).eval()
    for T, C in MASK_CASES:
        S = C + T
        mask = run(make_mask, T, S, what=f"make_mask(T={T}, S={S})")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (T, S):
            raise Mismatch(f"make_mask(T={T}, S={S}) should be a bool tensor of shape ({T}, {S}), got "
                           f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        g = torch.Generator().manual_seed(T * 10 + C)
        first, x = torch.randn(2, C, 16, generator=g), torch.randn(2, T, 16, generator=g)
        with torch.no_grad():
            cache = attn(first)[1] if C else None  # keys and values of C earlier tokens
            want = attn(x, cache=cache)[0]
            got = attention_with_mask(attn, x, cache, mask)
        if torch.isnan(got).any():
            raise Mismatch(f"T={T}, S={S}: a query sees no key at all (its row of the mask is all False)")
        close(got, want, f"attention output with your mask, T={T} queries after C={C} cached keys", atol=1e-5)


# ----------------------------------------------------------------------------------- answer-only labels

BLOCKS = (128, 24, 10)  # 24 and 10 cut long prompts


@checker("ch0.answer_labels")
def check_answer_labels(encode: Callable[[list[int], list[int], int], tuple[list[int], list[int]]]) -> None:
    """encode(prompt_ids, answer_ids, block_size) must equal minimal.data.encode_example's (ids, labels)."""
    from minimal.data import encode_example, encode_prompt, get_task
    from minimal.tokenizer import get_tokenizer, special_id

    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    examples = [get_task(name).train[i] for name in ("sentiment", "family", "camel") for i in (0, 7, 31)]
    for block in BLOCKS:
        for ex in examples:
            prompt_ids = encode_prompt(ex.prompt)
            answer_ids = enc.encode(ex.answer, allowed_special="all") + [eot]
            if len(answer_ids) >= block:
                continue
            want_ids, want_labels = encode_example(ex, block)
            got = run(encode, list(prompt_ids), list(answer_ids), block,
                      what=f"encode(<{len(prompt_ids)} prompt ids>, <{len(answer_ids)} answer ids>, {block})")
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"encode should return a pair (ids, labels), got {type(got).__name__}")
            ids, labels = (list(t.tolist() if isinstance(t, torch.Tensor) else t) for t in got)
            where = f"{ex.prompt[:30]!r}... with block_size {block}"
            if len(ids) != len(labels):
                raise Mismatch(f"{where}: ids and labels differ in length ({len(ids)} vs {len(labels)})")
            equal(ids, want_ids, f"{where}: ids")
            if labels != want_labels:
                n_got, n_want = sum(x != -100 for x in labels), sum(x != -100 for x in want_labels)
                raise Mismatch(f"{where}: {n_got} labels carry loss, expected {n_want} (the answer and "
                               f"<|endoftext|>; labels are aligned with the ids, the model shifts them itself); "
                               f"got {labels[-6:]} at the end, expected {want_labels[-6:]}")
