import math

import pytest
import torch

from minimal.data import Example, Task
from minimal.evaluate import evaluate_task, perplexity
from minimal.hooks import Hooks
from minimal.peft import freeze, unfreeze
from minimal.train import TrainConfig, lr_at, tensor_bytes, train


def fixed_batch(vocab: int = 101):
    idx = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    return lambda gen: (idx, idx)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and floor
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_reports(tiny_gpt):
    res = train(tiny_gpt, fixed_batch(), TrainConfig(steps=30, lr=3e-3, warmup=3, progress=False, log_every=0))
    assert res.history[-1]["loss"] < 0.7 * res.history[0]["loss"]
    assert res.trainable == res.total == tiny_gpt.config.n_params()
    assert res.seconds_per_step > 0
    # parameters + gradients + AdamW's two moments, all float32, + one 4-byte step counter per tensor
    n_tensors = len(list(tiny_gpt.parameters()))
    assert res.peak_memory_bytes == 4 * 4 * res.trainable + 4 * n_tensors
    assert tensor_bytes(tiny_gpt) == 2 * 4 * res.trainable  # without the optimizer: weights and gradients


def test_cpu_peak_memory_is_the_peak_not_the_end(tiny_gpt):
    """A hook that drops the optimizer state after the last step (like a ReLoRA reset) lowers the end
    value, not the reported peak."""
    cfg = TrainConfig(steps=3, lr=1e-3, warmup=1, progress=False, log_every=0)

    def reset_at_end(model, step, optimizer):
        if step == cfg.steps - 1:
            optimizer.state.clear()

    res = train(tiny_gpt, fixed_batch(), cfg, hooks=Hooks(step_end=reset_at_end))
    n_tensors = len(list(tiny_gpt.parameters()))
    assert res.peak_memory_bytes == 4 * 4 * res.trainable + 4 * n_tensors
    assert tensor_bytes(tiny_gpt) == 2 * 4 * res.trainable  # what the end of the run holds


def test_frozen_parameters_stay_bit_identical(tiny_gpt):
    freeze(tiny_gpt)
    unfreeze(tiny_gpt, lambda n: n.startswith("h.1."))
    before = {n: p.clone() for n, p in tiny_gpt.named_parameters()}
    train(tiny_gpt, fixed_batch(), TrainConfig(steps=5, warmup=1, weight_decay=0.1, progress=False, log_every=0))
    for n, p in tiny_gpt.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("h.1."), n


def test_hooks_are_called_in_order(tiny_gpt):
    calls = []
    hooks = Hooks(
        extra_loss=lambda m: (calls.append("extra"), torch.zeros(()))[1],
        after_backward=lambda m, s: calls.append(("grad", s, m.ln_f.weight.grad is not None)),
        step_end=lambda m, s, opt: calls.append(("end", s)),
        make_optimizer=lambda params, cfg: (calls.append("opt"), torch.optim.SGD(params, lr=cfg.lr))[1],
    )
    train(tiny_gpt, fixed_batch(), TrainConfig(steps=2, warmup=0, progress=False, log_every=0), hooks=hooks)
    assert calls == ["opt", "extra", ("grad", 0, True), ("end", 0), "extra", ("grad", 1, True), ("end", 1)]


def test_gradient_mask_hook_keeps_entries(tiny_gpt):
    """A hook after backward that zeroes gradients keeps those entries unchanged (SGD, no decay)."""
    freeze(tiny_gpt)
    unfreeze(tiny_gpt, lambda n: n == "ln_f.weight")
    before = tiny_gpt.ln_f.weight.detach().clone()
    mask = torch.arange(64) % 2 == 0

    def after_backward(model, step):
        model.ln_f.weight.grad *= mask

    hooks = Hooks(after_backward=after_backward, make_optimizer=lambda ps, cfg: torch.optim.SGD(ps, lr=0.1))
    train(tiny_gpt, fixed_batch(), TrainConfig(steps=3, warmup=0, progress=False, log_every=0), hooks=hooks)
    assert torch.equal(tiny_gpt.ln_f.weight[~mask], before[~mask])
    assert not torch.equal(tiny_gpt.ln_f.weight[mask], before[mask])


def test_same_seed_same_numbers(tiny_config):
    from minimal.gpt import GPT

    def run():
        torch.manual_seed(0)
        m = GPT(tiny_config)
        gen_batch = lambda g: (torch.randint(0, 101, (2, 8), generator=g),) * 2  # noqa: E731
        return [h["loss"] for h in train(m, gen_batch, TrainConfig(steps=4, warmup=0, progress=False)).history]

    assert run() == run()


def test_bad_configs_and_nothing_to_train(tiny_gpt):
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=5, warmup=10)
    freeze(tiny_gpt)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        train(tiny_gpt, fixed_batch(), TrainConfig(steps=1, warmup=0))


def test_perplexity_of_uniform_model_is_vocab_size(tiny_gpt):
    with torch.no_grad():
        for p in tiny_gpt.parameters():
            p.zero_()  # all logits equal -> uniform over the vocabulary
    ppl = perplexity(tiny_gpt, torch.randint(0, 101, (200,)), block_size=32)
    assert math.isclose(ppl, 101, rel_tol=1e-4)


def test_evaluate_task_metrics():
    from minimal.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    tiny_gpt = GPT(GPTConfig(vocab_size=2048, block_size=32, n_layer=1, n_head=2, n_embd=32))
    task = Task("t", "classify", {"test": [Example("x", "good"), Example("y", "bad")]}, choices=["bad", "good"])
    acc = evaluate_task(tiny_gpt, task, "test", block_size=32)["accuracy"]
    assert acc in (0.0, 0.5, 1.0)
    gen = Task("g", "generate", {"test": [Example("x", "zzzz-unlikely")]})
    assert evaluate_task(tiny_gpt, gen, "test", block_size=32) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="no val examples"):
        evaluate_task(tiny_gpt, task, "val")
