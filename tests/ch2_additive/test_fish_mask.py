import pytest
import torch

from chapters.ch2_additive.fish_mask import apply_fish_mask, count_fish_mask, fish_mask, fisher_samples
from chapters.ch2_additive.ia3 import apply_ia3, count_ia3
from minimal.data import Example, Task
from minimal.gpt import GPT
from minimal.peft import count_trainable, trainable_names
from minimal.sparse import delta_masks, empirical_fisher, mask_count, mask_overlap
from minimal.train import TrainConfig, train
from tests.helpers import effective_params, masked_batch, tiny_config, tiny_gpt

CFG = tiny_config(n_embd=32)


def tiny() -> GPT:
    return tiny_gpt(0, CFG, eval_mode=False)


def batch(n=8, seed=1):
    return masked_batch(seed, b=n, t=12, prompt=5)


def effective(model):
    """Every tensor under its original name, read through any parametrisation."""
    return effective_params(model, tiny())


def run(model, hooks, steps=8):
    idx, labels = batch()
    return train(model, lambda gen: (idx, labels), TrainConfig(steps=steps, lr=1e-2, warmup=0, log_every=0), hooks)


def test_mask_is_exactly_the_top_k_of_the_fisher():
    model = tiny()
    idx, labels = batch()
    fraction = 0.01
    k = int(fraction * CFG.n_params())
    mask = fish_mask(model, idx, labels, fraction=fraction)
    assert "wte.weight" not in mask and mask_count(mask) == k
    fisher = empirical_fisher(model, idx, labels, names=list(mask), method="loop")  # independent computation
    chosen = torch.cat([fisher[n][mask[n]] for n in mask])
    rest = torch.cat([fisher[n][~mask[n]] for n in mask])
    assert chosen.min() >= rest.max()
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    assert torch.allclose(chosen.sort().values, flat.topk(k).values.sort().values, rtol=1e-4)


def test_delta_training_count_learns_and_leaves_unselected_entries_bitwise():
    model = tiny()
    idx, labels = batch()
    base_logits = model(idx).logits
    theta0 = effective(model)
    hooks = apply_fish_mask(model, batch(), fraction=0.02)
    mask = delta_masks(model)
    k = int(0.02 * CFG.n_params())
    assert count_trainable(model).trainable == mask_count(mask) == k == count_fish_mask(CFG, 0.02)
    assert torch.equal(model(idx).logits, base_logits)
    res = run(model, hooks)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    after = effective(model)
    for n, t in after.items():
        m = mask.get(n, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~m], theta0[n][~m]), n
    moved = sum(int((after[n][m] != theta0[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.9 * k


def test_grad_mask_implementation_gives_the_same_mask_and_guarantee():
    model = tiny()
    theta0 = effective(model)
    hooks = apply_fish_mask(model, batch(), fraction=0.02, implementation="grad_mask")
    mask = hooks.masks
    assert hooks.n_trainable == mask_count(mask) == count_fish_mask(CFG, 0.02)
    reference = tiny()
    ref_mask = fish_mask(reference, *batch(), fraction=0.02)
    assert all(torch.equal(mask[n], ref_mask[n]) for n in mask)
    assert mask_count(mask) == mask_count(ref_mask)
    run(model, hooks, steps=4)
    for n, t in effective(model).items():
        m = mask.get(n, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~m], theta0[n][~m]), n
        assert n in mask or torch.equal(t, theta0[n])


def test_fraction_one_with_nothing_excluded_is_full_fine_tuning():
    model, full = tiny(), tiny()
    apply_fish_mask(model, batch(), fraction=1.0, exclude=())
    assert count_trainable(model).trainable == CFG.n_params()
    run(model, None, steps=4)
    run(full, None, steps=4)
    idx, _ = batch()
    assert torch.allclose(model(idx).logits, full(idx).logits, atol=1e-5)


def test_random_mask_has_the_same_budget_but_other_entries():
    model = tiny()
    idx, labels = batch()
    fisher = fish_mask(model, idx, labels, fraction=0.01)
    rand = fish_mask(model, idx, labels, fraction=0.01, score="random", seed=0)
    assert mask_count(rand) == mask_count(fisher)
    assert mask_overlap(rand, fisher) < 0.2
    assert all(torch.equal(rand[n], m) for n, m in fish_mask(model, None, None, 0.01, score="random").items())
    apply_fish_mask(model, None, fraction=0.01, score="random")  # the baseline needs no data
    assert all(torch.equal(m, rand[n]) for n, m in delta_masks(model).items())


def test_fisher_samples_from_a_task_are_deterministic():
    task = Task("t", "classify", {"train": [Example(f"item {i}", "yes") for i in range(20)], "val": [], "test": []})
    a = fisher_samples(task, 5, block_size=32, seed=0)
    b = fisher_samples(task, 5, block_size=32, seed=0)
    assert a[0].shape[0] == 5 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    idx, labels = batch()
    assert fisher_samples((idx, labels), 3, 32)[0].shape[0] == 3


def test_stacked_on_another_method_leaves_its_parameters_to_it():
    model = tiny()
    apply_ia3(model)
    hooks = apply_fish_mask(model, None, fraction=0.01, score="random", implementation="grad_mask")
    assert not any(n.endswith(".scale") for n in hooks.masks)  # (IA)^3's vectors are not scored or masked
    assert all(n in trainable_names(model) for n, _ in model.named_parameters() if n.endswith(".scale"))
    assert hooks.n_trainable == mask_count(hooks.masks) + count_ia3(CFG)


def test_errors(refuses):
    model = tiny()
    refuses(model, lambda m: apply_fish_mask(m, batch(), implementation="dense"), "implementation")
    refuses(model, lambda m: apply_fish_mask(m, batch(), fraction=0.0), "fraction")
    refuses(model, lambda m: apply_fish_mask(m, batch(), fraction=1.0), "eligible")
    refuses(model, lambda m: apply_fish_mask(m, [1, 2, 3]), "Task or an", TypeError)
    refuses(model, lambda m: apply_fish_mask(m, None), "needs data")
    refuses(model, lambda m: apply_fish_mask(m, batch(), n_samples=0), "n_samples")
    with pytest.raises(ValueError, match="unknown score"):
        fish_mask(model, *batch(), score="magnitude")
    with pytest.raises(ValueError, match="fraction"):
        fish_mask(model, *batch(), fraction=0.0)
    with pytest.raises(ValueError, match="eligible"):
        fish_mask(model, *batch(), fraction=1.0)  # wte is excluded: not enough entries
    with pytest.raises(ValueError, match="exclude names unknown"):
        fish_mask(model, *batch(), exclude=("lm_head.weight",))
    with pytest.raises(ValueError, match="needs samples"):
        fish_mask(model, None, None)
    apply_fish_mask(model, batch(), fraction=0.01)
    refuses(model, lambda m: apply_fish_mask(m, batch(), fraction=0.01, exclude=()), "already has sparse deltas")
