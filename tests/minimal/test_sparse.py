import pytest
import torch

from minimal.gpt import GPT, GPTConfig
from minimal.hooks import Hooks
from minimal.peft import count_trainable, freeze, trained_before
from minimal.sparse import (
    GradMask,
    SparseDelta,
    add_sparse_deltas,
    budget,
    delta_masks,
    empirical_fisher,
    mask_count,
    mask_overlap,
    merge_sparse_deltas,
    sparse_deltas,
    squared_batch_gradient,
    sum_batch_gradients,
    topk_mask,
)
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def batch(n: int = 6, t: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (n, t), generator=g)
    labels = idx.clone()
    labels[:, :4] = -100  # a prompt
    labels[0, 8:] = -100  # examples with different numbers of targets
    return idx, labels


def adamw_everywhere(params, cfg):  # weight decay on every tensor, vectors included
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.1)


def fixed_batch(idx, labels):
    return lambda gen: (idx, labels)


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ masks


def test_topk_mask_picks_the_global_largest_entries():
    scores = {"a": torch.tensor([[0.1, 5.0], [3.0, 0.2]]), "b": torch.tensor([4.0, -1.0, 0.0])}
    m = topk_mask(scores, 3)
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [True, False, False]
    assert mask_count(m) == 3


def test_topk_mask_exact_count_with_ties_and_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"x": torch.rand(7, 9, generator=g), "y": torch.zeros(20)}  # 20 tied zeros
    for k in (1, 10, 63, 70, 83):
        m = topk_mask(scores, k)
        assert mask_count(m) == k
        chosen = torch.cat([scores[n][m[n]] for n in scores])
        rest = torch.cat([scores[n][~m[n]] for n in scores])
        if len(rest):
            assert chosen.min() >= rest.max()


def test_topk_and_budget_errors():
    with pytest.raises(ValueError, match="k must be"):
        topk_mask({"x": torch.rand(4)}, 0)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        topk_mask({"x": torch.rand(4)}, 5)
    with pytest.raises(ValueError, match="no score"):
        topk_mask({}, 1)
    assert budget(0.005, 842_496) == 4212  # 0.5% of a 4-layer, width-128 GPT (vocab 256, block 128)
    with pytest.raises(ValueError, match="fraction"):
        budget(0.0, 100)
    with pytest.raises(ValueError, match="selects no entry"):
        budget(0.001, 100)


def test_mask_overlap():
    a = {"x": torch.tensor([True, True, False, False])}
    b = {"x": torch.tensor([False, True, True, False])}
    assert mask_overlap(a, b) == pytest.approx(1 / 3)
    assert mask_overlap(a, a) == 1.0
    with pytest.raises(ValueError, match="different parameters"):
        mask_overlap(a, {"y": a["x"]})


# ------------------------------------------------------------------------------------------ Fisher


def test_loop_and_vmap_fisher_agree_and_batch_mean_square_differs():
    model = tiny()
    idx, labels = batch()
    loop = empirical_fisher(model, idx, labels, method="loop")
    vm = empirical_fisher(model, idx, labels, method="vmap", chunk_size=4)  # uneven chunks: 4 + 2
    assert set(loop) == {n for n, _ in model.named_parameters()}
    for n in loop:
        scale = loop[n].abs().max()
        assert torch.allclose(loop[n], vm[n], rtol=1e-4, atol=1e-6 * scale), n
    sq = squared_batch_gradient(model, idx, labels)
    num = sum((sq[n] - loop[n]).abs().sum() for n in loop)
    den = sum(loop[n].abs().sum() for n in loop)
    assert num / den > 0.3  # cross terms between examples: a different quantity


def test_fisher_of_one_example_is_its_squared_gradient():
    model = tiny()
    idx, labels = batch(n=1)
    f = empirical_fisher(model, idx, labels, names=["h.0.mlp.c_fc.weight"], method="vmap")
    sq = squared_batch_gradient(model, idx, labels, names=["h.0.mlp.c_fc.weight"])
    assert torch.allclose(f["h.0.mlp.c_fc.weight"], sq["h.0.mlp.c_fc.weight"], rtol=1e-4, atol=1e-12)


def test_fisher_leaves_the_model_untouched_and_validates():
    model = tiny()
    model.train()
    before = snapshot(model)
    idx, labels = batch()
    empirical_fisher(model, idx, labels, names=["ln_f.weight"], method="vmap")
    assert model.training and all(b.attn.fast for b in model.h)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="method"):
        empirical_fisher(model, idx, labels, method="magic")
    with pytest.raises(ValueError, match="cannot score"):
        empirical_fisher(model, idx, labels, names=["nope.weight"])
    labels[2] = -100
    with pytest.raises(ValueError, match=r"examples \[2\] have no target"):
        empirical_fisher(model, idx, labels)


# ------------------------------------------------------------------------------------------ delta parametrisation


def random_masks(model, names, p=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < p for n in names}


def test_sparse_delta_identity_count_and_untouched_entries_under_adamw_decay():
    model = tiny()
    idx, labels = batch()
    theta0 = snapshot(model)
    base_logits = model(idx).logits
    names = ["h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight", "h.1.ln_2.bias", "wte.weight"]
    masks = random_masks(model, names)
    freeze(model)
    assert add_sparse_deltas(model, masks) == names
    counts = count_trainable(model)
    assert counts.trainable == mask_count(masks) and counts.total == CFG.n_params() + mask_count(masks)
    assert torch.equal(model(idx).logits, base_logits)  # Delta = 0 at init: bitwise the base model
    assert all(torch.equal(delta_masks(model)[n], masks[n]) for n in names)

    res = train(model, fixed_batch(idx, labels), TrainConfig(steps=12, lr=1e-2, warmup=0, log_every=0),
                Hooks(make_optimizer=adamw_everywhere))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    for n in names:
        module, attr = n.rsplit(".", 1)
        theta = getattr(model.get_submodule(module), attr).detach()
        assert torch.equal(theta[~masks[n]], theta0[n][~masks[n]]), n  # bitwise, despite weight decay
        assert (theta[masks[n]] != theta0[n][masks[n]]).float().mean() > 0.9, n
    for n, t in model.state_dict().items():  # tensors without a delta are untouched too
        if n in theta0:
            assert torch.equal(t, theta0[n]), n

    trained_logits = model(idx).logits
    assert merge_sparse_deltas(model) == len(names)
    assert set(model.state_dict()) == set(theta0)  # plain parameters again, original names
    assert torch.equal(model(idx).logits, trained_logits)
    assert list(sparse_deltas(model)) == []


def test_sparse_delta_skips_empty_masks_and_rejects_bad_input():
    model = tiny()
    freeze(model)
    masks = random_masks(model, ["h.0.mlp.c_fc.bias"])
    masks["h.1.mlp.c_fc.bias"] = torch.zeros(4 * CFG.n_embd, dtype=torch.bool)
    assert add_sparse_deltas(model, masks) == ["h.0.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="already have a sparse delta"):
        add_sparse_deltas(model, {"h.0.mlp.c_fc.bias": masks["h.0.mlp.c_fc.bias"]})
    with pytest.raises(ValueError, match="unknown parameters"):
        add_sparse_deltas(model, {"h.9.mlp.c_fc.bias": masks["h.0.mlp.c_fc.bias"]})
    with pytest.raises(TypeError, match="bool"):
        add_sparse_deltas(model, {"ln_f.bias": torch.ones(CFG.n_embd)})
    with pytest.raises(ValueError, match="shape"):
        add_sparse_deltas(model, {"ln_f.bias": torch.ones(3, dtype=torch.bool)})


def test_sparse_delta_right_inverse_round_trip():
    theta0 = torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.5
    sd = SparseDelta(theta0, mask)
    assert torch.equal(sd(sd.right_inverse(theta0)), theta0)
    target = theta0 + 1.0
    out = sd(sd.right_inverse(target))
    assert torch.allclose(out[mask], target[mask]) and torch.equal(out[~mask], theta0[~mask])


# ------------------------------------------------------------------------------------------ gradient masking


@pytest.mark.parametrize("restore", [False, True])
def test_grad_mask_restore_keeps_unselected_entries_bitwise(restore):
    model = tiny()
    idx, labels = batch()
    theta0 = snapshot(model)
    names = ["h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight"]
    masks = random_masks(model, names, p=0.2)
    freeze(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    gm = GradMask(model, masks, restore=restore)
    hooks = Hooks(after_backward=gm.after_backward, step_end=gm.step_end, make_optimizer=adamw_everywhere)
    train(model, fixed_batch(idx, labels), TrainConfig(steps=5, lr=1e-2, warmup=0, log_every=0), hooks)
    params = dict(model.named_parameters())
    for n in names:
        unselected_same = torch.equal(params[n][~masks[n]], theta0[n][~masks[n]])
        assert unselected_same == restore, n  # without restore, AdamW's decay moves them: the pitfall
        assert (params[n][masks[n]] != theta0[n][masks[n]]).any()


def test_grad_mask_scales_and_zeroes_the_gradient():
    model = tiny()
    idx, labels = batch()
    model(idx, labels=labels).loss.backward()
    g = model.h[0].mlp.c_fc.weight.grad.clone()
    mask = torch.rand(g.shape) < 0.3
    GradMask(model, {"h.0.mlp.c_fc.weight": mask}, restore=False, scale=2.5).after_backward(model, 0)
    assert torch.equal(model.h[0].mlp.c_fc.weight.grad, g * mask * 2.5)


def test_grad_mask_is_the_hooks_and_counts_the_entries_it_lets_train():
    model = tiny()
    freeze(model)
    model.ln_f.bias.requires_grad_(True)  # a dense trainable tensor beside the masked one
    model.h[0].mlp.c_fc.weight.requires_grad_(True)
    mask = torch.rand(model.h[0].mlp.c_fc.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.1
    gm = GradMask(model, {"h.0.mlp.c_fc.weight": mask})
    assert isinstance(gm, Hooks) and gm.hooks() is gm
    assert gm.n_trainable == int(mask.sum()) + CFG.n_embd


def test_trained_before_names_an_earlier_method_s_trainables_only():
    model = tiny()
    assert trained_before(model) == set()  # a fresh model: everything requires grad, nothing was applied
    freeze(model)
    model.ln_f.bias.requires_grad_(True)
    model.peft_methods_applied = 1  # what minimal.peft.freeze_base records
    assert trained_before(model) == {"ln_f.bias"}


def test_sparse_needs_torch_and_hooks_only():
    import subprocess
    import sys

    code = ("import sys, minimal.sparse; print(sorted(n for n in sys.modules if n.startswith(('minimal', 'chapters', "
            "'tiktoken', 'regex'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['minimal', 'minimal.hooks', 'minimal.sparse']"


def test_grad_mask_errors():
    model = tiny()
    mask = torch.ones(CFG.n_embd, dtype=torch.bool)
    with pytest.raises(ValueError, match="scale"):
        GradMask(model, {"ln_f.bias": mask}, scale=0.0)
    freeze(model)
    with pytest.raises(ValueError, match="do not require grad"):
        GradMask(model, {"ln_f.bias": mask})


def test_sum_batch_gradients_sums_transformed_batch_gradients_and_leaves_the_model_alone() -> None:
    model = tiny().train()
    freeze_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.h[0].mlp.c_fc.weight.requires_grad_(False)  # a frozen tensor is scored all the same
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [batch(seed=1), batch(seed=2)]
    names = ["h.0.mlp.c_fc.weight", "h.1.attn.c_attn.bias"]
    total, count = sum_batch_gradients(model, batches, names, transform=torch.square)
    assert count == 2 and set(total) == set(names)
    # the reference: one plain backward per batch on a copy in eval mode
    ref = tiny().eval()
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if n in names}
    for idx, labels in batches:
        ref.zero_grad()
        ref(idx, labels=labels).loss.backward()
        for n, p in ref.named_parameters():
            if n in names:
                expected[n] += p.grad.square()
    for n in names:
        torch.testing.assert_close(total[n], expected[n])
        assert total[n].abs().max() > 0
    assert model.training and not model.h[0].mlp.c_fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        **freeze_flags, "h.0.mlp.c_fc.weight": False}
    with pytest.raises(ValueError, match="cannot take gradients"):
        sum_batch_gradients(model, batches, ["nope"])
