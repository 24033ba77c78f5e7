"""Instruction tuning data: FLAN-style templates for the task suite, and a chat template for SFT.

Papers:
- FLAN, "Finetuned Language Models Are Zero-Shot Learners" (Wei et al., ICLR 2022, arXiv 2109.01652):
  render every dataset through several hand-written instruction templates (a few "inverted" ones swap
  the roles of input and answer), fine-tune on the mixture, evaluate zero-shot on whole task clusters
  held out of training.
- T0 / PromptSource (Sanh et al., ICLR 2022, arXiv 2110.08207): the same recipe with a public pool of
  prompt templates, holding out task families.
- Llama 2-Chat SFT (Touvron et al. 2023, arXiv 2307.09288): prompt and answer joined by special tokens,
  and the loss only on the answer:

      L = -(1 / |A|) sum_{t in A} log p(x_t | x_<t),     A = positions whose target token is in an answer.

What trains: nothing here; these functions make the data (prompt/answer `Example`s for the shared
batching in minimal/data.py, or (ids, labels) for chats) that any method then trains on.

Choices made here:
- Templates are written for our task suite (minimal/data.py), five per task family; inverted templates
  exist only for classification tasks (e.g. "write a good review") and are used for training only,
  since an inverted example cannot be scored against the task's choices.
- Each example gets one template, drawn with a seeded generator (FLAN samples a template per example);
  `max_per_task` caps large tasks (FLAN's examples-proportional mixing with a cap).
- Chat format: `<|system|>text<|user|>text<|assistant|>text<|endoftext|>` repeated per turn; every assistant
  response and its end token carry the loss, everything else (system, user, the role markers, padding)
  has label -100. Labels are aligned with the ids (the model shifts them), as everywhere in this repo.
  A message that itself contains a chat special token is refused, so user text can never fake a turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from minimal.data import Example, Task
from minimal.tokenizer import get_tokenizer, special_id

# ------------------------------------------------------------------------------------------ FLAN-style


@dataclass(frozen=True)
class Template:
    """Format strings over the fields {input}, {answer} and {choices} (the task's choices, comma-separated)."""

    prompt: str
    answer: str = "{answer}"

    @property
    def inverted(self) -> bool:
        """True when the template asks for the input given the answer (FLAN's inverted templates)."""
        return "{input}" in self.answer


TEMPLATES: dict[str, list[Template]] = {
    "sentiment": [
        Template("Review: {input}\nIs this review good or bad?"),
        Template("{input}\nDid the writer like it? Answer {choices}."),
        Template("Classify the sentiment of this review as {choices}.\n{input}"),
        Template("Here is what someone said: \"{input}\". Was their experience good or bad?"),
        Template("Write a short {answer} review.", answer="{input}"),
    ],
    "topic": [
        Template("Docstring: {input}\nWhich kind of module is it from? Options: {choices}."),
        Template("{input}\nTopic ({choices}):"),
        Template("Read this documentation and name its area among {choices}.\n{input}"),
        Template("Which part of the standard library does this describe: {choices}?\n{input}"),
        Template("Write one sentence of documentation for a {answer} module.", answer="{input}"),
    ],
    "formatting": [
        Template("Convert the snake_case name {input} to CamelCase."),
        Template("{input}\nThe same name in CamelCase:"),
        Template("Rewrite {input} as a class-style name."),
        Template("Python name: {input}\nCamelCase:"),
        Template("Capitalise each part of {input} and remove the underscores."),
    ],
    "translation": [
        Template("Translate: {input}"),
        Template("{input}"),
        Template("Translate the sentence after the first language tag into the language of the second. {input}"),
        Template("Say this in the other language: {input}"),
        Template("Rewrite the text in the target language. {input}"),
    ],
    "lookup": [
        Template("What word is stored under {input}?"),
        Template("{input} ->"),
        Template("Recall the value for {input}."),
        Template("Table lookup: {input}"),
        Template("Which word goes with {input}? Options: {choices}."),
    ],
}

_FAMILY_OF_TASK = {"sentiment": "sentiment", "family": "topic", "camel": "formatting", "kv_recall": "lookup"}


def task_family(task_name: str) -> str:
    """The task family (FLAN's "cluster") of a task of minimal/data.py: translate_* -> translation."""
    if task_name.startswith("translate_"):
        return "translation"
    if task_name not in _FAMILY_OF_TASK:
        raise ValueError(f"no task family for task {task_name!r}; known: {sorted(_FAMILY_OF_TASK)}, translate_*")
    return _FAMILY_OF_TASK[task_name]


def render(example: Example, template: Template, choices: list[str] | None = None) -> Example:
    """One example through one template: a new (prompt, answer) pair."""
    fields = {"input": example.prompt, "answer": example.answer, "choices": ", ".join(choices or [])}
    return Example(template.prompt.format(**fields), template.answer.format(**fields))


def _templates(task: Task, template_ids: list[int] | None, inverted: bool) -> list[Template]:
    family = TEMPLATES[task_family(task.name)]
    ids = list(range(len(family))) if template_ids is None else list(template_ids)
    bad = [i for i in ids if not 0 <= i < len(family)]
    if bad:
        raise ValueError(f"template ids {bad} out of range for task {task.name!r} ({len(family)} templates)")
    chosen = [family[i] for i in ids if inverted or not family[i].inverted]
    if not chosen:
        raise ValueError(f"no usable template for task {task.name!r} among ids {ids} (inverted={inverted})")
    return chosen


def instruct_task(task: Task, template_ids: list[int] | None = None, seed: int = 0) -> Task:
    """The task with every split rendered through its templates (inverted ones left out).

    Kind and choices are kept, so `minimal.evaluate.evaluate_task` scores the instruction-formatted task.
    """
    templates = _templates(task, template_ids, inverted=False)
    rng = random.Random(f"{seed}-{task.name}")
    splits = {name: [render(ex, rng.choice(templates), task.choices) for ex in data]
              for name, data in task.splits.items()}
    return Task(task.name, task.kind, splits, list(task.choices), f"instruction-formatted {task.description}")


def build_mixture(tasks: list[Task], split: str = "train", held_out_families: tuple[str, ...] = (),
                  template_ids: list[int] | None = None, inverted: bool = True, max_per_task: int | None = None,
                  seed: int = 0) -> list[Example]:
    """A shuffled instruction mixture of the tasks not in a held-out family.

    Each example is rendered through one template drawn (seeded) from `template_ids` (all when None);
    inverted templates are included when `inverted`. Deterministic for a given seed.
    """
    unknown = set(held_out_families) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {sorted(TEMPLATES)}")
    if max_per_task is not None and max_per_task <= 0:
        raise ValueError(f"max_per_task must be positive, got {max_per_task}")
    kept = [t for t in tasks if task_family(t.name) not in held_out_families]
    if not kept:
        raise ValueError(f"every task is held out (families {sorted(held_out_families)}); nothing to train on")
    rng = random.Random(seed)
    mixture = []
    for task in kept:
        templates = _templates(task, template_ids, inverted)
        data = list(task.splits[split])
        if max_per_task is not None and len(data) > max_per_task:
            data = rng.sample(data, max_per_task)
        mixture += [render(ex, rng.choice(templates), task.choices) for ex in data]
    rng.shuffle(mixture)
    return mixture


# ------------------------------------------------------------------------------------------ chat SFT

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>", "<|pad|>", "<|answer|>")


def chat_text(messages: list[dict[str, str]]) -> str:
    """The conversation as one string: <|role|>content per message, <|endoftext|> after each answer."""
    _check_messages(messages)
    return "".join(f"<|{m['role']}|>{m['content']}" + ("<|endoftext|>" if m["role"] == "assistant" else "")
                   for m in messages)


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if set(m) != {"role", "content"}:
            raise ValueError(f"message {i} must have exactly the keys 'role' and 'content', got {sorted(m)}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; roles are {ROLES}")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"a system message may only come first (found one at position {i})")
        found = [t for t in CHAT_TOKENS if t in m["content"]]
        if found:
            raise ValueError(f"message {i} contains the chat special token(s) {found}; remove them from the text")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a chat for training needs at least one assistant message (nothing would carry loss)")


def encode_chat(messages: list[dict[str, str]], block_size: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a chat; labels = ids on assistant responses and their end token, -100 elsewhere.

    The ids equal `enc.encode(chat_text(messages), allowed_special="all")`. A chat longer than block_size
    is cut from the left (the latest turns are kept); it is an error if no answer token survives.
    """
    _check_messages(messages)
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        marker = [special_id(enc, f"<|{m['role']}|>")]
        content = enc.encode(m["content"], allowed_special="all")
        ids += marker + content
        if m["role"] == "assistant":
            ids.append(eot)
            labels += [-100] + content + [eot]  # the role marker is prompt; the answer and its end are trained
        else:
            labels += [-100] * (1 + len(content))
    if block_size is not None and len(ids) > block_size:
        ids, labels = ids[-block_size:], labels[-block_size:]
        if all(lab == -100 for lab in labels):
            raise ValueError(f"after cutting the chat to block_size {block_size} no answer token is left")
    return ids, labels


def collate_chats(chats: list[list[dict[str, str]]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded idx [B, T] and labels [B, T] (-100 outside the answers and on padding)."""
    pad = special_id(get_tokenizer(), "<|pad|>")
    pairs = [encode_chat(c, block_size) for c in chats]
    T = max(len(ids) for ids, _ in pairs)
    idx = torch.full((len(pairs), T), pad, dtype=torch.long)  # [B, T]
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)  # [B, T]
    for i, (ids, lab) in enumerate(pairs):
        idx[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return idx, labels


def example_to_chat(example: Example, system: str | None = None) -> list[dict[str, str]]:
    """A prompt/answer example as a one-turn chat (optionally with a system message)."""
    chat = [{"role": "system", "content": system}] if system is not None else []
    return chat + [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def render_loss_mask(ids: list[int] | torch.Tensor, labels: list[int] | torch.Tensor, open_mark: str = "[[",
                     close_mark: str = "]]") -> str:
    """The decoded tokens with every run of loss-carrying tokens (label != -100) wrapped in marks.

    Works for chats and for task batches (minimal.data.collate), e.g.
    '<|user|>hi<|assistant|>[[hello<|endoftext|>]]'. Padding at the end is left out.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(ids) != len(labels):
        raise ValueError(f"ids and labels differ in length: {len(ids)} vs {len(labels)}")
    enc = get_tokenizer()
    pad = special_id(enc, "<|pad|>")
    while ids and ids[-1] == pad and labels[-1] == -100:
        ids, labels = ids[:-1], labels[:-1]
    out, inside = [], False
    for tok, lab in zip(ids, labels, strict=True):
        trained = lab != -100
        if trained != inside:
            out.append(open_mark if trained else close_mark)
            inside = trained
        out.append(enc.decode([tok]))
    if inside:
        out.append(close_mark)
    return "".join(out)
