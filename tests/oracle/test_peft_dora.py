"""Oracle: our DoRA against Hugging Face peft (`use_dora=True`) on a tiny random GPT2LMHeadModel.

peft is built with init_lora_weights=False (random A and B, magnitude = ||W + sBA||_row), and A, B and
the magnitude vector are copied into our layers unchanged; logits and the gradients of A, B and m match.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.dora import DoRALinear, apply_dora  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_fc"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def build(r: int = 4, alpha: float = 8.0) -> tuple[torch.nn.Module, GPT]:
    hf, ours = hf_tiny_pair()  # same weights, both in eval mode
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
        fan_in_fan_out=True, init_lora_weights=False, use_dora=True,
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, config).eval()
    apply_dora(ours, r=r, alpha=alpha, targets=TARGETS)
    return pm, ours


def peft_layers(pm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m) for name, m in pm.base_model.model.transformer.named_modules()
        if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector
    ]


def copy_peft_dora(pm: torch.nn.Module, ours: GPT) -> None:
    for name, module in peft_layers(pm):
        mine = ours.get_submodule(name)
        assert isinstance(mine, DoRALinear) and mine.scale == module.scaling["default"]
        with torch.no_grad():
            mine.A.copy_(module.lora_A["default"].weight)  # [r, in]
            mine.B.copy_(module.lora_B["default"].weight)  # [out, r]
            mine.m.copy_(module.lora_magnitude_vector["default"].weight)  # [out]


def test_peft_magnitude_is_our_row_norm() -> None:
    pm, ours = build()
    copy_peft_dora(pm, ours)
    for name, module in peft_layers(pm):
        magnitude = module.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(magnitude, ours.get_submodule(name).weight_norm())


def test_dora_logits_and_gradients_match_peft() -> None:
    pm, ours = build()
    copy_peft_dora(pm, ours)
    with torch.no_grad():  # move m away from ||V|| so the rescaling is not the identity
        for name, module in peft_layers(pm):
            scale = 1 + 0.3 * torch.randn(module.lora_magnitude_vector["default"].weight.shape)
            module.lora_magnitude_vector["default"].weight.mul_(scale)
            ours.get_submodule(name).m.mul_(scale)
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs, mine = pm(input_ids=idx, labels=idx), ours(idx, labels=idx)
    assert (theirs.logits - mine.logits).abs().max() < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    layers = peft_layers(pm)
    assert len(layers) == 2 * 2
    for name, module in layers:
        layer = ours.get_submodule(name)
        torch.testing.assert_close(layer.A.grad, module.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.B.grad, module.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(
            layer.m.grad, module.lora_magnitude_vector["default"].weight.grad, atol=1e-6, rtol=1e-4
        )
        assert layer.A.grad.abs().max() > 0 and layer.m.grad.abs().max() > 0


def test_full_gradient_differs_from_peft() -> None:
    """peft detaches the norm: our detach_norm=False gives the same logits but other A gradients."""
    pm, ours = build()
    copy_peft_dora(pm, ours)
    for m in ours.modules():
        if isinstance(m, DoRALinear):
            m.detach_norm = False
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs, mine = pm(input_ids=idx, labels=idx), ours(idx, labels=idx)
    assert (theirs.logits - mine.logits).abs().max() < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    name, module = peft_layers(pm)[0]
    assert not torch.allclose(ours.get_submodule(name).A.grad, module.lora_A["default"].weight.grad, atol=1e-6,
                              rtol=1e-3)


def test_merge_matches_peft() -> None:
    pm, ours = build()
    copy_peft_dora(pm, ours)
    merged_hf = pm.merge_and_unload()
    for i, block in enumerate(ours.h):
        block.attn.c_attn.merge()
        torch.testing.assert_close(
            block.attn.c_attn.base.weight, merged_hf.transformer.h[i].attn.c_attn.weight.T, atol=1e-6, rtol=1e-5
        )
