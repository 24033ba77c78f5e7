import math

import pytest
import torch
import torch.nn.functional as F

from chapters.ch3_selective.learned_masks import (
    MaskedLinear,
    apply_learned_masks,
    count_learned_masks,
    mask_sparsity,
    mask_storage_bits,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, merge_all, trainable_names, unload, unmerge_all
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (4, 12), generator=g)
    labels = idx.clone()
    labels[:, :5] = -100
    return idx, labels


def test_all_ones_mask_is_the_base_model_and_count_is_formula():
    model = tiny()
    idx, _ = batch()
    base = model(idx).logits
    apply_learned_masks(model, initial_sparsity=0.0)
    assert all(bool(m.mask().all()) for m in model.modules() if isinstance(m, MaskedLinear))
    # the straight-through value is exactly the binary mask, so W * 1 = W and the logits are bitwise the base's
    assert torch.equal(model(idx).logits, base)
    d, L = CFG.n_embd, CFG.n_layer
    assert count_trainable(model).trainable == L * 12 * d * d == mask_storage_bits(model) == count_learned_masks(CFG)
    assert all(n.endswith(".scores") for n in trainable_names(model))


def test_initial_sparsity_matches_the_request():
    model = tiny()
    apply_learned_masks(model, initial_sparsity=0.1)
    n = mask_storage_bits(model)
    masked = sum(s * m.scores.numel() for s, m in zip(mask_sparsity(model).values(),
                 [m for m in model.modules() if isinstance(m, MaskedLinear)], strict=True))
    assert abs(masked / n - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)


def test_ste_gradient_equals_the_gradient_wrt_an_explicit_mask():
    torch.manual_seed(0)
    layer = MaskedLinear(torch.nn.Linear(6, 5), initial_sparsity=0.3)
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    m = layer.mask().float().requires_grad_(True)
    F.linear(x, layer.base.weight * m, layer.base.bias).square().sum().backward()
    assert torch.allclose(layer.scores.grad, m.grad)
    w_eff = (layer.base.weight * layer.mask()).detach().requires_grad_(True)
    F.linear(x, w_eff, layer.base.bias).square().sum().backward()
    assert torch.allclose(layer.scores.grad, w_eff.grad * layer.base.weight)  # dL/dS = dL/dW_eff * W


def test_training_changes_only_which_weights_are_kept():
    model = tiny()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    apply_learned_masks(model, initial_sparsity=0.05)
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    masks0 = [m.mask().clone() for m in layers]
    idx, labels = batch()
    res = train(model, lambda gen: (idx, labels), TrainConfig(steps=10, lr=2e-3, warmup=0, log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    flipped = sum(int((m.mask() != m0).sum()) for m, m0 in zip(layers, masks0, strict=True))
    assert flipped > 0
    for n, t in model.state_dict().items():
        plain = n.replace(".base.", ".")
        if plain in before:
            assert torch.equal(t, before[plain]), n  # weights, biases, embeddings, LayerNorms: untouched


def test_merge_unmerge_and_unload():
    model = tiny()
    apply_learned_masks(model, initial_sparsity=0.2)
    idx, _ = batch()
    out = model(idx).logits
    w = model.h[0].attn.c_attn.base.weight.clone()
    merge_all(model)
    assert torch.allclose(model(idx).logits, out, atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        model.h[0].attn.c_attn.merge()
    unmerge_all(model)
    assert torch.equal(model.h[0].attn.c_attn.base.weight, w)
    with pytest.raises(ValueError, match="not merged"):
        model.h[0].attn.c_attn.unmerge()
    unload(model)
    assert type(model.h[0].attn.c_attn) is torch.nn.Linear
    assert torch.allclose(model(idx).logits, out, atol=1e-6)


@pytest.mark.parametrize("targets", [("c_fc",), ("attn.c_proj", "mlp.c_proj"), r"h\.1\.attn\..*"])
def test_count_formula_for_other_targets(targets):
    model = tiny()
    apply_learned_masks(model, targets=targets)
    assert count_trainable(model).trainable == count_learned_masks(CFG, targets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_scores_follow_the_weight_dtype_and_an_all_ones_mask_stays_the_base(dtype):
    model = tiny().to(dtype)
    idx, _ = batch()
    base = model(idx).logits
    apply_learned_masks(model, initial_sparsity=0.0)
    assert all(m.scores.dtype == dtype and bool(m.mask().all()) for m in model.modules() if isinstance(m, MaskedLinear))
    assert torch.equal(model(idx).logits, base)


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_learned_masks(m, initial_sparsity=1.0), "initial_sparsity")
    refuses(tiny(), lambda m: apply_learned_masks(m, targets=["q_proj"]), "unknown target module 'q_proj'")
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        MaskedLinear(torch.nn.Conv1d(2, 2, 1))
