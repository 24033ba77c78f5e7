import math

import pytest
import torch

from chapters.ch3_selective.child_tuning import (
    BernoulliGradMask,
    apply_child_tuning_d,
    apply_child_tuning_f,
    child_fisher,
    child_mask,
    count_child_tuning_d,
    count_child_tuning_f,
    in_block_names,
    task_batches,
)
from chapters.ch3_selective.freeze_layers import apply_freeze_layers
from minimal.data import Example, Task
from minimal.gpt import GPT
from minimal.peft import count_trainable
from minimal.sparse import mask_count
from minimal.train import TrainConfig, train
from tests.helpers import masked_batches, tiny_config, tiny_gpt

CFG = tiny_config(n_embd=32)


def tiny() -> GPT:
    return tiny_gpt(0, CFG, eval_mode=False)


def grads_of(model, idx, labels):
    model.zero_grad(set_to_none=True)
    model(idx, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ F


def test_f_mask_keeps_a_fraction_and_rescales_by_one_over_it():
    p = 0.3
    model = tiny()
    apply_child_tuning_f(model, fraction=p)
    idx, labels = masked_batches(1)[0]
    g0 = grads_of(model, idx, labels)
    BernoulliGradMask(p, seed=0).after_backward(model, 0)
    kept = total = 0
    for n, q in model.named_parameters():
        live = g0[n] != 0  # entries with a gradient at all (unused token rows have none)
        nz = q.grad != 0
        assert not (nz & ~live).any()
        assert torch.allclose(q.grad[nz], g0[n][nz] / p, rtol=1e-6)  # rescaled by 1/p
        kept += int(nz.sum())
        total += int(live.sum())
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(kept / total - p) < 5 * sigma, (kept / total, total)


def test_f_masks_are_fresh_each_step_reproducible_and_unbiased():
    lin = torch.nn.Linear(50, 40)
    lin.weight.grad = torch.ones_like(lin.weight)
    masker, twin = BernoulliGradMask(0.25, seed=3), BernoulliGradMask(0.25, seed=3)
    masker.after_backward(lin, 0)
    first = lin.weight.grad.clone()
    lin.weight.grad = torch.ones_like(lin.weight)
    masker.after_backward(lin, 1)
    assert not torch.equal(first, lin.weight.grad)  # redrawn every step
    lin.weight.grad = torch.ones_like(lin.weight)
    twin.after_backward(lin, 0)
    assert torch.equal(first, lin.weight.grad)  # same seed, same masks
    total = torch.zeros_like(lin.weight)
    n = 400
    for s in range(n):
        lin.weight.grad = torch.ones_like(lin.weight)
        masker.after_backward(lin, s)
        total += lin.weight.grad
    mean = (total / n).mean()  # E[M / p] = 1
    sigma = math.sqrt((1 - 0.25) / 0.25 / (n * lin.weight.numel()))
    assert abs(mean - 1) < 5 * sigma


def test_f_trains_everything_and_learns():
    model = tiny()
    hooks = apply_child_tuning_f(model, fraction=0.4)
    assert count_trainable(model).trainable == count_trainable(model).total == count_child_tuning_f(CFG)
    assert isinstance(hooks, BernoulliGradMask) and hooks.n_trainable is None  # every entry trains over a run
    idx, labels = masked_batches(1)[0]
    res = train(model, lambda gen: (idx, labels), TrainConfig(steps=10, lr=1e-2, warmup=0, log_every=0), hooks)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


# ------------------------------------------------------------------------------------------ D


def test_child_fisher_is_the_mean_of_clipped_squared_batch_gradients():
    model = tiny()
    batches = masked_batches(2)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    f = child_fisher(model, batches, names=["h.0.mlp.c_fc.weight", "h.1.ln_1.bias"], max_grad_norm=0.01)
    expected = {}
    for idx, labels in batches:
        g = grads_of(model, idx, labels)
        for n in f:
            clipped = g[n] * min(1.0, 0.01 / g[n].norm().item())
            expected[n] = expected.get(n, 0) + clipped.square() / 2
    for n in f:
        assert torch.allclose(f[n], expected[n], rtol=1e-4, atol=1e-12), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_d_mask_is_the_top_of_the_fisher_and_holds_through_training():
    p = 0.2
    model = tiny()
    batches = masked_batches(3)
    fisher = child_fisher(model, batches)
    assert list(fisher) == in_block_names(model)
    theta0 = {n: t.detach().clone() for n, t in model.named_parameters()}
    hooks = apply_child_tuning_d(model, batches, fraction=p)
    mask = hooks.masks
    n_in = sum(f.numel() for f in fisher.values())
    assert mask_count(mask) == int(p * n_in)
    assert hooks.n_trainable == count_child_tuning_d(CFG, fraction=p)  # the child entries + wte, wpe, ln_f
    assert all(torch.equal(mask[n], m) for n, m in child_mask(fisher, p).items())
    chosen = torch.cat([fisher[n][mask[n]] for n in fisher])
    rest = torch.cat([fisher[n][~mask[n]] for n in fisher])
    assert chosen.min() >= rest.max()
    assert count_trainable(model).trainable == count_trainable(model).total

    idx, labels = batches[0]
    cfg = TrainConfig(steps=6, lr=1e-2, warmup=0, weight_decay=0.0, log_every=0)
    res = train(model, lambda gen: (idx, labels), cfg, hooks)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    for n, q in model.named_parameters():
        if n in mask:
            assert torch.equal(q[~mask[n]], theta0[n][~mask[n]]), n  # weight decay 0: bitwise fixed
        else:
            assert not torch.equal(q, theta0[n]), n  # embeddings and ln_f train densely
    moved = sum(int((q[mask[n]] != theta0[n][mask[n]]).sum()) for n, q in model.named_parameters() if n in mask)
    assert moved > 0.9 * mask_count(mask)


def test_task_batches_from_a_task():
    task = Task("t", "classify", {"train": [Example(f"item {i}", "yes") for i in range(5)], "val": [], "test": []})
    batches = task_batches(task, block_size=32, batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert len(task_batches(task, 32, 2, max_batches=2)) == 2


def test_errors(refuses):
    for bad in (0.0, 1.5, -0.1):
        refuses(tiny(), lambda m, bad=bad: apply_child_tuning_f(m, fraction=bad), "fraction")
        refuses(tiny(), lambda m, bad=bad: apply_child_tuning_d(m, masked_batches(1), fraction=bad), "fraction")
    refuses(tiny(), lambda m: apply_child_tuning_d(m, [], fraction=0.2), "no batches")
    model = tiny()
    with pytest.raises(ValueError, match="cannot take gradients"):
        child_fisher(model, masked_batches(1), names=["h.7.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match="max_grad_norm"):
        child_fisher(model, masked_batches(1), max_grad_norm=0.0)


def test_d_stacked_on_another_method_leaves_its_parameters_unmasked():
    model = tiny()
    apply_freeze_layers(model, k=1)  # a first method: h.1 and ln_f train
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    hooks = apply_child_tuning_d(model, masked_batches(2), fraction=0.2)
    assert not first & set(hooks.masks) and all(n.startswith("h.0.") for n in hooks.masks)
    assert count_trainable(model).trainable == count_trainable(model).total  # still full fine-tuning
