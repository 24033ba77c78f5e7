"""Checkers for chapter 1's exercises (`ch1_introduction.ipynb`): training memory by formula, ROUGE-L's LCS,
the k-shot truncation rule, the chat template's loss mask. Each compares with the library on seeded inputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from chapters.exercises import Mismatch, checker, equal, run

# ----------------------------------------------------------------------------------- memory prediction

MEMORY_MODEL, MEMORY_RANK = "llama-2-13b", 64  # not a row of the notebook's table (which uses rank 8)
TOLERANCE_GB = 0.06  # an answer rounded to 0.1 GB passes; LoRA without its fp32 master weights (-0.2 GB) fails


def memory_truth() -> tuple[float, float]:
    """(full fine-tuning, LoRA r=64 on q and v) model-state GB of Llama-2 13B in mixed precision."""
    from chapters.ch1_introduction import cost_model as cm

    shape = cm.llama2_shape(MEMORY_MODEL)
    n, n_t = cm.param_count(shape), cm.lora_param_count(shape, MEMORY_RANK)
    return (cm.model_state_bytes(n, n, "mixed").model_states / cm.GB,
            cm.model_state_bytes(n, n_t, "mixed").model_states / cm.GB)


@checker("ch1.memory")
def check_memory(answer: Any) -> None:
    """answer = (full GB, LoRA GB): the model states of Llama-2 13B in mixed precision, within 0.06 GB."""
    if answer is None or answer is ...:
        raise NotImplementedError
    if not isinstance(answer, (tuple, list)) or len(answer) != 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in answer):
        raise Mismatch(f"the answer should be a pair of numbers (full GB, LoRA GB), got {answer!r}")
    full, lora = (float(x) for x in answer)
    want_full, want_lora = memory_truth()
    if abs(full - want_full) > TOLERANCE_GB:
        hint = " (16 bytes per parameter when every parameter trains)" if full < want_full / 2 else ""
        raise Mismatch(f"full fine-tuning: {want_full:.2f} GB expected, you predicted {full:.2f} GB{hint}")
    if abs(lora - want_lora) > TOLERANCE_GB:
        hint = ""
        if lora > 2 * want_lora:
            hint = " (only the trainable parameters carry gradients, master weights and Adam moments)"
        elif lora < want_lora / 2:
            hint = " (the frozen weights are still held: 2 bytes each in 16 bits)"
        else:
            hint = " (each trainable parameter: 16-bit gradient, fp32 master copy, two fp32 Adam moments)"
        raise Mismatch(f"LoRA: {want_lora:.2f} GB expected, you predicted {lora:.2f} GB{hint}")


# ----------------------------------------------------------------------------------- LCS


def lcs_cases() -> list[tuple[list[str], list[str]]]:
    """Edge cases (empty, equal, disjoint, reordered), then seeded random sequences over a small vocabulary."""
    cases = [([], []), (["a"], []), ([], ["a"]), (["a", "b", "c"], ["a", "b", "c"]), (["a", "b"], ["c", "d"]),
             (["a", "b", "c", "d"], ["b", "d"]), (["a", "x", "b", "y", "c"], ["a", "b", "c"]),
             (["c", "b", "a"], ["a", "b", "c"]), (["a", "a", "b"], ["a", "b", "a", "a"])]
    rng = random.Random(0)
    words = ["the", "a", "list", "sort", "of", "numbers"]
    for n, m in ((5, 9), (12, 7), (20, 20), (1, 15)):
        for _ in range(5):
            cases.append(([rng.choice(words) for _ in range(n)], [rng.choice(words) for _ in range(m)]))
    return cases


@checker("ch1.lcs_length")
def check_lcs_length(lcs: Callable[[list[str], list[str]], int]) -> None:
    """lcs(a, b) must equal chapters.ch1_introduction.rouge.lcs_length (a subsequence: same order, gaps allowed)."""
    from chapters.ch1_introduction.rouge import lcs_length

    for a, b in lcs_cases():
        got = run(lcs, list(a), list(b), what=f"lcs({a}, {b})")
        equal(got, lcs_length(a, b), f"lcs({a}, {b})")


# ----------------------------------------------------------------------------------- k-shot truncation


def kshot_cases() -> list[tuple[list[int], int, int, list[int]]]:
    """(demo lengths, query length, room, indices build_prompt keeps): real prompts of sentiment and family
    at three block sizes, then made-up lengths where the prompt fits exactly."""
    from chapters.ch1_introduction import in_context as icl
    from minimal.data import encode_prompt, get_task
    from minimal.tokenizer import get_tokenizer

    enc = get_tokenizer()
    cases = []
    for name, k in (("sentiment", 8), ("family", 3)):
        task = get_task(name)
        room = icl.answer_room(task)
        for i, query in enumerate(task.test[::40]):
            demos = icl.sample_demos(task.train, query, k, random.Random(i))
            lengths = [len(enc.encode(icl.format_demo(d), allowed_special="all")) for d in demos]
            for block in (128, 96, 64):
                p = icl.build_prompt(query, demos, block, room)
                cases.append((lengths, len(encode_prompt(query.prompt)), block - room, list(range(k - p.shots, k))))
    # exact fits: the prompt may use every token of the room
    cases += [([5, 5, 5], 5, 20, [0, 1, 2]), ([5, 5, 5], 5, 19, [1, 2]), ([9, 1, 1], 3, 5, [1, 2]),
              ([1, 1, 9], 3, 5, []), ([2, 2], 30, 10, []), ([], 4, 10, [])]
    return cases


@checker("ch1.kshot_keep")
def check_kshot_keep(keep: Callable[[list[int], int, int], list[int]]) -> None:
    """keep(demo_lengths, query_len, room) must list the demonstrations that build_prompt keeps."""
    for lengths, query_len, room, want in kshot_cases():
        got = run(keep, list(lengths), query_len, room, what=f"keep({lengths}, {query_len}, {room})")
        got = list(got) if isinstance(got, (list, tuple, range)) else got
        equal(got, want, f"keep(demo lengths {lengths}, query_len {query_len}, room {room})")


# ----------------------------------------------------------------------------------- chat loss mask


def chat_cases() -> list[list[dict[str, str]]]:
    from chapters.ch1_introduction import instruction as it
    from minimal.data import get_task

    task = get_task("sentiment")
    cases = [it.example_to_chat(it.render(task.train[i], it.TEMPLATES["sentiment"][i % 4], task.choices),
                                system="Answer with one word." if i % 2 else None) for i in range(4)]
    cases.append([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue"},
                  {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "green, of course"}])
    cases.append([{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": ""}])
    return cases


@checker("ch1.chat_labels")
def check_chat_labels(encode: Callable[[list[dict[str, str]]], tuple[list[int], list[int]]]) -> None:
    """encode(messages) must equal chapters.ch1_introduction.instruction.encode_chat's (ids, labels)."""
    from chapters.ch1_introduction import instruction as it

    for chat in chat_cases():
        roles = "/".join(m["role"] for m in chat)
        got = run(encode, [dict(m) for m in chat], what=f"encode(a {roles} chat)")
        if not isinstance(got, tuple) or len(got) != 2:
            raise Mismatch(f"encode should return a pair (ids, labels), got {type(got).__name__}")
        ids, labels = (list(t) for t in got)
        want_ids, want_labels = it.encode_chat(chat)
        equal(ids, want_ids, f"{roles} chat: ids")
        if labels != want_labels:
            shown = it.render_loss_mask(ids, labels) if len(labels) == len(ids) else f"{len(labels)} labels"
            raise Mismatch(f"{roles} chat: your loss mask is {shown!r}, expected "
                           f"{it.render_loss_mask(want_ids, want_labels)!r} ([[ ]] marks the tokens with loss)")
