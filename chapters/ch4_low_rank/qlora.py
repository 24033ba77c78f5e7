"""QLoRA: LoRA on top of a frozen base stored in 4-bit NormalFloat (NF4) with double-quantised scales.

Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs",
NeurIPS 2023, arXiv 2305.14314. The 8-bit code of the scales: Dettmers, Lewis, Shleifer, Zettlemoyer,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022, arXiv 2110.02861.

Idea: the frozen base weights only have to be read, never updated, so store them in 4 bits; gradients
flow through the de-quantised weights into a float LoRA branch, which is all that trains.

    +----------------------------------------------------------------------------------------------+
    |  NF4: 16 levels q_0 < ... < q_15 in [-1, 1] from quantiles of N(0, 1), an exact zero among   |
    |  them. Q: the normal quantile function, delta = 1 - (1/(2*15) + 1/(2*16)) / 2 = 0.9677       |
    |  (Q(1) is infinite, so the outermost level sits at probability delta):                       |
    |    8 positive levels  Q(p) for p = linspace(delta, 1/2, 9) without its last point (1/2)      |
    |    7 negative levels -Q(p) for p = linspace(delta, 1/2, 8) without its last point            |
    |    plus 0; all divided by Q(delta), so that q_0 = -1 and q_15 = 1 (asymmetric: 8 vs 7).      |
    |                                                                                              |
    |  Block-wise absmax: W [out, in] is flattened row-major and cut into blocks of 64 (zeros pad  |
    |  the last one). Per block b: c1_b = max |W_b| (float), code_i = the nearest NF4 level to     |
    |  W_i / c1_b (ties to the lower level), stored as 4 bits, two per byte (first in the high     |
    |  nibble). Dequantised: W_i ~ q[code_i] * c1_b.                                               |
    |                                                                                              |
    |  Double quantisation of the scales c1 (one float per 64 weights): subtract their mean m,     |
    |  cut c1 - m into blocks of 256, per block c2 = max |c1 - m|, store (c1 - m) / c2 as the      |
    |  nearest level of an 8-bit code (bitsandbytes' signed dynamic code, the paper's "8-bit       |
    |  Floats"): c1 ~ code8[k] * c2 + m.                                                           |
    |                                                                                              |
    |  bits per weight = 4 + 8/64 + 32/(64*256) = 4.127 (+ 32 bits for m per matrix); bf16 is 16.  |
    |  y = x W~^T + b0 + s * (drop(x) A^T) B^T, W~ = dequantise(codes) in the compute dtype.       |
    +----------------------------------------------------------------------------------------------+

What trains: A and B of every targeted layer, as in LoRA (lora.py: same shapes, init and scale s);
the 4-bit codes, the scales, the biases, LayerNorms and the tied embedding are frozen.

How LoRA sits on the quantised layer: `QuantLinear` is a plain nn.Module, not an nn.Linear (its weight
is not a parameter: the float methods, which write into `base.weight`, cannot be stacked on it by
mistake), and `QLoRALinear` is LoRA's branch beside it: LoRALinear's `branch` and `delta_weight`
(lora.py, unchanged) with its own constructor. It is not a `minimal.peft.Mergeable`: merging s B A into
a 4-bit base would re-quantise it (the merged layer would not equal the unmerged one, and unmerge could
not restore W0), so a QLoRA adapter is kept beside the base or merged into a float copy by hand
(W~ + delta_weight()).

Choices where paper and code differ:
- the scales' 8-bit code: the paper says "8-bit Floats"; like its reference code (bitsandbytes) we use
  the signed dynamic code of the 8-bit optimizers paper: the 256 values 0, 1 and, for each decade
  i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), with both signs.
- the float state of the double quantisation (the 256-block scales c2 and the mean m) is stored in the
  dtype of the weight it replaces, so that it follows `model.to(dtype)` like every other tensor here:
  float32 in a float32 model (the paper's FP32), bfloat16 in a bfloat16 model (its rounding adds at
  most 2^-8 c2 to each recovered scale, under the 8-bit code's own half step of 0.007 c2).
- targets: the paper puts LoRA on every linear layer of the blocks; the default here is `c_attn`, like
  the registry's LoRA, so that the two differ only in the 4-bit base. Every linear of the blocks is
  quantised, as in the paper (`quantize`); the embeddings (and the tied head) stay in float.
- paged optimizers (the paper's third part, for memory spikes on a GPU) are not implemented.
- bitsandbytes is not a dependency: tests/ch4_low_rank/test_qlora.py checks our codes and scales
  against its `quantize_4bit(..., quant_type="nf4")` when it is importable (it runs on a CPU) and
  skips that test otherwise.

dtype and device: the codes live on the weight's device; forward de-quantises to the compute dtype (the
weight's own dtype by default, or `compute_dtype`), computes there and returns the input's dtype. A and B
take the weight's dtype. `count_qlora(config, r, targets)` is LoRA's count: quantising adds no trainable.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/qlora.py
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import LoRALinear, check_rank, count_lora, lora_scale
from minimal.hooks import Hooks
from minimal.peft import find_linears, freeze_base, replace_module

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

NF4_DELTA = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2  # 0.9677083: the probability of the outermost level
BLOCK_LINEARS = ("c_attn", "c_proj", "c_fc")  # every linear layer of a GPT block


# ------------------------------------------------------------------------------------------ the two codes


@functools.cache
def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels [16], float32, sorted, from normal quantiles (see the box above)."""
    pos = torch.special.ndtri(torch.linspace(NF4_DELTA, 0.5, 9, dtype=torch.float64)[:-1])  # 8 quantiles > 0
    neg = -torch.special.ndtri(torch.linspace(NF4_DELTA, 0.5, 8, dtype=torch.float64)[:-1])  # 7 quantiles < 0
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values  # [16]
    return (levels / levels.max()).float()


@functools.cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code [256], float32, sorted: 0, 1 and +-10^(i-6) * m for the
    2^i midpoints m of linspace(0.1, 1, 2^i + 1), i = 0..6 (a decimal exponent and a linear fraction)."""
    levels = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        mids = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2  # [2^i]
        levels += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(levels))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the (de)quantisation arithmetic runs in: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------ quantisation


@functools.cache
def code_on(make: Callable[[], torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A code table (nf4_code, dynamic_code) on `device` in `dtype`, copied there once, not on every forward."""
    return make().to(device, dtype)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax block-wise quantisation: x (any shape, n entries) -> (codes uint8 [nb, block], absmax [nb]).

    x is flattened, zero-padded to nb = ceil(n / block) blocks; each entry becomes the index of the level
    of the sorted `code` nearest to x / absmax of its block (ties go to the lower level, as bitsandbytes).
    """
    flat = x.reshape(-1)
    blocks = F.pad(flat, (0, -flat.numel() % block)).view(-1, block)  # [nb, block]
    absmax = blocks.abs().amax(dim=1)  # [nb]
    scaled = (blocks * (1 / absmax.clamp(min=torch.finfo(x.dtype).tiny))[:, None]).clamp(-1, 1)  # [nb, block]
    code = code.to(x.device, x.dtype)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """codes uint8 [nb, block], absmax [nb] -> the values code[codes] * absmax, flattened [nb * block]."""
    return (code.to(absmax.device, absmax.dtype)[codes.long()] * absmax[:, None]).reshape(-1)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15 [n] -> [ceil(n / 2)] bytes, codes 2j in the high and 2j+1 in the low nibble."""
    codes = F.pad(codes.reshape(-1), (0, codes.numel() % 2))  # an odd count gets a 0 nibble
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[ceil(n / 2)] bytes -> the n uint8 codes that pack_4bit packed."""
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]


def double_quantize(absmax: torch.Tensor, block2: int = 256, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales c1 [nb] -> (codes uint8 [nb], c2 [ceil(nb / block2)], mean m []); c2 and m in `dtype`.

    c1 - m is quantised block-wise (block2) with the 8-bit dynamic code; m is rounded to `dtype` first,
    so that the codes are taken against the stored mean.
    """
    dtype = dtype or absmax.dtype
    mean = absmax.mean().to(dtype)
    codes, scale = quantize_blockwise(absmax - mean.to(absmax.dtype), dynamic_code(), block2)  # [nb2, block2]
    return codes.reshape(-1)[: absmax.numel()], scale.to(dtype), mean


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, block2: int = 256,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [nb], c2, m) -> the recovered scales c1 ~ code8[codes] * c2 + m, [nb] in `dtype`."""
    padded = F.pad(codes, (0, -codes.numel() % block2)).view(-1, block2)  # [nb2, block2]
    c1 = dequantize_blockwise(padded, scale.to(dtype), code_on(dynamic_code, scale.device, dtype))[: codes.numel()]
    return c1 + mean.to(dtype)


# ------------------------------------------------------------------------------------------ modules


def check_blocks(block: int, block2: int) -> None:
    for name, value in (("block", block), ("block2", block2)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if block % 2:
        raise ValueError(f"block must be even (two 4-bit codes per byte), got {block}")


class DequantMatmul(torch.autograd.Function):
    """y = x W~^T for a QuantLinear, keeping nothing of W~ for the backward pass: the backward de-quantises
    again (as QLoRA's 4-bit matmul does), so training never holds the float weights of the frozen base."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return x @ layer.dequantize(dtype).T  # [..., in] @ [in, out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.layer.dequantize(ctx.dtype), None, None  # [..., out] @ [out, in]


class QuantLinear(nn.Module):
    """A frozen linear layer stored as NF4 codes with double-quantised scales (see the box above).

    Buffers: `qweight` uint8 [nb * block / 2] (two codes a byte), `absmax_q` uint8 [nb] (the 8-bit codes of
    the scales), `absmax_scale` [ceil(nb / block2)] and `absmax_mean` [] (in the weight's dtype); nb =
    ceil(out * in / block). The bias stays the float nn.Parameter of the layer it replaces (shared).
    forward: y = x W~^T + b, W~ de-quantised on every call in the compute dtype and again in backward (never kept).
    """

    def __init__(self, linear: nn.Linear, block: int = 64, block2: int = 256,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear quantises an nn.Linear, got {type(linear).__name__}")
        check_blocks(block, block2)
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype)
                                              and compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.block2, self.compute_dtype = block, block2, compute_dtype
        w = linear.weight.detach()  # [out, in]
        codes, absmax = quantize_blockwise(w.to(work_dtype(w.dtype)), nf4_code(), block)  # [nb, block], [nb]
        absmax_q, scale, mean = double_quantize(absmax, block2, w.dtype)
        self.register_buffer("qweight", pack_4bit(codes))  # [nb * block / 2]
        self.register_buffer("absmax_q", absmax_q)  # [nb]
        self.register_buffer("absmax_scale", scale)  # [nb2]
        self.register_buffer("absmax_mean", mean)  # []
        self.bias = linear.bias  # frozen with the rest of the base

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the float weight this layer replaced (its float state keeps it through .to())."""
        return self.absmax_scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W~ [out, in] in `dtype` (default: the compute dtype); the arithmetic runs in work_dtype(dtype)."""
        dtype = dtype or self.compute_dtype or self.weight_dtype
        work, n = work_dtype(dtype), self.out_features * self.in_features
        absmax = double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_mean, self.block2, work)  # [nb]
        codes = unpack_4bit(self.qweight, absmax.numel() * self.block).view(-1, self.block)  # [nb, block]
        code = code_on(nf4_code, absmax.device, absmax.dtype)
        return dequantize_blockwise(codes, absmax, code)[:n].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or self.weight_dtype
        y = DequantMatmul.apply(x.to(dtype), self, dtype)  # [..., in] -> [..., out]
        return (y if self.bias is None else y + self.bias.to(dtype)).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: the codes and the quantised scales (not the bias)."""
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.absmax_q, self.absmax_scale,
                                                          self.absmax_mean))

    def extra_repr(self) -> str:
        bits = 8 * self.weight_bytes() / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block}, "
                f"scales 8-bit block={self.block2}, {bits:.3f} bits/weight, bias={self.bias is not None}")


class QLoRALinear(nn.Module):
    """y = base(x) + s * (drop(x) A^T) B^T around a frozen QuantLinear `base`: LoRA's branch, not mergeable."""

    branch = LoRALinear.branch  # s * (x A^T) B^T, lora.py's own
    delta_weight = LoRALinear.delta_weight  # s * B @ A [out, in]

    def __init__(self, base: QuantLinear, r: int = 8, alpha: float = 16.0, rslora: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, QuantLinear):
            raise TypeError(f"QLoRALinear wraps a QuantLinear, got {type(base).__name__}")
        check_rank(r, base, type(self).__name__)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = lora_scale(r, alpha, rslora)
        kw = dict(device=base.qweight.device, dtype=base.weight_dtype)
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))  # [r, in]
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # [out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.branch(self.dropout(x))  # [..., out]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"


def apply_qlora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    quantize: str | Iterable[str] = BLOCK_LINEARS,
    block: int = 64,
    block2: int = 256,
    compute_dtype: torch.dtype | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
) -> Hooks:
    """Quantise every `quantize` linear to NF4 (QuantLinear), put LoRA on the `targets` among them; freeze.

    quantize / targets: names as in peft (see minimal.peft.find_linears); every target must be quantised.
    Everything is built (every layer quantised, every rank checked) before the model changes, so a bad
    argument leaves it as it was. The float weights of the quantised layers are dropped from the model.
    """
    quantized = find_linears(model, quantize)
    adapted = find_linears(model, targets)
    missing = [n for n in adapted if n not in quantized]
    if missing:
        raise ValueError(f"targets {missing} are not quantised; add them to quantize={quantize!r}")
    built = {n: QuantLinear(model.get_submodule(n), block, block2, compute_dtype) for n in quantized}
    for n in adapted:
        built[n] = QLoRALinear(built[n], r=r, alpha=alpha, rslora=rslora, dropout=dropout)
    freeze_base(model)
    for name, module in built.items():
        replace_module(model, name, module)
    return Hooks()


def count_qlora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_qlora: LoRA's r (in + out) per adapted layer (the 4-bit base adds none)."""
    return count_lora(config, r, targets)
