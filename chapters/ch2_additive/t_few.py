"""T-Few's training objective: score every answer choice, and train on all of them, not only the right one.

Paper: Haokun Liu, Derek Tam, Mohammed Muqeeth, Jay Mohta, Tenghao Huang, Mohit Bansal, Colin Raffel,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv 2205.05638 (code: r-three/t-few). T-Few is this loss plus the (IA)^3 vectors of ia3.py (the same
paper); chapter 5's TabLLM (chapters/ch5_applications/tabllm.py) trains with it.

Idea: a classification example is a prompt with C answer choices, the correct one among them. Rank
classification scores each choice by its length-normalised log-likelihood after the prompt; training adds
two terms to the usual cross-entropy so that the wrong choices are pushed down and the ranking is trained
directly. With lp the log-probabilities of the answer tokens, correct answer first:

    score(c) = (1 / |c|) sum_t lp(c_t | prompt, c_<t)                     length-normalised log-likelihood
    L_LM = - mean over the correct answer's tokens of lp                   (cross-entropy)
    L_UL = - mean over the wrong answers' tokens of log(1 - exp(lp))      (unlikelihood)
    L_LN = - log softmax_c(score(c))[correct]                            (length-normalised choice loss)
    L    = L_LM + L_UL + L_LN

Every example is a group of C sequences, prompt + each answer, the correct one first (idx, labels
[B, C, T], labels -100 except on the answer's tokens). `answer_logprobs` runs each prompt once and its C
answers on the prompt's key/value cache: the decoder-only counterpart of T-Few's encoder-decoder, which
encodes the input once and decodes every choice.

Choices: the answer's end-of-text token counts as one of its tokens (it says "the answer ends here");
UL clamps p below 1 - 1e-6 so that a wrong answer the model is certain of gives a large finite loss; the
loss is computed in float32 or wider (bfloat16 cannot hold 1 - 1e-6), the log-probabilities keep the
model's dtype. What trains is up to the method applied before (the paper: (IA)^3; chapter 5 also LoRA).

Copy: minimal/gpt.py, chapters/ch2_additive/t_few.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimal.gpt import GPT


def answer_logprobs(model: nn.Module, idx: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the answer tokens of groups of sequences: idx, labels [B, C, T] (group b: one prompt
    followed by each of C answers). Returns (logp, mask), both [B, C, T-1]:
    logp[b, c, t] = log p(idx[b, c, t+1] | idx[b, c, :t+1]) where labels[b, c, t+1] != -100, else 0.

    For our GPT the prompt of a group runs once and its C answers continue from the prompt's key/value cache
    (causal attention: the prompt's keys and values do not depend on what follows); prompts of equal length
    share a batch. Any other causal LM (model(idx).logits) runs all B C sequences in full. Both give the same
    numbers.
    """
    B, C, T = idx.shape
    target = labels[:, :, 1:]  # [B, C, T-1]
    mask = target != -100
    if not isinstance(model, GPT):
        logits = model(idx.view(B * C, T)).logits[:, :-1].view(B, C, T - 1, -1)  # [B, C, T-1, V]
        logp = logits[mask].log_softmax(-1)  # [M, V], only the M answer positions
        picked = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)  # [M]
        return torch.zeros(mask.shape, dtype=picked.dtype, device=idx.device).masked_scatter(mask, picked), mask
    start = mask[:, 0].int().argmax(-1)  # [B]: the prompt's last position, which predicts the first answer token
    _check_groups(idx, mask, start)
    out = None
    for s in torch.unique(start).tolist():
        rows = torch.nonzero(start == s).flatten()  # groups whose prompt is s + 1 tokens long
        n, L = len(rows), int(mask[rows].sum(-1).max())  # L: the longest answer (with <|endoftext|>)
        prompt = model(idx[rows, 0, :s + 1])  # logits [n, s+1, V], cache per layer [n, H, s+1, hd]
        cache = [(k.repeat_interleave(C, 0), v.repeat_interleave(C, 0)) for k, v in prompt.cache]  # [n C, ...]
        first = prompt.logits[:, -1].repeat_interleave(C, 0).unsqueeze(1)  # [n C, 1, V]
        logits = first
        if L > 1:
            rest = model(idx[rows, :, s + 1:s + L].reshape(n * C, L - 1), cache=cache).logits  # [n C, L-1, V]
            logits = torch.cat([first, rest], 1)
        logits = logits.view(n, C, L, -1)  # predicts positions s+1 .. s+L
        tgt, m = target[rows, :, s:s + L], mask[rows, :, s:s + L]  # [n, C, L]
        lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m  # [n, C, L]
        if out is None:
            out = torch.zeros(mask.shape, dtype=lp.dtype, device=idx.device)
        out = out.index_put((rows,), F.pad(lp, (s, T - 1 - s - L)))  # place at positions s .. s+L-1
    return out, mask


def _check_groups(idx: torch.Tensor, mask: torch.Tensor, start: torch.Tensor) -> None:
    """Every group shares its prompt (positions <= start) and every answer is labelled from start on, unbroken."""
    B, C, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    counts = mask.sum(-1, keepdim=True)  # [B, C, 1]
    first = start.view(B, 1, 1)
    unbroken = (pos[:-1] >= first) & (pos[:-1] < first + counts)  # [B, C, T-1]
    shared = ((idx == idx[:, :1]) | (pos > first)).all()
    if bool((counts == 0).any()) or not torch.equal(mask, unbroken) or not shared:
        raise ValueError("answer_logprobs expects groups of C sequences that share one prompt, each followed "
                         "by its answer's labelled tokens (see tabllm.choice_batch)")


def answer_scores(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """score(c): the mean log-probability of each answer's tokens. logp, mask [B, C, T-1] -> [B, C]"""
    return logp.sum(-1) / mask.sum(-1)


@dataclass
class ChoiceLossOutput:
    loss: torch.Tensor  # lm + ul + ln
    lm: torch.Tensor
    ul: torch.Tensor
    ln: torch.Tensor


class ChoiceLoss(nn.Module):
    """T-Few's training objective around a language model (see the module docstring).

    forward(idx [B, C, T], labels [B, C, T]): group b holds prompt b followed by each of the C answers,
    the correct answer first; labels are -100 everywhere but the answer tokens (and <|endoftext|>).
    `unlikelihood=False` drops L_UL, `length_norm=False` drops L_LN (the paper's ablations).
    """

    def __init__(self, model: nn.Module, unlikelihood: bool = True, length_norm: bool = True) -> None:
        super().__init__()
        self.model = model
        self.unlikelihood, self.length_norm = unlikelihood, length_norm

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> ChoiceLossOutput:
        if idx.dim() != 3 or idx.shape != labels.shape or idx.shape[1] < 2:
            raise ValueError(f"idx and labels must both be [B, C >= 2, T], got {tuple(idx.shape)} and "
                             f"{tuple(labels.shape)}")
        picked, mask = answer_logprobs(self.model, idx, labels)  # [B, C, T-1] each
        picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # float32 or float64
        lm = -picked[:, 0].sum() / mask[:, 0].sum()
        zero = picked.new_zeros(())
        ul = zero
        if self.unlikelihood:
            p_wrong = picked[:, 1:].exp().clamp(max=1 - 1e-6)  # [B, C-1, T-1]
            ul = -(torch.log1p(-p_wrong) * mask[:, 1:]).sum() / mask[:, 1:].sum()
        ln = zero
        if self.length_norm:
            scores = answer_scores(picked, mask)  # [B, C]
            ln = F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=idx.device))
        return ChoiceLossOutput(lm + ul + ln, lm.detach(), ul.detach(), ln.detach())
