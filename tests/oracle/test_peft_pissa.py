"""Oracle: our PiSSA initialisation against Hugging Face peft's `init_lora_weights="pissa"`.

Singular vectors are defined up to sign (the sign of a pair u_i, v_i can flip together), so A and B are
compared through the product B A and through |A|, |B|; the frozen residual W_res is compared directly
(peft stores GPT-2's Conv1D weight transposed). Then, with peft's A and B copied in, logits and gradients
match.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.pissa import PiSSALinear, apply_pissa  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def build(r: int, alpha: float) -> tuple[torch.nn.Module, GPT]:
    hf, ours = hf_tiny_pair()  # copies the weights before peft overwrites hf's with the residual
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
        fan_in_fan_out=True, init_lora_weights="pissa",
    )
    pm = peft.get_peft_model(hf, config).eval()
    apply_pissa(ours, r=r, alpha=alpha, targets=TARGETS)
    return pm, ours


def peft_layers(pm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m) for name, m in pm.base_model.model.transformer.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    ]


@pytest.mark.parametrize(("r", "alpha"), [(8, 8.0), (4, 16.0)])  # s = 1 and s = 4
def test_pissa_init_matches_peft(r: int, alpha: float) -> None:
    pm, ours = build(r, alpha)
    layers = peft_layers(pm)
    assert len(layers) == 3 * 2
    for name, module in layers:
        mine = ours.get_submodule(name)
        assert isinstance(mine, PiSSALinear) and mine.scale == module.scaling["default"]
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        torch.testing.assert_close(mine.B @ mine.A, B @ A, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.A.abs(), A.abs(), atol=1e-5, rtol=1e-4)  # equal up to each row's sign
        torch.testing.assert_close(mine.B.abs(), B.abs(), atol=1e-5, rtol=1e-4)
        W_res = module.get_base_layer().weight.T  # Conv1D (in, out) -> (out, in)
        torch.testing.assert_close(mine.base.weight, W_res, atol=1e-5, rtol=1e-5)


def test_pissa_logits_and_gradients_match_peft() -> None:
    pm, ours = build(4, 8.0)
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # take peft's exact A, B (signs included)
        for name, module in peft_layers(pm):
            ours.get_submodule(name).A.copy_(module.lora_A["default"].weight)
            ours.get_submodule(name).B.copy_(module.lora_B["default"].weight)
    theirs, mine = pm(input_ids=idx, labels=idx), ours(idx, labels=idx)
    assert (theirs.logits - mine.logits).abs().max() < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    for name, module in peft_layers(pm):
        layer = ours.get_submodule(name)
        torch.testing.assert_close(layer.A.grad, module.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.B.grad, module.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        assert layer.A.grad.abs().max() > 0  # PiSSA's A gets a gradient at init, unlike LoRA's
