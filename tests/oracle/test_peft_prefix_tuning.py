"""Our prefix tuning against Hugging Face peft's, on identical weights, with and without the MLP."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chapters.ch2_additive.prefix_tuning import apply_prefix_tuning, consolidate_prefix  # noqa: E402
from minimal.gpt import GPT  # noqa: E402
from tests.helpers import hf_tiny_pair  # noqa: E402

P, V, T, MID = 5, 101, 9, 24
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def pair(projection: bool) -> tuple[GPT, torch.nn.Module]:
    hf, ours = hf_tiny_pair()  # same weights, both in eval mode
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=MID)
    theirs = peft.get_peft_model(hf, cfg)
    apply_prefix_tuning(ours, n_tokens=P, projection=projection, hidden=MID)
    src, dst = theirs.prompt_encoder["default"], ours.prefix_encoder
    with torch.no_grad():  # copy verbatim: both use the flat layout ((2l + kv) H + h) hd + j
        if projection:
            dst.embedding.weight.copy_(src.embedding.weight)
            for i in (0, 2):
                dst.mlp[i].weight.copy_(src.transform[i].weight)
                dst.mlp[i].bias.copy_(src.transform[i].bias)
        else:
            dst.prefix.copy_(src.embedding.weight)
    return ours, theirs


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("projection", [True, False])
def test_logits_loss_and_gradients_match_peft(projection: bool):
    ours, theirs = pair(projection)
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[:, :3] = -100
    theirs.train()
    ours.train()
    out_t = theirs(input_ids=idx, labels=labels)
    out_o = ours(idx, labels=labels)
    assert out_t.logits.shape == out_o.logits.shape == (3, T, V)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=0, atol=1e-6)
    out_t.loss.backward()
    out_o.loss.backward()
    g_t, g_o = grads(theirs.prompt_encoder["default"]), grads(ours.prefix_encoder)
    assert len(g_t) == len(g_o) == (5 if projection else 1)
    for a, b in zip(g_o, g_t, strict=True):  # same parameter order: embedding/prefix, then the MLP's two linears
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_consolidated_prefix_loads_into_peft_without_projection():
    ours, theirs = pair(projection=True)
    consolidate_prefix(ours)
    _, flat = pair(projection=False)  # peft's stored form: one Embedding(P, 2Ld) holding the MLP output
    flat.prompt_encoder["default"].load_prompt_embeddings(ours.prefix_encoder.prefix.detach())
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(input_ids=idx).logits
        torch.testing.assert_close(flat(input_ids=idx).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(idx).logits, want, rtol=0, atol=1e-5)


def test_generation_matches_peft_greedy():
    ours, theirs = pair(projection=True)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx, 6, temperature=0.0), want)
