"""Oracle: our LoHa against Hugging Face peft's LoHaConfig on a tiny random GPT2LMHeadModel, in float64.

peft's LoHa wraps nn.Linear (and Conv1d/Conv2d) but not transformers' GPT-2 Conv1D, so the HF twin's
projections are first replaced by equal nn.Linear layers (weight transposed). peft is built with
init_weights=False (all four factors random) and its factors are copied into ours unchanged:
hada_w1_a = B1 [out, r], hada_w1_b = A1 [r, in], hada_w2_a = B2 [out, r], hada_w2_b = A2 [r, in]. Then equal
logits, equal loss (computed in float64 for both: transformers' own loss casts the logits to float32),
equal gradients of the four factors (peft's hand-written backward against our autograd) and equal merged
weights. With init_weights=True peft's zero factor is hada_w2_b, our A2.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.loha import LoHaLinear, apply_loha  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_fc"]
R, ALPHA = 4, 6.0
FACTORS = {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"}
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def linearize(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D (x @ W + b, W [in, out]) by an equal nn.Linear (W^T [out, in])."""
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D":
            n_in, n_out = m.weight.shape
            lin = nn.Linear(n_in, n_out, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def build(init_weights: bool = False) -> tuple[torch.nn.Module, GPT]:
    hf, ours = hf_tiny_pair()
    hf, ours = linearize(hf.double()), ours.double()
    config = peft.LoHaConfig(task_type="CAUSAL_LM", r=R, alpha=ALPHA, target_modules=TARGETS,
                             init_weights=init_weights)
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, config).eval()
    apply_loha(ours, r=R, alpha=ALPHA, targets=TARGETS)
    return pm, ours


def peft_layers(pm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in pm.base_model.model.transformer.named_modules()
            if hasattr(m, "hada_w1_a") and "default" in m.hada_w1_a]


def copy_peft_loha(pm: torch.nn.Module, ours: GPT) -> int:
    for name, module in peft_layers(pm):
        mine = ours.get_submodule(name)
        assert isinstance(mine, LoHaLinear) and mine.scale == module.scaling["default"]
        with torch.no_grad():
            for ours_name, peft_name in FACTORS.items():
                getattr(mine, ours_name).copy_(getattr(module, peft_name)["default"])  # same shapes
    return len(peft_layers(pm))


def lm_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the logits' dtype (float64 here)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def test_linearized_twin_is_the_same_model() -> None:
    hf, ours = hf_tiny_pair()
    idx = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    hf, ours = linearize(hf.double()), ours.double()
    torch.testing.assert_close(hf(input_ids=idx).logits, ours(idx).logits, rtol=1e-12, atol=1e-12)


def test_init_zero_factor_is_our_A2() -> None:
    pm, ours = build(init_weights=True)
    for name, module in peft_layers(pm):
        assert torch.count_nonzero(module.hada_w2_b["default"]) == 0
        assert all(torch.count_nonzero(getattr(module, f)["default"]) > 0 for f in ("hada_w1_a", "hada_w1_b",
                                                                                      "hada_w2_a"))
        mine = ours.get_submodule(name)
        assert torch.count_nonzero(mine.A2) == 0 and mine.A2.dtype == module.hada_w2_b["default"].dtype
        for ours_name, peft_name in FACTORS.items():
            assert getattr(mine, ours_name).shape == getattr(module, peft_name)["default"].shape


def test_loha_logits_and_gradients_match_peft() -> None:
    pm, ours = build()
    assert copy_peft_loha(pm, ours) == 2 * 2
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs, mine = pm(input_ids=idx).logits, ours(idx, labels=idx)
    torch.testing.assert_close(mine.logits, theirs, rtol=1e-12, atol=1e-12)
    loss = lm_loss(theirs, idx)
    torch.testing.assert_close(mine.loss, loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    mine.loss.backward()
    for name, module in peft_layers(pm):
        layer = ours.get_submodule(name)
        for ours_name, peft_name in FACTORS.items():
            got, want = getattr(layer, ours_name).grad, getattr(module, peft_name)["default"].grad
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name}.{ours_name}")
            assert got.abs().max() > 0


def test_merged_weights_match_peft_merge() -> None:
    pm, ours = build()
    copy_peft_loha(pm, ours)
    merged_hf = pm.merge_and_unload()
    for i, block in enumerate(ours.h):
        for ours_layer, hf_layer in ((block.attn.c_attn, merged_hf.transformer.h[i].attn.c_attn),
                                     (block.mlp.c_fc, merged_hf.transformer.h[i].mlp.c_fc)):
            ours_layer.merge()
            torch.testing.assert_close(ours_layer.base.weight, hf_layer.weight, rtol=1e-12, atol=1e-12)
