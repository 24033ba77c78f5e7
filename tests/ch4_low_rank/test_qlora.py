"""QLoRA: the NF4 codebook against the paper's printed values, the round-trip error bound, 4-bit packing,
double quantisation of the scales, bits per weight, the quantised layer and model, atomic apply, the count,
bfloat16 / float64, and (when bitsandbytes is importable) an oracle test against its quantize_4bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import apply_lora
from chapters.ch4_low_rank.qlora import (
    NF4_DELTA,
    QLoRALinear,
    QuantLinear,
    apply_qlora,
    count_qlora,
    dequantize_blockwise,
    double_dequantize,
    double_quantize,
    dynamic_code,
    nf4_code,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from minimal.peft import Mergeable, count_trainable, merge_all, trainable_names
from tests.helpers import adam_steps, assert_refuses, tiny_config, tiny_gpt, token_batch

# The NF4 data type as printed in the QLoRA paper (Dettmers et al. 2023, arXiv 2305.14314, Appendix E).
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def half_max_gap(code: torch.Tensor) -> float:
    """Half the largest distance between two neighbouring levels: the worst rounding error on [-1, 1]."""
    return (code[1:] - code[:-1]).max().item() / 2


def layer(n_out: int = 96, n_in: int = 130, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype)


# ------------------------------------------------------------------------------------------ the codes


def test_nf4_code_matches_the_values_printed_in_the_paper() -> None:
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    torch.testing.assert_close(code, torch.tensor(NF4_PAPER), rtol=0, atol=1e-6)
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1  # asymmetric, exact zero
    assert code[0] == -1 and code[-1] == 1
    assert NF4_DELTA == pytest.approx(0.9677083, abs=1e-7)


def test_nf4_levels_are_normal_quantiles() -> None:
    """Each positive level, times Q(delta), is the normal quantile of its probability (the definition)."""
    code = nf4_code().double()
    p = torch.linspace(NF4_DELTA, 0.5, 9, dtype=torch.float64)[:-1].flip(0)  # increasing quantiles
    torch.testing.assert_close(code[8:] * torch.special.ndtri(torch.tensor(NF4_DELTA, dtype=torch.float64)),
                               torch.special.ndtri(p), rtol=1e-6, atol=1e-6)


def test_dynamic_code_has_256_sorted_levels_in_minus_one_one() -> None:
    code = dynamic_code()
    assert code.shape == (256,) and code.unique().numel() == 256
    assert torch.equal(code, code.sort().values)
    assert code.max() == 1 and -1 < code.min() < -0.99 and (code == 0).any()
    assert code[code > 0].min() == pytest.approx(0.55e-6, rel=1e-5)  # the finest decade starts near 1e-6


# ------------------------------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("dist", ["normal", "heavy", "uniform"])
def test_round_trip_error_is_at_most_half_the_largest_gap_times_the_block_absmax(dist: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = {"normal": torch.randn(1000, generator=g), "uniform": torch.rand(1000, generator=g) * 2 - 1,
         "heavy": torch.randn(1000, generator=g) ** 3}[dist]
    code = nf4_code()
    codes, absmax = quantize_blockwise(x, code, 64)  # 1000 = 15 full blocks + one of 40 (zero-padded)
    assert codes.shape == (16, 64) and codes.dtype == torch.uint8 and absmax.shape == (16,)
    x_hat = dequantize_blockwise(codes, absmax, code)[:1000]
    bound = half_max_gap(code) * absmax.repeat_interleave(64)[:1000]
    assert ((x - x_hat).abs() <= bound + 1e-7).all()
    # every entry took its nearest level, and each block's largest entry is exact (it lands on +-1)
    scaled = F.pad(x, (0, 24)).view(16, 64) / absmax[:, None]
    nearest = (scaled[..., None] - code).abs().argmin(-1)
    assert torch.equal(codes.long(), nearest)
    peak = F.pad(x, (0, 24)).view(16, 64).abs().argmax(1)
    torch.testing.assert_close(x_hat.view(-1)[: 15 * 64].view(15, 64)[range(15), peak[:15]],
                               x[: 15 * 64].view(15, 64)[range(15), peak[:15]], rtol=1e-6, atol=0)


def test_an_all_zero_block_stays_zero() -> None:
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    codes, absmax = quantize_blockwise(x, nf4_code(), 64)
    assert absmax[0] == 0 and (codes[0] == 7).all()  # level 7 is the exact zero
    assert (dequantize_blockwise(codes, absmax, nf4_code())[:64] == 0).all()


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_packing_stores_two_codes_per_byte_and_unpacks_exactly(n: int) -> None:
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_4bit(packed, n), codes)


def test_packing_puts_the_first_code_in_the_high_nibble_and_pads_odd_counts() -> None:
    assert pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x12, 0x30]
    assert pack_4bit(torch.tensor([15, 0], dtype=torch.uint8)).tolist() == [0xF0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_double_quantisation_recovers_the_scales_to_within_the_8bit_step(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    work = torch.promote_types(dtype, torch.float32)
    absmax = (0.05 + 0.02 * torch.randn(700, generator=g).abs()).to(work)  # 700 scales: 3 blocks of 256
    codes, scale, mean = double_quantize(absmax, 256, dtype)
    assert codes.dtype == torch.uint8 and codes.shape == (700,)
    assert scale.shape == (3,) and scale.dtype == dtype and mean.shape == () and mean.dtype == dtype
    back = double_dequantize(codes, scale, mean, 256, work)
    c2 = scale.to(work).repeat_interleave(256)[:700]
    slack = 2**-8 if dtype == torch.bfloat16 else 1e-6  # bfloat16 rounds c2 (and the recovered value)
    assert ((back - absmax).abs() <= (half_max_gap(dynamic_code()) + slack) * c2).all()
    assert ((back - absmax).abs() / absmax).mean() < 5e-3  # the scales are good to about 0.25 %


# ------------------------------------------------------------------------------------------ the layer


def test_quant_linear_stores_about_4_127_bits_per_weight() -> None:
    q = QuantLinear(layer(256, 128))  # 32768 weights: 512 blocks of 64, 2 blocks of 256 scales
    n = 256 * 128
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == n // 2
    assert q.absmax_q.dtype == torch.uint8 and q.absmax_q.numel() == n // 64
    assert q.weight_bytes() == n // 2 + n // 64 + 4 * 2 + 4
    bits = 8 * q.weight_bytes() / n
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n) and 4.1 < bits < 4.25
    assert 4 * n / q.weight_bytes() == pytest.approx(32 / bits) and 32 / bits > 7.7  # vs float32
    assert 2 * n / q.weight_bytes() > 3.8  # vs bfloat16


def test_every_quantised_layer_of_a_tiny_gpt_is_between_4_1_and_4_25_bits() -> None:
    model = tiny_gpt()
    apply_qlora(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * model.config.n_layer
    for m in layers:
        assert 4.1 < 8 * m.weight_bytes() / (m.in_features * m.out_features) < 4.25
    floats = [n for n, _ in model.named_parameters() if n.startswith("h.") and n.endswith("weight")
              and not n.split(".")[-2].startswith("ln")]
    assert floats == [], "a float weight of a block linear is still in the model"


def test_quant_linear_forward_is_linear_on_the_dequantised_weight() -> None:
    lin = layer()
    q = QuantLinear(lin)
    x = torch.randn(3, 5, 130, generator=torch.Generator().manual_seed(1))
    w = q.dequantize()
    assert w.shape == lin.weight.shape and w.dtype == torch.float32
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias))
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert 0 < rel < 0.12  # NF4 of a uniform weight: about 9 % relative error
    bound = half_max_gap(nf4_code()) * quantize_blockwise(lin.weight.detach(), nf4_code(), 64)[1].max()
    assert (w - lin.weight).abs().max() <= 1.01 * bound


def test_backward_keeps_no_weight_sized_tensor_and_gives_the_dense_input_gradient() -> None:
    """The point of QLoRA's memory figure: autograd saves nothing of the size of W~ (it is rebuilt in backward)."""
    lin = layer()  # [77, 130]
    q = QuantLinear(lin)
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(2), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q(x)
    assert lin.weight.numel() not in saved and max(saved, default=0) < lin.weight.numel()
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ q.dequantize())


def test_quantised_tiny_gpt_keeps_the_float_loss() -> None:
    """A tiny GPT trained to a low loss on fixed sequences keeps its loss once every block linear is NF4."""
    model = tiny_gpt(eval_mode=False)
    idx = torch.stack([(torch.arange(32) * k) % 101 for k in (3, 5, 7, 11)])  # [4, 32]
    adam_steps(model, idx, steps=40, lr=1e-2)
    model.eval()
    float_loss = model(idx, labels=idx).loss.item()
    apply_qlora(model)
    quant_loss = model(idx, labels=idx).loss.item()
    assert float_loss < 0.3
    assert quant_loss != float_loss and abs(quant_loss - float_loss) < 0.02


# ------------------------------------------------------------------------------------------ apply


def test_apply_quantises_every_block_linear_and_trains_only_lora() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_qlora(model, r=4, alpha=8, targets=("c_attn", "c_fc"))
    for block in model.h:
        assert isinstance(block.attn.c_attn, QLoRALinear) and isinstance(block.mlp.c_fc, QLoRALinear)
        assert isinstance(block.attn.c_proj, QuantLinear) and isinstance(block.mlp.c_proj, QuantLinear)
    lora = model.h[0].attn.c_attn
    assert lora.A.shape == (4, 64) and lora.B.shape == (192, 4) and lora.scale == 2.0
    assert not isinstance(lora, Mergeable) and merge_all(model) == 0  # not mergeable into a 4-bit base
    assert all(n.endswith((".A", ".B")) for n in trainable_names(model))
    assert count_trainable(model).trainable == count_qlora(model.config, r=4, targets=("c_attn", "c_fc"))
    x = torch.randn(2, 64)
    assert torch.equal(lora(x), lora.base(x))  # B = 0: the branch adds exact zeros to the 4-bit base
    model(idx, labels=idx).loss.backward()
    assert lora.A.grad is not None and lora.B.grad is not None


@pytest.mark.parametrize("r, targets", [(8, ("c_attn",)), (2, ("c_attn", "c_proj", "c_fc"))])
def test_count_is_loras_formula(r: int, targets: tuple[str, ...]) -> None:
    config = tiny_config(n_layer=3, n_embd=32)
    model = tiny_gpt(config=config)
    apply_qlora(model, r=r, targets=targets)
    d, L = 32, 3
    # r (in + out) per layer; "c_proj" names attn.c_proj [d, d] and mlp.c_proj [d, 4d]
    per_layer = {"c_attn": r * (d + 3 * d), "c_proj": r * (d + d) + r * (4 * d + d), "c_fc": r * (d + 4 * d)}
    assert count_qlora(config, r=r, targets=targets) == L * sum(per_layer[t] for t in targets)
    assert count_trainable(model).trainable == count_qlora(config, r=r, targets=targets)


def test_training_moves_only_lora_and_leaves_the_codes_bit_identical() -> None:
    model, idx = tiny_gpt(), token_batch()
    apply_qlora(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = adam_steps(model, idx, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank r=0"),
    (dict(r=65), "rank r=65"),
    (dict(block=63), "block must be even"),
    (dict(block2=0), "block2 must be a positive int"),
    (dict(targets=("c_attn", "nope")), "unknown target module 'nope'"),
    (dict(targets=("c_fc",), quantize=("c_attn",)), "not quantised"),
    (dict(alpha=0.0), "alpha must be positive"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
])
def test_a_refused_apply_leaves_the_model_unchanged(kwargs: dict, match: str) -> None:
    model = tiny_gpt()
    assert_refuses(model, lambda m: apply_qlora(m, **kwargs), match)
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc")))


def test_qlora_on_a_lora_model_refuses_to_quantise_an_adapted_layer() -> None:
    model = tiny_gpt()
    apply_lora(model, r=4)
    assert_refuses(model, lambda m: apply_qlora(m), "already have an adapter")


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_forward_and_backward_in_the_models_dtype(dtype: torch.dtype) -> None:
    model, idx = tiny_gpt().to(dtype), token_batch()
    apply_qlora(model)
    floats = {n: t.dtype for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.is_floating_point()}
    assert set(floats.values()) == {dtype}, floats
    loss = model(idx, labels=idx).loss
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    lora = model.h[0].attn.c_attn
    assert lora.A.grad.dtype == dtype and torch.isfinite(lora.A.grad).all()
    assert lora.base.dequantize().dtype == dtype


def test_the_float64_codes_equal_the_float32_codes_and_dequantise_alike() -> None:
    lin = layer()
    q32, q64 = QuantLinear(lin), QuantLinear(layer(dtype=torch.float64))
    assert torch.equal(q32.qweight, q64.qweight)
    torch.testing.assert_close(q64.dequantize().float(), q32.dequantize(), rtol=1e-5, atol=1e-6)


def test_an_explicit_compute_dtype_and_a_later_cast() -> None:
    lin = layer()
    x = torch.randn(4, 130, generator=torch.Generator().manual_seed(2))
    q = QuantLinear(lin, compute_dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.float32  # computed in bfloat16, returned in the input's dtype
    torch.testing.assert_close(y, QuantLinear(lin)(x), rtol=0.05, atol=0.05)
    model, idx = tiny_gpt(), token_batch()
    apply_qlora(model, compute_dtype=torch.bfloat16)
    model(idx, labels=idx).loss.backward()
    assert model.h[0].attn.c_attn.A.grad.dtype == torch.float32
    model = tiny_gpt()
    apply_qlora(model)
    model.to(torch.bfloat16)  # the float state follows the cast; the codes do not change
    assert model.h[0].mlp.c_fc.weight_dtype == torch.bfloat16
    assert torch.isfinite(model(idx).logits).all()


def test_a_layer_without_bias() -> None:
    lin = nn.Linear(64, 32, bias=False)
    q = QuantLinear(lin)
    x = torch.randn(2, 64)
    assert q.bias is None
    torch.testing.assert_close(q(x), x @ q.dequantize().T)


# ------------------------------------------------------------------------------------------ oracle


def test_codes_and_scales_equal_bitsandbytes_quantize_4bit() -> None:
    """bitsandbytes (CPU) quantize_4bit(..., quant_type="nf4"): the same packed codes and scales, bit for bit.

    bitsandbytes is pinned in requirements.txt; its CPU backend quantises without a GPU.
    """
    import bitsandbytes.functional as bnbf
    lin = layer(77, 130)  # 10010 weights: the last block of 64 is partial
    q = QuantLinear(lin)
    w = lin.weight.detach()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.reshape(-1), q.qweight[: packed.numel()])
    assert torch.equal(state.absmax, q.absmax_q)
    assert torch.equal(state.state2.absmax, q.absmax_scale) and torch.equal(state.offset, q.absmax_mean)
    torch.testing.assert_close(bnbf.dequantize_4bit(packed, state), q.dequantize(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bnbf.create_dynamic_map(signed=True), dynamic_code(), rtol=0, atol=0)
    _, plain = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    torch.testing.assert_close(plain.code, nf4_code(), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.absmax, quantize_blockwise(w, nf4_code(), 64)[1])


# ------------------------------------------------------------------------------------------ the measurement


def test_measure_tables_on_a_tiny_gpt() -> None:
    from chapters.ch4_low_rank.qlora_measure import markdown, memory_and_error

    memory, rows = memory_and_error(tiny_gpt())
    bits = memory["bits_per_weight"]
    assert bits["float32"] == 32 and bits["bfloat16"] == 16 and bits["nf4 (float32 scales)"] == 4.5
    assert 4.1 < bits["nf4 + double quant"] < 4.25
    assert memory["model_bytes"]["nf4 block linears, rest float32"] < memory["model_bytes"]["bfloat16"]
    assert len(rows) == 8 and all(r["nf4"] < r["int4"] for r in rows)  # NF4 fits normal weights better
    assert all(abs(r["nf4_dq"] - r["nf4"]) < 1e-3 for r in rows)  # double quantisation costs almost nothing
    result = {"memory": memory, "layers": rows, "val_tokens": 0, "loss": {"float32": {"loss": 1.0, "perplexity": 2.7}},
              "finetune": [], "command": "test", "seconds": 0.0, "threads": 1, "torch": torch.__version__}
    md = markdown(result)
    assert "| nf4 + double quant |" in md and "| h.0.attn.c_attn | 192x64 |" in md
