"""Commands that must not overwrite shipped files, loading that checks before it copies, and the clear
errors a careless call gets (each case with the message that says what would be right)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

import minimal.pretrain as pretrain
from chapters import leaderboard
from chapters.ch4_low_rank.lora import apply_lora
from minimal.data import (
    Example,
    LMCorpus,
    encode_example,
    encode_prompt,
    get_corpus,
    get_task,
    get_tokenizer,
    task_batch,
)
from minimal.hooks import Hooks
from minimal.peft import ADAPTER_CONFIG, find_linears, load_adapter, save_adapter
from minimal.pretrained import DATA
from minimal.tokenizer import special_id
from minimal.train import TrainConfig, train
from tests.helpers import tiny_gpt, token_batch


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ pretrain


def test_pretrain_writes_runs_by_default_and_short_runs_work(tmp_path, monkeypatch) -> None:
    shipped = digest(DATA)
    monkeypatch.setattr(pretrain, "DEFAULT_OUT", tmp_path / "runs" / "pretrain")
    monkeypatch.setattr(pretrain, "VAL_WINDOWS", 2)
    pretrain.main(["--model", "small", "--steps", "2"])  # warmup 100 > 2 steps once crashed here
    out = tmp_path / "runs" / "pretrain"
    assert sorted(p.name for p in out.iterdir()) == ["small.json", "small.safetensors"]
    rec = json.loads((out / "small.json").read_text(encoding="utf-8"))
    assert rec["training"]["steps"] == 2 and math.isfinite(rec["training"]["val_loss"])
    assert digest(DATA) == shipped


@pytest.mark.parametrize("argv, message", [
    (["--out", str(DATA)], "--force"),
    (["--tokenizer", "--model", "small"], "retrains both models"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_pretrain_refuses_unsafe_or_invalid_commands(argv, message, capsys) -> None:
    shipped = digest(DATA)
    with pytest.raises(SystemExit):
        pretrain.main(argv)
    assert message in capsys.readouterr().err
    assert digest(DATA) == shipped
    with pytest.raises(ValueError, match="steps must be a positive int"):
        pretrain.pretrain("small", steps=0)
    with pytest.raises(ValueError, match="unknown model"):
        pretrain.pretrain("huge")


# ------------------------------------------------------------------------------------------ leaderboard


def test_leaderboard_writes_results_only_for_the_full_default_run(tmp_path, monkeypatch) -> None:
    assert leaderboard.default_out(None, list(leaderboard.DEFAULT_TASKS), leaderboard.DEFAULT.steps, 0) \
        == leaderboard.RESULTS
    for partial in [(["full", "lora"], list(leaderboard.DEFAULT_TASKS), leaderboard.DEFAULT.steps, 0),
                    (None, ["sentiment"], leaderboard.DEFAULT.steps, 0),
                    (None, list(leaderboard.DEFAULT_TASKS), 600, 0),
                    (None, list(leaderboard.DEFAULT_TASKS), leaderboard.DEFAULT.steps, 1)]:
        assert leaderboard.default_out(*partial) == leaderboard.PARTIAL
    monkeypatch.setattr(leaderboard, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(leaderboard, "PARTIAL", tmp_path / "runs")
    leaderboard.main(["--methods", "zero-shot", "--tasks", "sentiment", "--steps", "2", "--no-applications"])
    assert (tmp_path / "runs" / "leaderboard.md").is_file() and not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------ load_adapter


@pytest.fixture
def saved_lora(tmp_path):
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=16, targets=["c_attn"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_()
    save_adapter(model, tmp_path / "ad", {"method": "lora", "r": 4, "alpha": 16})
    return model, tmp_path / "ad"


def test_load_adapter_checks_alpha_and_leaves_the_model_unchanged(saved_lora) -> None:
    model, directory = saved_lora
    other = tiny_gpt()
    apply_lora(other, r=4, alpha=64, targets=["c_attn"])
    before = state(other)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.alpha: saved 16\.0 vs model 64\.0") as err:
        load_adapter(other, directory)
    assert str(directory) in str(err.value) and "nothing was copied" in str(err.value)
    assert same_state(other, before)
    same = tiny_gpt()
    apply_lora(same, r=4, alpha=16, targets=["c_attn"])
    load_adapter(same, directory)
    idx = token_batch()
    assert torch.equal(same(idx).logits, model(idx).logits)


def test_load_adapter_corrupt_config_fails_before_copying(saved_lora) -> None:
    _, directory = saved_lora
    target = tiny_gpt()
    apply_lora(target, r=4, alpha=16, targets=["c_attn"])
    before = state(target)
    (directory / ADAPTER_CONFIG).write_text('{"config": {"r": 4', encoding="utf-8")
    with pytest.raises(ValueError, match="adapter_config.json is not valid json"):
        load_adapter(target, directory)
    assert same_state(target, before)
    (directory / ADAPTER_CONFIG).write_text('{"shapes": {}}', encoding="utf-8")
    with pytest.raises(ValueError, match="field 'config' is missing"):
        load_adapter(target, directory)
    (directory / ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(target, directory)
    assert same_state(target, before)


def test_load_adapter_checks_dtype_and_merged_state(saved_lora) -> None:
    _, directory = saved_lora
    half = tiny_gpt()
    apply_lora(half, r=4, alpha=16, targets=["c_attn"])
    half.to(torch.float64)
    before = state(half)
    with pytest.raises(ValueError, match=r"c_attn\.A: dtype saved torch\.float32 vs model torch\.float64"):
        load_adapter(half, directory)
    assert same_state(half, before)
    merged = tiny_gpt()
    apply_lora(merged, r=4, alpha=16, targets=["c_attn"])
    merged.h[0].attn.c_attn.merge()
    with pytest.raises(ValueError, match="merged; unmerge"):
        load_adapter(merged, directory)


# ------------------------------------------------------------------------------------------ training


def test_non_finite_loss_or_gradient_is_caught_before_the_step() -> None:
    for hooks in [Hooks(extra_loss=lambda m: torch.tensor(float("nan"))),
                  Hooks(after_backward=lambda m, step: m.ln_f.weight.grad.fill_(float("inf")))]:
        model = tiny_gpt()
        before = state(model)
        with pytest.raises(FloatingPointError, match="step 0"):
            train(model, lambda g: (token_batch(), token_batch()), TrainConfig(steps=2, warmup=0, progress=False,
                                                                            log_every=0, grad_clip=0), hooks)
        assert same_state(model, before)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("inf"))


@pytest.mark.parametrize("field, value", [("batch_size", 2.5), ("steps", 10.0), ("warmup", "5")])
def test_train_config_refuses_non_int_counts(field, value) -> None:
    with pytest.raises(TypeError, match=f"TrainConfig.{field} must be an int"):
        TrainConfig(**{field: value})


# ------------------------------------------------------------------------------------------ model and data


def test_model_and_generate_explain_bad_input() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"shape \[B, T\].*idx\[None\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.rand(1, 3))
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        model.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(prompt, -1)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_task_batch_refuses_an_empty_batch() -> None:
    task = get_task("sentiment")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        task_batch(task, 0, 64, torch.Generator())
    with pytest.raises(ValueError, match="has no 'nope' examples"):
        task_batch(task, 2, 64, torch.Generator(), split="nope")


def test_string_targets_and_a_second_adapter_get_a_hint() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"pass a list, targets=\['c_attn'\]"):
        find_linears(model, "c_attn")
    apply_lora(model, r=2, targets=["c_attn"])
    with pytest.raises(ValueError, match="already have an adapter.*LoRALinear"):
        apply_lora(model, r=2, targets=["c_attn"])
    with pytest.raises(ValueError, match="already have an adapter"):
        apply_lora(model, r=2, targets=r"h\.\d+\.attn\.c_attn")


def test_special_token_text_in_user_text_is_refused_but_format_tokens_work() -> None:
    enc = get_tokenizer()
    eot, answer = special_id(enc, "<|endoftext|>"), special_id(enc, "<|answer|>")
    with pytest.raises(ValueError, match="remove <.endoftext.> from the text"):
        encode_prompt("a review <|endoftext|> that ends early")
    with pytest.raises(ValueError, match=r"special token text \['<\|pad\|>'\]"):
        encode_prompt("padded <|pad|>")
    with pytest.raises(ValueError, match="answer 'good<.endoftext.>' contains the special token text"):
        encode_example(Example("the movie was great", "good<|endoftext|>"), 64)
    # the format tokens our code writes: language tags, and solved k-shot demonstrations
    tagged = encode_prompt("<|lang_a|>hello<|lang_b|>")
    assert tagged[0] == special_id(enc, "<|lang_a|>") and tagged[-2] == special_id(enc, "<|lang_b|>")
    kshot = encode_prompt("the film was fun<|answer|>good<|endoftext|>the meal was dull")
    assert kshot.count(eot) == 1 and kshot.count(answer) == 2
    with pytest.raises(ValueError, match="may only end a solved demonstration"):
        encode_prompt("no answer here<|endoftext|>query")
    with pytest.raises(ValueError, match="document 0 of split 'train'"):
        LMCorpus("mine", {"train": ["my text <|endoftext|> more"]}).tokens("train")


def test_own_corpus_tokenizes_its_own_documents() -> None:
    docs = ["alpha beta gamma " * 20, "delta epsilon " * 30]
    for name in ["mine", "docs"]:  # "docs" once returned the standard library's corpus instead
        corpus = LMCorpus(name, {"train": docs, "val": docs[:1], "test": docs[1:]})
        enc = get_tokenizer()
        want = enc.encode(docs[0]) + [special_id(enc, "<|endoftext|>")] + enc.encode(docs[1])
        assert corpus.tokens("train").tolist() == want
    assert len(get_corpus("docs").tokens("val")) > 10 * len(want)
    with pytest.raises(ValueError, match="has no split 'dev'"):
        corpus.tokens("dev")
    with pytest.raises(TypeError, match="list of str"):
        LMCorpus("mine", {"train": "one string, not a list"})
