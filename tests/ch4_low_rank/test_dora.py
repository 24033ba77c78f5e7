"""DoRA: m starts at the row norms, count, the norm axis, the detached norm, the non-additive merge/unmerge, unload,
refused applies, learning. (Identity at init, frozen entries and merge equivalence of the registered setting are
checked for every method in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.dora import DoRALinear, apply_dora, count_dora
from minimal.peft import count_trainable, unload
from minimal.train import TrainConfig, train
from tests.helpers import adamw_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

CFG = tiny_config()


def trained_layer(detach_norm: bool = True, seed: int = 0) -> DoRALinear:
    """A non-square DoRA layer (out 48, in 32) moved away from its init: random B, perturbed m."""
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(32, 48), r=4, alpha=8, detach_norm=detach_norm)
    with torch.no_grad():
        nn.init.normal_(layer.B, std=0.3)
        layer.m.mul_(1 + 0.2 * torch.randn(48))
    return layer


def test_magnitude_starts_at_the_row_norms() -> None:
    model = tiny_gpt()
    apply_dora(model, r=4, alpha=8, targets=("c_attn", "c_proj"))
    layer = model.h[0].attn.c_attn
    torch.testing.assert_close(layer.m, layer.base.weight.norm(dim=1))


def test_trainable_count_and_set() -> None:
    model = tiny_gpt()
    apply_dora(model, r=4, targets=("c_attn", "c_fc"))
    d, r = CFG.n_embd, 4
    per_block = (r * (d + 3 * d) + 3 * d) + (r * (d + 4 * d) + 4 * d)  # r(in + out) + out for each layer
    assert count_trainable(model).trainable == CFG.n_layer * per_block == count_dora(CFG, 4, ("c_attn", "c_fc"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 3 * 2 * CFG.n_layer and all(n.endswith((".A", ".B", ".m")) for n in names)


def test_norm_axis_is_per_output_row() -> None:
    layer = trained_layer()
    W0 = layer.base.weight
    V = W0 + layer.lora_delta()
    assert layer.m.shape == (48,) and layer.weight_norm().shape == (48,)
    torch.testing.assert_close(layer.weight_norm(), torch.sqrt((V**2).sum(dim=1)))
    # every row of the effective weight has exactly the length m of its output unit
    torch.testing.assert_close(layer.dora_weight().norm(dim=1), layer.m.detach(), atol=1e-5, rtol=1e-5)
    # doubling m_j doubles output j (bias aside) and leaves the other outputs alone
    x = torch.randn(5, 32)
    before = layer(x) - layer.base.bias
    with torch.no_grad():
        layer.m[7] *= 2
    after = layer(x) - layer.base.bias
    torch.testing.assert_close(after[:, 7], 2 * before[:, 7])
    torch.testing.assert_close(torch.cat([after[:, :7], after[:, 8:]], 1), torch.cat([before[:, :7], before[:, 8:]], 1))


def test_forward_equals_dense_formula_bias_not_rescaled() -> None:
    layer = trained_layer()
    x = torch.randn(3, 5, 32)
    W0, b0, s = layer.base.weight, layer.base.bias, layer.scale
    V = W0 + s * layer.B @ layer.A
    expected = F.linear(x, (layer.m / V.norm(dim=1)).unsqueeze(1) * V, b0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, W0 + layer.delta_weight(), b0), atol=1e-5, rtol=1e-5)


def test_dropout_feeds_both_dora_terms() -> None:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(32, 48), r=4, dropout=0.5)
    with torch.no_grad():
        nn.init.normal_(layer.B, std=0.3)
        layer.m.mul_(1.5)
    layer.train()
    x = torch.randn(6, 32)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    x_d = nn.Dropout(0.5).train()(x)  # the same mask
    g = layer.m / layer.weight_norm()
    W0, b0 = layer.base.weight, layer.base.bias
    expected = F.linear(x, W0, b0) + (g - 1) * F.linear(x_d, W0) + g * layer.branch(x_d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.dora_weight(), b0), atol=1e-5, rtol=1e-5)


def _grads(layer: DoRALinear, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    ((layer(x) - target) ** 2).sum().backward()
    return {"A": layer.A.grad.clone(), "B": layer.B.grad.clone(), "m": layer.m.grad.clone()}


def test_detached_norm_changes_gradients_not_outputs() -> None:
    detached, full = trained_layer(detach_norm=True), trained_layer(detach_norm=False)
    x, target = torch.randn(8, 32), torch.randn(8, 48)
    torch.testing.assert_close(detached(x), full(x))
    g_det, g_full = _grads(detached, x, target), _grads(full, x, target)
    # without the detach, the gradient also flows through ||V||: A's and B's gradients differ
    assert (g_det["A"] - g_full["A"]).abs().max() > 1e-3 * g_full["A"].abs().max()
    assert (g_det["B"] - g_full["B"]).abs().max() > 1e-3 * g_full["B"].abs().max()
    torch.testing.assert_close(g_det["m"], g_full["m"])  # m enters only as the numerator either way

    # both match a hand-written reference: W' = (m / n) V with n detached or not
    for layer, grads, detach in ((detached, g_det, True), (full, g_full, False)):
        A, B, m = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B, layer.m))
        V = layer.base.weight + layer.scale * B @ A
        n = V.norm(dim=1)
        W = (m / (n.detach() if detach else n)).unsqueeze(1) * V
        ((F.linear(x, W, layer.base.bias) - target) ** 2).sum().backward()
        for name, t in (("A", A), ("B", B), ("m", m)):
            torch.testing.assert_close(grads[name], t.grad, atol=1e-5, rtol=1e-4)


def test_full_gradient_matches_finite_differences() -> None:
    layer = trained_layer(detach_norm=False).double()
    x, target = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 48, dtype=torch.float64)
    grad_A = _grads(layer, x, target)["A"]
    eps, (i, j) = 1e-6, (2, 5)
    with torch.no_grad():
        layer.A[i, j] += eps
        up = ((layer(x) - target) ** 2).sum()
        layer.A[i, j] -= 2 * eps
        down = ((layer(x) - target) ** 2).sum()
    assert abs((up - down).item() / (2 * eps) - grad_A[i, j].item()) < 1e-5 * max(1.0, abs(grad_A[i, j].item()))


@pytest.mark.parametrize("detach_norm", [True, False])
def test_merge_unmerge(detach_norm: bool) -> None:
    layer = trained_layer(detach_norm=detach_norm)
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(4, 32)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight.norm(dim=1), layer.m.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_model_unload() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_dora(model, r=4, targets=("c_attn", "c_fc"))
    adamw_steps(model, idx, steps=3, lr=1e-2)
    adapted = model(idx).logits
    unload(model)
    assert not any(isinstance(m, DoRALinear) for m in model.modules())
    assert isinstance(model.h[0].attn.c_attn, nn.Linear)
    torch.testing.assert_close(model(idx).logits, adapted, atol=1e-5, rtol=1e-5)


def test_bad_input_errors() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_dora(m, r=0), "rank r=0")
    assert_refuses(tiny_gpt(), lambda m: apply_dora(m, r=100, targets=("c_attn", "c_fc")), "rank r=100")
    assert_refuses(tiny_gpt(), lambda m: apply_dora(m, targets=["v_proj"]), "unknown target module 'v_proj'")


def test_learns() -> None:
    model, idx = tiny_gpt(), token_batch(b=8)
    apply_dora(model, r=8, alpha=16, targets=("c_attn", "c_fc"))
    before = model(idx, labels=idx).loss.item()
    train(model, lambda gen: (idx, idx), TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup=0, progress=False,
                                                     log_every=0))
    assert model(idx, labels=idx).loss.item() < before - 0.3
