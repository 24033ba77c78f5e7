"""Checkers for chapter 4's exercises in `ch4_low_rank.ipynb` and `ch4_learning_forgetting.ipynb`.

ch4_low_rank: `ch4.lora_count` (predict), `ch4.lora_merge`, `ch4.dora_magnitude`, `ch4.pissa_init` (implement).
ch4_learning_forgetting: `ch4.rank_for_energy` (implement), `ch4.adapter_bytes`, `ch4.rslora_scales` (predict).
Each implement-checker builds small random layers (seeded, several shapes, square and not) and compares the
student's function with the library's: `lora.py`, `dora.py`, `pissa.py`, `intrinsic_dimension.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from chapters.exercises import Mismatch, checker, close, equal, predicted, run

ALL = ("c_attn", "c_proj", "c_fc")  # every linear layer of a block ("c_proj": attn and mlp)


def as_pair(got: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{what} should return a pair, got {type(got).__name__}")
    return got[0], got[1]


# ----------------------------------------------------------------------------- LoRA: count (predict)


@checker("ch4.lora_count")
def check_lora_count(answer: Any) -> None:
    """Trainable parameters of LoRA r=4 on c_attn and c_fc of the shipped `base`, counted by the library."""
    from chapters.ch4_low_rank.lora import apply_lora
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("base")
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "c_fc"))
    want = count_trainable(model).trainable
    if got != want:
        L, d = model.config.n_layer, model.config.n_embd
        hints = {
            4 * (d + 3 * d) * L: " (that is c_attn alone: c_fc is [out=4d, in=d])",
            4 * (d + 4 * d) * L: " (that is c_fc alone: c_attn is [out=3d, in=d])",
            4 * ((d + 3 * d) + (d + 4 * d)): " (that is one block: there are n_layer blocks)",
        }
        raise Mismatch(f"LoRA r=4 on c_attn and c_fc trains {want:,} parameters of base, you predicted "
                       f"{got:,}{hints.get(got, '')}")


# ----------------------------------------------------------------------------- LoRA: merge (implement)

# (in, out, r, alpha, rslora, bias): non-square and square layers, scales 2, 0.5, 1.5, 0.5 (never 1)
MERGE_CASES = ((12, 20, 3, 6.0, False, True), (16, 16, 4, 2.0, False, True), (10, 6, 2, 3.0, False, False),
               (8, 24, 4, 1.0, True, True))


def lora_layer(n_in: int, n_out: int, r: int, alpha: float, rslora: bool, bias: bool, seed: int):
    """A LoRALinear around a random nn.Linear, with a random (non-zero) B so that the update is not 0."""
    from chapters.ch4_low_rank.lora import LoRALinear

    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out, bias=bias), r=r, alpha=alpha, rslora=rslora)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@checker("ch4.lora_merge")
def check_lora_merge(lora_merge: Callable[[nn.Module], nn.Linear]) -> None:
    """lora_merge(layer) -> a new nn.Linear computing what the unmerged LoRALinear `layer` computes."""
    for seed, (n_in, n_out, r, alpha, rslora, bias) in enumerate(MERGE_CASES):
        layer = lora_layer(n_in, n_out, r, alpha, rslora, bias, seed)
        W0 = layer.base.weight.detach().clone()
        b0 = None if layer.base.bias is None else layer.base.bias.detach().clone()
        where = f"layer [out={n_out}, in={n_in}], r={r}, s={layer.scale:g}, bias={bias}"
        with torch.no_grad():
            got = run(lora_merge, layer, what=f"lora_merge({where})")
        if not isinstance(got, nn.Linear):
            raise Mismatch(f"lora_merge should return an nn.Linear, got {type(got).__name__}")
        if layer.merged or not torch.equal(layer.base.weight, W0):
            raise Mismatch(f"{where}: lora_merge changed the layer it was given; build a new nn.Linear")
        ref = copy.deepcopy(layer)
        ref.merge()  # the library: W0 + s B A in place
        with torch.no_grad():
            if got.weight.shape == ref.base.weight.shape and torch.allclose(got.weight, W0 + layer.B @ layer.A):
                raise Mismatch(f"{where}: the weight is W0 + B A; the update is s B A with s = {layer.scale:g}")
            close(got.weight, ref.base.weight, f"{where}: merged weight")
            if b0 is None:
                if got.bias is not None:
                    raise Mismatch(f"{where}: the base layer has no bias, the merged one should have none")
            else:
                if got.bias is None:
                    raise Mismatch(f"{where}: the merged layer lost the bias b0")
                close(got.bias, ref.base.bias, f"{where}: merged bias (LoRA does not change the bias)")
            x = torch.randn(3, 5, n_in)
            close(got(x), layer(x), f"{where}: merged output vs unmerged output")


# ----------------------------------------------------------------------------- DoRA: magnitude (implement)

DORA_SHAPES = ((20, 12), (16, 16), (5, 30))  # (out, in)


@checker("ch4.dora_magnitude")
def check_dora_magnitude(dora_magnitude: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dora_magnitude(W [out, in]) -> (m [out], direction [out, in]) with W = m * direction row by row."""
    from chapters.ch4_low_rank.dora import DoRALinear

    for seed, (n_out, n_in) in enumerate(DORA_SHAPES):
        torch.manual_seed(seed)
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(n_out, 1) * 3 + 0.1)  # rows of different lengths
        W = lin.weight.detach().clone()
        ref = DoRALinear(copy.deepcopy(lin), r=1)  # at init B = 0: m = ||W0||_row, the library's magnitude
        want_m = ref.m.detach()
        want_dir = W / ref.weight_norm().detach().unsqueeze(1)  # [out, in] unit rows
        m, direction = as_pair(run(dora_magnitude, W.clone(), what=f"dora_magnitude(W [{n_out}, {n_in}])"),
                               "dora_magnitude")
        m, direction = torch.as_tensor(m), torch.as_tensor(direction)
        where = f"W [out={n_out}, in={n_in}]"
        if m.shape != want_m.shape:
            raise Mismatch(f"{where}: m has shape {tuple(m.shape)}, expected ({n_out},): one length per output "
                           "row, the norm over the input axis (dim=1 of an [out, in] weight)")
        close(m, want_m, f"{where}: magnitude m (the Euclidean norm of each row, not its square)")
        close(direction, want_dir, f"{where}: direction (each row divided by its length)")


# ----------------------------------------------------------------------------- PiSSA: init (implement)

PISSA_CASES = ((24, 10, 3, 1.0), (16, 16, 4, 2.0), (8, 30, 2, 0.5))  # (out, in, r, scale)


@checker("ch4.pissa_init")
def check_pissa_init(pissa_init: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """pissa_init(W0, r, scale) -> (A [r, in], B [out, r], W_res [out, in]) as the library's PiSSA start."""
    from chapters.ch4_low_rank.pissa import svd_init

    for seed, (n_out, n_in, r, s) in enumerate(PISSA_CASES):
        torch.manual_seed(seed)
        W0 = torch.randn(n_out, n_in)
        _, A_ref, B_ref = svd_init(W0, r, "principal", s)
        res_ref = W0 - s * B_ref @ A_ref
        where = f"W0 [out={n_out}, in={n_in}], r={r}, s={s:g}"
        got = run(pissa_init, W0.clone(), r, s, what=f"pissa_init({where})")
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise Mismatch("pissa_init should return (A, B, W_res)")
        A, B, W_res = (torch.as_tensor(t).detach() for t in got)
        if A.shape != (r, n_in) or B.shape != (n_out, r):
            raise Mismatch(f"{where}: A {tuple(A.shape)} and B {tuple(B.shape)}, expected A [{r}, {n_in}] and "
                           f"B [{n_out}, {r}] (the nn.Linear layout of lora.py)")
        close(s * B @ A, s * B_ref @ A_ref, f"{where}: s B A (should be the top-{r} part U_r S_r V_r^T of W0)",
              atol=1e-4)
        close(W_res, res_ref, f"{where}: W_res = W0 - s B A", atol=1e-4)
        close(A.norm(dim=1), A_ref.norm(dim=1), f"{where}: row lengths of A (sqrt(sigma_i / s) each)", atol=1e-4)
        close(B.norm(dim=0), B_ref.norm(dim=0), f"{where}: column lengths of B (sqrt(sigma_i / s) each)",
              atol=1e-4)


# ----------------------------------------------------------------------------- rank for 90% energy (implement)


def energy_cases() -> list[tuple[str, torch.Tensor, float]]:
    """(name, matrix, energy): chosen spectra (no value on a boundary), random and zero matrices."""
    torch.manual_seed(0)
    cases = []
    for sigma, shape in (([4.0, 2.0, 1.0, 1.0], (64, 32)), ([3.0, 2.9, 0.5, 0.2, 0.1], (20, 40)),
                         ([5.0] + [0.3] * 11, (12, 12))):
        U, _ = torch.linalg.qr(torch.randn(shape[0], len(sigma)))
        V, _ = torch.linalg.qr(torch.randn(shape[1], len(sigma)))
        M = U @ torch.diag(torch.tensor(sigma)) @ V.T
        cases += [(f"sigma = {sigma}, energy {e}", M, e) for e in (0.5, 0.9, 0.99)]
    for shape in ((48, 16), (10, 30)):
        M = torch.randn(*shape) @ torch.diag(torch.linspace(3, 0.1, shape[1]))
        cases.append((f"a random [{shape[0]}, {shape[1]}] matrix, energy 0.9", M, 0.9))
    cases.append(("a zero [6, 4] matrix (no energy: 0)", torch.zeros(6, 4), 0.9))
    return cases


@checker("ch4.rank_for_energy")
def check_rank_for_energy(rank_for_energy: Callable[[torch.Tensor, float], int]) -> None:
    """rank_for_energy(delta, energy) -> the smallest k whose top-k sigma^2 hold `energy` of the total."""
    from chapters.ch4_low_rank.intrinsic_dimension import rank_for_energy as library

    for name, M, energy in energy_cases():
        got = run(rank_for_energy, M.clone(), energy, what=f"rank_for_energy({name})")
        if isinstance(got, torch.Tensor):
            raise Mismatch("return a Python int (for a one-element tensor t, int(t) or t.item())")
        if isinstance(got, bool) or not isinstance(got, int):
            raise Mismatch(f"rank_for_energy should return an int, got {got!r}")
        equal(got, library(M, energy), f"rank for {energy:.0%} of the energy of {name}")


# ----------------------------------------------------------------------------- adapter size and scales (predict)


@checker("ch4.adapter_bytes")
def check_adapter_bytes(answer: Any) -> None:
    """Bytes of the float32 adapter checkpoint of LoRA r=4 on every linear layer of `base`."""
    from chapters.ch4_low_rank.lora import apply_lora
    from minimal.peft import adapter_state_dict
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("base")
    apply_lora(model, r=4, alpha=8, targets=ALL)
    want = sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())
    if got != want:
        hint = " (bytes, not parameters: float32 is 4 bytes)" if 4 * got == want else ""
        raise Mismatch(f"the adapter of LoRA r=4 on all four matrices of base is {want:,} bytes, you predicted "
                       f"{got:,}{hint}")


@checker("ch4.rslora_scales")
def check_rslora_scales(answer: Any) -> None:
    """(s with alpha / r, s with rsLoRA's alpha / sqrt(r)) at r = 64, alpha = 2."""
    from chapters.ch4_low_rank.lora import lora_scale

    if answer is None or answer is ...:
        raise NotImplementedError
    s_lora, s_rslora = as_pair(answer, "the answer")
    close(float(s_lora), lora_scale(64, 2.0), "s = alpha / r at r=64, alpha=2", atol=1e-9, rtol=1e-9)
    close(float(s_rslora), lora_scale(64, 2.0, rslora=True), "rsLoRA's s = alpha / sqrt(r) at r=64, alpha=2",
          atol=1e-9, rtol=1e-9)
