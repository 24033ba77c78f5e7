import pytest
import torch

from minimal.data import (
    DOC_MODULES,
    FAMILIES,
    TASK_NAMES,
    Example,
    collate,
    encipher,
    encode_example,
    get_corpus,
    get_task,
    lm_batch,
    split_of,
)
from minimal.tokenizer import get_tokenizer, special_id


def test_family_modules_are_not_in_the_pretraining_corpus():
    assert not set(DOC_MODULES) & {m for ms in FAMILIES.values() for m in ms}


def test_corpus_splits_are_deterministic_and_disjoint():
    docs = get_corpus("docs")
    again = type(docs)("docs", docs.docs)  # same content -> same hash
    assert docs.sha256() == again.sha256()
    train, val, test = (set(docs.docs[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(docs.docs["train"]) > 10 * len(docs.docs["val"]) > 0
    assert split_of("some text") == split_of("some text")


@pytest.mark.parametrize("name", ["family", "camel", "sentiment", "translate_a_b"])
def test_task_splits_are_disjoint_and_nonempty(name):
    task = get_task(name)
    prompts = {s: {ex.prompt for ex in task.splits[s]} for s in ("train", "val", "test")}
    assert all(prompts.values())
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    if task.kind == "classify":
        assert {ex.answer for ex in task.train} <= set(task.choices)


def test_every_task_builds():
    for name in TASK_NAMES:
        assert get_task(name).train
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_sentiment_negation_flips_the_label():
    by_prompt = {ex.prompt: ex.answer for s in ("train", "val", "test") for ex in get_task("sentiment").splits[s]}
    assert by_prompt["the movie was great"] == "good"
    assert by_prompt["the movie was not great"] == "bad"
    assert by_prompt["the movie was never awful"] == "good"


def test_camel_and_cipher_rules():
    ex = get_task("camel").train[0]
    assert ex.answer == "".join(p.capitalize() for p in ex.prompt.split("_"))
    assert encipher("abc xyz", "a") == "abc xyz"
    scrambled = encipher("hello world", "b")
    assert scrambled != "hello world" and len(scrambled) == len("hello world")


def test_answer_only_labels():
    enc = get_tokenizer()
    ids, labels = encode_example(Example("the movie was great", "good"), block_size=64)
    answer = enc.encode("good") + [special_id(enc, "<|endoftext|>")]
    n = len(answer)
    assert labels[-n:] == answer == ids[-n:]
    assert all(x == -100 for x in labels[:-n])
    assert ids[-n - 1] == special_id(enc, "<|answer|>")


def test_collate_pads_with_ignored_labels_and_cuts_long_prompts_from_the_left():
    idx, labels = collate([Example("a", "good"), Example("a much longer prompt here", "bad")], block_size=64)
    assert idx.shape == labels.shape and idx.shape[0] == 2
    pad = special_id(get_tokenizer(), "<|pad|>")
    assert (labels[idx == pad] == -100).all()
    ids, labels = encode_example(Example("word " * 100, "good"), block_size=16)
    assert len(ids) == 16 and labels[-1] != -100


def test_lm_batch_is_seeded():
    tokens = torch.arange(1000)
    a = lm_batch(tokens, 4, 16, torch.Generator().manual_seed(0))[0]
    b = lm_batch(tokens, 4, 16, torch.Generator().manual_seed(0))[0]
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="too short"):
        lm_batch(torch.arange(10), 2, 16, torch.Generator())


def test_evaluation_subset_is_evenly_spaced_covers_every_class_and_refuses_bad_sizes():
    from minimal.data import evaluation_subset
    test = get_task("family").test
    sub = evaluation_subset(test, 60)
    assert [test.index(ex) for ex in sub] == [i * len(test) // 60 for i in range(60)]
    assert {ex.answer for ex in sub} == {ex.answer for ex in test}  # the first 60 hold only some classes
    assert {ex.answer for ex in test[:60]} != {ex.answer for ex in test}
    assert evaluation_subset(test, None) == test and evaluation_subset(test, 10**6) == test
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            evaluation_subset(test, bad)


def test_evaluate_task_scores_the_evenly_spaced_subset():
    from minimal.data import Example, Task
    from minimal.evaluate import evaluate_task

    class Fixed(torch.nn.Module):  # always prefers the first choice
        config = type("C", (), {"block_size": 32})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, **kw):
            logits = torch.zeros(*idx.shape, 2048)
            logits[..., get_tokenizer().encode_ordinary("a")[0]] = 5.0
            return type("O", (), {"logits": logits})()

    rows = [Example(f"p{i}", "a" if i % 2 == 0 else "b") for i in range(10)]
    task = Task("t", "classify", {"test": rows}, ["a", "b"])
    # evenly spaced 5 of 10 are rows 0, 2, 4, 6, 8: all "a"; the first 5 would score 0.6
    assert evaluate_task(Fixed(), task, "test", max_examples=5) == {"accuracy": 1.0}
