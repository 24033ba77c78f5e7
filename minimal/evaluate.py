"""Evaluation of a (fine-tuned) GPT: perplexity, multiple-choice scores, greedy answers, task metrics.

- `perplexity`: exp(mean next-token loss) over non-overlapping windows of a token stream.
- `choice_logprobs`: the log-probability of each answer choice after each prompt (classification tasks).
- `greedy_answers`: greedy decoding up to <|endoftext|> (generation tasks).
- `evaluate_task`: accuracy (best-scoring choice) or exact match over a task's split, optionally on an
  evenly spaced subset of it (`minimal.data.evaluation_subset`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minimal.data import Example, Task, collate, encode_prompt, evaluation_subset, get_tokenizer
from minimal.tokenizer import special_id


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, block_size: int, max_windows: int = 64) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping windows of the token stream."""
    model.eval()
    device = next(model.parameters()).device
    n = min(max_windows, (len(tokens) - 1) // block_size)
    if n < 1:
        raise ValueError(f"need more than {block_size} tokens for perplexity, got {len(tokens)}")
    windows = tokens[: n * block_size].view(n, block_size).to(device)  # [n, T]
    losses = [model(w, labels=w).loss for w in windows.split(16)]
    weights = [len(w) for w in windows.split(16)]
    return math.exp(sum(loss.item() * k for loss, k in zip(losses, weights)) / sum(weights))


@torch.no_grad()
def choice_logprobs(model: nn.Module, prompts: list[str], choices: list[str], block_size: int) -> torch.Tensor:
    """Log-probability of each choice (its tokens plus <|endoftext|>) after each prompt: [len(prompts), C]."""
    model.eval()
    device = next(model.parameters()).device
    scores = torch.empty(len(prompts), len(choices))
    for i, prompt in enumerate(prompts):
        idx, labels = collate([Example(prompt, c) for c in choices], block_size)  # [C, T]
        idx, labels = idx.to(device), labels.to(device)
        logp = model(idx).logits[:, :-1].log_softmax(-1)  # [C, T-1, V]
        target = labels[:, 1:]  # [C, T-1]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [C, T-1]
        scores[i] = (picked * (target != -100)).sum(-1).cpu()
    return scores


MAX_NEW_TOKENS = 24  # greedy_answers keeps room for this many new tokens after the prompt


@torch.no_grad()
def greedy_answers(model: nn.Module, prompts: list[str], block_size: int,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy decoding of each prompt's answer, up to <|endoftext|>. Prompts of equal length share a batch."""
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_prompt(p)[-(block_size - max_new_tokens):] for p in prompts]
    answers: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for rows in by_len.values():
        idx = torch.tensor([encoded[i] for i in rows], device=device)  # [b, T]
        out = model.generate(idx, max_new_tokens, temperature=0.0, stop_token=eot)[:, idx.shape[1]:]
        for i, toks in zip(rows, out.tolist()):
            toks = toks[: toks.index(eot)] if eot in toks else toks
            answers[i] = enc.decode(toks)
    return answers


def evaluate_task(model: nn.Module, task: Task, split: str = "test", max_examples: int | None = None,
                  block_size: int | None = None) -> dict[str, float]:
    """{'accuracy': ...} for classification (best-scoring choice), {'exact_match': ...} for generation.

    With max_examples=n the score rests on n examples evenly spaced over the split (`evaluation_subset`).
    """
    block_size = block_size or model.config.block_size
    data = evaluation_subset(task.splits.get(split, []), max_examples)
    if not data:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    prompts = [ex.prompt for ex in data]
    if task.kind == "classify":
        pred = choice_logprobs(model, prompts, task.choices, block_size).argmax(-1).tolist()
        return {"accuracy": sum(task.choices[p] == ex.answer for p, ex in zip(pred, data)) / len(data)}
    answers = greedy_answers(model, prompts, block_size)
    return {"exact_match": sum(a.strip() == ex.answer for a, ex in zip(answers, data)) / len(data)}
