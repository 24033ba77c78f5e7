"""T-Few's loss: each term by hand, the shared-prompt scoring path against the full one, any dtype."""

from __future__ import annotations

import pytest
import torch

from chapters.ch2_additive.ia3 import apply_ia3
from chapters.ch2_additive.t_few import ChoiceLoss, answer_logprobs, answer_scores
from chapters.ch5_applications.tabllm import choice_batch
from minimal.data import Example, collate, encode_prompt, get_tokenizer
from minimal.tokenizer import special_id
from tests.helpers import Wrapped, tiny_config, tiny_gpt

VOCAB = get_tokenizer().n_vocab  # 2048


def lm(seed: int = 0):
    """A tiny random GPT over the shipped tokenizer's vocabulary."""
    return tiny_gpt(seed, tiny_config(vocab_size=VOCAB, block_size=128))


def test_shared_prompt_path_equals_the_full_path_with_gradients() -> None:
    prompts = ["- size: high", "- size: low\n- shade: medium\nIs it?", "a b c d e f", "- shade: low"]
    choices = ["small", "fairly large", "x"]
    idx, labels = choice_batch(prompts, [0, 1, 2, 1], choices, 6, 128, torch.Generator().manual_seed(1))
    model = lm(6)
    apply_ia3(model)
    grads = []
    for m in (model, Wrapped(model)):
        logp, mask = answer_logprobs(m, idx, labels)
        grads.append(torch.autograd.grad(logp.sum(), [p for p in model.parameters() if p.requires_grad]))
        if m is model:
            shared, shared_mask = logp.detach(), mask
    torch.testing.assert_close(shared, logp.detach(), rtol=0, atol=1e-5)
    assert torch.equal(shared_mask, mask) and int(mask.sum()) > 0
    assert bool((shared[~mask] == 0).all())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    other_prompt = idx.clone()
    other_prompt[0, 1, 0] += 1  # the second sequence of group 0 no longer shares the prompt
    no_answer = labels.clone()
    no_answer[1, 2] = -100
    for bad_idx, bad_labels in ((other_prompt, labels), (idx, no_answer)):
        with pytest.raises(ValueError, match="share one prompt"):
            answer_logprobs(model, bad_idx, bad_labels)


def test_choice_loss_terms_by_hand() -> None:
    model = lm(1)
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    choices = ["small", "fairly large", "huge"]
    examples = [Example("- size: high", c) for c in choices]  # the correct answer first
    idx, labels = collate(examples, 128)
    out = ChoiceLoss(model)(idx.unsqueeze(0), labels.unsqueeze(0))
    per_choice = []
    for choice in choices:
        ids = encode_prompt("- size: high")
        answer = enc.encode(choice) + [eot]
        with torch.no_grad():
            logp = model(torch.tensor([ids + answer])).logits[0].log_softmax(-1)
        per_choice.append(torch.stack([logp[len(ids) - 1 + t, a] for t, a in enumerate(answer)]))
    lm_loss = -per_choice[0].mean()
    wrong = torch.cat(per_choice[1:])
    ul = -torch.log1p(-wrong.exp()).mean()
    ln = -torch.stack([p.mean() for p in per_choice]).log_softmax(0)[0]
    torch.testing.assert_close(out.lm, lm_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.ul, ul, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.ln, ln, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), lm_loss + ul + ln, rtol=0, atol=1e-5)
    generic = ChoiceLoss(Wrapped(model))(idx.unsqueeze(0), labels.unsqueeze(0))  # no shared prompt cache
    torch.testing.assert_close(generic.loss, out.loss, rtol=0, atol=1e-5)
    only_lm = ChoiceLoss(model, unlikelihood=False, length_norm=False)(idx.unsqueeze(0), labels.unsqueeze(0))
    torch.testing.assert_close(only_lm.loss.detach(), lm_loss, rtol=0, atol=1e-5)
    logp, mask = answer_logprobs(model, idx.unsqueeze(0), labels.unsqueeze(0))
    torch.testing.assert_close(answer_scores(logp, mask)[0].detach(), torch.stack([p.mean() for p in per_choice]),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C >= 2, T\]"):
        ChoiceLoss(model)(idx, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_choice_loss_forward_and_backward_in_any_dtype(dtype: torch.dtype) -> None:
    prompts, choices = ["- size: high", "- size: low\n- shade: medium"], ["small", "fairly large", "x"]
    idx, labels = choice_batch(prompts, [0, 2], choices, 4, 128, torch.Generator().manual_seed(2))
    reference = ChoiceLoss(lm(3))(idx, labels).loss.detach()  # float32
    model = lm(3).to(dtype)
    out = ChoiceLoss(model)(idx, labels)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # at least float32
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in model.parameters())
    tol = 1e-4 if dtype == torch.float64 else 0.2  # bfloat16 keeps about 3 significant digits per activation
    torch.testing.assert_close(out.loss.detach().float(), reference, rtol=0, atol=tol)
