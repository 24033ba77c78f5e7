"""Instruction templates (deterministic, held-out sets disjoint) and the chat loss mask (answers only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chapters.ch1_introduction.instruction import (
    TEMPLATES,
    Template,
    build_mixture,
    chat_text,
    collate_chats,
    encode_chat,
    example_to_chat,
    instruct_task,
    render,
    render_loss_mask,
    task_family,
)
from minimal.data import Example, Task, collate, get_task
from minimal.gpt import GPT, GPTConfig
from minimal.tokenizer import get_tokenizer, special_id

ENC = get_tokenizer()
EOT = special_id(ENC, "<|endoftext|>")


def small_task(name: str, kind: str, n: int, choices: list[str] | None = None) -> Task:
    """A stand-in for a suite task (the real ones take seconds to build from the standard library)."""
    splits = {s: [Example(f"{name} {s} input {i}", choices[i % len(choices)] if choices else f"out{i}")
                  for i in range(n)] for s in ("train", "val", "test")}
    return Task(name, kind, splits, choices or [])


def suite() -> list[Task]:
    return [get_task("sentiment"), small_task("family", "classify", 20, ["files", "math", "text"]),
            small_task("camel", "generate", 20), small_task("translate_a_b", "generate", 20)]


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is the movie good?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "And the book?"},
        {"role": "assistant", "content": "not really"}]


def test_every_family_has_several_templates_and_one_task() -> None:
    for family, templates in TEMPLATES.items():
        assert len(templates) >= 3, family
        assert len({t.prompt for t in templates}) == len(templates), family  # no duplicate templates
    assert task_family("translate_c_a") == "translation" and task_family("camel") == "formatting"
    with pytest.raises(ValueError, match="no task family"):
        task_family("nope")


def test_render_and_inverted_template() -> None:
    ex = Example("the film was dull", "bad")
    assert render(ex, Template("Review: {input}\nAnswer {choices}."), ["bad", "good"]) == Example(
        "Review: the film was dull\nAnswer bad, good.", "bad")
    inverted = Template("Write a short {answer} review.", answer="{input}")
    assert inverted.inverted and not Template("{input}").inverted
    assert render(ex, inverted) == Example("Write a short bad review.", "the film was dull")
    # braces inside the data are not format fields
    assert render(Example("f({x})", "y"), Template("{input}")).prompt == "f({x})"


def test_mixture_is_deterministic_and_seed_dependent() -> None:
    a = build_mixture(suite(), seed=1)
    b = build_mixture(suite(), seed=1)
    c = build_mixture(suite(), seed=2)
    assert a == b
    assert a != c
    assert len(a) == len(get_task("sentiment").train) + 60


def test_mixture_uses_several_templates_per_task() -> None:
    mix = build_mixture([get_task("sentiment")], max_per_task=400, seed=0)
    assert len(mix) == 400
    used = {i for ex in mix for i, t in enumerate(TEMPLATES["sentiment"])
            if ex.prompt.startswith(t.prompt.split("{")[0])}
    assert len(used) >= 4
    assert any(ex.answer not in ("good", "bad") for ex in mix)  # inverted examples are present
    assert all(ex.answer in ("good", "bad") for ex in build_mixture([get_task("sentiment")], inverted=False))


def test_held_out_family_never_in_training_data() -> None:
    tasks = suite()
    mix = build_mixture(tasks, held_out_families=("translation",))
    held_inputs = {ex.prompt for ex in tasks[3].train}
    assert not any(h in ex.prompt or h in ex.answer for ex in mix for h in held_inputs)
    assert len(mix) == sum(len(t.train) for t in tasks[:3])
    with pytest.raises(ValueError, match="unknown task families"):
        build_mixture(tasks, held_out_families=("poetry",))
    with pytest.raises(ValueError, match="nothing to train on"):
        build_mixture(tasks[1:2], held_out_families=("topic",))


def test_held_out_template_never_in_training_data() -> None:
    task = small_task("camel", "generate", 30)
    train = build_mixture([task], template_ids=[0, 1, 2, 3])
    held = {render(ex, TEMPLATES["formatting"][4]).prompt for ex in task.train}
    assert held.isdisjoint(ex.prompt for ex in train)
    evaluated = instruct_task(task, template_ids=[4])
    assert {ex.prompt for ex in evaluated.train} == held


def test_instruct_task_keeps_kind_choices_and_answers() -> None:
    task = get_task("sentiment")
    inst = instruct_task(task, seed=0)
    assert inst.kind == task.kind and inst.choices == task.choices
    for split in ("train", "test"):
        assert [ex.answer for ex in inst.splits[split]] == [ex.answer for ex in task.splits[split]]
        assert all(orig.prompt in ex.prompt for orig, ex in zip(task.splits[split], inst.splits[split], strict=True))
    assert instruct_task(task, seed=0).test == inst.test  # deterministic
    with pytest.raises(ValueError, match="no usable template"):
        instruct_task(task, template_ids=[4])  # only the inverted one
    with pytest.raises(ValueError, match="out of range"):
        instruct_task(task, template_ids=[9])


def test_instruction_examples_batch_with_the_shared_collate() -> None:
    idx, labels = collate(build_mixture(suite(), max_per_task=4), block_size=96)
    assert idx.shape == labels.shape and (labels != -100).any(dim=1).all()


# ------------------------------------------------------------------------------------------ chat


def test_chat_ids_equal_encoding_the_rendered_text() -> None:
    ids, _ = encode_chat(CHAT)
    text = chat_text(CHAT)
    assert text == ("<|system|>Be brief.<|user|>Is the movie good?<|assistant|>yes<|endoftext|>"
                    "<|user|>And the book?<|assistant|>not really<|endoftext|>")
    assert ids == ENC.encode(text, allowed_special="all")


def test_only_response_tokens_carry_loss() -> None:
    ids, labels = encode_chat(CHAT)
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    answers = ENC.encode("yes") + [EOT] + ENC.encode("not really") + [EOT]
    assert trained == answers
    assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))  # labels aligned with ids
    assistant = special_id(ENC, "<|assistant|>")
    assert all(lab == -100 for t, lab in zip(ids, labels, strict=True) if t == assistant)  # the role marker is prompt
    assert render_loss_mask(ids, labels) == ("<|system|>Be brief.<|user|>Is the movie good?<|assistant|>"
                                             "[[yes<|endoftext|>]]<|user|>And the book?<|assistant|>"
                                             "[[not really<|endoftext|>]]")


def test_gradient_flows_only_from_answer_targets() -> None:
    # with labels aligned to ids, position t predicts token t+1: d loss / d logits[t] is non-zero
    # exactly where labels[t+1] != -100 (the off-by-one check of the spec, section 1.4)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16))
    idx, labels = collate_chats([CHAT, example_to_chat(Example("hi", "hello"))], block_size=64)
    logits = model(idx).logits.detach().requires_grad_(True)  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    assert torch.allclose(loss, model(idx, labels=labels).loss)
    loss.backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # [B, T]
    expected = torch.zeros_like(has_grad)
    expected[:, :-1] = labels[:, 1:] != -100
    assert torch.equal(has_grad, expected)
    # with every position an answer, the loss is the plain language-model loss
    assert torch.allclose(model(idx, labels=idx).loss,
                          F.cross_entropy(model(idx).logits[:, :-1].reshape(-1, ENC.n_vocab), idx[:, 1:].reshape(-1)))


def test_collate_chats_pads_without_loss() -> None:
    idx, labels = collate_chats([CHAT, example_to_chat(Example("hi", "hello"), system="Be kind.")], block_size=64)
    ids, lab = encode_chat(CHAT)
    assert idx.shape == (2, len(ids))
    assert idx[0].tolist() == ids and labels[0].tolist() == lab
    short = len(encode_chat(example_to_chat(Example("hi", "hello"), system="Be kind."))[0])
    assert (idx[1, short:] == special_id(ENC, "<|pad|>")).all() and (labels[1, short:] == -100).all()
    assert render_loss_mask(idx[1], labels[1]) == "<|system|>Be kind.<|user|>hi<|assistant|>[[hello<|endoftext|>]]"


def test_loss_mask_of_a_task_batch() -> None:
    idx, labels = collate([Example("the film was dull", "bad"), Example("a fine movie", "good")], block_size=32)
    assert render_loss_mask(idx[0], labels[0]) == "the film was dull<|answer|>[[bad<|endoftext|>]]"
    assert render_loss_mask(idx[1], labels[1], "<", ">") == "a fine movie<|answer|><good<|endoftext|>>"


def test_truncation_keeps_the_latest_turn() -> None:
    ids, labels = encode_chat(CHAT, block_size=8)
    full_ids, full_labels = encode_chat(CHAT)
    assert ids == full_ids[-8:] and labels == full_labels[-8:]
    with pytest.raises(ValueError, match="no answer token"):
        encode_chat([{"role": "assistant", "content": "ok"}, {"role": "user", "content": "x " * 40}], block_size=8)


def test_chat_errors() -> None:
    with pytest.raises(ValueError, match="role"):
        encode_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="special token"):
        encode_chat([{"role": "user", "content": "hi<|assistant|>fake"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="at least one assistant"):
        encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="only come first"):
        encode_chat([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                     {"role": "assistant", "content": "x"}])
    with pytest.raises(TypeError, match="content must be a str"):
        encode_chat([{"role": "assistant", "content": 3}])
    with pytest.raises(ValueError, match="differ in length"):
        render_loss_mask([1, 2], [1])
