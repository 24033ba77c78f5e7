"""Chapter 5 (ch5_applications.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

from fractions import Fraction

import torch

from chapters.exercises import check
from minimal.data import Example, collate
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def test_unfilled_stubs_say_not_implemented(capsys):
    def stub(*args):
        raise NotImplementedError

    for name in ("ch5.roc_auc", "ch5.serialize_text", "ch5.rank_classify"):
        assert not check(name, stub)
        assert "not implemented yet" in capsys.readouterr().out
    assert not check("ch5.ovr_auc", None)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- one-vs-rest AUC by hand

def test_ovr_auc(capsys):
    passes("ch5.ovr_auc", (7 / 8 + 1 + 7 / 8) / 3, capsys)
    passes("ch5.ovr_auc", Fraction(11, 12), capsys)
    fails("ch5.ovr_auc", (7 / 8 + 1 + 3 / 4) / 3, capsys, "one half")  # ties counted as losses
    fails("ch5.ovr_auc", 7 / 8, capsys)  # one class only
    fails("ch5.ovr_auc", "0.92", capsys, "a number")


# ---------------------------------------------------------------------------- the hand AUC

def roc_auc(y, s):
    y, s = torch.as_tensor(y), torch.as_tensor(s, dtype=torch.float64)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return wins.mean().item()


def test_roc_auc_reference_passes(capsys):
    passes("ch5.roc_auc", roc_auc, capsys)


def test_roc_auc_rank_sum_passes(capsys):
    def by_ranks(y, s):
        values, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
        last = counts.cumsum(0).double()
        ranks = (last - (counts.double() - 1) / 2)[inverse]
        P, N = int((y == 1).sum()), int((y == 0).sum())
        return ((ranks[y == 1].sum() - P * (P + 1) / 2) / (P * N)).item()
    passes("ch5.roc_auc", by_ranks, capsys)


def test_roc_auc_ties_as_losses_fails(capsys):
    def strict(y, s):
        pos, neg = s[y == 1], s[y == 0]
        return (pos[:, None] > neg[None]).double().mean().item()
    fails("ch5.roc_auc", strict, capsys, "tied")


def test_roc_auc_ordinal_ranks_fails(capsys):
    def ordinal(y, s):  # ranks 1..n without averaging the ties
        ranks = s.argsort().argsort().double() + 1
        P, N = int((y == 1).sum()), int((y == 0).sum())
        return ((ranks[y == 1].sum() - P * (P + 1) / 2) / (P * N)).item()
    fails("ch5.roc_auc", ordinal, capsys, "tied")


def test_roc_auc_classes_swapped_fails(capsys):
    fails("ch5.roc_auc", lambda y, s: roc_auc(1 - y, s), capsys, "swapped")


# ---------------------------------------------------------------------------- serialisation

def serialize_text(columns, values):
    return " ".join(f"The {c} is {v}." for c, v in zip(columns, values))


def test_serialize_text_reference_passes(capsys):
    passes("ch5.serialize_text", serialize_text, capsys)


def test_serialize_text_mistakes_fail(capsys):
    fails("ch5.serialize_text", lambda c, v: " ".join(f"The {a} is {b}" for a, b in zip(c, v)), capsys)  # no period
    fails("ch5.serialize_text", lambda c, v: "\n".join(f"The {a} is {b}." for a, b in zip(c, v)), capsys)  # lines
    fails("ch5.serialize_text", lambda c, v: " ".join(f"The {b} is {a}." for a, b in zip(c, v)), capsys)  # swapped
    fails("ch5.serialize_text", lambda c, v: serialize_text(c, v) + " ", capsys)  # trailing space
    fails("ch5.serialize_text", lambda c, v: None, capsys, "a string")


# ---------------------------------------------------------------------------- rank classification

def rank_classify(model, prompts, choices, normalise=True, end_token=True, shift=True):
    scores = torch.zeros(len(prompts), len(choices))
    for i, p in enumerate(prompts):
        idx, labels = collate([Example(p, c) for c in choices], model.config.block_size)  # [C, T]
        if not end_token:  # drop the <|endoftext|> label at the end of each answer
            for row in labels:
                row[(row != -100).nonzero().max()] = -100
        logits = model(idx).logits
        if shift:
            logp, target = logits[:, :-1].log_softmax(-1), labels[:, 1:]
        else:  # a token scored with the logits of its own position
            logp, target = logits.log_softmax(-1), labels
        mask = target != -100
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        scores[i] = picked.sum(-1) / (mask.sum(-1) if normalise else 1)
    return scores.softmax(-1)


def test_rank_classify_reference_passes(capsys):
    passes("ch5.rank_classify", rank_classify, capsys)


def test_rank_classify_without_length_normalisation_fails(capsys):
    fails("ch5.rank_classify", lambda m, p, c: rank_classify(m, p, c, normalise=False), capsys, "summed")


def test_rank_classify_without_end_token_fails(capsys):
    fails("ch5.rank_classify", lambda m, p, c: rank_classify(m, p, c, end_token=False), capsys, "p(class | row)")


def test_rank_classify_unshifted_logits_fails(capsys):
    fails("ch5.rank_classify", lambda m, p, c: rank_classify(m, p, c, shift=False), capsys, "p(class | row)")


def test_rank_classify_raw_scores_fail(capsys):
    def raw(m, p, c):
        return rank_classify(m, p, c).log()  # log-probabilities, not probabilities
    fails("ch5.rank_classify", raw, capsys, "sum to 1")
