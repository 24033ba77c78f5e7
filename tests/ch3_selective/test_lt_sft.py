import pytest
import torch

from chapters.ch3_selective.lt_sft import (
    SparseDiff,
    apply_lt_sft,
    batch_source,
    compare_composition,
    compose,
    count_lt_sft,
    find_mask,
    full_finetune,
    l1_pull,
    maskable_names,
    read_state,
)
from minimal.data import Example, Task
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, trainable_names
from minimal.sparse import delta_masks, mask_count, merge_sparse_deltas
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def source(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (8, 12), generator=g)
    labels = idx.clone()
    labels[:, :5] = -100
    return lambda gen: (idx, labels)


def names():
    return [n for n, _ in tiny().named_parameters()]


def test_maskable_excludes_the_head_and_layernorms():
    m = maskable_names(tiny())
    assert "wte.weight" not in m and "wpe.weight" in m and "h.0.mlp.c_fc.weight" in m
    assert not any("ln_" in n for n in m)


def test_selection_is_the_top_k_change_and_the_model_is_rewound_bitwise():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    k = 500
    phase1 = find_mask(model, source(), k, steps=4, lr=1e-2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # rewound: theta0 everywhere, bitwise
        assert p.requires_grad == flags[n]
    assert mask_count(phase1.mask) == k
    change = {n: (phase1.theta1[n] - phase1.theta0[n]).abs() for n in phase1.mask}
    chosen = torch.cat([change[n][m] for n, m in phase1.mask.items()])
    rest = torch.cat([change[n][~m] for n, m in phase1.mask.items()])
    assert chosen.min() >= rest.max() and chosen.min() > 0
    every = torch.cat([c.reshape(-1) for c in change.values()])
    assert torch.equal(chosen.sort().values, every.sort().values[-k:])  # brute force: the k largest changes
    assert all(torch.equal(phase1.theta0[n], before[n]) for n in phase1.theta0)


def test_phase2_trains_exactly_k_entries_and_nothing_outside_the_mask_changes():
    model = tiny()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    fraction = 0.01
    apply_lt_sft(model, source(), fraction=fraction, full_steps=4, full_lr=1e-2)
    k = int(fraction * CFG.n_params())
    assert count_trainable(model).trainable == k == mask_count(delta_masks(model)) == count_lt_sft(CFG, fraction)
    assert torch.equal(model(source()(None)[0]).logits, tiny()(source()(None)[0]).logits)  # rewound: theta0
    res = train(model, source(), TrainConfig(steps=12, lr=3e-2, warmup=0, log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    masks = delta_masks(model)
    after = read_state(model, names())
    for n, t in after.items():
        m = masks.get(n, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~m], theta0[n][~m]), n
    phi = SparseDiff.from_model(model)
    assert 0 < phi.nnz() <= k
    assert all(not (pm & ~masks[n]).any() for n, pm in phi.masks().items())  # support(phi) within M
    merge_sparse_deltas(model)
    assert all(torch.allclose(t, theta0[n] + phi.to_dense().get(n, 0)) for n, t in read_state(model, names()).items())


def diffs():
    """Two sparse phis with overlapping supports, as from a language and a task SFT."""
    shapes = {n: p.shape for n, p in tiny().named_parameters()}
    g = torch.Generator().manual_seed(0)

    def phi(rows):
        index = {"h.0.mlp.c_fc.weight": torch.tensor(rows), "wpe.weight": torch.tensor([3, 4])}
        values = {n: torch.randn(len(i), generator=g) for n, i in index.items()}
        return SparseDiff(index, values, {n: shapes[n] for n in index})

    return phi([0, 5, 9]), phi([5, 7])


def test_composition_is_theta0_plus_both_deltas_commutative_and_reversible():
    model = tiny()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    a, b = diffs()
    dense_a, dense_b = a.to_dense(), b.to_dense()
    composed = compose(model, a, b)
    assert all(torch.equal(p, theta0[n]) for n, p in model.named_parameters())  # compose copies
    for n, p in composed.named_parameters():
        expected = theta0[n] + dense_a.get(n, 0) + dense_b.get(n, 0)
        assert torch.allclose(p, expected, atol=1e-7), n
    summed = a + b
    assert summed.nnz() == 4 + 2  # union of supports: c_fc {0, 5, 9} | {5, 7}, wpe {3, 4} | {3, 4}
    for n, p in compose(model, summed).named_parameters():
        assert torch.allclose(p, dict(composed.named_parameters())[n], atol=1e-7)
        assert torch.allclose(p, dict(compose(model, b, a).named_parameters())[n], atol=1e-7)
    back = compose(composed, -a, -b)
    assert all(torch.allclose(p, theta0[n], atol=1e-6) for n, p in back.named_parameters())


def test_dense_deltas_and_the_comparison_function():
    model = tiny()
    theta0 = read_state(model, names())
    shifted = {n: t + 0.01 for n, t in theta0.items()}
    dense = SparseDiff.between(theta0, shifted, eps=None)
    assert dense.nnz() == CFG.n_params()
    a, b = diffs()
    seen = []

    def evaluate(m):
        seen.append(m)
        return float(m.wpe.weight.detach().sum())

    out = compare_composition(model, [a, b], [dense, dense], evaluate)
    assert out["dense_overlap"] == 1.0 and 0 < out["sparse_overlap"] < 1
    assert out["sparse"] == pytest.approx(float((theta0["wpe.weight"] + a.to_dense()["wpe.weight"]
                                                 + b.to_dense()["wpe.weight"]).sum()), rel=1e-5)
    assert out["dense"] == pytest.approx(float(theta0["wpe.weight"].sum()) + 0.02 * theta0["wpe.weight"].numel(),
                                         rel=1e-4)
    assert len(seen) == 2


def test_l1_pull_equals_the_hand_computed_value():
    model = tiny()
    theta0 = read_state(model, ["h.0.mlp.c_fc.bias", "wpe.weight"])
    with torch.no_grad():
        model.h[0].mlp.c_fc.bias += 0.5
        model.wpe.weight[0, :3] -= 2.0
    value = l1_pull(theta0, lam=0.1, n_params=1000)(model)
    expected = 0.1 / 1000 * (0.5 * 4 * CFG.n_embd + 2.0 * 3)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    model2 = tiny()
    hooks = apply_lt_sft(model2, source(), fraction=0.01, full_steps=2, lam=0.1)
    assert hooks.extra_loss(model2).item() == 0.0  # at theta0 the pull is zero


def test_phase1_loop_is_the_shared_loop_with_its_defaults():
    ours, shared = tiny(), tiny()
    losses = full_finetune(ours, source(), steps=5, lr=1e-2, seed=3)
    res = train(shared, source(), TrainConfig(steps=5, lr=1e-2, warmup=0, seed=3, log_every=0, progress=False))
    assert losses == [h["loss"] for h in res.history]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), shared.parameters(), strict=True))


def test_stacked_on_another_method_leaves_its_parameters_alone():
    model = tiny()
    model.peft_methods_applied = 1  # as if a first method had trained ln_f and wpe
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("ln_f.", "wpe.")))
    first = set(trainable_names(model))
    apply_lt_sft(model, source(), fraction=0.01, full_steps=2)
    assert first <= set(trainable_names(model)) and not first & set(delta_masks(model))


def test_batch_source_and_errors(refuses):
    task = Task("t", "classify", {"train": [Example(f"item {i}", "yes") for i in range(5)], "val": [], "test": []})
    idx, labels = batch_source(task, 32, 4)(torch.Generator().manual_seed(0))
    assert idx.shape[0] == 4 and labels.shape == idx.shape
    with pytest.raises(TypeError, match="Task or a get_batch"):
        batch_source([1, 2], 32, 4)
    model = tiny()
    refuses(model, lambda m: apply_lt_sft(m, source(), fraction=0.99, full_steps=1), "maskable")
    refuses(model, lambda m: apply_lt_sft(m, source(), fraction=0.01, full_steps=0), "full_steps")
    refuses(model, lambda m: apply_lt_sft(m, [1, 2], fraction=0.01, full_steps=1), "get_batch", TypeError)
    refuses(model, lambda m: apply_lt_sft(m, source(), fraction=0.01, full_steps=2, full_lr=1e9),
            "non-finite|loss became", FloatingPointError)  # phase 1 diverges: rewound, flags restored
    a, _ = diffs()
    bad = SparseDiff(a.index, a.values, {**a.shapes, "wpe.weight": torch.Size([2, 2])})
    with pytest.raises(ValueError, match="shape"):
        bad.apply_to(tiny())
    with pytest.raises(ValueError, match="not plain parameters"):
        SparseDiff({"h.9.x": torch.tensor([0])}, {"h.9.x": torch.ones(1)}, {"h.9.x": torch.Size([1])}).apply_to(model)
    with pytest.raises(ValueError, match="no sparse deltas"):
        SparseDiff.from_model(model)
    with pytest.raises(ValueError, match="at least one"):
        compose(model)
    apply_lt_sft(model, source(), fraction=0.01, full_steps=1)
    refuses(model, lambda m: apply_lt_sft(m, source(), fraction=0.01, full_steps=1), "already has sparse deltas")
