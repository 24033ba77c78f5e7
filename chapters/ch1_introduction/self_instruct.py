"""A miniature Self-Instruct: grow a pool of instructions from a few seeds with the model itself.

Paper: "Self-Instruct: Aligning Language Models with Self-Generated Instructions" (Wang et al., ACL 2023,
arXiv 2212.10560; code yizhongw/self-instruct).

Idea: start from a small pool of human-written task instructions; repeatedly show the model a few of
them as in-context examples and let it write new ones; keep a new instruction only if it is not too
similar to anything already in the pool; the growing pool becomes instruction-tuning data.

One round here (the paper's instruction-generation step and its filter):

    demos      = sample(seeds, n_seed_demos) + sample(generated, n_demos - n_seed_demos)   (6 + 2 in the paper)
    candidates = propose(demos)
    keep c     iff  length bounds hold, c has no banned word, starts with a letter, is not a duplicate,
                    and max_{p in pool} ROUGE-L(c, p) < 0.7
    pool       = pool + kept (checked one by one, so two near-identical candidates cannot both enter)

Nothing trains here: `propose` is any callable `(demos, rng) -> candidates`; `model_proposer` builds one
from a GPT (sampling continuations of a numbered task list), and tests pass a deterministic fake.

Choices made here: the paper's later steps (deciding whether a task is classification, generating input
and output instances input-first or output-first, filtering instances) are left out; the miniature stops
at instructions. The banned words follow the paper's idea (things a text-only model cannot do: images,
files, audio, ...) in our own list. Generated demos are used only once some exist; until then all demos are
seeds. ROUGE-L is ours (rouge.py), on lowercased alphanumeric tokens.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chapters.ch1_introduction.rouge import rouge_l, tokenize
from minimal.gpt import GPT
from minimal.tokenizer import get_tokenizer, special_id

Proposer = Callable[[list[str], random.Random], list[str]]

SEED_TASKS = [
    "Decide whether this movie review is positive or negative.",
    "Convert the given snake_case function name to CamelCase.",
    "Translate the sentence into the other language.",
    "Sort the list of numbers from smallest to largest.",
    "Write a one-line docstring for the following Python function.",
    "Name the standard-library module that this documentation comes from.",
    "Reverse the order of the words in the sentence.",
    "Count how many vowels the word contains.",
    "Give a synonym for the adjective.",
    "Rewrite the sentence in the passive voice.",
    "Explain what the error message means in plain words.",
    "Turn the list of key and value pairs into a dictionary literal.",
]

BANNED_WORDS = ("image", "images", "picture", "pictures", "photo", "photos", "video", "videos", "audio", "sound",
                "music", "file", "files", "graph", "graphs", "chart", "diagram", "flowchart", "draw", "plot",
                "map", "maps", "website", "click")


@dataclass(frozen=True)
class FilterConfig:
    threshold: float = 0.7  # reject when ROUGE-L F >= threshold against any instruction in the pool
    min_words: int = 3
    max_words: int = 150
    banned_words: tuple[str, ...] = BANNED_WORDS

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0 < self.min_words <= self.max_words:
            raise ValueError(f"need 0 < min_words <= max_words, got {self.min_words}, {self.max_words}")


def rejection_reason(candidate: str, pool: list[str], cfg: FilterConfig = FilterConfig()) -> str | None:
    """Why the candidate is rejected ('too_short', 'too_long', 'banned_word', 'not_a_letter', 'duplicate',
    'similar'), or None when it is kept. The checks run cheapest first."""
    tokens = tokenize(candidate)
    if len(tokens) < cfg.min_words:
        return "too_short"
    if len(tokens) > cfg.max_words:
        return "too_long"
    if set(tokens) & set(cfg.banned_words):
        return "banned_word"
    if not candidate.strip()[:1].isalpha():
        return "not_a_letter"
    if any(tokenize(p) == tokens for p in pool):
        return "duplicate"
    if any(rouge_l(tokens, tokenize(p)).fmeasure >= cfg.threshold for p in pool):
        return "similar"
    return None


@dataclass
class RoundStats:
    round: int
    proposed: int
    kept: int
    rejected: dict[str, int]  # reason -> count
    pool_size: int  # after the round


@dataclass
class SelfInstructResult:
    pool: list[str]  # seeds first, then kept instructions in the order they were accepted
    generated: list[str]
    history: list[RoundStats] = field(default_factory=list)

    @property
    def pool_sizes(self) -> list[int]:
        return [r.pool_size for r in self.history]


def sample_demos(seeds: list[str], generated: list[str], n_demos: int, n_seed_demos: int,
                 rng: random.Random) -> list[str]:
    """n_seed_demos seeds plus (n_demos - n_seed_demos) generated instructions (seeds fill any shortfall)."""
    n_gen = min(n_demos - n_seed_demos, len(generated))
    picked_gen = rng.sample(generated, n_gen)
    picked_seed = rng.sample(seeds, min(n_demos - n_gen, len(seeds)))
    demos = picked_seed + picked_gen
    rng.shuffle(demos)
    return demos


def self_instruct(seeds: list[str], propose: Proposer, rounds: int = 3, requests_per_round: int = 1,
                  n_demos: int = 8, n_seed_demos: int = 6, cfg: FilterConfig = FilterConfig(),
                  seed: int = 0) -> SelfInstructResult:
    """Run the generate-then-filter loop; `history[i].pool_size` is the pool size after round i+1."""
    if not seeds:
        raise ValueError("Self-Instruct needs at least one seed instruction")
    if rounds <= 0 or requests_per_round <= 0:
        raise ValueError(f"rounds and requests_per_round must be positive, got {rounds}, {requests_per_round}")
    if not 0 < n_seed_demos <= n_demos:
        raise ValueError(f"need 0 < n_seed_demos <= n_demos, got {n_seed_demos}, {n_demos}")
    rng = random.Random(seed)
    result = SelfInstructResult(pool=list(seeds), generated=[])
    for r in range(1, rounds + 1):
        proposed, kept, rejected = 0, 0, Counter()
        for _ in range(requests_per_round):
            demos = sample_demos(seeds, result.generated, n_demos, n_seed_demos, rng)
            for candidate in propose(demos, rng):
                proposed += 1
                candidate = " ".join(candidate.split())
                reason = rejection_reason(candidate, result.pool, cfg)
                if reason is None:
                    result.pool.append(candidate)
                    result.generated.append(candidate)
                    kept += 1
                else:
                    rejected[reason] += 1
        result.history.append(RoundStats(r, proposed, kept, dict(rejected), len(result.pool)))
    return result


# ------------------------------------------------------------------------------------------ the model


def proposal_prompt(demos: list[str]) -> str:
    """A numbered task list that ends where the model should write the next task."""
    lines = "".join(f"Task {i}: {d}\n" for i, d in enumerate(demos, start=1))
    return f"Come up with a series of tasks:\n{lines}Task {len(demos) + 1}:"


_TASK_LINE = re.compile(r"^Task \d+:(.*)$")


def parse_instructions(continuation: str) -> list[str]:
    """The instructions in the model's continuation of `proposal_prompt`: the rest of the open line, then
    every further 'Task N: ...' line. Other lines end the list."""
    lines = continuation.split("\n")
    found = [lines[0].strip()]
    for line in lines[1:]:
        m = _TASK_LINE.match(line.strip())
        if m is None:
            break
        found.append(m.group(1).strip())
    return [f for f in found if f]


def model_proposer(model: GPT, n_samples: int = 4, max_new_tokens: int = 32, temperature: float = 1.0,
                   top_k: int | None = 50) -> Proposer:
    """A proposer that samples n_samples continuations of the demo list from a GPT (minimal/gpt.py).

    The prompt keeps its last (block_size - max_new_tokens) tokens if it is too long. Sampling uses a
    torch.Generator seeded from the loop's rng, so a run is reproducible.
    """
    if n_samples <= 0 or max_new_tokens <= 0:
        raise ValueError(f"n_samples and max_new_tokens must be positive, got {n_samples}, {max_new_tokens}")
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    block = model.config.block_size
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than block_size ({block})")
    device = next(model.parameters()).device

    def propose(demos: list[str], rng: random.Random) -> list[str]:
        ids = enc.encode(proposal_prompt(demos), allowed_special="all")[-(block - max_new_tokens):]
        idx = torch.tensor([ids] * n_samples, device=device)  # [n, T]
        gen = torch.Generator(device=device).manual_seed(rng.getrandbits(63))
        model.eval()
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, stop_token=eot,
                             generator=gen)[:, idx.shape[1]:]  # [n, new]
        found = []
        for row in out.tolist():
            row = row[: row.index(eot)] if eot in row else row
            found += parse_instructions(enc.decode(row))
        return found

    return propose
