"""Our (IA)^3 against Hugging Face peft's IA3 on GPT-2 (c_attn output scale, mlp.c_proj input scale)."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chapters.ch2_additive.ia3 import apply_ia3  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from minimal.peft import merge_all  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

V, T, D = 101, 9, 64
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def pair(attn: str) -> tuple[GPT, torch.nn.Module]:
    hf, ours = hf_tiny_pair()  # same weights, both in eval mode
    cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                         feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True, init_ia3_weights=False)
    theirs = peft.get_peft_model(hf, cfg)  # init_ia3_weights=False: random vectors, not trivially ones
    apply_ia3(ours, attn=attn)
    for i, blk in enumerate(theirs.base_model.model.transformer.h):
        la = blk.attn.c_attn.ia3_l["default"]  # [3d, 1]
        lf = blk.mlp.c_proj.ia3_l["default"]  # [1, 4d]
        assert la.shape == (3 * D, 1) and lf.shape == (1, 4 * D)
        with torch.no_grad():
            if attn == "kv":
                la[:D] = 1.0  # the paper's form: queries are not scaled
            ours.h[i].attn.c_attn.scale.copy_(la.flatten()[D:] if attn == "kv" else la.flatten())
            ours.h[i].mlp.c_proj.scale.copy_(lf.flatten())
    return ours, theirs


@pytest.mark.parametrize("attn", ["qkv", "kv"])
def test_logits_loss_and_gradients_match_peft(attn: str):
    ours, theirs = pair(attn)
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    out_t = theirs(input_ids=idx, labels=idx)
    out_o = ours(idx, labels=idx)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=0, atol=1e-6)
    out_t.loss.backward()
    out_o.loss.backward()
    for i, blk in enumerate(theirs.base_model.model.transformer.h):
        ga = blk.attn.c_attn.ia3_l["default"].grad.flatten()
        gf = blk.mlp.c_proj.ia3_l["default"].grad.flatten()
        mine_a, mine_f = ours.h[i].attn.c_attn.scale.grad, ours.h[i].mlp.c_proj.scale.grad
        assert mine_a.abs().max() > 0 and mine_f.abs().max() > 0
        torch.testing.assert_close(mine_a, ga[D:] if attn == "kv" else ga, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mine_f, gf, rtol=1e-4, atol=1e-7)


def test_merged_models_match():
    ours, theirs = pair("qkv")
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(input_ids=idx).logits
        merged = theirs.merge_and_unload()
        merge_all(ours)
        torch.testing.assert_close(merged(input_ids=idx).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(idx).logits, want, rtol=0, atol=1e-5)
        # the merged weights themselves agree (Conv1D [in, out] vs our [out, in])
        for i in range(2):
            torch.testing.assert_close(ours.h[i].attn.c_attn.base.weight, merged.transformer.h[i].attn.c_attn.weight.T)
            torch.testing.assert_close(ours.h[i].attn.c_attn.base.bias, merged.transformer.h[i].attn.c_attn.bias)
            torch.testing.assert_close(ours.h[i].mlp.c_proj.base.weight, merged.transformer.h[i].mlp.c_proj.weight.T)
