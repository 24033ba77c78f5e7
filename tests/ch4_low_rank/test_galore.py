"""GaLore: Adam reduction, update in the projector's span, refresh cadence, state memory, learning, errors."""

from __future__ import annotations

import pytest
import torch

from chapters.ch4_low_rank.galore import (
    GaLore,
    GaLoreAdamW,
    adam_state_numel,
    apply_galore,
    count_galore,
    galore_state_numel,
    optimizer_state_bytes,
)
from chapters.ch4_low_rank.lora import apply_lora
from minimal.peft import count_trainable
from minimal.train import TrainConfig, default_optimizer, train
from tests.helpers import assert_refuses, tiny_config, tiny_gpt

CFG = tiny_config()


class IdentityGaLore(GaLoreAdamW):
    """The projector is the identity on the short side: with full rank and alpha=1 this must be Adam."""

    def compute_projector(self, grad: torch.Tensor, r: int) -> tuple[str, torch.Tensor]:
        m, n = grad.shape
        return ("left", torch.eye(m)) if m < n else ("right", torch.eye(n))


def random_grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_identity_projector_full_rank_equals_adam(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(shape), torch.randn(shape[0])
    ours = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    ref = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    opt = IdentityGaLore([{"params": [ours[0]], "r": min(shape)}, {"params": [ours[1]]}],
                         lr=1e-2, betas=(0.9, 0.95), alpha=1.0, period=2)
    adam = torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.95))
    for step in range(6):
        random_grads(ours, step)
        random_grads(ref, step)
        opt.step()
        adam.step()
    assert not torch.equal(ours[0], w)  # it moved
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-6, rtol=1e-5)


def test_svd_projector_is_a_rotation_so_full_rank_galore_is_not_adam() -> None:
    """With an SVD projector Adam runs in rotated coordinates: not rotation-invariant, so results differ."""
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt = GaLoreAdamW([ours], lr=1e-2, r=8, alpha=1.0)
    adam = torch.optim.Adam([ref], lr=1e-2)
    for step in range(3):
        random_grads([ours], step)
        random_grads([ref], step)
        opt.step()
        adam.step()
    assert (ours - ref).abs().max() > 1e-4


@pytest.mark.parametrize("shape,side", [((6, 16), "left"), ((16, 6), "right"), ((10, 10), "right")])
def test_projector_side_orthonormal_and_update_in_span(shape: tuple[int, int], side: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape, requires_grad=True)
    before = w.detach().clone()
    opt = GaLoreAdamW([w], lr=1e-2, r=3, period=10)
    random_grads([w], 0)
    opt.step()
    state = opt.state[w]
    P = state["projector"]
    assert state["side"] == side
    assert P.shape == ((shape[0], 3) if side == "left" else (shape[1], 3))
    torch.testing.assert_close(P.T @ P, torch.eye(3), atol=1e-5, rtol=0)
    delta = w.detach() - before  # [m, n], rank <= 3, inside the projector's span
    outside = delta - P @ (P.T @ delta) if side == "left" else delta - (delta @ P) @ P.T
    assert delta.abs().max() > 1e-4 and outside.abs().max() < 1e-6
    moment_shape = (3, shape[1]) if side == "left" else (shape[0], 3)
    assert state["exp_avg"].shape == moment_shape and state["exp_avg_sq"].shape == moment_shape


def test_projector_refreshes_exactly_every_T_steps() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 12, requires_grad=True)
    opt = GaLoreAdamW([w], lr=1e-3, r=2, period=3)
    projectors = []
    for step in range(8):
        random_grads([w], step)
        opt.step()
        projectors.append(opt.state[w]["projector"].clone())
    changed = [t for t in range(1, 8) if not torch.equal(projectors[t], projectors[t - 1])]
    assert changed == [3, 6]  # steps t with t % T == 0 (step 0 made the first one)


def test_moments_reused_on_refresh_unless_reset() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(8, 12)
    moments = {}
    for reset in (False, True):
        w = w0.clone().requires_grad_()
        opt = GaLoreAdamW([w], lr=1e-3, r=2, period=2, reset_on_refresh=reset)
        for step in range(3):  # step index 2 refreshes the projector
            random_grads([w], step)
            opt.step()
        moments[reset] = opt.state[w]["exp_avg"].clone()
    grad2 = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    P = GaLoreAdamW([torch.zeros(8, 12, requires_grad=True)], r=2).compute_projector(grad2, 2)[1]
    torch.testing.assert_close(moments[True], 0.1 * (P.T @ grad2))  # fresh moment: (1 - b1) R
    assert not torch.allclose(moments[False], moments[True])


def test_state_memory_formula_and_smaller_than_adamw() -> None:
    model = tiny_gpt()
    hooks = apply_galore(model, r=8, period=5)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(steps=1, lr=1e-3, warmup=0)
    opt = hooks.make_optimizer(params, cfg)
    ref = default_optimizer(params, cfg)
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(idx, labels=idx).loss.backward()
    opt.step()
    ref.step()
    projected = [m.weight for name, m in model.named_modules() if name.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(projected) == 4 * CFG.n_layer
    ids = {id(p) for p in projected}
    expect = sum(galore_state_numel(tuple(p.shape), 8) for p in projected)
    expect += sum(adam_state_numel(tuple(p.shape)) for p in params if id(p) not in ids)
    moments = sum(t.numel() for s in opt.state.values() for k, t in s.items() if torch.is_tensor(t))
    assert moments == expect  # our step counter is a Python int, so every state tensor is counted here
    assert optimizer_state_bytes(opt) == 4 * expect
    assert optimizer_state_bytes(opt) < optimizer_state_bytes(ref)
    block = sum(2 * p.numel() for p in projected)  # what AdamW keeps for those matrices
    assert sum(galore_state_numel(tuple(p.shape), 8) for p in projected) < block / 3


def test_everything_trains_and_it_learns() -> None:
    model = tiny_gpt()
    hooks = apply_galore(model, r=8, period=10, alpha=0.25)
    assert isinstance(hooks, GaLore) and (hooks.r, hooks.period) == (8, 10)
    assert all(p.requires_grad for p in model.parameters())
    assert count_trainable(model).trainable == count_galore(CFG) == CFG.n_params()
    idx = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup=3, progress=False, log_every=0)
    result = train(model, lambda g: (idx, idx), cfg, hooks)
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]


def test_errors() -> None:
    assert_refuses(tiny_gpt(), lambda m: apply_galore(m, r=65), "rank r=65 exceeds")
    assert_refuses(tiny_gpt(), lambda m: apply_galore(m, r=0), "positive int")
    assert_refuses(tiny_gpt(), lambda m: apply_galore(m, period=0), "period")
    assert_refuses(tiny_gpt(), lambda m: apply_galore(m, targets=("q_proj",)), "unknown target")
    stacked = tiny_gpt()
    apply_lora(stacked, r=2, targets=("c_fc",))
    assert_refuses(stacked, apply_galore, "GaLore trains every parameter")
    with pytest.raises(ValueError, match="2-D parameters only"):
        GaLoreAdamW([torch.zeros(5, requires_grad=True)], r=2)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_alpha_scales_the_update_and_weight_decay_is_decoupled(shape: tuple[int, int]) -> None:
    """Identity projector, full rank: W <- W (1 - lr wd) - lr alpha N, which is AdamW at lr alpha, wd / alpha."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    lr, alpha, wd = 1e-2, 0.25, 0.5
    opt = IdentityGaLore([{"params": [ours], "r": min(shape)}], lr=lr, betas=(0.9, 0.95), alpha=alpha,
                         weight_decay=wd, period=2)
    adamw = torch.optim.AdamW([ref], lr=lr * alpha, betas=(0.9, 0.95), weight_decay=wd / alpha)
    for step in range(6):
        random_grads([ours], step)
        random_grads([ref], step)
        opt.step()
        adamw.step()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
