"""Chapter 4 (ch4_low_rank, ch4_learning_forgetting) exercise checkers: the reference solutions pass, typical
mistakes fail, and the library helpers the checkers compare with are right on hand-made cases."""

import math

import pytest
import torch
import torch.nn as nn

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def stub(*args):
    raise NotImplementedError


# ---------------------------------------------------------------------------- LoRA count (predict)

def test_lora_count(capsys):
    L, d, r = 4, 128, 4  # base
    passes("ch4.lora_count", L * r * ((d + 3 * d) + (d + 4 * d)), capsys)
    fails("ch4.lora_count", L * r * (d + 3 * d), capsys, "c_attn alone")
    fails("ch4.lora_count", r * ((d + 3 * d) + (d + 4 * d)), capsys, "one block")
    fails("ch4.lora_count", L * r * (3 * d * d + 4 * d * d), capsys)  # r times the weight sizes
    fails("ch4.lora_count", 18432.0, capsys, "an int")
    assert not check("ch4.lora_count", None)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- LoRA merge (implement)

def merged_linear(layer, weight, bias):
    new = nn.Linear(layer.base.in_features, layer.base.out_features, bias=layer.base.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def lora_merge(layer):
    return merged_linear(layer, layer.base.weight + layer.scale * layer.B @ layer.A, layer.base.bias)


def test_lora_merge_reference_passes(capsys):
    passes("ch4.lora_merge", lora_merge, capsys)


def test_lora_merge_missing_scale_fails(capsys):
    fails("ch4.lora_merge", lambda m: merged_linear(m, m.base.weight + m.B @ m.A, m.base.bias), capsys, "s B A")


def test_lora_merge_a_and_b_swapped_fails(capsys):
    def swapped(m):
        return merged_linear(m, m.base.weight + m.scale * m.A.T @ m.B.T, m.base.bias)
    fails("ch4.lora_merge", swapped, capsys)


def test_lora_merge_bias_merged_twice_fails(capsys):
    def bias_twice(m):  # the output at x = 0 already contains b0; adding b0 again counts it twice
        b = None if m.base.bias is None else m(torch.zeros(m.base.in_features)) + m.base.bias
        return merged_linear(m, m.base.weight + m.scale * m.B @ m.A, b)
    fails("ch4.lora_merge", bias_twice, capsys, "bias")


def test_lora_merge_in_place_fails(capsys):
    def in_place(m):
        m.merge()
        return m.base
    fails("ch4.lora_merge", in_place, capsys, "changed the layer")


def test_lora_merge_stub_is_not_implemented(capsys):
    assert not check("ch4.lora_merge", stub)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- DoRA magnitude (implement)

def dora_magnitude(W):
    m = W.norm(dim=1)
    return m, W / m.unsqueeze(1)


def test_dora_magnitude_reference_passes(capsys):
    passes("ch4.dora_magnitude", dora_magnitude, capsys)


def test_dora_magnitude_norm_over_the_output_axis_fails(capsys):
    def columns(W):
        m = W.norm(dim=0)
        return m, W / m
    fails("ch4.dora_magnitude", columns, capsys)


def test_dora_magnitude_squared_norm_fails(capsys):
    def squared(W):
        m = (W ** 2).sum(dim=1)
        return m, W / m.unsqueeze(1)
    fails("ch4.dora_magnitude", squared, capsys, "magnitude")


def test_dora_magnitude_one_norm_for_the_whole_matrix_fails(capsys):
    fails("ch4.dora_magnitude", lambda W: (W.norm().expand(W.shape[0]), W / W.norm()), capsys)


def test_dora_magnitude_stub_is_not_implemented(capsys):
    assert not check("ch4.dora_magnitude", stub)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- PiSSA init (implement)

def pissa_init(W0, r, scale=1.0):
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    A = root.unsqueeze(1) * Vh[:r]
    B = U[:, :r] * root
    return A, B, W0 - scale * B @ A


def test_pissa_init_reference_passes(capsys):
    passes("ch4.pissa_init", pissa_init, capsys)


def test_pissa_init_minor_components_fail(capsys):  # MiLoRA's start, not PiSSA's
    def minor(W0, r, scale=1.0):
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = torch.sqrt(S[-r:] / scale)
        A, B = root.unsqueeze(1) * Vh[-r:], U[:, -r:] * root
        return A, B, W0 - scale * B @ A
    fails("ch4.pissa_init", minor, capsys, "top-")


def test_pissa_init_unbalanced_split_fails(capsys):  # B A is right, but all of sigma sits in B
    def unbalanced(W0, r, scale=1.0):
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        A, B = Vh[:r], U[:, :r] * (S[:r] / scale)
        return A, B, W0 - scale * B @ A
    fails("ch4.pissa_init", unbalanced, capsys, "row lengths of A")


def test_pissa_init_scale_not_divided_out_fails(capsys):
    def no_scale(W0, r, scale=1.0):
        A, B, _ = pissa_init(W0, r, 1.0)
        return A, B, W0 - scale * B @ A
    fails("ch4.pissa_init", no_scale, capsys, "s B A")


def test_pissa_init_residual_not_subtracted_fails(capsys):
    def no_residual(W0, r, scale=1.0):
        A, B, _ = pissa_init(W0, r, scale)
        return A, B, W0
    fails("ch4.pissa_init", no_residual, capsys, "W_res")


def test_pissa_init_matches_what_pissa_linear_does():
    from chapters.ch4_low_rank.pissa import PiSSALinear, svd_init
    torch.manual_seed(0)
    lin = nn.Linear(10, 14)
    W0 = lin.weight.detach().clone()
    layer = PiSSALinear(lin, r=3, alpha=6.0)
    idx, A, B = svd_init(W0, 3, "principal", layer.scale)
    assert idx.tolist() == [0, 1, 2]
    assert torch.equal(layer.A, A) and torch.equal(layer.B, B)
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), W0)


# ---------------------------------------------------------------------------- rank for energy (implement)

def rank_for_energy(delta, energy=0.9):
    s2 = torch.linalg.svdvals(delta) ** 2
    if s2.sum() == 0:
        return 0
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < energy).sum()) + 1


def test_rank_for_energy_reference_passes(capsys):
    passes("ch4.rank_for_energy", rank_for_energy, capsys)


def test_rank_for_energy_on_singular_values_not_their_squares_fails(capsys):
    def sigma_not_squared(delta, energy=0.9):
        s = torch.linalg.svdvals(delta)
        return 0 if s.sum() == 0 else int((torch.cumsum(s, 0) / s.sum() < energy).sum()) + 1
    fails("ch4.rank_for_energy", sigma_not_squared, capsys)


def test_rank_for_energy_off_by_one_fails(capsys):
    fails("ch4.rank_for_energy", lambda d, e=0.9: max(rank_for_energy(d, e) - 1, 0), capsys)


def test_rank_for_energy_returning_a_tensor_fails(capsys):
    fails("ch4.rank_for_energy", lambda d, e=0.9: torch.tensor(rank_for_energy(d, e)), capsys, "Python int")


def test_library_rank_for_energy_on_hand_made_spectra():
    from chapters.ch4_low_rank.intrinsic_dimension import rank_for_energy as library
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 4))
    V, _ = torch.linalg.qr(torch.randn(32, 4))
    M = U @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0])) @ V.T  # energies 16, 4, 1, 1 of 22
    assert [library(M, e) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 4]
    assert library(torch.zeros(5, 3)) == 0
    assert library(torch.eye(6)) == math.ceil(0.9 * 6)
    with pytest.raises(ValueError, match="energy"):
        library(M, 0.0)


# ---------------------------------------------------------------------------- adapter bytes, scales (predict)

def test_adapter_bytes(capsys):
    L, d, r = 4, 128, 4
    params = L * r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    passes("ch4.adapter_bytes", 4 * params, capsys)
    fails("ch4.adapter_bytes", params, capsys, "bytes, not parameters")
    fails("ch4.adapter_bytes", 2 * params, capsys)
    assert not check("ch4.adapter_bytes", None)


def test_rslora_scales(capsys):
    passes("ch4.rslora_scales", (2 / 64, 2 / 8), capsys)
    fails("ch4.rslora_scales", (2 / 8, 2 / 64), capsys, "alpha / r")
    fails("ch4.rslora_scales", (2.0, 2.0), capsys)
    assert not check("ch4.rslora_scales", None)
