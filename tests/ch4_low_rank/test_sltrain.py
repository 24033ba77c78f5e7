"""SLTrain: count formula, dense equivalence, fixed support, value gradients, pretrain mode, refused applies.
(Identity at init, frozen entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import apply_lora
from chapters.ch4_low_rank.sltrain import SLTrainLinear, apply_sltrain, count_sltrain
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train
from tests.helpers import assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
IDX = token_batch()


def run_cfg(steps: int, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=2, progress=False, log_every=0)


def randomize(layer: SLTrainLinear, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=g))
        layer.values.copy_(0.05 * torch.randn(layer.values.shape, generator=g))


def test_count() -> None:
    model = tiny_gpt()
    apply_sltrain(model, r=4, fraction=0.05, targets=("c_attn", "c_fc"))
    d = CFG.n_embd
    per_block = 4 * (4 * d) + math.floor(0.05 * 3 * d * d) + 4 * (5 * d) + math.floor(0.05 * 4 * d * d)
    assert count_trainable(model).trainable == CFG.n_layer * per_block
    assert count_sltrain(CFG, r=4, fraction=0.05, targets=("c_attn", "c_fc")) == CFG.n_layer * per_block
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"A", "B", "values"}


def test_dense_equivalence() -> None:
    torch.manual_seed(0)
    layer = SLTrainLinear(nn.Linear(24, 40), r=3, alpha=6, fraction=0.1)
    randomize(layer)
    x = torch.randn(5, 24)
    S = torch.zeros(40 * 24)
    S[layer.idx] = layer.values.detach()
    W = layer.base.weight + 2.0 * layer.B @ layer.A + S.view(40, 24)
    torch.testing.assert_close(layer(x), F.linear(x, W, layer.base.bias), atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()).item() > 3  # sparse part lifts the rank


def test_support_is_fixed_sorted_unique_and_only_values_get_gradients() -> None:
    model = tiny_gpt()
    hooks = apply_sltrain(model, r=4, fraction=0.03, targets=("c_attn",))
    layer = model.h[0].attn.c_attn
    idx0 = layer.idx.clone()
    assert layer.nnz == math.floor(0.03 * 64 * 192) and "h.0.attn.c_attn.idx" in dict(model.named_buffers())
    assert idx0.unique().numel() == idx0.numel() and torch.equal(idx0, idx0.sort().values)
    assert 0 <= idx0.min() and idx0.max() < 64 * 192
    w0 = layer.base.weight.detach().clone()
    train(model, lambda g: (IDX, IDX), run_cfg(8), hooks)
    assert torch.equal(layer.idx, idx0) and torch.equal(layer.base.weight, w0)
    sparse = (layer.delta_weight() - layer.scale * layer.B @ layer.A).detach().flatten()
    off = torch.ones_like(sparse, dtype=torch.bool)
    off[idx0] = False
    assert torch.count_nonzero(sparse[off]) == 0 and torch.count_nonzero(sparse[idx0]) > 0.9 * layer.nnz
    # the values' gradient is the dense gradient of S gathered at the support
    S = layer.sparse_weight().detach().requires_grad_()
    x = torch.randn(3, 64)
    F.linear(x, S).pow(2).sum().backward()
    layer.values.grad = None
    F.linear(x, layer.sparse_weight()).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, S.grad.flatten()[idx0])
    assert torch.count_nonzero(S.grad.flatten()[off]) > 0  # the dense gradient is not sparse


def test_pretrain_mode_is_the_papers_parameterisation() -> None:
    model = tiny_gpt()
    original = model.h[1].mlp.c_fc
    w0, b0 = original.weight.detach().clone(), original.bias.detach().clone()
    apply_sltrain(model, r=4, fraction=0.05, targets=("c_attn", "c_proj", "c_fc"), mode="pretrain")
    layer = model.h[1].mlp.c_fc
    assert torch.count_nonzero(layer.base.weight) == 0 and not layer.base.weight.requires_grad
    assert layer.base is not original and torch.equal(original.weight, w0) and torch.equal(original.bias, b0)
    assert not torch.equal(layer.base.bias, b0) and layer.base.bias.abs().max() <= 1 / math.sqrt(256)
    targets = ("c_attn", "c_proj", "c_fc")
    assert count_trainable(model).trainable == count_sltrain(CFG, 4, 0.05, targets, mode="pretrain")
    torch.testing.assert_close(layer.delta_weight(), layer.sparse_weight())  # B = 0: the layer starts as S
    assert layer.values.abs().max() <= 1 / math.sqrt(64) and torch.count_nonzero(layer.values) == layer.nnz
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in dict(model.named_parameters()) if n.endswith(".base.weight")}


def test_it_learns_and_errors() -> None:
    model = tiny_gpt()
    before = model(IDX, labels=IDX).loss.item()
    train(model, lambda g: (IDX, IDX), run_cfg(30), apply_sltrain(model, r=8, targets=("c_attn", "c_fc")))
    with torch.no_grad():
        assert model(IDX, labels=IDX).loss.item() < before - 0.3
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, fraction=0.0), "fraction")
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, fraction=1e-6), "fraction")
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, r=65), "rank")
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, mode="scratch"), "mode")
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, targets=("wq",)), "unknown target")
    # pretrain mode builds fresh layers: a failing one leaves the others' weights and biases as they were
    assert_refuses(tiny_gpt(), lambda m: apply_sltrain(m, fraction=1e-4, targets=("c_attn", "c_proj"), mode="pretrain"),
                   "fraction")
    stacked = tiny_gpt()
    apply_lora(stacked, r=2, targets=("c_fc",))
    assert_refuses(stacked, lambda m: apply_sltrain(m, mode="pretrain"), "pretrain mode trains every parameter")
    apply_sltrain(stacked, r=2, fraction=0.05)  # finetune mode stacks: LoRA's A, B keep training
    assert stacked.h[0].mlp.c_fc.A.requires_grad and stacked.h[0].attn.c_attn.values.requires_grad
