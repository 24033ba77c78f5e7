"""k-shot prompting: exactly k demonstrations, never the query, deterministic, truncation reported."""

from __future__ import annotations

import random

import pytest
import torch

from chapters.ch1_introduction.in_context import (
    GENERATE_BUDGET,
    answer_room,
    build_prompt,
    context_cost,
    evaluate_kshot,
    format_demo,
    kshot_prompts,
    max_shots,
    sample_demos,
)
from minimal.data import Example, Task, encode_prompt, get_task
from minimal.gpt import GPT, GPTConfig
from minimal.tokenizer import get_tokenizer

ENC = get_tokenizer()


def toy_task(n_train: int = 30, n_test: int = 6) -> Task:
    train = [Example(f"item {i} is {'odd' if i % 2 else 'even'}", "bad" if i % 2 else "good") for i in range(n_train)]
    test = [Example(f"query {i}", "good") for i in range(n_test)]
    return Task("toy", "classify", {"train": train, "val": test, "test": test}, ["bad", "good"], "toy")


def test_format_is_the_task_format_repeated() -> None:
    demos = [Example("a b", "good"), Example("c", "bad")]
    p = build_prompt(Example("q", "good"), demos)
    assert p.prompt == "a b<|answer|>good<|endoftext|>c<|answer|>bad<|endoftext|>q"
    assert format_demo(demos[0]) == "a b<|answer|>good<|endoftext|>"
    # the model reads the prompt then <|answer|>: n_tokens counts exactly that
    assert p.n_tokens == len(encode_prompt(p.prompt))
    assert p.shots == p.k == 2 and not p.truncated


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_prompt_contains_exactly_k_demonstrations(k: int) -> None:
    task = toy_task()
    for p in kshot_prompts(task, k, block_size=10_000):
        assert p.shots == k and len(p.demos) == k
        assert p.prompt.count("<|answer|>") == k and p.prompt.count("<|endoftext|>") == k
        assert all(d in task.train for d in p.demos)
        assert len({d.prompt for d in p.demos}) == k  # distinct


def test_demonstrations_never_include_the_query() -> None:
    task = get_task("kv_recall")  # train split == test split: every query is also in the pool
    assert task.train == task.test
    for p, q in zip(kshot_prompts(task, 6, max_examples=40, block_size=10_000), task.test[:40]):
        assert q.prompt not in [d.prompt for d in p.demos]
    # with a pool of 3 where one is the query, at most 2 demonstrations exist
    pool = [Example("x", "1"), Example("y", "2"), Example("z", "3")]
    assert {d.prompt for d in sample_demos(pool, pool[1], 2, random.Random(0))} == {"x", "z"}
    with pytest.raises(ValueError, match="only 2"):
        sample_demos(pool, pool[1], 3, random.Random(0))


def test_deterministic_with_a_seed_and_nested_in_k() -> None:
    task = toy_task()
    a = kshot_prompts(task, 4, block_size=10_000, seed=3)
    assert a == kshot_prompts(task, 4, block_size=10_000, seed=3)
    assert [p.prompt for p in a] != [p.prompt for p in kshot_prompts(task, 4, block_size=10_000, seed=4)]
    # k demonstrations are the first k of the draw for k + 2
    for small, big in zip(a, kshot_prompts(task, 6, block_size=10_000, seed=3)):
        assert big.demos[:4] == small.demos
    # different queries get different draws
    assert len({p.demos for p in a}) > 1


def test_truncation_drops_whole_demonstrations_from_the_left_and_is_reported() -> None:
    demos = [Example(f"demo number {i}", "good") for i in range(10)]
    query = Example("the query", "bad")
    full = build_prompt(query, demos)
    room = 2
    block = full.n_tokens + room - 7  # not enough for all ten
    p = build_prompt(query, demos, block_size=block, answer_tokens=room)
    assert p.truncated and p.k == 10 and 0 < p.shots < 10
    assert p.demos == tuple(demos[10 - p.shots:])  # the demonstrations nearest the query are kept
    assert p.n_tokens == len(encode_prompt(p.prompt)) <= block - room
    # one more demonstration would not have fit
    one_more = build_prompt(query, demos[10 - p.shots - 1:])
    assert one_more.n_tokens > block - room
    assert p.prompt.endswith("the query") and p.prompt.startswith(f"demo number {10 - p.shots}")


def test_query_too_long_keeps_zero_shots() -> None:
    query = Example("word " * 200, "good")
    p = build_prompt(query, [Example("a", "bad")], block_size=64, answer_tokens=3)
    assert p.shots == 0 and p.truncated and p.prompt == query.prompt
    assert p.n_tokens == 61  # encode_example cuts the query itself from the left
    with pytest.raises(ValueError, match="answer_tokens"):
        build_prompt(query, [], block_size=4, answer_tokens=4)


def test_answer_room() -> None:
    task = toy_task()
    assert answer_room(task) == max(len(ENC.encode(c)) for c in task.choices) + 1
    assert answer_room(get_task("camel")) == GENERATE_BUDGET == 24


def test_max_shots_and_context_cost_on_a_real_task() -> None:
    task = get_task("sentiment")
    k = max_shots(task, max_examples=20, block_size=128)
    assert k >= 4
    fit = kshot_prompts(task, k, max_examples=20, block_size=128)
    assert not any(p.truncated for p in fit)
    over = kshot_prompts(task, k + 4, max_examples=20, block_size=128)
    assert any(p.truncated for p in over)
    assert all(p.n_tokens + answer_room(task) <= 128 for p in over)
    zero = kshot_prompts(task, 0, max_examples=20, block_size=128)
    tokens, extra = context_cost(fit, zero)
    assert tokens == pytest.approx(sum(p.n_tokens for p in fit) / 20)
    assert extra > 0 and tokens > 2 * (tokens - extra)  # k shots read several times the zero-shot prompt


def test_evaluate_kshot_reports_metric_and_truncation() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=16)).eval()
    before = [p.detach().clone() for p in model.parameters()]
    task = toy_task()
    res = evaluate_kshot(model, task, [0, 2, 25], max_examples=6, seed=0)
    assert [r.k for r in res] == [0, 2, 25]
    assert all(r.metric == "accuracy" and 0 <= r.value <= 1 and r.n_queries == 6 for r in res)
    assert res[0].extra_tokens_per_query == 0 and res[0].n_truncated == 0 and res[0].mean_shots == 0
    assert res[1].n_truncated == 0 and res[1].min_shots == 2 and res[1].extra_tokens_per_query > 0
    assert res[2].n_truncated == 6 and res[2].mean_shots < 25  # 25 demonstrations do not fit 48 tokens
    assert res[2].tokens_per_query <= 48 - answer_room(task)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trains
    assert set(res[1].as_row()) == {"k", "accuracy", "shots_fit (mean/min)", "truncated", "tokens/query",
                                    "extra tokens"}
