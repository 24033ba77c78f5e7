"""LoRA: init, exact trainable set and its formula, gradients at init, the dense update, scale, dropout, unload,
target selection, save/load, stacking, refused applies that change nothing, learning. (Identity at init, frozen
entries and merge equivalence are checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora, count_lora, lora_scale, target_shapes
from minimal.peft import count_trainable, load_adapter, save_adapter, trainable_names, unload
from minimal.train import TrainConfig, train
from tests.helpers import assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    """Give every B (zero at init) random values, so the branch is no longer trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(0.05 * torch.randn(m.B.shape, generator=g))


def sgd_steps(model: nn.Module, idx: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(idx, labels=idx).loss.backward()
        opt.step()
    model.eval()


def test_init_shapes_and_values() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "c_fc"))
    layer = model.h[0].attn.c_attn
    assert layer.A.shape == (4, 64) and layer.B.shape == (192, 4)
    assert torch.count_nonzero(layer.B) == 0 and layer.A.abs().max() <= 1 / math.sqrt(64)  # U(+-1/sqrt(in))


def test_trainable_count_is_formula_and_only_A_B_train() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4, targets=("c_attn", "c_proj", "c_fc"))
    d, r, L = CFG.n_embd, 4, CFG.n_layer
    # c_attn r(d + 3d), attn.c_proj r(d + d), c_fc r(d + 4d), mlp.c_proj r(4d + d)
    assert count_trainable(model).trainable == L * r * (4 * d + 2 * d + 5 * d + 5 * d)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".A", ".B")) for n in names)
    assert len(names) == 2 * 4 * L
    assert count_lora(CFG, r=4, targets=("c_attn", "c_proj", "c_fc")) == count_trainable(model).trainable


@pytest.mark.parametrize("targets", [("c_attn",), ["c_proj"], ["mlp.c_proj", "c_fc"], r"h\.1\.mlp\..*"])
def test_count_formula_and_target_shapes(targets) -> None:
    model = tiny_gpt()
    apply_lora(model, r=3, targets=targets)
    assert count_lora(CFG, r=3, targets=targets) == count_trainable(model).trainable
    wrapped = {n: (m.base.out_features, m.base.in_features) for n, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    assert target_shapes(CFG, targets) == wrapped  # the same names, in the same order, with the same shapes


def test_gradients_at_init_A_zero_B_nonzero() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_lora(model, r=4)
    model(idx, labels=idx).loss.backward()
    layer = model.h[1].attn.c_attn
    assert torch.count_nonzero(layer.A.grad) == 0  # dL/dA = s B^T (...) = 0 while B = 0
    assert layer.B.grad.abs().sum() > 0


def test_dense_equivalence_and_rank_bound() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    layer = LoRALinear(lin, r=3, alpha=6)
    nn.init.normal_(layer.B)
    x = torch.randn(5, 7, 32)
    dense = F.linear(x, lin.weight + layer.delta_weight(), lin.bias)
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.B @ layer.A)  # s = 6 / 3
    s = torch.linalg.svdvals(layer.delta_weight())
    assert s[3] / s[0] < 1e-6  # rank <= r


def test_scale_and_rslora() -> None:
    lin = nn.Linear(16, 16)
    assert LoRALinear(lin, r=4, alpha=8).scale == 2.0
    assert LoRALinear(lin, r=4, alpha=8, rslora=True).scale == 4.0  # alpha / sqrt(r)
    assert lora_scale(16, 8, rslora=True) == 2.0
    # with A, B fixed, the branch output is linear in alpha
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    l1, l2 = LoRALinear(lin, r=4, alpha=8), LoRALinear(lin, r=4, alpha=24)
    nn.init.normal_(l1.B)
    l2.load_state_dict(l1.state_dict())
    y0 = lin(x)
    torch.testing.assert_close(l2(x) - y0, 3.0 * (l1(x) - y0), atol=1e-5, rtol=1e-5)


def test_dropout_only_on_branch() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = LoRALinear(lin, r=2, dropout=0.5).train()
    x = torch.randn(64, 16)
    # B = 0: whatever dropout does to the branch input, the output is the clean base output
    assert torch.equal(layer(x), lin(x))
    nn.init.normal_(layer.B)
    torch.manual_seed(1)
    mask = (nn.Dropout(0.5).train()(torch.ones_like(x)) != 0).float() * 2.0  # the same draw dropout makes
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), lin(x) + layer.branch(x * mask))
    layer.eval()
    torch.testing.assert_close(layer(x), lin(x) + layer.branch(x))


def test_unload_gives_plain_linear_architecture() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_lora(model, r=4, targets=("c_attn", "c_fc"))
    sgd_steps(model, idx)
    adapted = model(idx).logits
    unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    plain = tiny_gpt()
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert {n: p.shape for n, p in model.state_dict().items()} == {n: p.shape for n, p in plain.state_dict().items()}
    torch.testing.assert_close(model(idx).logits, adapted, atol=1e-5, rtol=1e-5)


def test_target_selection_by_name() -> None:
    model = tiny_gpt()
    apply_lora(model, r=2, targets=["c_proj"])  # peft rule: hits attn.c_proj and mlp.c_proj
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(f"h.{i}.{k}.c_proj" for i in range(CFG.n_layer) for k in ("attn", "mlp"))
    model = tiny_gpt()
    apply_lora(model, r=2, targets=["mlp.c_proj"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == ["h.0.mlp.c_proj",
                                                                                          "h.1.mlp.c_proj"]
    model = tiny_gpt()
    apply_lora(model, r=2, targets=r"h\.1\.attn\.c_attn")  # a string is a full-name regular expression
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == ["h.1.attn.c_attn"]


def test_bad_input_errors() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_lora(m, targets=["q_proj"]), "unknown target module 'q_proj'")
    assert_refuses(tiny_gpt(), lambda m: apply_lora(m, r=0), r"rank r=0 must be in \[1, 64\]")
    assert_refuses(tiny_gpt(), lambda m: apply_lora(m, r=65, targets=("c_attn", "c_fc")),
                   r"rank r=65 must be in \[1, 64\]")
    assert_refuses(tiny_gpt(), lambda m: apply_lora(m, dropout=1.0), "dropout")
    with pytest.raises(TypeError, match="must be an int"):
        LoRALinear(nn.Linear(8, 8), r=2.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(8, 8), r=2, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(8, 8), r=2, dropout=1.0)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(8, 8, 1), r=2)


def test_save_load_round_trip_bit_exact(tmp_path) -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_lora(model, r=4, alpha=8, targets=("c_attn",))
    sgd_steps(model, idx)
    config = {"method": "lora", "r": 4, "alpha": 8, "targets": ["c_attn"]}
    save_adapter(model, tmp_path, config)
    fresh = tiny_gpt()  # the same base weights (same seed), fresh random A
    apply_lora(fresh, r=4, alpha=8, targets=("c_attn",))
    assert not torch.equal(fresh(idx).logits, model(idx).logits)
    assert load_adapter(fresh, tmp_path) == config
    assert torch.equal(fresh(idx).logits, model(idx).logits)
    other = tiny_gpt()
    apply_lora(other, r=2, alpha=8, targets=("c_attn",))
    with pytest.raises(ValueError, match="h.0.attn.c_attn.A"):
        load_adapter(other, tmp_path)


def test_stacking_keeps_the_first_adapter_and_refuses_a_wrapped_target() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4, targets=("c_attn",))
    first = set(trainable_names(model))
    assert_refuses(model, lambda m: apply_lora(m, r=2, targets=("c_attn",)), "already have an adapter")
    apply_lora(model, r=2, targets=("c_fc",))  # a second LoRA on other layers: the first one keeps training
    assert first < set(trainable_names(model))
    assert count_trainable(model).trainable == count_lora(CFG, 4, ("c_attn",)) + count_lora(CFG, 2, ("c_fc",))


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch(b=8, t=16)
    apply_lora(model, r=8, alpha=16, targets=("c_attn", "c_fc"))
    before = model(idx, labels=idx).loss.item()
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup=0, progress=False, log_every=0)
    result = train(model, lambda gen: (idx, idx), cfg)
    after = model(idx, labels=idx).loss.item()
    assert after < before - 0.3, (before, after)
    assert result.trainable == CFG.n_layer * 8 * ((64 + 192) + (64 + 256))
