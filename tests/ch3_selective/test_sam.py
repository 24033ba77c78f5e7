import itertools

import pytest
import torch
import torch.nn as nn

from chapters.ch3_selective.freeze_layers import apply_freeze_layers
from chapters.ch3_selective.sam import (
    accumulated_gradient,
    apply_sam,
    burn_in_batches,
    count_sam,
    sam_mask,
    second_order_scores,
)
from minimal.data import Example, Task
from minimal.gpt import GPT
from minimal.peft import count_trainable, trainable_names
from minimal.sparse import delta_masks, mask_count
from minimal.train import TrainConfig, train
from tests.helpers import effective_params, masked_batches, tiny_config, tiny_gpt

CFG = tiny_config(n_embd=32)


def tiny() -> GPT:
    return tiny_gpt(0, CFG, eval_mode=False)


def effective(model):
    return effective_params(model, tiny())


# ------------------------------------------------------------------------------------------ the quadratic toy


class Quadratic(nn.Module):
    """L_t(theta) = g_t . (theta - theta0) + 1/2 sum_i h_i (theta - theta0)_i^2, one g_t per 'batch'."""

    def __init__(self, n: int, h: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n))
        self.theta0 = self.theta.detach().clone()
        self.h = h


def quad_loss(model: Quadratic, g_t: torch.Tensor) -> torch.Tensor:
    d = model.theta - model.theta0
    return g_t @ d + 0.5 * (model.h * d.square()).sum()


def brute_force_best_mask(model: Quadratic, gs: list[torch.Tensor], K: int) -> set[int]:
    """Try every K-subset: solve the restricted quadratic exactly and evaluate the summed loss."""
    n = model.theta.numel()
    H = torch.diag(model.h) * len(gs)  # Hessian of sum_t L_t
    G = torch.stack(gs).sum(0)
    best, best_loss = None, float("inf")
    for subset in itertools.combinations(range(n), K):
        s = list(subset)
        delta = torch.zeros(n)
        delta[s] = torch.linalg.solve(H[s][:, s], -G[s])
        with torch.no_grad():
            model.theta.copy_(model.theta0 + delta)
            loss = sum(quad_loss(model, g).item() for g in gs)
            model.theta.copy_(model.theta0)
        if loss < best_loss - 1e-9:
            best, best_loss = set(s), loss
    return best


def chosen(mask):
    return set(mask["theta"].nonzero().squeeze(1).tolist())


def test_uniform_curvature_brute_force_equals_top_abs_accumulated_gradient():
    torch.manual_seed(0)
    n, K = 8, 3
    model = Quadratic(n, torch.full((n,), 2.0))
    gs = [torch.randn(n) for _ in range(4)]
    G = accumulated_gradient(model, gs, loss_fn=quad_loss)
    assert torch.allclose(G["theta"], torch.stack(gs).sum(0), atol=1e-6)
    assert torch.equal(model.theta.detach(), model.theta0) and model.theta.grad is None  # no update
    mask = sam_mask(G, fraction=K / n)
    assert chosen(mask) == brute_force_best_mask(model, gs, K)


def test_non_uniform_curvature_needs_g_squared_over_h():
    n, K = 6, 2
    h = torch.tensor([20.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    model = Quadratic(n, h)
    g = torch.tensor([3.0, 2.0, 1.5, 0.1, -0.2, 0.3])  # |g| ranks entry 0 first, but it is very curved
    G = accumulated_gradient(model, [g], loss_fn=quad_loss)
    best = brute_force_best_mask(model, [g], K)
    theory = sam_mask(second_order_scores(G, {"theta": h}), fraction=K / n)
    assert chosen(theory) == best == {1, 2}
    assert chosen(sam_mask(G, fraction=K / n)) != best  # the |g| rule is only right for uniform h


# ------------------------------------------------------------------------------------------ on the GPT


def test_accumulated_gradient_is_the_signed_sum_and_changes_nothing():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = masked_batches(3)
    G = accumulated_gradient(model, batches, names=["h.0.mlp.c_fc.weight", "h.1.attn.c_attn.bias"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    expected = {n: torch.zeros_like(G[n]) for n in G}
    for idx, labels in batches:
        model.zero_grad()
        model(idx, labels=labels).loss.backward()
        for n in G:
            expected[n] += model.get_parameter(n).grad
    for n in G:
        assert torch.allclose(G[n], expected[n], atol=1e-6)


def test_mask_is_per_tensor_top_of_abs_gradient_with_the_exact_budget():
    model = tiny()
    batches = masked_batches(3)
    rho = 0.05
    G = accumulated_gradient(model, batches, [n for n, _ in model.named_parameters() if n != "wte.weight"])
    mask = sam_mask(G, rho)
    for n, m in mask.items():
        k = int(rho * m.numel())
        assert int(m.sum()) == k
        if 0 < k < m.numel():
            assert G[n].abs()[m].min() >= G[n].abs()[~m].max()
    apply_sam(model, batches, fraction=rho)
    expected = sum(int(rho * p.numel()) for n, p in tiny().named_parameters() if n != "wte.weight")
    assert count_trainable(model).trainable == expected == mask_count(delta_masks(model)) == count_sam(CFG, rho)
    assert all(torch.equal(delta_masks(model)[n], mask[n]) for n in delta_masks(model))
    assert "wte.weight" not in delta_masks(model)


def test_global_variant_keeps_k_entries_overall():
    G = {"a": torch.tensor([5.0, -1.0, 0.5]), "b": torch.tensor([[-4.0, 0.1], [3.0, 0.0]])}
    mask = sam_mask(G, fraction=3 / 7, per_tensor=False)
    assert mask["a"].tolist() == [True, False, False] and mask["b"].tolist() == [[True, False], [True, False]]


def test_training_learns_and_leaves_unselected_entries_bitwise():
    model = tiny()
    batches = masked_batches(3)
    theta0 = effective(model)
    apply_sam(model, batches, fraction=0.05)
    masks = delta_masks(model)
    idx, labels = batches[0]
    res = train(model, lambda g: (idx, labels), TrainConfig(steps=15, lr=1e-2, warmup=0, log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    after = effective(model)
    for n, t in after.items():
        m = masks.get(n, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~m], theta0[n][~m]), n
    assert any(not torch.equal(after[n][m], theta0[n][m]) for n, m in masks.items())


def test_grad_mask_implementation_uses_the_same_mask():
    batches = masked_batches(2)
    a, b = tiny(), tiny()
    apply_sam(a, batches, fraction=0.05)
    hooks = apply_sam(b, batches, fraction=0.05, implementation="grad_mask")
    trainable = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trainable == set(delta_masks(a))
    assert hooks.n_trainable == count_trainable(a).trainable == count_sam(CFG, 0.05)  # the masked entries only


def test_global_budget_count_matches_the_formula():
    model = tiny()
    apply_sam(model, masked_batches(2), fraction=0.05, per_tensor=False, exclude=("wte.weight", "wpe.weight"))
    assert count_trainable(model).trainable == count_sam(CFG, 0.05, per_tensor=False,
                                                         exclude=("wte.weight", "wpe.weight"))


def test_burn_in_batches_from_a_task_are_deterministic():
    task = Task("t", "classify", {"train": [Example(f"item {i}", "yes") for i in range(20)], "val": [], "test": []})
    one = burn_in_batches(task, 32, batch_size=4, n_batches=3, seed=1)
    two = burn_in_batches(task, 32, batch_size=4, n_batches=3, seed=1)
    assert len(one) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(one, two))


def test_errors(refuses):
    model = tiny()
    batches = masked_batches(1)
    refuses(model, lambda m: apply_sam(m, batches, implementation="dense"), "implementation")
    refuses(model, lambda m: apply_sam(m, batches, exclude=("lm_head.weight",)), "exclude")
    refuses(model, lambda m: apply_sam(m, batches, fraction=1e-6), "selects no entry")
    refuses(model, lambda m: apply_sam(m, batches, n_batches=0), "n_batches")
    with pytest.raises(ValueError, match="fraction"):
        sam_mask({"a": torch.ones(3)}, fraction=1.5)
    with pytest.raises(ValueError, match="selects no entry"):
        sam_mask({"a": torch.ones(3)}, fraction=0.1)
    with pytest.raises(ValueError, match="no batches"):
        accumulated_gradient(model, [])
    with pytest.raises(ValueError, match="positive"):
        second_order_scores({"a": torch.ones(2)}, {"a": torch.tensor([1.0, 0.0])})
    apply_sam(model, batches, fraction=0.05)
    refuses(model, lambda m: apply_sam(m, batches, fraction=0.05), "already has sparse deltas")


def test_grad_mask_training_moves_exactly_the_selected_entries():
    batches = masked_batches(2)
    model = tiny()
    hooks = apply_sam(model, batches, fraction=0.05, implementation="grad_mask")
    reference = tiny()
    apply_sam(reference, batches, fraction=0.05)
    mask = delta_masks(reference)  # the delta path's mask: the one the grad-mask path must train
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx, labels = batches[0]
    train(model, lambda g: (idx, labels), TrainConfig(steps=5, lr=1e-2, warmup=0, log_every=0), hooks)
    params = dict(model.named_parameters())
    for n, m in mask.items():
        assert torch.equal(params[n][~m], before[n][~m]), n
    moved = sum(int((params[n][m] != before[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())


def test_stacked_on_another_method_leaves_its_parameters_alone():
    model = tiny()
    apply_freeze_layers(model, k=1)  # a first method: the top block and ln_f train
    first = set(trainable_names(model))
    apply_sam(model, masked_batches(2), fraction=0.05)
    assert first <= set(trainable_names(model))  # still trained, densely, by the first method
    assert not first & set(delta_masks(model))  # and neither scored nor masked by SAM
