"""Shared-memory bank conflicts of the CUDA tile copy (lora_cuda.cu), counted in plain Python.

Shared memory is split into 32 banks of 4-byte words: word w sits in bank w % 32. When the 32 threads
of a warp access shared memory in one instruction, words in different banks are served together, the
same word is broadcast, but distinct words in the same bank are served one after another. The number
of distinct words in the busiest bank is the "n-way conflict": that instruction takes n times longer.

The GEMM of lora_cuda.cu stores its tiles transposed, dst[k][row] (k-major, so that the inner loop reads
contiguous rows). `unpadded_store_words` is the first version: thread e copied element (row e // 16,
k e % 16), so the 16 threads that share a row wrote 16 words that are `rows` words apart. With 64 rows
that is 16 words in one bank. `padded_store_words` mirrors the fixed copy: each thread reads a 16-byte
chunk of one row (8 half/bf16 or 4 float values along K) and the rows of the tile are padded to
`rows + PAD` words, which spreads every store instruction of a warp over the 32 banks. The tests check
this mirror against the .cu file itself (its `lora_cuda_tile_store_words`, compiled on the CPU).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

BANKS = 32  # banks of shared memory, 4 bytes wide
WARP = 32  # threads per warp
BK = 16  # k-width of a tile in lora_cuda.cu
THREADS = 256  # threads per block in lora_cuda.cu
PAD = 2  # extra words per row of a shared tile in lora_cuda.cu


def conflict_ways(words: Iterable[int]) -> int:
    """The n of an n-way conflict: distinct words in the busiest bank (1 = conflict-free, 0 = no access).

    `words` are the 4-byte word indices that the threads of one warp access in one instruction;
    negative entries mean "this thread is idle" and are ignored. Equal words count once (broadcast)."""
    per_bank: dict[int, set[int]] = defaultdict(set)
    for w in words:
        if w >= 0:
            per_bank[w % BANKS].add(w)
    return max((len(s) for s in per_bank.values()), default=0)


def unpadded_store_words(rows: int, threads: int = THREADS, bk: int = BK) -> list[int]:
    """The first copy loop: thread e stores element (row e // bk, k e % bk) at word k * rows + row of
    dst[bk][rows]. One word per thread (-1 when the thread has nothing to copy)."""
    return [(e % bk) * rows + e // bk if e < rows * bk else -1 for e in range(threads)]


def padded_store_words(rows: int, elem_bytes: int, threads: int = THREADS, bk: int = BK,
                       pad: int = PAD) -> list[list[int]]:  # fmt: skip
    """The fixed copy: thread e loads chunk c = e % (bk / vec) of row e // (bk / vec), vec = 16 / elem_bytes
    elements, and stores element q of it at word (c * vec + q) * (rows + pad) + row. Returns, per thread,
    its vec words (all -1 when the thread has nothing to copy)."""
    vec = 16 // elem_bytes
    chunks = bk // vec
    out = []
    for e in range(threads):
        if e >= rows * chunks:
            out.append([-1] * vec)
            continue
        row, k = e // chunks, (e % chunks) * vec
        out.append([(k + q) * (rows + pad) + row for q in range(vec)])
    return out


def worst_ways(words_per_thread: list[int] | list[list[int]]) -> int:
    """Largest conflict over every warp and every store instruction (element q) of a tile copy."""
    per_thread = [w if isinstance(w, list) else [w] for w in words_per_thread]
    worst = 0
    for w0 in range(0, len(per_thread), WARP):
        warp = per_thread[w0:w0 + WARP]
        for q in range(len(warp[0])):
            worst = max(worst, conflict_ways(t[q] for t in warp))
    return worst
