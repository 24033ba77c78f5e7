"""Checkers for the exercises of `ch4_rank_allocation.ipynb` ("ch4.alloc_*") and
`ch4_training_and_serving.ipynb` ("ch4.train_*", "ch4.serve_*").

Each checker compares the student's function (or number) with the library's implementation in
`chapters/ch4_low_rank/` on seeded random inputs of several shapes and raises `Mismatch` saying what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, predicted, run

TARGETS = ("c_attn", "c_proj", "c_fc")  # every block linear: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


def tensor(got: Any, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what} should return a tensor, got {type(got).__name__}")
    return got


# =========================================================================== ch4_rank_allocation.ipynb

# (init_budget b0, target_budget b_T, total_steps T, t_init, t_final, period); the first is the notebook's
SCHEDULES = ((96, 64, 80, 8, 24, 5), (120, 40, 200, 20, 40, 10), (10, 3, 17, 0, 0, 1), (48, 48, 30, 5, 5, 3),
             (1000, 1, 90, 9, 0, 4))


def _exact_budget(t: int, b0: int, bT: int, T: int, t_init: int, t_final: int) -> Fraction:
    left = 1 - Fraction(t - t_init, T - t_final - t_init)
    return (b0 - bT) * left**3 + bT


@checker("ch4.alloc_budget_schedule")
def check_budget_schedule(budget: Callable[..., tuple[int, bool]]) -> None:
    """budget(t, b0, b_T, T, t_init, t_final, period) -> (b(t), mask now?), as adalora.budget_schedule."""
    from chapters.ch4_low_rank.adalora import budget_schedule

    for b0, bT, T, t_init, t_final, period in SCHEDULES:
        setting = f"b0={b0}, b_T={bT}, T={T}, t_init={t_init}, t_final={t_final}, period={period}"
        for t in range(1, T + 1):
            got = run(budget, t, b0, bT, T, t_init, t_final, period, what=f"budget(t={t}, {setting})")
            want = budget_schedule(t, b0, bT, T, t_init, t_final, period)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"budget(...) should return a pair (b, mask_now), got {got!r}")
            b, mask_now = got
            if isinstance(b, bool) or not isinstance(b, int):
                raise Mismatch(f"t={t} ({setting}): b(t) should be an int (the schedule truncates with int()), "
                               f"got {b!r}")
            if b != want[0]:
                exact = _exact_budget(t, b0, bT, T, t_init, t_final) if t_init < t <= T - t_final else None
                if exact is not None and exact.denominator == 1 and abs(b - want[0]) == 1:
                    continue  # the exact value is an integer: float rounding may land on either side of it
                raise Mismatch(f"t={t} ({setting}): b(t) = {b}, the library's schedule gives {want[0]}")
            if bool(mask_now) != want[1]:
                raise Mismatch(f"t={t} ({setting}): mask now = {bool(mask_now)}, expected {want[1]} "
                               "(no masking up to t_init; every `period` steps in the cubic phase; "
                               "every step once the final budget is reached)")


def random_scores(seed: int) -> dict[str, torch.Tensor]:
    """Triplet scores [r] of 3 to 6 layers with mixed ranks; continuous, so there are no ties."""
    g = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(3, 7, (1,), generator=g))
    return {f"h.{i}.layer": torch.rand(int(torch.randint(1, 9, (1,), generator=g)), generator=g) * (1 + i)
            for i in range(n_layers)}


@checker("ch4.alloc_budget_mask")
def check_budget_mask(budget_mask: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]) -> None:
    """budget_mask(scores, k): kept masks with the k lowest scores over all layers switched off."""
    from chapters.ch4_low_rank import adalora

    for seed in range(4):
        scores = random_scores(seed)
        total = sum(s.numel() for s in scores.values())
        for k in sorted({0, 1, 3, total // 2, total - 1}):
            given = {n: s.clone() for n, s in scores.items()}
            got = run(budget_mask, given, k, what=f"budget_mask(scores, k={k})")
            want = adalora.budget_mask(scores, k)
            if not isinstance(got, dict) or set(got) != set(want):
                raise Mismatch(f"k={k}: expected a dict with the layer names {sorted(want)} as keys, got "
                               f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
            for n in want:
                m = got[n]
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != want[n].shape:
                    raise Mismatch(f"k={k}: the mask of {n!r} should be a bool tensor of shape "
                                   f"{tuple(want[n].shape)}, got {getattr(m, 'dtype', type(m).__name__)} "
                                   f"{tuple(getattr(m, 'shape', ()))}")
            off = sum(int((~m).sum()) for m in got.values())
            if off != k:
                raise Mismatch(f"k={k}: you switch off {off} components in total, the budget says {k}")
            for n in want:
                if not torch.equal(got[n], want[n]):
                    raise Mismatch(f"k={k}: in {n!r} (scores {[round(v, 3) for v in scores[n].tolist()]}) you keep "
                                   f"{got[n].int().tolist()}, the model-wide rule keeps {want[n].int().tolist()} "
                                   "(compare all layers' scores together and switch off the lowest)")


@checker("ch4.alloc_adalora_count")
def check_adalora_count(answer: Any) -> None:
    """Trainable entries of AdaLoRA with init_r=8 on the 16 block matrices of `base`, counted from the model."""
    from chapters.ch4_low_rank.adalora import apply_adalora
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("base")
    apply_adalora(model, init_r=8, target_r=4, targets=TARGETS)
    want = count_trainable(model).trainable
    if got != want:
        lora = want - 8 * 16
        hint = (" (that is LoRA r=8's count: each matrix also trains its r singular values E)" if got == lora
                else " (count r (in + out) + r per matrix, 4 matrices per block)")
        raise Mismatch(f"AdaLoRA init_r=8 trains {want:,} entries of base, you predicted {got:,}{hint}")


# =========================================================================== ch4_training_and_serving.ipynb

# (m, n, r) of wide gradients (m < n: GaLore's "left" case)
GALORE_SHAPES = ((8, 20, 3), (16, 64, 4), (5, 7, 5), (32, 48, 1))


@checker("ch4.train_galore_projection")
def check_galore_projection(answer: Any) -> None:
    """(project, project_back): project(G, r) -> (P [m, r], R [r, n]); project_back(N, P, alpha) -> [m, n]."""
    from chapters.ch4_low_rank import galore

    if not isinstance(answer, tuple) or len(answer) != 2:
        raise Mismatch("pass the pair of functions: check(..., (project, project_back))")
    project, project_back = answer
    g = torch.Generator().manual_seed(0)
    for m, n, r in GALORE_SHAPES:
        G = torch.randn(m, n, generator=g)  # [m, n]
        where = f"G [{m}, {n}], r={r}"
        got = run(project, G.clone(), r, what=f"project(G, {r}) with {where}")
        if not isinstance(got, tuple) or len(got) != 2:
            raise Mismatch(f"project(G, r) should return the pair (P, R), got {type(got).__name__}")
        P, R = (tensor(t, "project") for t in got)
        if P.shape != (m, r):
            raise Mismatch(f"{where}: P should be [m, r] = [{m}, {r}] (the top-r LEFT singular vectors, "
                           f"columns of U), got {tuple(P.shape)}")
        close(P.T @ P, torch.eye(r), f"{where}: P^T P (the columns of P should be orthonormal)", atol=1e-4)
        side, P_lib = galore.GaLoreAdamW.compute_projector(None, G, r)
        assert side == "left"
        close(P @ P.T, P_lib @ P_lib.T, f"{where}: the subspace P spans (P P^T) against the top-{r} left "
              "singular vectors", atol=1e-4)
        close(R, galore.project(G, "left", P), f"{where}: R (should be P^T G, [r, n])", atol=1e-4)
        N = torch.randn(r, n, generator=g)  # an Adam step in the projected space
        for alpha in (0.25, 1.0):
            back = tensor(run(project_back, N, P, alpha, what=f"project_back(N, P, {alpha}) with {where}"),
                          "project_back")
            close(back, galore.project_back(N, "left", P, alpha),
                  f"{where}: project_back(N, P, alpha={alpha}) (should be alpha P N, [m, n])", atol=1e-4)


@checker("ch4.train_galore_state")
def check_galore_state(answer: Any) -> None:
    """Numbers GaLore's optimizer holds for the 16 block matrices of `base` at rank 16, counted after one step."""
    from chapters.ch4_low_rank import galore
    from minimal.peft import find_linears
    from minimal.pretrained import load_base
    from minimal.train import TrainConfig

    got = predicted(answer)
    torch.manual_seed(0)
    model = load_base("base")
    hooks = galore.apply_galore(model, r=16, targets=TARGETS)
    opt = hooks.make_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig())
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    model(idx, labels=idx).loss.backward()
    opt.step()
    mats = [model.get_submodule(n).weight for n in find_linears(model, TARGETS)]
    want = sum(t.numel() for w in mats for t in opt.state[w].values() if torch.is_tensor(t) and t.dim() > 0)
    if got != want:
        moments = sum(2 * 16 * max(w.shape) for w in mats)
        adam = sum(2 * w.numel() for w in mats)
        hint = (" (those are the moments only: add the projector of each matrix)" if got == moments
                else " (that is plain Adam's 2 m n per matrix)" if got == adam
                else " (per [m, n] matrix: a projector on the short side, two moments on the long side)")
        raise Mismatch(f"GaLore rank 16 keeps {want:,} numbers for base's block matrices, you predicted {got:,}{hint}")


def random_modules(seed: int) -> list[dict[str, torch.Tensor]]:
    """2 to 4 LoRA modules of one architecture: {'<layer>.A': [r, in], '<layer>.B': [out, r]}."""
    g = torch.Generator().manual_seed(seed)
    K, r = 2 + seed % 3, 1 + seed % 4
    shapes = {"h.0.attn.c_attn": (12, 4), "h.0.mlp.c_fc": (16, 4), "h.1.attn.c_attn": (12, 4)}  # (out, in)
    return [{key: torch.randn(*shape, generator=g) for layer, (o, i) in shapes.items()
             for key, shape in ((f"{layer}.A", (r, i)), (f"{layer}.B", (o, r)))} for _ in range(K)]


@checker("ch4.train_lorahub_compose")
def check_lorahub_compose(compose: Callable) -> None:
    """compose(modules, weights) -> {name: sum_k w_k module_k[name]}, as lorahub.compose."""
    from chapters.ch4_low_rank import lorahub

    for seed in range(4):
        modules = random_modules(seed)
        g = torch.Generator().manual_seed(100 + seed)
        for w in (torch.randn(len(modules), generator=g), torch.eye(len(modules))[0], torch.zeros(len(modules))):
            given = [{n: t.clone() for n, t in mod.items()} for mod in modules]
            got = run(compose, given, w.clone(), what=f"compose(modules, weights={w.tolist()})")
            want = lorahub.compose(modules, w)
            if not isinstance(got, dict) or set(got) != set(want):
                raise Mismatch(f"expected a dict with the factor names {sorted(want)[:2]}..., got "
                               f"{sorted(got)[:2] if isinstance(got, dict) else type(got).__name__}")
            for name in want:
                close(tensor(got[name], "compose"), want[name],
                      f"{len(modules)} modules, w = {[round(v, 2) for v in w.tolist()]}: factor {name!r}")


def slot_weights(adapters: list[tuple[torch.Tensor, torch.Tensor, float]]):
    from chapters.ch4_low_rank.slora import SlotWeights

    return SlotWeights(A=torch.cat([A for A, _, _ in adapters]), Bt=torch.cat([B.T for _, B, _ in adapters]),
                       ranks=[A.shape[0] for A, _, _ in adapters],
                       scales=torch.tensor([float(s) for _, _, s in adapters]))


# (tokens N, adapters S, d_in, d_out)
SERVE_SHAPES = ((10, 3, 8, 12), (1, 1, 4, 4), (16, 4, 6, 10), (7, 2, 5, 3))


@checker("ch4.serve_gathered_lora")
def check_gathered_lora(gathered: Callable) -> None:
    """gathered(x, slot, adapters) -> the low-rank branch [N, out] of every token, as slora.add_lora_."""
    from chapters.ch4_low_rank import slora

    g = torch.Generator().manual_seed(0)
    for N, S, d_in, d_out in SERVE_SHAPES:
        ranks = torch.randint(1, 7, (S,), generator=g).tolist()
        adapters = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + k)
                    for k, r in enumerate(ranks)]
        x = torch.randn(N, d_in, generator=g)  # [N, in]
        for slot in (torch.randint(-1, S, (N,), generator=g), torch.full((N,), S - 1), torch.full((N,), -1)):
            where = f"{N} tokens, {S} adapters of ranks {ranks}, slot {slot.tolist()}"
            got = run(gathered, x.clone(), slot.clone(), adapters, what=f"gathered(x, slot, adapters) with {where}")
            got = tensor(got, "gathered")
            want = slora.add_lora_(x.new_zeros(N, d_out), x, slot, slot_weights(adapters), path="gather")
            close(got, want, f"{where}: the branch s_a (x A_a^T) B_a^T (slot -1: no adapter, zero)", atol=1e-4)
