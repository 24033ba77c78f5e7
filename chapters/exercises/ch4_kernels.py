"""Checkers for the exercises of notebooks/ch4_fused_lora_kernels.ipynb (the LoRA kernels)."""

from __future__ import annotations

import torch

from chapters.exercises import Mismatch, checker, close, equal


def _call(fn, *args):
    """Run the student's function; a shape error or similar becomes a Mismatch that says so."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 - any crash of the student's code is reported, not raised
        raise Mismatch(f"your function raised {type(err).__name__}: {err}") from None


@checker("ch4.kernel_split_epilogue")
def check_split_epilogue(lora_epilogue) -> None:
    """lora_epilogue(acc, t, B, s) -> acc + s t B^T in float32 (s t rounded to B's dtype first)."""
    from chapters.ch4_low_rank.kernels.reference import lora_epilogue as library

    g = torch.Generator().manual_seed(0)
    for BM, BN, r, dtype, s in [(16, 32, 4, torch.float32, 0.5), (8, 24, 16, torch.float16, 2.0),
                                (5, 7, 3, torch.float32, -1.5)]:  # fmt: skip
        acc = torch.randn(BM, BN, generator=g)
        t = torch.randn(BM, r, generator=g)
        B = torch.randn(BN, r, generator=g).to(dtype)
        got = _call(lora_epilogue, acc.clone(), t.clone(), B, s)
        if not torch.is_tensor(got):
            raise Mismatch(f"return a tensor [BM, BN], got {type(got).__name__}")
        close(got, library(acc, t, B, s), f"acc + s t B^T for BM={BM}, BN={BN}, r={r}, {dtype}, s={s}",
              atol=2e-3, rtol=2e-3)  # fmt: skip


@checker("ch4.kernel_roofline_ratio")
def check_roofline_ratio(ratio) -> None:
    """naive_addmm / base on the H200 model at M = K = N = 4096, r = 16, without launch costs."""
    from chapters.ch4_low_rank.kernels.roofline import roofline_ratios

    if ratio is ... or ratio is None:  # the notebook's placeholder, not filled in yet
        raise NotImplementedError
    if not isinstance(ratio, (int, float)):
        raise Mismatch(f"answer with one number (time of naive_addmm / time of the base GEMM), got {ratio!r}")
    want = roofline_ratios(4096, 4096, 4096, 16, launch_us=0.0)["naive_addmm"]
    if abs(ratio - want) > 0.01:
        hint = "count the bytes of the shrink (x once) and of the expand-accumulate (y read and written)"
        raise Mismatch(f"{ratio:.3f} is more than 0.01 away from the model's ratio; {hint}")


@checker("ch4.kernel_bank_conflict")
def check_bank_conflict(conflict_ways) -> None:
    """conflict_ways(words) -> distinct words in the busiest of the 32 banks (negative words: idle)."""
    from chapters.ch4_low_rank.kernels import banks

    cases = {
        "one word per bank": list(range(32)),
        "every thread the same word (a broadcast)": [5] * 32,
        "a stride of 64 words": [64 * i for i in range(32)],
        "a stride of 2 words": [2 * i for i in range(32)],
        "half the threads idle (-1)": [32 * i if i < 16 else -1 for i in range(32)],
        "idle threads (-1) beside words of bank 31": [31, 63, 95] + [-1] * 29,
        "two words repeated": [0, 32] * 16,
    }
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        cases[f"random warp {i}"] = torch.randint(-1, 200, (32,), generator=g).tolist()
    for what, words in cases.items():
        equal(_call(conflict_ways, list(words)), banks.conflict_ways(words), f"ways for {what}")


@checker("ch4.kernel_padding_ways")
def check_padding_ways(ways) -> None:
    """Worst conflict of the bf16 copy of a 64-row tile for PAD = 0, 1, 2, 4 words of row padding."""
    from chapters.ch4_low_rank.kernels import banks

    if ways is ... or ways is None:  # the notebook's placeholder, not filled in yet
        raise NotImplementedError
    want = [banks.worst_ways(banks.padded_store_words(64, 2, pad=p)) for p in (0, 1, 2, 4)]
    if not isinstance(ways, (list, tuple)) or len(ways) != 4:
        raise Mismatch(f"answer with four numbers, the ways for PAD = 0, 1, 2, 4; got {ways!r}")
    equal(list(ways), want, "ways for PAD = 0, 1, 2, 4")
