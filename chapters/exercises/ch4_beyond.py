"""Checkers for the exercises of `ch4_beyond.ipynb` (QLoRA, LoRA+, VeRA, LoHa): "ch4.beyond_*".

`ch4.beyond_nf4_block` (implement): NF4 quantisation of one block and back, against qlora.py's
`quantize_blockwise` / `dequantize_blockwise` with `nf4_code()`.
`ch4.beyond_lora_plus_groups` (implement): the LoRA+ optimizer groups, against the rule of lora_plus.py
(B matrices at lr * ratio, every other trainable tensor at lr, frozen tensors left out).
`ch4.beyond_vera_count` (predict): VeRA's trainable count on the shipped `base`, counted by the library.
`ch4.beyond_loha_delta` (implement): LoHa's weight update s (B1 A1) ⊙ (B2 A2), against loha.py's
`LoHaLinear.delta_weight()` on layers whose four factors are random (A2 not zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from chapters.exercises import Mismatch, checker, close, predicted, run, tiny_gpt

# ----------------------------------------------------------------------------- NF4: one block (implement)


def nf4_blocks() -> list[tuple[str, torch.Tensor]]:
    """(name, block): normal weights, a block whose largest magnitude is negative, an outlier, another
    length, and an all-zero block (what pads the last block of a weight)."""
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, generator=g) * 0.05
    negative = torch.randn(64, generator=g) * 0.05
    negative[17] = -0.4  # the largest |x| is negative: absmax, not max
    outlier = torch.randn(64, generator=g) * 0.02
    outlier[5] = 0.6
    short = torch.randn(32, generator=g)
    return [("64 normal weights (std 0.05)", normal), ("64 weights whose largest |x| is negative", negative),
            ("64 weights with one outlier", outlier), ("a block of 32 weights", short),
            ("an all-zero block of 64 (the padding of a last block)", torch.zeros(64))]


def as_codes(got: Any, n: int, where: str) -> torch.Tensor:
    codes = torch.as_tensor(got).detach().reshape(-1)
    if codes.numel() != n:
        raise Mismatch(f"{where}: {codes.numel()} codes, expected {n} (one per weight of the block)")
    if codes.is_floating_point():
        if not torch.isfinite(codes).all() or not torch.equal(codes, codes.round()):
            raise Mismatch(f"{where}: the codes should be integers 0..15 (indices into the 16 NF4 levels), got "
                           f"{codes[:4].tolist()} ...")
    return codes.long()


@checker("ch4.beyond_nf4_block")
def check_nf4_block(nf4_block: Callable[[torch.Tensor], tuple[Any, Any, Any]]) -> None:
    """nf4_block(x [n]) -> (codes [n] in 0..15, absmax, x_hat [n]): NF4 with absmax scaling, one block."""
    from chapters.ch4_low_rank.qlora import dequantize_blockwise, nf4_code, quantize_blockwise

    code = nf4_code()
    int4 = torch.arange(-7, 8) / 7  # evenly spaced levels: a plain 4-bit integer code, not NF4
    for name, x in nf4_blocks():
        n = x.numel()
        want_codes, want_absmax = quantize_blockwise(x, code, n)  # [1, n], [1]
        want_hat = dequantize_blockwise(want_codes, want_absmax, code)  # [n]
        got = run(nf4_block, x.clone(), what=f"nf4_block({name})")
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise Mismatch("nf4_block should return (codes, absmax, x_hat)")
        codes = as_codes(got[0], n, name)
        if codes.min() < 0 or codes.max() > 15:
            raise Mismatch(f"{name}: codes from {codes.min().item()} to {codes.max().item()}; they index the 16 "
                           "levels of nf4_code(), so 0..15")
        absmax = torch.as_tensor(got[1]).detach().reshape(-1)
        if absmax.numel() != 1:
            raise Mismatch(f"{name}: absmax should be one number for the block, got {absmax.numel()} values")
        close(absmax, want_absmax, f"{name}: absmax (the largest |x| of the block, not the largest x)")
        want = want_codes.reshape(-1).long()
        if not torch.equal(codes, want):
            wrong = int((codes != want).sum())
            hint = ""
            if not want_absmax.item():
                hint = (": with absmax = 0 every weight is 0, and 0 is an NF4 level (index 7); "
                        "do not divide by zero")
            elif torch.equal(codes, quantize_blockwise(x, int4, n)[0].reshape(-1).long()):
                hint = ": those are the codes of 15 evenly spaced levels; NF4's levels are nf4_code()"
            raise Mismatch(f"{name}: {wrong} of {n} codes differ from the nearest NF4 level of x / absmax{hint}")
        close(torch.as_tensor(got[2]).detach().reshape(-1), want_hat,
              f"{name}: x_hat (the level of each code times absmax)", atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------- LoRA+: optimizer groups (implement)

# (lr, ratio, unfreeze the c_proj biases too): the last case has trainables that are neither A nor B
GROUP_CASES = ((1e-3, 16.0, False), (2e-4, 4.0, False), (5e-3, 16.0, True))


def lora_model(unfreeze_biases: bool) -> nn.Module:
    """A tiny GPT with LoRA r=2 on c_attn and c_fc (and, if asked, the c_proj biases trainable as well)."""
    from chapters.ch4_low_rank.lora import apply_lora

    model = tiny_gpt((2, 32, 4), seed=0)
    apply_lora(model, r=2, alpha=4, targets=("c_attn", "c_fc"))
    if unfreeze_biases:
        for name, p in model.named_parameters():
            if name.endswith("c_proj.bias"):
                p.requires_grad_(True)
    return model


@checker("ch4.beyond_lora_plus_groups")
def check_lora_plus_groups(lora_plus_groups: Callable[[nn.Module, float, float], list[dict]]) -> None:
    """lora_plus_groups(model, lr, ratio) -> AdamW parameter groups: B at lr * ratio, the other trainables at lr."""
    from chapters.ch4_low_rank.lora import LoRALinear

    for lr, ratio, biases in GROUP_CASES:
        model = lora_model(biases)
        names = {id(p): n for n, p in model.named_parameters()}
        b_ids = {id(m.B) for m in model.modules() if isinstance(m, LoRALinear)}
        trainable = {id(p): p for p in model.parameters() if p.requires_grad}
        where = (f"LoRA r=2 on c_attn and c_fc{' + trainable c_proj biases' if biases else ''}, lr={lr:g}, "
                 f"ratio={ratio:g}")
        groups = run(lora_plus_groups, model, lr, ratio, what=f"lora_plus_groups({where})")
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in groups):
            raise Mismatch("lora_plus_groups should return a list of dicts, each with a 'params' list "
                           "(and an 'lr' where it differs from the default)")
        groups = [{**g, "params": list(g["params"])} for g in groups]
        opt = run(torch.optim.AdamW, groups, lr, what=f"torch.optim.AdamW(your groups, lr={lr:g})")
        lr_of = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
        frozen = [names.get(i, "a tensor not in the model") for i in lr_of if i not in trainable]
        if frozen:
            raise Mismatch(f"{where}: the groups hold {frozen[0]}, which is frozen (or not the model's); "
                           "only parameters with requires_grad go to the optimizer")
        missing = [names[i] for i in trainable if i not in lr_of]
        if missing:
            raise Mismatch(f"{where}: {missing[0]} trains but is in no group")
        for i in trainable:
            want, kind = (lr * ratio, "a B matrix: lr * ratio") if i in b_ids else (lr, "not a B matrix: lr")
            close(lr_of[i], want, f"{where}: learning rate of {names[i]} ({kind})", atol=0.0, rtol=1e-9)


# ----------------------------------------------------------------------------- VeRA: count (predict)


@checker("ch4.beyond_vera_count")
def check_vera_count(answer: Any) -> None:
    """Trainable parameters of VeRA r=256 on c_attn and c_fc of the shipped `base`, counted by the library."""
    from chapters.ch4_low_rank.vera import apply_vera
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("base")
    apply_vera(model, r=256, targets=("c_attn", "c_fc"))
    want = count_trainable(model).trainable
    if got != want:
        L, d, r = model.config.n_layer, model.config.n_embd, 256
        hints = {
            L * r * ((d + 3 * d) + (d + 4 * d)): " (that is LoRA's count at r=256: VeRA trains no matrix, only d "
                                                 "[r] and b [out] per layer)",
            L * ((r + d) + (r + d)): " (b has one entry per output row: out, not in)",
            (r + 3 * d) + (r + 4 * d): " (that is one block: there are n_layer blocks)",
            L * (r + 3 * d): " (that is c_attn alone: c_fc is [out=4d, in=d])",
            want + r * d + 4 * d * r: " (the shared A and B are frozen buffers: they are not trained)",
        }
        raise Mismatch(f"VeRA r=256 on c_attn and c_fc trains {want:,} parameters of base, you predicted "
                       f"{got:,}{hints.get(got, '')}")


# ----------------------------------------------------------------------------- LoHa: the update (implement)

# (out, in, r, alpha): a square layer first (where a matrix product of the two [out, in] products still runs),
# then non-square ones; scales 2, 0.5, 1.5 (never 1)
LOHA_CASES = ((16, 16, 3, 6.0), (24, 10, 4, 2.0), (6, 20, 2, 3.0))


def loha_layer(n_out: int, n_in: int, r: int, alpha: float, seed: int) -> nn.Module:
    """A LoHaLinear around a random nn.Linear with all four factors random (A2 not 0, so the update is not 0)."""
    from chapters.ch4_low_rank.loha import LoHaLinear

    torch.manual_seed(seed)
    layer = LoHaLinear(nn.Linear(n_in, n_out), r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.B1, layer.A1, layer.B2, layer.A2):
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def loha_hint(got: torch.Tensor, layer: nn.Module) -> str:
    """What a typical wrong update computed, or "" when it is none of them."""
    B1, A1, B2, A2, s = layer.B1, layer.A1, layer.B2, layer.A2, layer.scale
    P1, P2 = B1 @ A1, B2 @ A2  # [out, in] each
    want = s * P1 * P2

    def near(x: torch.Tensor) -> bool:
        return got.shape == x.shape and torch.allclose(got, x.to(got.dtype), atol=1e-4, rtol=1e-4)

    if near(want.T):
        return ("that is the transpose: the update has the weight's shape [out, in], B [out, r] times A [r, in] "
                "(B on the left, as in LoRA)")
    hadamard = P1 * P2
    scalar = float((got * hadamard).sum() / (hadamard * hadamard).sum()) if got.shape == hadamard.shape else 0.0
    if scalar and near(scalar * hadamard):
        times = "without a scale" if abs(scalar - 1) < 1e-4 else f"times {scalar:g}"
        return f"that is (B1 A1) ⊙ (B2 A2) {times}; the scale is s = alpha / r = {s:g} (layer.scale)"
    if P1.shape[0] == P1.shape[1] and any(near(c * P1 @ P2) for c in (s, 1.0)):
        return ("that is the matrix product (B1 A1) @ (B2 A2); ⊙ is the element-wise (Hadamard) product, `*`, "
                "which also works when out != in")
    if near(s * (B1 @ A2) * (B2 @ A1)):
        return "the pairs are B1 with A1 and B2 with A2"
    if near(s * (P1 + P2)) or near(P1 + P2):
        return "that adds the two products (a rank-2r LoRA); LoHa multiplies them element-wise"
    return ""


@checker("ch4.beyond_loha_delta")
def check_loha_delta(loha_delta: Callable[[nn.Module], torch.Tensor]) -> None:
    """loha_delta(layer) -> s (B1 A1) ⊙ (B2 A2) [out, in] of a LoHaLinear, as its delta_weight()."""
    for seed, (n_out, n_in, r, alpha) in enumerate(LOHA_CASES):
        layer = loha_layer(n_out, n_in, r, alpha, seed)
        factors = [p.detach().clone() for p in (layer.B1, layer.A1, layer.B2, layer.A2)]
        where = f"LoHa layer [out={n_out}, in={n_in}], r={r}, s={layer.scale:g}"
        got = run(loha_delta, layer, what=f"loha_delta({where})")
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"loha_delta should return a tensor [out, in], got {type(got).__name__}")
        got = got.detach()
        if not all(torch.equal(p, q) for p, q in zip((layer.B1, layer.A1, layer.B2, layer.A2), factors)):
            raise Mismatch(f"{where}: loha_delta changed the layer's factors; it should only read them")
        with torch.no_grad():
            want = layer.delta_weight()  # the library
            if not (got.shape == want.shape and torch.allclose(got.double(), want.double(), atol=1e-5, rtol=1e-4)):
                hint = loha_hint(got.to(want.dtype), layer)
                if hint:
                    raise Mismatch(f"{where}: {hint}")
            close(got, want, f"{where}: the update s (B1 A1) ⊙ (B2 A2)")
