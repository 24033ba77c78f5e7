"""Oracle: our VeRA against Hugging Face peft's VeraConfig on a tiny random GPT2LMHeadModel, in float64.

The same projection_seed (peft: projection_prng_key) gives the same shared A and B bit for bit (one pair
sized to the largest layer, sliced per layer, as peft does); d and b are set to random values in peft and
copied into ours; then equal logits, equal loss (computed in float64 for both: transformers' own loss
casts the logits to float32), equal gradients of d and b, and equal merged weights (peft's Conv1D weight
is ours transposed).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.vera import VeRALinear, apply_vera  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_proj"]  # c_attn [192, 64], attn.c_proj [64, 64], mlp.c_proj [64, 256]
R, SEED = 16, 7
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")]


def build() -> tuple[torch.nn.Module, GPT]:
    hf, ours = hf_tiny_pair()
    hf, ours = hf.double(), ours.double()
    config = peft.VeraConfig(task_type="CAUSAL_LM", r=R, target_modules=TARGETS, projection_prng_key=SEED,
                             vera_dropout=0.0, d_initial=0.1, fan_in_fan_out=True)
    pm = peft.get_peft_model(hf, config).eval()
    apply_vera(ours, r=R, targets=TARGETS, projection_seed=SEED, d_initial=0.1)
    return pm, ours


def lm_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the logits' dtype (float64 here)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def peft_layers(pm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in pm.base_model.model.transformer.named_modules()
            if hasattr(m, "vera_lambda_d") and "default" in m.vera_lambda_d]


def randomize_and_copy(pm: torch.nn.Module, ours: GPT) -> int:
    """Random lambda_d, lambda_b in peft (b is zero at init), copied into our d and b; returns the layer count."""
    g = torch.Generator().manual_seed(3)
    for name, module in peft_layers(pm):
        mine = ours.get_submodule(name)
        assert isinstance(mine, VeRALinear)
        d, b = module.vera_lambda_d["default"], module.vera_lambda_b["default"]
        with torch.no_grad():
            d.copy_(torch.randn(d.shape, generator=g, dtype=torch.float64))
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64))
            mine.d.copy_(d)  # [r]
            mine.b.copy_(b)  # [out]
    return len(peft_layers(pm))


def test_init_and_shared_projection_match_peft() -> None:
    pm, ours = build()
    shared_A, shared_B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    proj = ours.h[0].attn.c_attn.proj
    assert shared_A.dtype == proj.A.dtype == torch.float64
    assert torch.equal(proj.A, shared_A) and torch.equal(proj.B, shared_B)  # [16, 256], [192, 16]: bit for bit
    for name, module in peft_layers(pm):
        mine = ours.get_submodule(name)
        assert module.vera_A["default"] is shared_A  # peft shares one pair too
        assert torch.equal(mine.b, module.vera_lambda_b["default"])  # zeros
        # peft fills d_initial in float32 and then casts (float32(0.1) in a float64 model); we fill in the dtype
        torch.testing.assert_close(mine.d, module.vera_lambda_d["default"], rtol=1e-7, atol=0)


def test_vera_logits_and_gradients_match_peft() -> None:
    pm, ours = build()
    assert randomize_and_copy(pm, ours) == 3 * 2
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs, mine = pm(input_ids=idx).logits, ours(idx, labels=idx)
    torch.testing.assert_close(mine.logits, theirs, rtol=1e-12, atol=1e-12)
    loss = lm_loss(theirs, idx)  # transformers' own loss casts the logits to float32
    torch.testing.assert_close(mine.loss, loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    mine.loss.backward()
    for name, module in peft_layers(pm):
        layer = ours.get_submodule(name)
        torch.testing.assert_close(layer.d.grad, module.vera_lambda_d["default"].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.b.grad, module.vera_lambda_b["default"].grad, rtol=1e-10, atol=1e-12)
        assert layer.d.grad.abs().max() > 0 and layer.b.grad.abs().max() > 0


def test_merged_weights_match_peft_merge() -> None:
    pm, ours = build()
    randomize_and_copy(pm, ours)
    merged_hf = pm.merge_and_unload()
    for i, block in enumerate(ours.h):
        for ours_layer, hf_layer in ((block.attn.c_attn, merged_hf.transformer.h[i].attn.c_attn),
                                     (block.mlp.c_proj, merged_hf.transformer.h[i].mlp.c_proj)):
            ours_layer.merge()
            torch.testing.assert_close(ours_layer.base.weight, hf_layer.weight.T, rtol=1e-12, atol=1e-12)
