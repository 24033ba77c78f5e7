"""In-context learning: k-shot prompting of a frozen model, its accuracy against k, and its context cost.

Paper: "Language Models are Few-Shot Learners" (GPT-3; Brown et al., NeurIPS 2020, arXiv 2005.14165).
Instead of training, condition the frozen model on k solved examples (demonstrations) placed before the
query, and read the answer off the model:

    y_hat = argmax_{y in choices} log p_theta(y | demo_1, ..., demo_k, x)        (rank classification)

and greedy decoding for generation tasks. Nothing trains, but every query pays for the demonstrations in
context: the model reads about k times more tokens per call, and k is bounded by the context window.

The prompt is the task's own format (minimal/data.py) repeated, then the query:

    p_1<|answer|>a_1<|endoftext|> p_2<|answer|>a_2<|endoftext|> ... p_k<|answer|>a_k<|endoftext|> x<|answer|>

(without the spaces), so the scoring and decoding of `minimal.evaluate.evaluate_task` apply unchanged: the
k-shot prompt simply replaces the query's prompt.

Choices made here:
- Demonstrations come from the training split; for query i they are drawn with `random.Random(f"{seed}-{i}")`
  one at a time without replacement, so the k demonstrations are a prefix of the k+1 (accuracy against k
  compares nested prompts, less noisy than fresh draws) and a run is reproducible. Any training example
  with the query's prompt is excluded, so a demonstration never gives the answer away (kv_recall's train
  split *is* its test split). Labels are not balanced; the draw is uniform, as in GPT-3.
- Truncation: the prompt plus the longest possible answer must fit the model's block. When k
  demonstrations do not fit, whole demonstrations are dropped from the left (the ones farthest from the
  query) until the rest fits; `KShotPrompt.shots` records how many were kept and every result reports the
  mean and minimum number of shots that fit and how many queries were truncated. A query too long even at
  zero shots is cut from the left by `encode_example`, as everywhere in the repo.
- Context cost: the tokens the model reads before answering (prompt and `<|answer|>`), per query; the cost
  of k shots is reported against zero shots.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from minimal.data import Example, Task, encode_prompt, evaluation_subset
from minimal.evaluate import MAX_NEW_TOKENS, evaluate_task
from minimal.tokenizer import get_tokenizer

# greedy_answers keeps room for this many new tokens after the prompt; a generation query must leave it free
GENERATE_BUDGET = MAX_NEW_TOKENS


def format_demo(example: Example) -> str:
    """One demonstration in the task's format: prompt<|answer|>answer<|endoftext|>."""
    return f"{example.prompt}<|answer|>{example.answer}<|endoftext|>"


@dataclass(frozen=True)
class KShotPrompt:
    """A query prompt with its demonstrations: `prompt` is what the query's prompt becomes."""

    prompt: str  # the kept demonstrations, then the query's prompt (encode_prompt appends <|answer|>)
    demos: tuple[Example, ...]  # the demonstrations kept, in prompt order
    k: int  # demonstrations asked for
    n_tokens: int  # tokens read before answering (prompt and <|answer|>), at most block - answer room

    @property
    def shots(self) -> int:
        """Demonstrations that fit (<= k)."""
        return len(self.demos)

    @property
    def truncated(self) -> bool:
        return self.shots < self.k


def answer_room(task: Task) -> int:
    """Tokens to keep free after the prompt: the longest choice and <|endoftext|>, or the decoding budget."""
    if task.kind == "classify":
        enc = get_tokenizer()
        return max(len(enc.encode(c, allowed_special="all")) for c in task.choices) + 1
    return GENERATE_BUDGET


def build_prompt(query: Example, demos: Sequence[Example], block_size: int | None = None,
                 answer_tokens: int = 0) -> KShotPrompt:
    """The k-shot prompt for `query`; with a block size, drop demonstrations from the left until
    prompt tokens + answer_tokens <= block_size (the shots kept are recorded in the result)."""
    if block_size is not None and answer_tokens >= block_size:
        raise ValueError(f"answer_tokens ({answer_tokens}) must be smaller than block_size ({block_size})")
    demos = tuple(demos)
    k = len(demos)
    query_len = len(encode_prompt(query.prompt))
    enc = get_tokenizer()
    lengths = [len(enc.encode(format_demo(d), allowed_special="all")) for d in demos]
    start = 0
    if block_size is not None:
        room = block_size - answer_tokens
        total = query_len + sum(lengths)
        while start < k and total > room:
            total -= lengths[start]
            start += 1
    kept = demos[start:]
    n_tokens = query_len + sum(lengths[start:])
    if block_size is not None:
        n_tokens = min(n_tokens, block_size - answer_tokens)  # a too-long query is cut by encode_example
    return KShotPrompt("".join(format_demo(d) for d in kept) + query.prompt, kept, k, n_tokens)


def sample_demos(pool: Sequence[Example], query: Example, k: int, rng: random.Random) -> list[Example]:
    """k distinct examples of the pool drawn one at a time (a prefix of the draw for k + 1), never one with
    the query's prompt."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    allowed = [i for i, ex in enumerate(pool) if ex.prompt != query.prompt]
    if k > len(allowed):
        raise ValueError(f"asked for {k} demonstrations but only {len(allowed)} examples are available")
    picked: list[int] = []
    chosen: set[int] = set()
    while len(picked) < k:
        i = allowed[rng.randrange(len(allowed))]
        if i not in chosen:
            chosen.add(i)
            picked.append(i)
    return [pool[i] for i in picked]


def kshot_prompts(task: Task, k: int, split: str = "test", demo_split: str = "train",
                  max_examples: int | None = None, block_size: int = 128, seed: int = 0) -> list[KShotPrompt]:
    """One k-shot prompt per query of `split` (max_examples evenly spaced ones), demonstrations from `demo_split`."""
    queries = evaluation_subset(task.splits[split], max_examples)
    if not queries:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    pool = task.splits[demo_split]
    room = answer_room(task)
    return [build_prompt(q, sample_demos(pool, q, k, random.Random(f"{seed}-{i}")), block_size, room)
            for i, q in enumerate(queries)]


def max_shots(task: Task, split: str = "test", demo_split: str = "train", max_examples: int | None = None,
              block_size: int = 128, seed: int = 0) -> int:
    """The largest k for which no query's prompt is truncated (with the same draws as `kshot_prompts`)."""
    k_cap = min(len(task.splits[demo_split]) - 1, block_size // 2)  # a demonstration is at least 2 tokens
    return min(p.shots for p in kshot_prompts(task, k_cap, split, demo_split, max_examples, block_size, seed))


@dataclass
class KShotResult:
    k: int  # demonstrations asked for
    metric: str  # "accuracy" or "exact_match"
    value: float
    mean_shots: float  # demonstrations that fit, on average over the queries
    min_shots: int
    n_truncated: int  # queries that kept fewer than k demonstrations
    n_queries: int
    tokens_per_query: float  # mean tokens read before answering
    extra_tokens_per_query: float  # the same minus the zero-shot prompt: the context cost of the shots

    def as_row(self) -> dict[str, float | int | str]:
        return {"k": self.k, self.metric: round(self.value, 3), "shots_fit (mean/min)":
                f"{self.mean_shots:.1f}/{self.min_shots}", "truncated": f"{self.n_truncated}/{self.n_queries}",
                "tokens/query": round(self.tokens_per_query, 1), "extra tokens": round(self.extra_tokens_per_query, 1)}


def context_cost(prompts: Sequence[KShotPrompt], zero_shot: Sequence[KShotPrompt]) -> tuple[float, float]:
    """(mean tokens per query, mean extra tokens per query over the zero-shot prompts)."""
    if len(prompts) != len(zero_shot) or not prompts:
        raise ValueError(f"need equally many (>0) prompts, got {len(prompts)} and {len(zero_shot)}")
    mean = sum(p.n_tokens for p in prompts) / len(prompts)
    return mean, mean - sum(p.n_tokens for p in zero_shot) / len(zero_shot)


def evaluate_kshot(model: nn.Module, task: Task, ks: Sequence[int], split: str = "test", demo_split: str = "train",
                   max_examples: int | None = None, seed: int = 0) -> list[KShotResult]:
    """Accuracy (or exact match) of the frozen model with k demonstrations, for each k; nothing trains."""
    block = model.config.block_size
    zero = kshot_prompts(task, 0, split, demo_split, max_examples, block, seed)
    queries = evaluation_subset(task.splits[split], max_examples)
    results = []
    for k in ks:
        prompts = zero if k == 0 else kshot_prompts(task, k, split, demo_split, max_examples, block, seed)
        shown = Task(task.name, task.kind, {split: [Example(p.prompt, q.answer) for p, q in zip(prompts, queries)]},
                     list(task.choices), f"{k}-shot {task.description}")
        (metric, value), = evaluate_task(model, shown, split, block_size=block).items()
        tokens, extra = context_cost(prompts, zero)
        shots = [p.shots for p in prompts]
        results.append(KShotResult(k, metric, value, sum(shots) / len(shots), min(shots),
                                   sum(p.truncated for p in prompts), len(prompts), tokens, extra))
    return results
