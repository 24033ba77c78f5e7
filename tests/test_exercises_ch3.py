"""Chapter 3 (ch3_selective.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

import pytest
import torch

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes

# ---------------------------------------------------------------------------- BitFit count

def test_bitfit_count(capsys):
    L, d = 2, 64  # the small model
    passes("ch3.bitfit_count", L * 11 * d + d, capsys)
    fails("ch3.bitfit_count", L * 9 * d, capsys, "LayerNorm")  # the linear biases only
    fails("ch3.bitfit_count", L * 11 * d, capsys)  # ln_f forgotten
    fails("ch3.bitfit_count", float(L * 11 * d + d), capsys, "an int")
    assert not check("ch3.bitfit_count", None)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- BitFit as masks

def bitfit_masks(model, variant):
    d = model.config.n_embd
    out = {}
    for name, p in model.named_parameters():
        if variant == "all" and name.endswith(".bias"):
            out[name] = torch.ones_like(p, dtype=torch.bool)
        elif variant == "subset" and name.endswith("mlp.c_fc.bias"):
            out[name] = torch.ones_like(p, dtype=torch.bool)
        elif variant == "subset" and name.endswith("attn.c_attn.bias"):
            m = torch.zeros_like(p, dtype=torch.bool)
            m[:d] = True  # b_q, the first third of b_q | b_k | b_v
            out[name] = m
    return out


def test_bitfit_masks_reference_passes(capsys):
    passes("ch3.bitfit_masks", bitfit_masks, capsys)


def test_bitfit_masks_value_bias_instead_of_query_fails(capsys):
    def last_third(model, variant):
        out = bitfit_masks(model, variant)
        for n, m in out.items():
            if n.endswith("c_attn.bias") and variant == "subset":
                out[n] = m.flip(0)
        return out
    fails("ch3.bitfit_masks", last_third, capsys, "c_attn.bias")


def test_bitfit_masks_linear_biases_only_fails(capsys):
    def no_layernorm(model, variant):
        return {n: m for n, m in bitfit_masks(model, variant).items() if ".ln_" not in n and not n.startswith("ln_f")}
    fails("ch3.bitfit_masks", no_layernorm, capsys, "should train")


def test_bitfit_masks_whole_c_attn_bias_in_subset_fails(capsys):
    def whole(model, variant):
        out = bitfit_masks(model, variant)
        return {n: torch.ones_like(m) if n.endswith("c_attn.bias") else m for n, m in out.items()}
    fails("ch3.bitfit_masks", whole, capsys, "you select")


# ---------------------------------------------------------------------------- global top-k

def topk_reference(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(k).indices] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = chosen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def test_topk_reference_passes(capsys):
    passes("ch3.topk_mask", topk_reference, capsys)


def test_topk_per_tensor_fails(capsys):
    def per_tensor(scores, k):
        out = {}
        for n, s in scores.items():
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[s.reshape(-1).topk(min(k, s.numel())).indices] = True
            out[n] = m.view(s.shape)
        return out
    fails("ch3.topk_mask", per_tensor, capsys)


def test_topk_smallest_fails(capsys):
    fails("ch3.topk_mask", lambda scores, k: topk_reference({n: -s for n, s in scores.items()}, k), capsys)


def test_topk_float_mask_fails(capsys):
    fails("ch3.topk_mask", lambda scores, k: {n: m.float() for n, m in topk_reference(scores, k).items()},
          capsys, "bool tensor")


def test_topk_crash_is_reported_not_raised(capsys):
    def crash(scores, k):
        return topk_reference(scores, k + 10**6)  # topk with k > numel raises RuntimeError
    fails("ch3.topk_mask", crash, capsys, "raised RuntimeError")


# ---------------------------------------------------------------------------- gradient masking

def masked_step(model, masks, theta0, optimizer):
    params = dict(model.named_parameters())
    for n, m in masks.items():
        params[n].grad.mul_(m)
    optimizer.step()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].copy_(torch.where(m, params[n], theta0[n]))


def test_masked_step_reference_passes(capsys):
    passes("ch3.masked_step", masked_step, capsys)


def test_masked_step_without_restore_fails(capsys):
    def no_restore(model, masks, theta0, optimizer):
        params = dict(model.named_parameters())
        for n, m in masks.items():
            params[n].grad.mul_(m)
        optimizer.step()
    fails("ch3.masked_step", no_restore, capsys, "unselected entries")


def test_masked_step_inverted_mask_fails(capsys):
    fails("ch3.masked_step", lambda model, masks, theta0, opt: masked_step(
        model, {n: ~m for n, m in masks.items()}, theta0, opt), capsys, "unselected entries")


def test_masked_step_restoring_everything_fails(capsys):
    def restore_all(model, masks, theta0, optimizer):
        masked_step(model, masks, theta0, optimizer)
        with torch.no_grad():
            for n in masks:
                dict(model.named_parameters())[n].copy_(theta0[n])
    fails("ch3.masked_step", restore_all, capsys, "selected entries")


@pytest.mark.parametrize("name", ["ch3.bitfit_masks", "ch3.topk_mask", "ch3.masked_step"])
def test_unfilled_stubs_say_not_implemented(name, capsys):
    def stub(*args):
        raise NotImplementedError
    assert not check(name, stub)
    assert "not implemented yet" in capsys.readouterr().out
