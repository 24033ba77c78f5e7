"""Chapter 2 (ch2_additive.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

import torch

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def not_implemented(name, answer, capsys):
    assert not check(name, answer)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- counts on small

L, d = 2, 64
RIGHT = {"prompt": 20 * d,
         "prefix": 10 * d + (d * d + d) + (d * 2 * L * d + 2 * L * d),
         "prefix_stored": 2 * 10 * L * d,
         "houlsby": 2 * L * (2 * 8 * d + 8 + d) + 4 * L * d + 2 * d}


def test_count_small(capsys):
    passes("ch2.count_small", RIGHT, capsys)
    fails("ch2.count_small", {**RIGHT, "houlsby": 2 * L * (2 * 8 * d + 8 + d)}, capsys, "LayerNorms")  # LNs left out
    fails("ch2.count_small", {**RIGHT, "prefix_stored": 10 * L * d}, capsys, "after consolidate")  # keys only
    fails("ch2.count_small", {**RIGHT, "prefix": 10 * d + d * d + d * 2 * L * d}, capsys, "biases")  # no biases
    fails("ch2.count_small", {**RIGHT, "prompt": 1280.0}, capsys, "an int")
    fails("ch2.count_small", {"prompt": 1280}, capsys, "keys")
    not_implemented("ch2.count_small", {k: None for k in RIGHT}, capsys)


# ---------------------------------------------------------------------------- the prefix layout

def prefix_flat(cache):
    t = torch.stack([x[0] for k, v in cache for x in (k, v)])  # [2L, H, P, hd]
    return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1)  # [P, 2Ld]


def keys_then_values(cache):  # all keys first, then all values
    t = torch.stack([k[0] for k, _ in cache] + [v[0] for _, v in cache])
    return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1)


def heads_and_dims_swapped(cache):
    t = torch.stack([x[0] for k, v in cache for x in (k, v)])  # [2L, H, P, hd]
    return t.permute(2, 0, 3, 1).reshape(t.shape[2], -1)


def no_permute(cache):  # reshapes [2L, H, P, hd] straight to [P, 2Ld]
    t = torch.stack([x[0] for k, v in cache for x in (k, v)])
    return t.reshape(t.shape[2], -1)


def test_prefix_flat(capsys):
    passes("ch2.prefix_flat", prefix_flat, capsys)
    fails("ch2.prefix_flat", keys_then_values, capsys, "layer")
    fails("ch2.prefix_flat", heads_and_dims_swapped, capsys, "comes out wrong")
    fails("ch2.prefix_flat", no_permute, capsys)
    fails("ch2.prefix_flat", lambda cache: torch.zeros(3, 3), capsys, "shape")

    def stub(cache):
        raise NotImplementedError
    not_implemented("ch2.prefix_flat", stub, capsys)


# ---------------------------------------------------------------------------- (IA)^3 merge

def ia3_merge(weight, bias, vec, mode):
    if mode == "output":
        return weight * vec[:, None], (bias * vec if bias is not None else None)
    return weight * vec[None, :], bias


def bias_forgotten(weight, bias, vec, mode):
    return (weight * vec[:, None] if mode == "output" else weight * vec[None, :]), bias


def bias_scaled_in_input_mode(weight, bias, vec, mode):
    if mode == "output":
        return weight * vec[:, None], (bias * vec if bias is not None else None)
    return weight * vec[None, :], bias  if bias is None else bias * vec.mean()


def rows_and_columns_swapped(weight, bias, vec, mode):
    if mode == "output":
        return weight * vec[None, :], (bias * vec if bias is not None else None)
    return weight * vec[:, None], bias


def test_ia3_merge(capsys):
    passes("ch2.ia3_merge", ia3_merge, capsys)
    fails("ch2.ia3_merge", bias_forgotten, capsys, "merged bias")
    fails("ch2.ia3_merge", bias_scaled_in_input_mode, capsys, "mode='input'")
    fails("ch2.ia3_merge", rows_and_columns_swapped, capsys, "raised")
    fails("ch2.ia3_merge", lambda w, b, v, m: w * v, capsys)

    def stub(weight, bias, vec, mode):
        raise NotImplementedError
    not_implemented("ch2.ia3_merge", stub, capsys)


# ---------------------------------------------------------------------------- proxy-tuning

def proxy_combine(s_base, s_expert, s_anti, alpha):
    lp = [s.log_softmax(-1) for s in (s_base, s_expert, s_anti)]
    return lp[0] + alpha * (lp[1] - lp[2])


def test_proxy_combine(capsys):
    passes("ch2.proxy_combine", proxy_combine, capsys)
    fails("ch2.proxy_combine", lambda b, e, a, alpha: b + alpha * (e - a), capsys, "z")  # raw logits
    fails("ch2.proxy_combine", lambda b, e, a, alpha: proxy_combine(b, a, e, alpha), capsys)  # sign flipped
    fails("ch2.proxy_combine", lambda b, e, a, alpha: alpha * b.log_softmax(-1) + e.log_softmax(-1)
          - a.log_softmax(-1), capsys)  # alpha on the wrong term
    fails("ch2.proxy_combine", lambda b, e, a, alpha: (b.softmax(-1) + alpha * (e.softmax(-1) - a.softmax(-1))),
          capsys)

    def stub(s_base, s_expert, s_anti, alpha):
        raise NotImplementedError
    not_implemented("ch2.proxy_combine", stub, capsys)
