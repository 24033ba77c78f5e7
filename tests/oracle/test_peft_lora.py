"""Oracle: our LoRA and rsLoRA against Hugging Face peft on a tiny random GPT2LMHeadModel.

Identical base weights (our loader transposes GPT-2's Conv1D) and identical adapter weights (peft's
lora_A [r, in] and lora_B [out, r] copy in unchanged); then equal logits and equal gradients of A and B.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.lora import apply_lora  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def copy_peft_lora(peft_model: torch.nn.Module, ours: GPT) -> int:
    """Copy every lora_A / lora_B into our A / B by module name; return how many layers were copied."""
    n = 0
    for name, module in peft_model.base_model.model.transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            mine = ours.get_submodule(name)
            with torch.no_grad():
                mine.A.copy_(module.lora_A["default"].weight)  # [r, in], no transpose
                mine.B.copy_(module.lora_B["default"].weight)  # [out, r], no transpose
            assert mine.scale == module.scaling["default"]
            n += 1
    return n


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_logits_and_gradients_match_peft(rslora: bool) -> None:
    hf, ours = hf_tiny_pair()
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
        fan_in_fan_out=True, init_lora_weights=False, use_rslora=rslora,
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, config).eval()
    apply_lora(ours, r=4, alpha=16, targets=TARGETS, rslora=rslora)
    assert copy_peft_lora(pm, ours) == 3 * 2  # c_attn, attn.c_proj, mlp.c_proj in 2 blocks

    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs = pm(input_ids=idx, labels=idx)
    mine = ours(idx, labels=idx)
    assert (theirs.logits - mine.logits).abs().max() < 1e-5
    torch.testing.assert_close(mine.loss, theirs.loss, atol=1e-6, rtol=1e-6)

    theirs.loss.backward()
    mine.loss.backward()
    compared = 0
    for name, module in pm.base_model.model.transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = ours.get_submodule(name)
            torch.testing.assert_close(layer.A.grad, module.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(layer.B.grad, module.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
            assert layer.A.grad.abs().max() > 0 and layer.B.grad.abs().max() > 0
            compared += 1
    assert compared == 6


def test_merged_weights_match_peft_merge() -> None:
    """peft's merged Conv1D weight is our merged nn.Linear weight transposed."""
    hf, ours = hf_tiny_pair()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, config)
    apply_lora(ours, r=4, alpha=8, targets=["c_attn"])
    copy_peft_lora(pm, ours)
    merged_hf = pm.merge_and_unload()
    for i, block in enumerate(ours.h):
        block.attn.c_attn.merge()
        torch.testing.assert_close(
            block.attn.c_attn.base.weight, merged_hf.transformer.h[i].attn.c_attn.weight.T, atol=1e-6, rtol=1e-6
        )
