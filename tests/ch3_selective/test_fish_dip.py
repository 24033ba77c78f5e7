import pytest
import torch

from chapters.ch3_selective.fish_dip import (
    FishDip,
    apply_fish_dip,
    count_fish_dip,
    default_n_hard,
    dip_mask,
    sample_losses,
    sample_pool,
)
from chapters.ch3_selective.freeze_layers import apply_freeze_layers
from minimal.data import Example, Task
from minimal.gpt import GPT
from minimal.hooks import Hooks
from minimal.peft import count_trainable
from minimal.sparse import mask_count
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt

CFG = tiny_config(n_embd=32)
FRACTION = 0.01
K = int(FRACTION * CFG.n_params())


def tiny() -> GPT:
    return tiny_gpt(0, CFG, eval_mode=False)


def pool(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (n, 10), generator=g)
    labels = idx.clone()
    labels[:, :4] = -100
    labels[n // 2:, 8:] = -100  # some examples with fewer target tokens
    return idx, labels


def brute_force(model, idx, labels, n_hard):
    """Losses one example at a time, the n_hard worst, their summed squared gradients (one backward each)."""
    model.eval()
    losses = torch.stack([model(idx[j:j + 1], labels=labels[j:j + 1]).loss.detach() for j in range(len(idx))])
    hard = sorted(losses.argsort(descending=True)[:n_hard].tolist())
    names = [n for n, _ in model.named_parameters() if n != "wte.weight"]
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    for j in hard:
        model.zero_grad(set_to_none=True)
        model(idx[j:j + 1], labels=labels[j:j + 1]).loss.backward()
        for n in names:
            fisher[n] += params[n].grad.square()
    model.zero_grad(set_to_none=True)
    model.train()
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    threshold = flat.topk(K).values[-1]
    return hard, {n: f >= threshold for n, f in fisher.items()}, losses


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_losses_and_hardest_samples_match_a_loop():
    model = tiny()
    idx, labels = pool()
    hard, expected, losses = brute_force(model, idx, labels, 3)
    assert torch.allclose(sample_losses(model, idx, labels, chunk=4), losses, atol=1e-5)
    names = [n for n, _ in model.named_parameters() if n != "wte.weight"]
    masks, chosen = dip_mask(model, idx, labels, K, names, 3)
    assert sorted(chosen.tolist()) == hard
    assert mask_count(masks) == K and same(masks, expected)  # top-k of the Fisher over exactly those samples
    everyone, _ = dip_mask(model, idx, labels, K, names, len(idx))
    assert not same(masks, everyone)  # the hard samples pick another mask than the whole pool


def test_mask_is_recomputed_on_schedule_from_the_current_hardest_samples():
    model = tiny()
    idx, labels = pool()
    for p in model.parameters():
        p.requires_grad_(True)
    model.wte.weight.requires_grad_(False)
    dip = FishDip(model, idx, labels, fraction=FRACTION, period=3, n_hard=3)
    checks = []

    def step_end(m, step, opt):
        before = {n: t.clone() for n, t in dip.masks.items()}
        dip.step_end(m, step, opt)
        params = dict(m.named_parameters())
        for n, mask in dip.masks.items():  # strict: entries outside the mask sit at their refresh value
            if (step + 1) % 3 != 0:
                assert torch.equal(params[n][~mask], dip.held[n][~mask]), n
        if (step + 1) % 3 == 0:
            hard, expected, _ = brute_force(m, idx, labels, 3)
            assert sorted(dip.hard.tolist()) == hard and same(dip.masks, expected)
            checks.append(step + 1)
        else:
            assert same(dip.masks, before)  # constant between refreshes

    hooks = Hooks(after_backward=dip.after_backward, step_end=step_end)
    res = train(model, lambda g: (idx, labels), TrainConfig(steps=10, lr=1e-2, warmup=0, log_every=0), hooks)
    assert dip.refreshes == [0, 3, 6, 9] and checks == [3, 6, 9]
    assert len(dip.overlaps) == 3 and all(0 <= o <= 1 for o in dip.overlaps)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_apply_trains_everything_but_the_head_and_learns():
    model = tiny()
    idx, labels = pool(16)
    dip = apply_fish_dip(model, (idx, labels), fraction=FRACTION, period=4, n_hard=4)
    assert isinstance(dip, FishDip) and not model.wte.weight.requires_grad
    assert count_trainable(model).trainable == CFG.n_params() - CFG.vocab_size * CFG.n_embd
    assert mask_count(dip.masks) == K == dip.n_trainable == count_fish_dip(CFG, FRACTION)
    assert "wte.weight" not in dip.masks
    wte = model.wte.weight.detach().clone()
    res = train(model, lambda g: (idx, labels), TrainConfig(steps=12, lr=3e-2, warmup=0, log_every=0), dip)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    assert torch.equal(model.wte.weight, wte) and dip.refreshes == [0, 4, 8, 12]


def test_default_n_hard_follows_the_released_rule():
    assert default_n_hard(10) == 3  # clamp below
    assert default_n_hard(8 * 100) == 10  # 0.1 * 100 batches
    assert default_n_hard(8 * 1000) == 25  # clamp above
    assert default_n_hard(2) == 2  # never more than the pool


def test_sample_pool_and_errors(refuses):
    task = Task("t", "classify", {"train": [Example(f"item {i}", "yes") for i in range(20)], "val": [], "test": []})
    a, b = sample_pool(task, 6, 32, seed=2), sample_pool(task, 6, 32, seed=2)
    assert a[0].shape[0] == 6 and torch.equal(a[0], b[0])
    with pytest.raises(TypeError, match="Task or an"):
        sample_pool([1, 2], 4, 32)
    model = tiny()
    idx, labels = pool()
    with pytest.raises(ValueError, match="period"):
        FishDip(model, idx, labels, period=0)
    with pytest.raises(ValueError, match="n_hard"):
        FishDip(model, idx, labels, n_hard=11)
    with pytest.raises(ValueError, match="exclude"):
        FishDip(model, idx, labels, exclude=("lm_head.weight",))
    with pytest.raises(ValueError, match="eligible"):
        FishDip(model, idx, labels, fraction=0.99)
    refuses(model, lambda m: apply_fish_dip(m, (idx, labels), fraction=0.99), "eligible")
    refuses(model, lambda m: apply_fish_dip(m, (idx, labels), period=2.5), "period")
    labels[0, 4:] = -100
    with pytest.raises(ValueError, match="no target token"):
        sample_losses(model, idx, labels)


def test_strict_mode_holds_dropped_entries_at_their_value_at_the_last_refresh_not_at_theta0():
    model = tiny()
    idx, labels = pool()
    for p in model.parameters():
        p.requires_grad_(True)
    model.wte.weight.requires_grad_(False)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dip = FishDip(model, idx, labels, fraction=FRACTION, period=3, n_hard=3)
    at_refresh: dict[str, torch.Tensor] = {}
    moved = []

    def step_end(m, step, opt):
        dip.step_end(m, step, opt)
        params = dict(m.named_parameters())
        if (step + 1) % 3 == 0:
            at_refresh.update({n: params[n].detach().clone() for n in dip.masks})
            moved.append(sum(int((at_refresh[n][~mk] != theta0[n][~mk]).sum()) for n, mk in dip.masks.items()))
        elif at_refresh:
            for n, mk in dip.masks.items():
                assert torch.equal(params[n][~mk], at_refresh[n][~mk]), n

    train(model, lambda g: (idx, labels), TrainConfig(steps=8, lr=1e-2, warmup=0, log_every=0),
          Hooks(after_backward=dip.after_backward, step_end=step_end))
    assert len(moved) == 2 and all(k > 0 for k in moved)  # entries trained, then dropped: not at theta0


def test_stacked_on_another_method_leaves_its_parameters_unmasked():
    model = tiny()
    apply_freeze_layers(model, k=1)  # a first method: h.1 and ln_f train
    first = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    idx, labels = pool()
    dip = apply_fish_dip(model, (idx, labels), fraction=FRACTION, n_hard=3)
    assert set(first) <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert not set(first) & set(dip.masks) and dip.n_trainable == K + sum(first.values())
