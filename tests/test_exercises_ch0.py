"""Chapter 0 (ch0_minimal_gpt.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

import torch

from chapters.exercises import check
from minimal.tokenizer import merge_pair
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def stub(*args):
    raise NotImplementedError


def test_unfilled_stubs_report_not_implemented(capsys):
    for name in ("ch0.param_count", "ch0.merge_pair", "ch0.causal_mask", "ch0.answer_labels"):
        assert not check(name, stub)
        assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- parameter count

def count(cfg):
    V, T, L, d, b = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, int(cfg.bias)
    per_block = 12 * d * d + b * 9 * d + (2 + 2 * b) * d  # four linears (+ biases), two LayerNorms
    return V * d + T * d + L * per_block + (1 + b) * d


def test_param_count_reference_passes(capsys):
    passes("ch0.param_count", count, capsys)


def test_param_count_untied_head_fails(capsys):
    fails("ch0.param_count", lambda cfg: count(cfg) + cfg.vocab_size * cfg.n_embd, capsys, "tied")


def test_param_count_ignoring_bias_flag_fails(capsys):
    def with_biases(cfg):
        V, T, L, d = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
        return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    fails("ch0.param_count", with_biases, capsys, "bias=False")


def test_param_count_without_positions_fails(capsys):
    fails("ch0.param_count", lambda cfg: count(cfg) - cfg.block_size * cfg.n_embd, capsys, "you counted")


def test_param_count_float_fails(capsys):
    fails("ch0.param_count", lambda cfg: float(count(cfg)), capsys, "an int")


# ---------------------------------------------------------------------------- BPE merge

def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i:i + 2]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def test_library_merge_pair_does_not_overlap():
    assert merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 7) == [7, 3, 7]
    assert merge_pair([], (1, 2), 7) == []


def test_merge_pair_reference_passes(capsys):
    passes("ch0.merge_pair", merge, capsys)


def test_merge_pair_first_occurrence_only_fails(capsys):
    def first_only(ids, pair, new_id):
        for i in range(len(ids) - 1):
            if (ids[i], ids[i + 1]) == pair:
                return ids[:i] + [new_id] + ids[i + 2:]
        return list(ids)
    fails("ch0.merge_pair", first_only, capsys, "expected")


def test_merge_pair_scanning_from_the_right_fails(capsys):
    def from_right(ids, pair, new_id):  # (1, 1) in [1, 1, 1] gives [1, new_id]: overlaps resolved the wrong way
        return merge(ids[::-1], pair[::-1], new_id)[::-1]
    fails("ch0.merge_pair", from_right, capsys, "[1, 1, 1]")


def test_merge_pair_dropping_the_last_token_fails(capsys):
    def drops_last(ids, pair, new_id):
        out, i = [], 0
        while i < len(ids) - 1:
            if (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        return out
    fails("ch0.merge_pair", drops_last, capsys, "expected")


def test_merge_pair_in_place_fails(capsys):
    def in_place(ids, pair, new_id):
        ids[:] = merge(ids, pair, new_id)
        return ids
    fails("ch0.merge_pair", in_place, capsys, "changed its input")


# ---------------------------------------------------------------------------- causal mask

def test_causal_mask_reference_passes(capsys):
    passes("ch0.causal_mask", lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T), capsys)


def test_causal_mask_without_the_cache_offset_fails(capsys):
    fails("ch0.causal_mask", lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(), capsys, "cached keys")


def test_causal_mask_seeing_the_future_fails(capsys):
    fails("ch0.causal_mask", lambda T, S: torch.ones(T, S, dtype=torch.bool).triu(diagonal=S - T), capsys, "T=5")


def test_causal_mask_strictly_lower_fails(capsys):
    fails("ch0.causal_mask", lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T - 1), capsys,
          "no key")


def test_causal_mask_float_fails(capsys):
    fails("ch0.causal_mask", lambda T, S: torch.ones(T, S).tril(diagonal=S - T), capsys, "bool tensor")


# ---------------------------------------------------------------------------- answer-only labels

def encode(prompt_ids, answer_ids, block_size):
    prompt_ids = prompt_ids[-(block_size - len(answer_ids)):]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def test_answer_labels_reference_passes(capsys):
    passes("ch0.answer_labels", encode, capsys)


def test_answer_labels_loss_everywhere_fails(capsys):
    def everywhere(p, a, block):
        ids, _ = encode(p, a, block)
        return ids, list(ids)
    fails("ch0.answer_labels", everywhere, capsys, "labels carry loss")


def test_answer_labels_shifted_fails(capsys):
    def shifted(p, a, block):
        ids, labels = encode(p, a, block)
        return ids, labels[1:] + [-100]
    fails("ch0.answer_labels", shifted, capsys, "labels carry loss")


def test_answer_labels_cut_from_the_right_fails(capsys):
    def cut_right(p, a, block):
        p = p[:block - len(a)]
        return p + a, [-100] * len(p) + a
    fails("ch0.answer_labels", cut_right, capsys, "ids")


def test_answer_labels_without_the_end_token_loss_fails(capsys):
    def no_eot(p, a, block):
        ids, labels = encode(p, a, block)
        return ids, labels[:-1] + [-100]
    fails("ch0.answer_labels", no_eot, capsys, "labels carry loss")
