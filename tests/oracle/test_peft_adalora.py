"""Oracle: our AdaLoRA against Hugging Face peft's AdaLoRA on a tiny random GPT2LMHeadModel.

1. Forward: identical base weights and identical A, E, B give equal logits, equal loss including the
   orthogonality regulariser (peft adds it in AdaLoraModel.forward with task_type="CAUSAL_LM"), and equal
   gradients. peft's scale is alpha / (r + 1e-5); our `scale` attribute is set to the same number.
2. Allocator: fed the same weights and bit-identical gradients, our RankAllocator and peft's produce the same
   EMA tensors (sensitivity and uncertainty), the same budgets and the same singular-value masks, step by step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chapters.ch4_low_rank.adalora import RankAllocator, SVDLinear, apply_adalora  # noqa: E402
from minimal.train import TrainConfig  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

TARGETS = ["c_attn", "c_proj"]
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def build(init_r: int = 4, target_r: int = 2, total_step: int = 4, orth_reg_weight: float = 0.5):
    hf, ours = hf_tiny_pair()  # same weights, both in eval mode
    config = peft.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=init_r, target_r=target_r, lora_alpha=16, target_modules=TARGETS,
        total_step=total_step, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
        orth_reg_weight=orth_reg_weight, lora_dropout=0.0, fan_in_fan_out=True,
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, config).eval()
    allocator = apply_adalora(ours, init_r=init_r, target_r=target_r, alpha=16, targets=TARGETS,
                              orth_reg_weight=orth_reg_weight)
    allocator.setup(ours, TrainConfig(steps=total_step, warmup=0), None)  # the run length, as train() passes it
    # E is zero at init in both: give it values so that the comparison is not trivially equal
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, module in pm.base_model.model.transformer.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            mine = ours.get_submodule(name)
            assert isinstance(mine, SVDLinear)
            with torch.no_grad():
                module.lora_E["default"].copy_(torch.randn(init_r, 1, generator=g))
                mine.A.copy_(module.lora_A["default"])  # [r, in] Q, no transpose
                mine.E.copy_(module.lora_E["default"].view(-1))  # [r, 1] -> [r]
                mine.B.copy_(module.lora_B["default"])  # [out, r] P, no transpose
            assert mine.scale == pytest.approx(16 / init_r, rel=1e-5)
            mine.scale = module.scaling["default"] / (module.ranknum["default"].item() + 1e-5)
            pairs.append((name, mine, module))
    assert len(pairs) == 3 * 2  # c_attn, attn.c_proj, mlp.c_proj in 2 blocks
    return pm, ours, allocator, pairs


def test_adalora_forward_loss_and_gradients_match_peft() -> None:
    pm, ours, allocator, pairs = build()
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    theirs = pm(input_ids=idx, labels=idx)  # loss includes 0.5 * orthogonality regulariser
    out = ours(idx, labels=idx)
    mine_loss = out.loss + allocator.extra_loss(ours)
    assert (theirs.logits - out.logits).abs().max() < 1e-5
    assert allocator.extra_loss(ours).item() > 0.1  # the regulariser is really part of both losses
    torch.testing.assert_close(mine_loss, theirs.loss, atol=1e-5, rtol=1e-6)
    theirs.loss.backward()
    mine_loss.backward()
    for name, mine, module in pairs:
        for ours_p, theirs_p in ((mine.A, module.lora_A["default"]), (mine.B, module.lora_B["default"]),
                                 (mine.E, module.lora_E["default"])):
            torch.testing.assert_close(ours_p.grad, theirs_p.grad.view_as(ours_p), atol=1e-6, rtol=1e-4)
            assert ours_p.grad.abs().max() > 0, name


def test_rank_allocator_matches_peft_step_by_step() -> None:
    pm, ours, allocator, pairs = build(init_r=4, target_r=2, total_step=4)
    assert isinstance(allocator, RankAllocator)
    theirs = pm.base_model.rankallocator
    assert (allocator.init_budget, allocator.target_budget) == (theirs.init_bgt, theirs.target_bgt) == (24, 12)
    gen = torch.Generator().manual_seed(5)
    for t in (1, 2, 3, 4):  # budgets 17, 13, 12 in the cubic phase, then the final mask at t = T - t_final = 4
        ours.zero_grad(set_to_none=True)
        idx = torch.randint(0, 101, (2, 16), generator=gen)
        (ours(idx, labels=idx).loss + allocator.extra_loss(ours)).backward()
        with torch.no_grad():  # bit-identical weights and gradients on both sides
            for _, mine, module in pairs:
                for ours_p, theirs_p in ((mine.A, module.lora_A["default"]), (mine.B, module.lora_B["default"]),
                                         (mine.E, module.lora_E["default"])):
                    theirs_p.copy_(ours_p.view_as(theirs_p))
                    theirs_p.grad = ours_p.grad.view_as(theirs_p).clone()
        if t < 4:
            expected = {1: 17, 2: 13, 3: 12}[t]
            assert theirs.budget_schedule(t)[0] == allocator.budget_at(t)[0] == expected
        allocator.after_backward(ours, t - 1)
        pm.base_model.update_and_allocate(t)
        if t < 4:  # importance compared while it is being updated (peft resets it at t = T - t_final)
            for name, mine, _ in pairs:
                for p in ("A", "E", "B"):
                    key = f"transformer.{name}.lora_{p}.default"
                    shape = getattr(mine, p).shape
                    torch.testing.assert_close(allocator.ipt_avg[f"{name}.{p}"], theirs.exp_avg_ipt[key].view(shape),
                                               atol=0, rtol=1e-6)
                    torch.testing.assert_close(allocator.unc_avg[f"{name}.{p}"], theirs.exp_avg_unc[key].view(shape),
                                               atol=0, rtol=1e-6)
        allocator.step_end(ours, t - 1, None)
        kept_total = 0
        for name, mine, module in pairs:
            ours_kept = mine.E != 0
            theirs_kept = module.lora_E["default"].view(-1) != 0
            assert torch.equal(ours_kept, theirs_kept), (t, name)
            assert pm.peft_config["default"].rank_pattern[f"transformer.{name}.lora_E.default"] == ours_kept.tolist()
            kept_total += int(ours_kept.sum())
        assert kept_total == {1: 17, 2: 13, 3: 12, 4: 12}[t]
    assert allocator.ipt_avg == {} and theirs.exp_avg_ipt == {}  # both reset when the mask is fixed
