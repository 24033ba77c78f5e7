"""Our prompt tuning against Hugging Face peft's, on identical weights (logits, loss and prompt gradient)."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chapters.ch2_additive.prompt_tuning import apply_prompt_tuning  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

P, V, T = 6, 101, 9
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def pair() -> tuple[GPT, torch.nn.Module]:
    hf, ours = hf_tiny_pair()  # same weights, both in eval mode
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    apply_prompt_tuning(ours, n_tokens=P, init="random")
    with torch.no_grad():
        ours.soft_prompt.weight.copy_(theirs.prompt_encoder["default"].embedding.weight)
    return ours, theirs


def test_logits_loss_and_prompt_gradient_match_peft():
    ours, theirs = pair()
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[:, :2] = -100
    labels[1, 5] = -100
    theirs.train()  # the training path: the prompt goes through the embedding, so it gets a gradient
    ours.train()
    out_t = theirs(input_ids=idx, labels=labels)
    out_o = ours(idx, labels=labels)
    assert out_t.logits.shape == (3, P + T, V)  # peft returns the prompt rows too; we return the T real ones
    torch.testing.assert_close(out_o.logits, out_t.logits[:, P:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=0, atol=1e-6)
    out_t.loss.backward()
    out_o.loss.backward()
    g_t = theirs.prompt_encoder["default"].embedding.weight.grad
    g_o = ours.soft_prompt.weight.grad
    assert g_o.abs().max() > 0
    torch.testing.assert_close(g_o, g_t, rtol=1e-4, atol=1e-7)


def test_generation_matches_peft_greedy():
    ours, theirs = pair()
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    got = ours.generate(idx, 6, temperature=0.0)
    assert torch.equal(got, want[:, -got.shape[1]:])
