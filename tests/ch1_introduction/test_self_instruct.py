"""Self-Instruct loop with a scripted fake proposer: exact pool sizes, each filter, the demo mix."""

from __future__ import annotations

import random

import pytest
import torch

from chapters.ch1_introduction.rouge import rouge_l
from chapters.ch1_introduction.self_instruct import (
    SEED_TASKS,
    FilterConfig,
    model_proposer,
    parse_instructions,
    proposal_prompt,
    rejection_reason,
    sample_demos,
    self_instruct,
)
from minimal.gpt import GPT, GPTConfig
from minimal.tokenizer import get_tokenizer

SEEDS = ["Sort the list of numbers from smallest to largest.", "Translate the sentence into French.",
         "Count the vowels in the word."]

SCRIPT = [
    [
        # LCS with seed 0 = "sort the list of numbers from" + "to" = 7 of 9 and 9 tokens: F = 14/18 = 0.78
        "Sort the list of numbers from largest to smallest.",
        "Describe the picture in one sentence.",  # banned word
        "Hi there",  # 2 words < 3
        "Write a haiku about autumn leaves.",  # kept
        "write a   haiku about autumn leaves",  # the same tokens: duplicate
        "Write a haiku about autumn rain.",  # LCS 5 of 6 and 6: F = 10/12 = 0.83 against the one kept just before
        "123 is the number to double.",  # does not start with a letter
    ],
    [
        "Summarise the paragraph in two sentences.",  # kept
        "List three animals that live in the ocean.",  # kept
        "word " * 200,  # 200 words > 150
    ],
    [],
]


class FakeProposer:
    """Returns the next scripted batch on each call and records the demos it was shown."""

    def __init__(self, script: list[list[str]]) -> None:
        self.script, self.calls = script, 0
        self.seen: list[list[str]] = []

    def __call__(self, demos: list[str], rng: random.Random) -> list[str]:
        self.seen.append(list(demos))
        batch = self.script[self.calls % len(self.script)]
        self.calls += 1
        return list(batch)


def test_pool_size_per_round_and_reasons() -> None:
    fake = FakeProposer(SCRIPT)
    result = self_instruct(SEEDS, fake, rounds=3, n_demos=4, n_seed_demos=3)
    assert result.pool_sizes == [4, 6, 6]
    assert result.generated == ["Write a haiku about autumn leaves.", "Summarise the paragraph in two sentences.",
                                "List three animals that live in the ocean."]
    assert result.pool == SEEDS + result.generated
    first, second, third = result.history
    assert (first.proposed, first.kept) == (7, 1)
    assert first.rejected == {"similar": 2, "banned_word": 1, "too_short": 1, "duplicate": 1, "not_a_letter": 1}
    assert (second.proposed, second.kept, second.rejected) == (3, 2, {"too_long": 1})
    assert (third.proposed, third.kept, third.rejected) == (0, 0, {})


def test_demos_mix_seeds_and_generated() -> None:
    fake = FakeProposer(SCRIPT)
    self_instruct(SEEDS, fake, rounds=3, n_demos=4, n_seed_demos=3)
    assert sorted(fake.seen[0]) == sorted(SEEDS)  # nothing generated yet: seeds only
    assert sorted(fake.seen[1]) == sorted(SEEDS + ["Write a haiku about autumn leaves."])
    assert len(fake.seen[2]) == 4 and sum(d not in SEEDS for d in fake.seen[2]) == 1
    rng = random.Random(0)
    demos = sample_demos(SEED_TASKS, [f"generated {i}" for i in range(5)], 8, 6, rng)
    assert len(demos) == 8 and sum(d in SEED_TASKS for d in demos) == 6  # the paper's 6 human + 2 generated


def test_no_kept_instruction_is_similar_to_an_earlier_one() -> None:
    bank = ["Write a poem about the sea.", "Write a short poem about the sea.", "List facts about the moon.",
            "Give three facts about the moon.", "Explain how rain forms.", "Explain how snow forms in clouds.",
            "Name a fruit that is yellow.", "Name a yellow fruit.", "Describe a calm evening in a town."]

    def random_proposer(demos: list[str], rng: random.Random) -> list[str]:
        return rng.sample(bank, 4)

    a = self_instruct(SEEDS, random_proposer, rounds=5, seed=3)
    b = self_instruct(SEEDS, random_proposer, rounds=5, seed=3)
    assert a.pool == b.pool and a.pool_sizes == b.pool_sizes  # deterministic for a seed
    assert a.pool_sizes == sorted(a.pool_sizes)
    for i, inst in enumerate(a.pool[len(SEEDS):], start=len(SEEDS)):
        assert all(rouge_l(inst, earlier).fmeasure < 0.7 for earlier in a.pool[:i])
    assert 0 < len(a.generated) < len(bank)  # near-duplicates in the bank were refused


def test_rejection_reason_and_threshold() -> None:
    pool = ["write a short poem about the sea"]
    # F = 2*6 / (6 + 7) = 0.92 against the pool
    assert rejection_reason("Write a poem about the sea.", pool) == "similar"
    assert rejection_reason("Write a poem about the sea.", pool, FilterConfig(threshold=0.95)) is None
    assert rejection_reason("Plot the temperature by month.", []) == "banned_word"
    assert rejection_reason("Hello", []) == "too_short"
    assert rejection_reason("one two three four", [], FilterConfig(max_words=3)) == "too_long"
    with pytest.raises(ValueError, match="threshold"):
        FilterConfig(threshold=0)
    with pytest.raises(ValueError, match="seed"):
        self_instruct([], FakeProposer(SCRIPT))
    with pytest.raises(ValueError, match="n_seed_demos"):
        self_instruct(SEEDS, FakeProposer(SCRIPT), n_demos=2, n_seed_demos=3)


def test_prompt_and_parse() -> None:
    prompt = proposal_prompt(["Sort numbers.", "Count vowels."])
    assert prompt == "Come up with a series of tasks:\nTask 1: Sort numbers.\nTask 2: Count vowels.\nTask 3:"
    assert parse_instructions(" Name a color.\nTask 4: Add two numbers.\nsomething else\nTask 5: x") == [
        "Name a color.", "Add two numbers."]
    assert parse_instructions("   \n") == []


def test_model_proposer_runs_and_is_reproducible() -> None:
    enc = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16))
    propose = model_proposer(model, n_samples=3, max_new_tokens=12)
    a = propose(SEED_TASKS[:8], random.Random(5))  # this prompt is longer than 64 - 12 tokens: cut from the left
    b = propose(SEED_TASKS[:8], random.Random(5))
    assert a == b and all(isinstance(s, str) and s for s in a)
    result = self_instruct(SEED_TASKS, propose, rounds=2)
    assert len(result.history) == 2 and result.pool_sizes[-1] >= len(SEED_TASKS)
    with pytest.raises(ValueError, match="block_size"):
        model_proposer(model, max_new_tokens=64)
