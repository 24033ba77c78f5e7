"""Exercise checkers of ch4_rank_allocation.ipynb and ch4_training_and_serving.ipynb: the reference solutions
pass, typical mistakes fail. Also the two small library functions the exercises are checked against."""

import pytest
import torch

from chapters.ch4_low_rank import adalora, galore
from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def not_implemented(name, answer, capsys):
    assert not check(name, answer)
    assert "not implemented yet" in capsys.readouterr().out


def stub(*args):
    raise NotImplementedError


# ---------------------------------------------------------------------------- AdaLoRA's budget schedule

def budget(t, b0, bT, T, t_init, t_final, period, power=3, plateau=True, as_int=True, first=True):
    if (t <= t_init) if first else (t < t_init):
        return b0, False
    if plateau and t > T - t_final:
        return bT, True
    left = 1 - (t - t_init) / (T - t_final - t_init)
    b = bT + (b0 - bT) * left**power
    return (int(b) if as_int else b), t % period == 0


def test_budget_schedule_reference_passes(capsys):
    passes("ch4.alloc_budget_schedule", budget, capsys)
    not_implemented("ch4.alloc_budget_schedule", stub, capsys)


@pytest.mark.parametrize("wrong, match", [
    (lambda *a: budget(*a, power=2), "b(t) ="),  # quadratic
    (lambda *a: budget(*a, plateau=False), "b(t) ="),  # the cubic runs on past T - t_final
    (lambda *a: budget(*a, as_int=False), "an int"),
    (lambda *a: budget(*a, first=False), "t=20"),  # t_init itself already in the cubic phase
    (lambda *a: (budget(*a)[0], True), "mask now"),  # masks at every step
])
def test_budget_schedule_mistakes_fail(wrong, match, capsys):
    fails("ch4.alloc_budget_schedule", wrong, capsys, match)


# ---------------------------------------------------------------------------- AdaLoRA's model-wide mask

def budget_mask(scores, k):
    flat = torch.cat(list(scores.values()))
    off = torch.zeros(flat.numel(), dtype=torch.bool)
    off[torch.argsort(flat)[:k]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = ~off[start:start + s.numel()]
        start += s.numel()
    return masks


def test_budget_mask_reference_passes(capsys):
    passes("ch4.alloc_budget_mask", budget_mask, capsys)
    not_implemented("ch4.alloc_budget_mask", stub, capsys)


def test_budget_mask_per_layer_fails(capsys):
    def per_layer(scores, k):  # the same share off in every layer: no rank moves between matrices
        share = k // len(scores)
        out = {}
        for name, s in scores.items():
            m = torch.ones_like(s, dtype=torch.bool)
            m[torch.argsort(s)[:share]] = False
            out[name] = m
        return out
    fails("ch4.alloc_budget_mask", per_layer, capsys, "switch off")


def test_budget_mask_highest_instead_of_lowest_fails(capsys):
    fails("ch4.alloc_budget_mask", lambda s, k: budget_mask({n: -v for n, v in s.items()}, k), capsys, "model-wide")


def test_budget_mask_off_by_one_fails(capsys):
    fails("ch4.alloc_budget_mask", lambda s, k: budget_mask(s, max(k - 1, 0)), capsys, "the budget says")


def test_budget_mask_is_what_the_allocator_applies():
    torch.manual_seed(0)
    layers = {f"l{i}": adalora.SVDLinear(torch.nn.Linear(6, 5), r=4) for i in range(3)}
    alloc = adalora.RankAllocator(layers, target_r=2)
    for layer in layers.values():
        torch.nn.init.normal_(layer.E)
        layer(torch.randn(3, 6)).pow(2).sum().backward()
    alloc.update_importance()
    want = adalora.budget_mask(alloc.scores(), 12 - 7)
    got = alloc.mask_to_budget(7)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert sum(int(m.sum()) for m in want.values()) == 7
    assert all(bool((layers[n].E[~m] == 0).all()) for n, m in want.items())


# ---------------------------------------------------------------------------- AdaLoRA count (predict)

def test_adalora_count(capsys):
    per_block = 8 * ((384 + 128) + (128 + 128) + (512 + 128) + (128 + 512)) + 4 * 8
    passes("ch4.alloc_adalora_count", 4 * per_block, capsys)
    fails("ch4.alloc_adalora_count", 4 * (per_block - 32), capsys, "singular values")  # LoRA r=8's count
    fails("ch4.alloc_adalora_count", 4 * per_block // 2, capsys)
    fails("ch4.alloc_adalora_count", 1.0 * 4 * per_block, capsys, "an int")
    not_implemented("ch4.alloc_adalora_count", None, capsys)


# ---------------------------------------------------------------------------- GaLore's projection

def project(G, r):
    U, _, _ = torch.linalg.svd(G, full_matrices=False)
    P = U[:, :r]  # [m, r]
    return P, P.T @ G  # [r, n]


def project_back(N, P, alpha):
    return alpha * P @ N  # [m, n]


def test_galore_projection_reference_passes(capsys):
    passes("ch4.train_galore_projection", (project, project_back), capsys)
    not_implemented("ch4.train_galore_projection", (stub, stub), capsys)


def test_galore_projection_mistakes_fail(capsys):
    def right_vectors(G, r):
        _, _, Vh = torch.linalg.svd(G, full_matrices=False)
        return Vh[:r], G @ Vh[:r].T
    fails("ch4.train_galore_projection", (right_vectors, project_back), capsys, "LEFT")

    def smallest(G, r):
        U, _, _ = torch.linalg.svd(G, full_matrices=False)
        return U[:, -r:], U[:, -r:].T @ G
    fails("ch4.train_galore_projection", (smallest, project_back), capsys, "subspace")
    fails("ch4.train_galore_projection", (project, lambda N, P, a: P @ N), capsys, "alpha=0.25")
    fails("ch4.train_galore_projection", (project, lambda N, P, a: a * P.T @ N), capsys, "raised")
    fails("ch4.train_galore_projection", (lambda G, r: (project(G, r)[0], G), project_back), capsys, "R")


def test_galore_project_and_project_back_are_the_optimizer_step():
    torch.manual_seed(0)
    for shape in ((6, 10), (10, 6)):
        w = torch.nn.Parameter(torch.randn(shape))
        opt = galore.GaLoreAdamW([w], lr=0.1, r=2, period=5, alpha=0.5)
        w0 = w.detach().clone()
        w.grad = torch.randn(shape)
        opt.step()
        side, P = opt.state[w]["side"], opt.state[w]["projector"]
        R = galore.project(w.grad, side, P)
        N = R / (R.abs() + 1e-8)  # Adam's first step: m_hat / (sqrt(v_hat) + eps)
        torch.testing.assert_close(w.detach(), w0 - 0.1 * galore.project_back(N, side, P, 0.5))
        assert side == ("left" if shape[0] < shape[1] else "right")


# ---------------------------------------------------------------------------- GaLore's state (predict)

def test_galore_state(capsys):
    shapes = ((384, 128), (128, 128), (512, 128), (128, 512))
    per_block = sum(16 * min(m, n) + 2 * 16 * max(m, n) for m, n in shapes)
    passes("ch4.train_galore_state", 4 * per_block, capsys)
    fails("ch4.train_galore_state", 4 * sum(2 * 16 * max(m, n) for m, n in shapes), capsys, "projector")
    fails("ch4.train_galore_state", 4 * sum(2 * m * n for m, n in shapes), capsys, "plain Adam")
    fails("ch4.train_galore_state", 4 * sum(16 * max(m, n) + 2 * 16 * min(m, n) for m, n in shapes), capsys)
    not_implemented("ch4.train_galore_state", None, capsys)


# ---------------------------------------------------------------------------- LoraHub's composition

def compose(modules, weights):
    return {name: sum(float(w) * mod[name] for w, mod in zip(weights, modules)) for name in modules[0]}


def test_lorahub_compose_reference_passes(capsys):
    passes("ch4.train_lorahub_compose", compose, capsys)
    not_implemented("ch4.train_lorahub_compose", stub, capsys)


def test_lorahub_compose_mistakes_fail(capsys):
    fails("ch4.train_lorahub_compose", lambda m, w: compose(m, w / w.abs().sum().clamp(min=1e-8)), capsys, "factor")
    fails("ch4.train_lorahub_compose", lambda m, w: compose(m, torch.ones_like(w)), capsys, "factor")
    fails("ch4.train_lorahub_compose", lambda m, w: compose(m, w**2), capsys, "factor")


# ---------------------------------------------------------------------------- S-LoRA's gathered branch

def gathered(x, slot, adapters):
    rmax = max(A.shape[0] for A, _, _ in adapters)
    A = x.new_zeros(len(adapters) + 1, rmax, x.shape[1])  # slot -1 reads the last, all-zero, adapter
    B = x.new_zeros(len(adapters) + 1, adapters[0][1].shape[0], rmax)
    s = x.new_zeros(len(adapters) + 1)
    for a, (A_a, B_a, s_a) in enumerate(adapters):
        A[a, :A_a.shape[0]], B[a, :, :B_a.shape[1]], s[a] = A_a, B_a, s_a
    t = torch.bmm(A[slot], x.unsqueeze(2))  # [N, rmax, 1]
    return (s[slot, None, None] * torch.bmm(B[slot], t)).squeeze(2)  # [N, out]


def test_gathered_lora_reference_passes(capsys):
    passes("ch4.serve_gathered_lora", gathered, capsys)
    not_implemented("ch4.serve_gathered_lora", stub, capsys)


def test_gathered_lora_mistakes_fail(capsys):
    def minus_one_is_last(x, slot, adapters):  # Python's -1 picks the last adapter instead of none
        return torch.stack([adapters[a][2] * (x[i] @ adapters[a][0].T) @ adapters[a][1].T
                            for i, a in enumerate(slot.tolist())])
    fails("ch4.serve_gathered_lora", minus_one_is_last, capsys, "slot -1")

    def no_scale(x, slot, adapters):
        return gathered(x, slot, [(A, B, 1.0) for A, B, _ in adapters])
    fails("ch4.serve_gathered_lora", no_scale, capsys, "largest difference")

    def b_not_transposed(x, slot, adapters):
        return torch.stack([(x[i] @ adapters[a][0].T) @ adapters[a][1] if a >= 0 else x.new_zeros(3)
                            for i, a in enumerate(slot.tolist())])
    fails("ch4.serve_gathered_lora", b_not_transposed, capsys)
