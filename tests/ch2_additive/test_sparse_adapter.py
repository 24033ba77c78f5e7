import math

import pytest
import torch

from chapters.ch2_additive.adapters import apply_adapters
from chapters.ch2_additive.sparse_adapter import (
    apply_sparse_adapter,
    count_sparse_adapter,
    large_sparse_bottleneck,
    masked_weights,
    n_keep,
    nonzero_count,
    prune,
    snip_scores,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
L, d = CFG.n_layer, CFG.n_embd


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def batch(seed: int = 1, B: int = 4, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    return x, x


def cfg(steps: int = 20, wd: float = 0.0, clip: float = 1.0) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=0, weight_decay=wd, grad_clip=clip,
                       progress=False, log_every=0)


def test_snip_score_is_weight_times_gradient():
    model = tiny()
    apply_sparse_adapter(model, bottleneck=8, fraction=1.0, batches=[batch()])  # keep all: nothing pruned
    weights = masked_weights(model)
    assert sorted(weights) == ["h.0.mlp_out.down", "h.0.mlp_out.up", "h.1.mlp_out.down", "h.1.mlp_out.up"]
    scores = snip_scores(model, [batch(1), batch(2)])
    # by hand: |W * g| with g the gradient of the loss averaged over the two batches, normalised to sum 1
    loss = (model(batch(1)[0], labels=batch(1)[1]).loss + model(batch(2)[0], labels=batch(2)[1]).loss) / 2
    grads = torch.autograd.grad(loss, list(weights.values()))
    raw = {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
    total = sum(r.sum() for r in raw.values())
    for n in weights:
        torch.testing.assert_close(scores[n], raw[n] / total)
    assert all(bool((s > 0).any()) for s in scores.values())


@pytest.mark.parametrize("fraction", [0.6, 0.2])
def test_global_mask_keeps_exactly_the_top_k_scores(fraction: float):
    model = tiny()
    apply_sparse_adapter(model, bottleneck=8, fraction=fraction, batches=[batch()])
    weights = masked_weights(model)
    N = sum(w.numel() for w in weights.values())
    model2 = tiny()
    apply_sparse_adapter(model2, bottleneck=8, fraction=1.0, batches=[batch()])
    scores = snip_scores(model2, [batch()])  # the same init (same seed): the same scores
    masks = prune(model2, scores, fraction)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    dropped = torch.cat([scores[n][~masks[n]] for n in scores])
    assert kept.numel() == math.ceil(fraction * N) == n_keep(N, fraction)
    assert kept.min() >= dropped.max()
    counts = nonzero_count(model)
    assert counts["weights"] == kept.numel() and counts["dense_weights"] == N == L * 2 * 8 * d
    assert counts["weights"] / N == pytest.approx(fraction, abs=1 / N)
    for n, w in weights.items():  # the model's own mask is the same, and pruned weights are zero
        assert torch.equal(model.get_submodule(n).parametrizations.weight[0].mask, masks[n])
        assert torch.equal(w != 0, masks[n])


def test_per_tensor_scope_prunes_every_tensor_to_the_same_density():
    model = tiny()
    apply_sparse_adapter(model, bottleneck=8, fraction=0.4, scope="tensor", placement="houlsby", batches=[batch()])
    weights = masked_weights(model)
    assert len(weights) == 2 * 2 * L
    for w in weights.values():
        assert int((w != 0).sum()) == math.ceil(0.4 * w.numel())


def test_pruned_entries_stay_exactly_zero_under_adamw_with_weight_decay():
    model = tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = apply_sparse_adapter(model, bottleneck=8, fraction=0.3)  # SNIP on the first training batch
    assert hooks.after_backward is not None
    res = train(model, lambda g: batch(3), cfg(30, wd=0.1), hooks=hooks)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    for n, w in masked_weights(model).items():
        mask = model.get_submodule(n).parametrizations.weight[0].mask
        assert int(mask.sum()) > 0 and bool((~mask).any())
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))  # raw pruned entries
        assert torch.equal(model.get_submodule(n).weight[~mask], torch.zeros(int((~mask).sum())))  # effective
        assert (w[mask] != 0).all()
    total = nonzero_count(model)
    assert total["weights"] == n_keep(total["dense_weights"], 0.3)
    params = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(params[n], p), n


def test_scoring_at_step_zero_equals_scoring_the_first_batch_up_front():
    lazy, eager = tiny(), tiny()
    torch.manual_seed(5)
    hooks = apply_sparse_adapter(lazy, bottleneck=8, fraction=0.5)
    torch.manual_seed(5)
    apply_sparse_adapter(eager, bottleneck=8, fraction=0.5, batches=[batch(3)])
    before = {n: w.detach().clone() for n, w in masked_weights(lazy).items()}
    assert all(bool((w != 0).all()) for w in before.values())  # nothing pruned before step 0
    train(lazy, lambda g: batch(3), cfg(1, clip=0.0), hooks=hooks)
    for n in before:
        assert torch.equal(lazy.get_submodule(n).parametrizations.weight[0].mask,
                           eager.get_submodule(n).parametrizations.weight[0].mask)


def test_keeping_everything_reproduces_dense_adapter_training_exactly():
    dense, sparse = tiny(), tiny()
    torch.manual_seed(7)
    apply_adapters(dense, 8, "pfeiffer")
    torch.manual_seed(7)
    hooks = apply_sparse_adapter(sparse, bottleneck=8, fraction=1.0)
    x = batch(3)
    assert torch.equal(dense(x[0]).logits, sparse(x[0]).logits)
    train(dense, lambda g: x, cfg(5, wd=0.1, clip=0.0))
    train(sparse, lambda g: x, cfg(5, wd=0.1, clip=0.0), hooks=hooks)
    assert torch.equal(dense(x[0]).logits, sparse(x[0]).logits)


def test_large_sparse_has_the_dense_budget():
    m = 8
    assert large_sparse_bottleneck(m, 0.5) == 16 and large_sparse_bottleneck(m, 1.0) == m
    assert large_sparse_bottleneck(m, 0.2) == 40 and large_sparse_bottleneck(m, 0.6) == 13
    assert large_sparse_bottleneck(m, 1 - 0.8) == 40  # 8 / 0.19999999999999996 = 40.00000000000001
    dense_budget = L * 2 * m * d
    for f in (0.5, 0.2, 0.6, 0.4):
        m2 = large_sparse_bottleneck(m, f)
        model = tiny()
        apply_sparse_adapter(model, bottleneck=m2, fraction=f, criterion="magnitude")
        nnz = nonzero_count(model)["weights"]
        assert nnz <= dense_budget
        assert nnz > dense_budget - L * 2 * d  # one more bottleneck unit would exceed the budget
        if (m / f).is_integer():
            assert nnz == dense_budget
        # count_trainable and the formula: the dense storage of the masked tensors
        assert count_trainable(model).trainable == L * (2 * m2 * d + m2 + d) == count_sparse_adapter(CFG, m2)


def test_random_and_magnitude_criteria_and_zero_init_pitfall():
    model = tiny()
    torch.manual_seed(3)
    apply_sparse_adapter(model, bottleneck=8, fraction=0.5, criterion="magnitude", scope="tensor")
    dense = tiny()
    torch.manual_seed(3)
    apply_adapters(dense, 8, "pfeiffer")
    for i in range(L):  # magnitude keeps the largest |W| of each tensor
        w0, w = dense.h[i].mlp_out.down.weight, model.h[i].mlp_out.down.weight
        assert w0[w != 0].abs().min() >= w0[w == 0].abs().max()
    for w in masked_weights(model).values():
        kept, gone = w[w != 0].abs(), w[w == 0]
        assert kept.numel() == w.numel() // 2 == gone.numel()
    model = tiny()
    apply_sparse_adapter(model, bottleneck=8, fraction=0.5, criterion="random")
    assert nonzero_count(model)["weights"] == L * 8 * d


def test_errors(refuses):
    for bad in (0.0, -0.1, 1.5, "0.5", True):
        refuses(tiny(), lambda model, bad=bad: apply_sparse_adapter(model, fraction=bad), "fraction")
    refuses(tiny(), lambda model: apply_sparse_adapter(model, criterion="grasp"), "unknown pruning criterion")
    refuses(tiny(), lambda model: apply_sparse_adapter(model, scope="row"), "unknown pruning scope")
    refuses(tiny(), lambda model: apply_sparse_adapter(model, bottleneck=0), "bottleneck")
    refuses(tiny(), lambda model: apply_sparse_adapter(model, fraction=0.5, batches=[]), "at least one")
    refuses(tiny(), lambda model: apply_sparse_adapter(model, fraction=0.5, criterion="magnitude", init="zero"),
            "would prune all of W_up")
    # SNIP on a zero up-projection: the scores are computed (adapters in place), found all zero, taken out again
    refuses(tiny(), lambda model: apply_sparse_adapter(model, bottleneck=8, fraction=0.5, init="zero",
                                                       batches=[batch()]), "zero-initialised up-projection")
    model = tiny()
    apply_sparse_adapter(model, bottleneck=8, fraction=0.5, criterion="random")
    refuses(model, lambda model: apply_sparse_adapter(model, bottleneck=8, batches=[batch()]), "already holds")
    with pytest.raises(ValueError, match="bottleneck"):
        large_sparse_bottleneck(0, 0.5)
    with pytest.raises(ValueError, match="no sparse adapters"):
        nonzero_count(tiny())
    with pytest.raises(ValueError, match="unknown adapter placement"):
        count_sparse_adapter(CFG, 8, "parallel")


def test_dtype_follows_the_model():
    model = tiny().to(torch.float64)
    apply_sparse_adapter(model, bottleneck=8, fraction=0.5, batches=[batch()])
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model(batch()[0], labels=batch()[1]).loss.backward()
