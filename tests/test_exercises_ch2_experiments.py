"""Chapter 2 (ch2_additive_experiments.ipynb) exercise checkers: reference solutions pass, typical mistakes fail."""

import math

import torch

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def not_implemented(name, answer, capsys):
    assert not check(name, answer)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- large-sparse budget

def test_large_sparse(capsys):
    passes("ch2.large_sparse", {"width": 32, "kept": 2048}, capsys)
    fails("ch2.large_sparse", {"width": 10, "kept": 2048}, capsys, "width")  # m / (1 - f) instead of m / f
    fails("ch2.large_sparse", {"width": 32, "kept": 1024}, capsys, "keeps")  # one block only
    fails("ch2.large_sparse", {"width": 32, "kept": 2048 + 2 * (32 + 64)}, capsys, "biases")  # biases counted
    fails("ch2.large_sparse", {"width": 32.0, "kept": 2048}, capsys, "an int")
    not_implemented("ch2.large_sparse", {"width": None, "kept": None}, capsys)


# ---------------------------------------------------------------------------- SNIP masks

def snip_masks(weights, grads, fraction):
    scores = {n: (w * grads[n]).abs() for n, w in weights.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = math.ceil(round(fraction * flat.numel(), 9))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k).indices] = True
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


def per_tensor(weights, grads, fraction):
    out = {}
    for n, w in weights.items():
        s = (w * grads[n]).abs().reshape(-1)
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep[s.topk(math.ceil(round(fraction * s.numel(), 9))).indices] = True
        out[n] = keep.view(w.shape)
    return out


def magnitude(weights, grads, fraction):
    return snip_masks(weights, {n: torch.ones_like(g) for n, g in grads.items()}, fraction)


def floor_budget(weights, grads, fraction):
    scores = {n: (w * grads[n]).abs() for n, w in weights.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(int(fraction * flat.numel())).indices] = True
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


def test_snip_masks(capsys):
    passes("ch2.snip_masks", snip_masks, capsys)
    fails("ch2.snip_masks", per_tensor, capsys, "all tensors together")
    fails("ch2.snip_masks", magnitude, capsys, "|W * grad|")
    fails("ch2.snip_masks", floor_budget, capsys, "number")

    def stub(weights, grads, fraction):
        raise NotImplementedError
    not_implemented("ch2.snip_masks", stub, capsys)


# ---------------------------------------------------------------------------- empirical Fisher

def empirical_fisher(model, idx, labels):
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for j in range(len(idx)):
        loss = model(idx[j:j + 1], labels=labels[j:j + 1]).loss
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            scores[n] += g.detach() ** 2 / len(idx)
    return scores


def squared_batch_gradient(model, idx, labels):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(idx, labels=labels).loss, list(params.values()))
    return {n: g.detach() ** 2 for n, g in zip(params, grads, strict=True)}


def summed(model, idx, labels):
    return {n: s * len(idx) for n, s in empirical_fisher(model, idx, labels).items()}


def not_squared(model, idx, labels):
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for j in range(len(idx)):
        loss = model(idx[j:j + 1], labels=labels[j:j + 1]).loss
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            scores[n] += g.detach().abs() / len(idx)
    return scores


def test_empirical_fisher(capsys):
    passes("ch2.empirical_fisher", empirical_fisher, capsys)
    fails("ch2.empirical_fisher", squared_batch_gradient, capsys, "largest difference")
    fails("ch2.empirical_fisher", summed, capsys)
    fails("ch2.empirical_fisher", not_squared, capsys)
    fails("ch2.empirical_fisher", lambda m, i, l: {"wte.weight": torch.zeros(1)}, capsys, "one score tensor")

    def stub(model, idx, labels):
        raise NotImplementedError
    not_implemented("ch2.empirical_fisher", stub, capsys)


# ---------------------------------------------------------------------------- FISH budget

def test_fish_budget(capsys):
    passes("ch2.fish_budget", int(0.005 * 1_071_872), capsys)
    fails("ch2.fish_budget", int(0.005 * (1_071_872 - 2048 * 128)), capsys, "wte")  # wte left out of Phi
    fails("ch2.fish_budget", math.ceil(0.005 * 1_071_872), capsys)
    fails("ch2.fish_budget", 5359.0, capsys, "an int")
    not_implemented("ch2.fish_budget", None, capsys)
