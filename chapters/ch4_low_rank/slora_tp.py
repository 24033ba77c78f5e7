"""S-LoRA's tensor parallelism, emulated: n shards in one process, each adapter cut the way its layer is.

Paper: Ying Sheng, Shiyi Cao, Dacheng Li, Coleman Hooper, Nicholas Lee, Shuo Yang, Christopher Chou,
Banghua Zhu, Lianmin Zheng, Kurt Keutzer, Joseph E. Gonzalez, Ion Stoica, "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters", MLSys 2024, arXiv 2311.03285, section on tensor parallelism. The base model's
split is Megatron-LM's (Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism", 2019, arXiv 1909.08053). Adapters are slora_pool.py's HostAdapter.

Megatron cuts every block over n devices so that each sublayer needs one collective (W [out, in]):

    column-parallel (c_attn, mlp.c_fc):  shard k owns the rows W[out_k] and computes y_k = x W[out_k]^T;
        x is on every shard, the output stays split by features (c_attn by heads: q, k, v of heads
        k H/n .. (k+1) H/n, so attention runs on each shard for its own heads; GELU is elementwise)
    row-parallel (attn.c_proj, mlp.c_proj): shard k owns the columns W[:, in_k], reads its part x_k of the
        input (the column layer's output) and makes a partial sum x_k W[:, in_k]^T [N, out];
        ONE all-reduce adds the partial sums: the only traffic of the sublayer, [N, d]

A LoRA branch s (x A^T) B^T (A [r, in], B [out, r]) rides along. S-LoRA cuts its factors so that the
branch never needs a width-d tensor of its own:

    column-parallel layer: A by rank rows, A[r_k]:   t_k = x A[r_k]^T [N, r_k], all-gather -> t [N, r]
                           B by output rows like W:  y_k += s t B[out_k]^T
    row-parallel layer:    A by input columns like W: t_k = x_k A[:, in_k]^T [N, r] partial sums,
                                                      all-reduce -> t [N, r]
                           B by output rows, d/n each: shard k writes s t B[out_k]^T into ITS columns of
                           its partial sum; the base's all-reduce then delivers the LoRA output too (the
                           all-gather of the LoRA output is fused into the all-reduce the base needs anyway)

So the extra traffic is the rank-r intermediate x A^T: one all-gather per column-parallel layer and one
all-reduce per row-parallel layer, [N, r] each, against the base's [N, d] all-reduce per sublayer. With a
ring, an all-gather of M numbers sends (n-1)/n M per device and an all-reduce 2 (n-1)/n M, so an MLP with
a LoRA on both matrices adds 3 (n-1)/n N r to the base's 2 (n-1)/n N d (`ring_volume`).

The collectives are plain functions over a list of per-shard tensors (`all_gather`, `all_reduce`); each
appends a `Collective` record with the shape every shard sent, which is what the tests check. Requests may
name different adapters (a heterogeneous batch as in slora.py): tokens are grouped by adapter and each
group's intermediate [n_s, r_s] is communicated at its own rank, no padding (a real server packs the groups
into one buffer per layer: the same numbers, fewer launches).

Choices: the rank rows of a column-parallel A are dealt as evenly as torch.tensor_split deals them, so any
rank works with any shard count (pieces may differ by one row, or be empty when r < n; an all-gather of
unequal pieces); the base dimensions (n_head, hence d and 4d) must be multiples of n, else a ValueError.
Embeddings, LayerNorms and the LM head are replicated (Megatron also splits the vocabulary; not here).
Inference only, one process, no real devices.

Copy: minimal/gpt.py, chapters/ch4_low_rank/slora_pool.py, chapters/ch4_low_rank/slora_tp.py
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.slora_pool import HostAdapter
from minimal.gpt import GPT, Block

# ------------------------------------------------------------------------------------------ collectives


@dataclass
class Collective:
    """One simulated collective: which op, for what (the base model or a LoRA branch), who sent what."""

    op: str  # "all_gather" or "all_reduce"
    what: str  # "base" or "lora"
    layer: str
    shapes: list[tuple[int, ...]]  # the tensor each shard put in

    @property
    def numel(self) -> int:
        """Numbers in the result every shard receives."""
        if self.op == "all_gather":
            return sum(_numel(s) for s in self.shapes)
        return _numel(self.shapes[0])


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def all_gather(parts: Sequence[torch.Tensor], log: list[Collective], what: str, layer: str) -> torch.Tensor:
    """parts[k] [M, w_k] from shard k -> [M, sum_k w_k] on every shard (concatenated in shard order)."""
    if len({p.shape[:-1] for p in parts}) != 1:
        raise ValueError(f"all_gather needs equal leading shapes, got {[list(p.shape) for p in parts]}")
    log.append(Collective("all_gather", what, layer, [tuple(p.shape) for p in parts]))
    return torch.cat(list(parts), dim=-1)


def all_reduce(parts: Sequence[torch.Tensor], log: list[Collective], what: str, layer: str) -> torch.Tensor:
    """parts[k] from shard k, all of one shape -> their sum on every shard."""
    if len({p.shape for p in parts}) != 1:
        raise ValueError(f"all_reduce needs one shape on every shard, got {[list(p.shape) for p in parts]}")
    log.append(Collective("all_reduce", what, layer, [tuple(p.shape) for p in parts]))
    return torch.stack(list(parts)).sum(0)


def ring_volume(log: Sequence[Collective], what: str | None = None) -> float:
    """Numbers each device sends under ring algorithms: all-gather (n-1)/n M, all-reduce 2 (n-1)/n M."""
    total = 0.0
    for c in log:
        if what is None or c.what == what:
            n = len(c.shapes)
            total += (1 if c.op == "all_gather" else 2) * (n - 1) / n * c.numel
    return total


# ------------------------------------------------------------------------------------------ sharding


def _check_shards(n_shards: int) -> None:
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ValueError(f"n_shards must be an int >= 1, got {n_shards!r}")


def even_parts(size: int, n_shards: int, what: str) -> list[torch.Tensor]:
    """Contiguous index ranges 0 .. size-1 cut into n_shards equal parts; size must divide."""
    _check_shards(n_shards)
    if size % n_shards:
        raise ValueError(f"{n_shards} shards do not divide {what} = {size}; choose a shard count that divides it")
    return list(torch.arange(size).chunk(n_shards))


def head_parts(n_embd: int, n_head: int, n_shards: int) -> list[torch.Tensor]:
    """c_attn's output features [q | k | v] owned by each shard: q, k and v of its n_head / n heads."""
    _check_shards(n_shards)
    if n_head % n_shards:
        raise ValueError(f"{n_shards} shards do not divide n_head = {n_head}; attention is split by heads")
    w = n_embd // n_shards  # the features of n_head / n heads
    return [torch.cat([j * n_embd + torch.arange(k * w, (k + 1) * w) for j in range(3)]) for k in range(n_shards)]


@dataclass
class LinearShards:
    """One nn.Linear cut into shards, Megatron style.

    column: shard k computes the output features parts[k]; row: shard k reads the input features parts[k]
    and, for a LoRA branch, writes the output features out_parts[k] (for a column layer out_parts = parts).
    """

    kind: str  # "column" or "row"
    weight: list[torch.Tensor]  # column [out_k, in], row [out, in_k]
    bias: torch.Tensor | None  # [out]; column: each shard adds its slice; row: added once after the all-reduce
    parts: list[torch.Tensor]
    out_parts: list[torch.Tensor]
    in_features: int
    out_features: int


def shard_linear(lin: nn.Linear, kind: str, n_shards: int, parts: list[torch.Tensor] | None = None) -> LinearShards:
    """Cut `lin` for n shards; `parts` (column: out features, row: in features) default to even ranges."""
    if type(lin) is not nn.Linear:
        raise TypeError(f"shard a plain nn.Linear, got {type(lin).__name__}")
    if kind not in ("column", "row"):
        raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")
    n_out, n_in = lin.weight.shape
    W = lin.weight.detach()
    if kind == "column":
        parts = parts if parts is not None else even_parts(n_out, n_shards, "out_features")
        return LinearShards(kind, [W[p] for p in parts], _detach(lin.bias), parts, parts, n_in, n_out)
    parts = parts if parts is not None else even_parts(n_in, n_shards, "in_features")
    out_parts = even_parts(n_out, n_shards, "out_features")  # the LoRA output's columns per shard
    return LinearShards(kind, [W[:, p] for p in parts], _detach(lin.bias), parts, out_parts, n_in, n_out)


def _detach(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.detach()


@dataclass
class LoRAShards:
    """One adapter's A and B for one sharded layer (see the docstring for how each kind cuts them)."""

    A: list[torch.Tensor]  # column: rank rows A[r_k] [r_k, in]; row: input columns A[:, in_k] [r, in_k]
    B: list[torch.Tensor]  # output rows B[out_k] [out_k, r]
    scale: float


def shard_lora(A: torch.Tensor, B: torch.Tensor, scale: float, layer: LinearShards) -> LoRAShards:
    """Cut a LoRA (A [r, in], B [out, r]) consistently with its layer's shards."""
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape != (layer.out_features, r):
        raise ValueError(f"expected A [r, {layer.in_features}] and B [{layer.out_features}, r], got "
                         f"{list(A.shape)} and {list(B.shape)}")
    if layer.kind == "column":
        A_parts = list(A.tensor_split(len(layer.parts), dim=0))  # rank rows, as even as possible
    else:
        A_parts = [A[:, p] for p in layer.parts]
    return LoRAShards(A_parts, [B[p] for p in layer.out_parts], float(scale))


# ------------------------------------------------------------------------------------------ sharded linears


def _groups(slot: torch.Tensor, loras: Sequence[LoRAShards | None], n_tokens: int):
    """(slot, its LoRA, its token rows) for every slot that has tokens and a LoRA on this layer."""
    if slot.shape != (n_tokens,) or bool((slot < -1).any() | (slot >= len(loras)).any()):
        raise ValueError(f"expected slot [{n_tokens}] with values in -1 .. {len(loras) - 1}, got "
                         f"{list(slot.shape)} {slot.unique().tolist()}")
    for s, lora in enumerate(loras):
        rows = (slot == s).nonzero().squeeze(1)  # [n_s]
        if lora is not None and len(rows):
            yield s, lora, rows


def column_parallel(x: torch.Tensor, layer: LinearShards, loras: Sequence[LoRAShards | None], slot: torch.Tensor,
                    log: list[Collective], name: str = "") -> list[torch.Tensor]:
    """x [N, in] on every shard -> y_k [N, out_k] on shard k; token i adds the LoRA of slot[i] (-1: none)."""
    if layer.kind != "column" or x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"column_parallel needs a column layer and x [N, {layer.in_features}], got "
                         f"{layer.kind!r} and {list(x.shape)}")
    ys = [x @ W.T + (0 if layer.bias is None else layer.bias[p]) for W, p in zip(layer.weight, layer.parts)]
    for _, lora, rows in _groups(slot, loras, len(x)):
        t = all_gather([x[rows] @ A.T for A in lora.A], log, "lora", name)  # [n_s, r_k] each -> [n_s, r]
        for y, B in zip(ys, lora.B):
            y.index_add_(0, rows, lora.scale * t @ B.T)  # += [n_s, out_k]
    return ys


def row_parallel(xs: Sequence[torch.Tensor], layer: LinearShards, loras: Sequence[LoRAShards | None],
                 slot: torch.Tensor, log: list[Collective], name: str = "") -> torch.Tensor:
    """x_k [N, in_k] on shard k -> y [N, out] on every shard, through the base's one all-reduce."""
    want = [[len(xs[0]) if xs else 0, len(p)] for p in layer.parts]
    if layer.kind != "row" or [list(x.shape) for x in xs] != want:
        raise ValueError(f"row_parallel needs a row layer and one x_k [N, in_k] per shard {want}, got "
                         f"{layer.kind!r} and {[list(x.shape) for x in xs]}")
    partial = [x @ W.T for x, W in zip(xs, layer.weight)]  # [N, out] each: partial sums over the inputs
    for _, lora, rows in _groups(slot, loras, len(xs[0])):
        t = all_reduce([x[rows] @ A.T for x, A in zip(xs, lora.A)], log, "lora", name)  # [n_s, r] summed
        for k, (B, cols) in enumerate(zip(lora.B, layer.out_parts)):
            delta = t.new_zeros(len(rows), layer.out_features)  # [n_s, out], zero outside this shard's columns
            delta[:, cols] = lora.scale * t @ B.T  # [n_s, out_k]
            partial[k].index_add_(0, rows, delta)
    y = all_reduce(partial, log, "base", name)  # the base's all-reduce, carrying the LoRA outputs as well
    return y if layer.bias is None else y + layer.bias


# ------------------------------------------------------------------------------------------ a block, a GPT


class ShardedBlock:
    """A GPT block over n shards; adapters[s] is slot s (its LoRAs on this block's layers, if any)."""

    LAYERS = {"attn.c_attn": "column", "attn.c_proj": "row", "mlp.c_fc": "column", "mlp.c_proj": "row"}

    def __init__(self, block: Block, n_shards: int, adapters: Sequence[HostAdapter] = (), prefix: str = "h.0"):
        if not (isinstance(block.attn_out, nn.Identity) and isinstance(block.mlp_out, nn.Identity)):
            raise TypeError("shard a plain base block (its attn_out / mlp_out are wrapped by an adapter)")
        d, H = block.ln_1.normalized_shape[0], block.attn.n_head
        heads = head_parts(d, H, n_shards)
        self.n, self.n_head, self.prefix = n_shards, H, prefix
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.layers = {
            "attn.c_attn": shard_linear(block.attn.c_attn, "column", n_shards, heads),
            "attn.c_proj": shard_linear(block.attn.c_proj, "row", n_shards),  # its inputs are the heads in order
            "mlp.c_fc": shard_linear(block.mlp.c_fc, "column", n_shards),
            "mlp.c_proj": shard_linear(block.mlp.c_proj, "row", n_shards),
        }
        self.loras: dict[str, list[LoRAShards | None]] = {}
        for name, layer in self.layers.items():
            self.loras[name] = []
            for a in adapters:
                w = a.weights.get(f"{prefix}.{name}")
                self.loras[name].append(None if w is None else shard_lora(w[0], w[1], a.scale, layer))

    def _name(self, layer: str) -> str:
        return f"{self.prefix}.{layer}"

    def attention(self, x: torch.Tensor, slot: torch.Tensor, log: list[Collective]) -> torch.Tensor:
        """The attention sublayer on x [B, T, d] (already normalised); slot [B] per sequence -> [B, T, d]."""
        B, T, d = x.shape
        tok = slot.repeat_interleave(T)  # [N] slot of every token
        qkv = column_parallel(x.reshape(B * T, d), self.layers["attn.c_attn"], self.loras["attn.c_attn"], tok,
                              log, self._name("attn.c_attn"))  # n x [N, 3d/n]: q_k | k_k | v_k
        heads = []
        for y in qkv:  # each shard attends with its own heads, no communication
            q, k, v = (t.reshape(B, T, -1, d // self.n_head).transpose(1, 2) for t in y.split(d // self.n, 1))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H/n, T, hd]
            heads.append(o.transpose(1, 2).reshape(B * T, d // self.n))  # [N, d/n]
        out = row_parallel(heads, self.layers["attn.c_proj"], self.loras["attn.c_proj"], tok, log,
                           self._name("attn.c_proj"))
        return out.view(B, T, d)

    def mlp(self, x: torch.Tensor, slot: torch.Tensor, log: list[Collective]) -> torch.Tensor:
        """The MLP sublayer on x [B, T, d] (already normalised); slot [B] per sequence -> [B, T, d]."""
        B, T, d = x.shape
        tok = slot.repeat_interleave(T)  # [N]
        hs = column_parallel(x.reshape(B * T, d), self.layers["mlp.c_fc"], self.loras["mlp.c_fc"], tok, log,
                             self._name("mlp.c_fc"))  # n x [N, 4d/n]
        hs = [F.gelu(h, approximate="tanh") for h in hs]  # elementwise: stays on its shard
        return row_parallel(hs, self.layers["mlp.c_proj"], self.loras["mlp.c_proj"], tok, log,
                            self._name("mlp.c_proj")).view(B, T, d)

    def forward(self, x: torch.Tensor, slot: torch.Tensor, log: list[Collective]) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), slot, log)
        return x + self.mlp(self.ln_2(x), slot, log)


class ShardedGPT:
    """A base GPT whose blocks run over n shards, serving several adapters at once (one per sequence)."""

    def __init__(self, model: GPT, n_shards: int, adapters: Sequence[HostAdapter] = ()) -> None:
        if bad := [a for a in adapters if not isinstance(a, HostAdapter)]:
            raise TypeError(f"adapters must be HostAdapter, got {type(bad[0]).__name__}")
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")
        known = {f"h.{i}.{n}" for i in range(len(model.h)) for n in ShardedBlock.LAYERS}
        for a in adapters:
            if unknown := sorted(set(a.weights) - known):
                raise ValueError(f"adapter {a.name!r} adapts {unknown}, not among the sharded layers")
        self.model, self.names = model.eval(), names
        self.blocks = [ShardedBlock(b, n_shards, adapters, f"h.{i}") for i, b in enumerate(model.h)]

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, adapters: Sequence[str | None],
                log: list[Collective] | None = None) -> torch.Tensor:
        """idx [B, T], one adapter name (or None) per sequence -> logits [B, T, V]; collectives go to `log`."""
        if idx.dim() != 2 or len(adapters) != idx.shape[0]:
            raise ValueError(f"expected idx [B, T] and B adapter names, got {list(idx.shape)} and {len(adapters)}")
        if unknown := [a for a in adapters if a is not None and a not in self.names]:
            raise ValueError(f"unknown adapter {unknown[0]!r}; known: {self.names}")
        log = [] if log is None else log
        slot = torch.tensor([-1 if a is None else self.names.index(a) for a in adapters])  # [B]
        m, T = self.model, idx.shape[1]
        x = m.wte(idx) + m.wpe(torch.arange(T, device=idx.device))  # [B, T, d], replicated
        for block in self.blocks:
            x = block.forward(x, slot, log)
        return m.ln_f(x) @ m.wte.weight.T  # [B, T, V]
