"""S-LoRA: serve many LoRA adapters over one frozen base model, in one batch, without merging any.

Paper: Ying Sheng, Shiyi Cao, Dacheng Li, Coleman Hooper, Nicholas Lee, Shuo Yang, Christopher Chou,
Banghua Zhu, Lianmin Zheng, Kurt Keutzer, Joseph E. Gonzalez, Ion Stoica, "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters", MLSys 2024, arXiv 2311.03285 (code: S-LoRA/S-LoRA). Builds on lora.py's
convention and slora_pool.py's memory pool.

Idea: merging an adapter into W (lora.py's merge) makes one adapter free but forces a batch to share it.
A server whose requests each name one of hundreds of adapters keeps W0 unmerged and, for every adapted
layer, computes for a batch of tokens x_1 .. x_N, token i belonging to a request with adapter a_i:

    Y = X W0^T + b0                                 one GEMM for the whole batch, whatever the adapters
    Y[i] += s_a (x_i A_a^T) B_a^T,   a = a_i         the low-rank branch, gathered per token
                                                    (no branch where a request has no adapter)

Ranks differ between adapters. Four ways to compute the gathered branch (`add_lora_`), all equal:
- "bmm": pad every adapter to the largest rank and run one batched matmul per token (the paper's
  S-LoRA-bmm baseline; padding wastes work and memory when ranks are mixed);
- "gather": padding-free, per token and rank row: token i with rank r_i makes exactly r_i dot products
  with rows of A_a and adds r_i scaled columns of B_a (the decode kernel, MBGMV, in PyTorch);
- "segment": padding-free, tokens sorted by adapter, one pair of small GEMMs per adapter (MBGMM);
- "triton": the multi-adapter shrink/expand kernels of kernels/multi_adapter.py (imported only then).
The server's default "auto" takes "triton" on a CUDA device; on a CPU it takes "gather" for a step where
every request feeds one token (decode) and "segment" for a step with a prompt in it (prefill), as S-LoRA
runs MBGMV for decode and MBGMM for prefill. A and B are read from the pool pages through their page
tables (slora_pool.py), not from the host copy; a step reuses the previous step's gathered rows when the
batch has the same adapters and nothing was paged in or out in between.

The serving loop (`LoRAServer.serve`) batches at the iteration level (continuous batching): at each step
every running request contributes its new tokens (its whole prompt on its first step, then one token)
to ONE packed token matrix [N, d]; the linear layers run on all N tokens at once, attention runs per
request on its own KV cache. Requests are admitted first-in first-out while the batch has room (at most
`max_batch` requests, at most `token_budget` tokens in a step) and the pool can hold the request's
adapter and its KV pages to the end of its generation; a request leaves as soon as it is done and the
next one takes its place at the next step. Greedy decoding only.

Two companion files: slora_benchmark.py measures this server against merging adapters per request or
per batch (`python -m chapters.ch4_low_rank.slora_benchmark` writes results/slora_cpu.json and .md), and
slora_tp.py emulates S-LoRA's tensor parallelism (the LoRA branch sharded the way Megatron shards W0).

Choices where the paper differs: no custom CUDA kernels on CPU (PyTorch paths); no prefetching overlap,
no early-abort admission control; tensor parallelism only as the single-process emulation of slora_tp.py;
the KV cache is accounted in the pool's pages but stored in ordinary tensors; admission reserves every KV
page a request may need (no preemption).

The files below serve on the PyTorch paths; the "triton" path also needs chapters/ch4_low_rank/kernels/
(multi_adapter.py with triton_lora.py, interpreter.py and __init__.py), imported only when it runs.

Copy: minimal/gpt.py, minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/slora_pool.py, chapters/ch4_low_rank/slora.py
"""  # noqa: E501

from __future__ import annotations

import importlib.util
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import LoRALinear
from chapters.ch4_low_rank.slora_pool import AdapterStore, HostAdapter, PagePool, Resident
from minimal.gpt import GPT

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PATHS = ("bmm", "gather", "segment", "triton")
KV = tuple[torch.Tensor, torch.Tensor]


def served_layers(model: GPT, targets: Iterable[str] = TARGETS) -> dict[str, tuple[int, int]]:
    """Every adaptable layer of the GPT: 'h.0.attn.c_attn' -> (out, in). Adapters may cover a subset."""
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown target(s) {bad}; choose among {TARGETS}")
    shapes = {}
    for i in range(len(model.h)):
        for t in targets:
            lin = model.h[i].get_submodule(t)
            if type(lin) is not nn.Linear:
                raise TypeError(f"h.{i}.{t} is a {type(lin).__name__}; serve a plain base GPT (no adapter applied)")
            shapes[f"h.{i}.{t}"] = (lin.out_features, lin.in_features)
    return shapes


# ------------------------------------------------------------------------------------------ adapters


def random_adapter(model: GPT, name: str, rank: int, alpha: float | None = None, targets: Iterable[str] = TARGETS,
                   std: float = 0.05, seed: int = 0) -> HostAdapter:
    """A LoRA adapter as if trained: A ~ N(0, 1/in), B ~ N(0, std^2) (not zero), s = alpha / r (alpha = r)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer, (n_out, n_in) in served_layers(model, targets).items():
        A = torch.randn(rank, n_in, generator=g) / n_in**0.5  # [r, in]
        weights[layer] = (A, std * torch.randn(n_out, rank, generator=g))  # B [out, r]
    return HostAdapter(name, rank, (alpha if alpha is not None else rank) / rank, weights)


def adapter_from_lora(model: nn.Module, name: str) -> HostAdapter:
    """The LoRALinear layers of a model trained with lora.apply_lora, as a servable adapter."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRALinear layer; train it with lora.apply_lora first")
    ranks = {m.r for m in layers.values()}
    scales = {m.scale for m in layers.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"one adapter has one rank and one scale; got ranks {ranks}, scales {scales}")
    weights = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in layers.items()}
    return HostAdapter(name, ranks.pop(), scales.pop(), weights)


# ------------------------------------------------------------------------------------------ the gathered branch


@dataclass
class SlotWeights:
    """The adapters of one batch for one layer, rows concatenated without padding.

    Slot s owns rows offsets[s] : offsets[s] + ranks[s] of A [R, in] and Bt = B^T [R, out]; rank 0 means
    the slot's adapter does not adapt this layer."""

    A: torch.Tensor  # [R, in]
    Bt: torch.Tensor  # [R, out]
    ranks: list[int]
    scales: torch.Tensor  # [S]
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # the "triton" path's padded stacks

    @property
    def offsets(self) -> list[int]:
        return [sum(self.ranks[:s]) for s in range(len(self.ranks))]


def _padded(w: SlotWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, rmax, in] and Bt [S, rmax, out], each adapter zero-padded to the largest rank."""
    S, rmax = len(w.ranks), max(w.ranks)
    A = w.A.new_zeros(S, rmax, w.A.shape[1])
    Bt = w.Bt.new_zeros(S, rmax, w.Bt.shape[1])
    for s, (o, r) in enumerate(zip(w.offsets, w.ranks)):
        A[s, :r], Bt[s, :r] = w.A[o:o + r], w.Bt[o:o + r]
    return A, Bt


def add_lora_bmm_(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, w: SlotWeights) -> torch.Tensor:
    """Pad to the largest rank, one batched matmul per token. x [N, in], y [N, out], slot [N] (-1: none)."""
    rows = (slot >= 0).nonzero().squeeze(1)  # [n] tokens with an adapter
    A, Bt = _padded(w)  # [S, rmax, in], [S, rmax, out]
    s = slot[rows]  # [n]
    t = torch.bmm(x[rows].unsqueeze(1), A[s].transpose(1, 2))  # [n, 1, rmax]
    return y.index_add_(0, rows, torch.bmm(t, Bt[s]).squeeze(1) * w.scales[s, None])  # += [n, out]


def add_lora_gather_(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, w: SlotWeights) -> torch.Tensor:
    """Padding-free: token i makes exactly rank(a_i) dot products, one entry per (token, rank row)."""
    ranks = torch.tensor(w.ranks + [0], device=x.device)  # [S + 1]; slot -1 reads the trailing 0
    offsets = torch.cumsum(ranks, 0) - ranks  # [S + 1] first row of each slot
    r_tok = ranks[slot]  # [N] rank of each token's adapter
    tok = torch.repeat_interleave(torch.arange(len(slot), device=x.device), r_tok)  # [E] token of each entry
    first = torch.repeat_interleave(torch.cumsum(r_tok, 0) - r_tok, r_tok)  # [E] first entry of its token
    row = torch.arange(len(tok), device=x.device) - first + offsets[slot[tok]]  # [E] its row of A and Bt
    t = (x[tok] * w.A[row]).sum(-1) * w.scales[slot[tok]]  # [E] shrink: s * x_i . A_a[j]
    return y.index_add_(0, tok, t[:, None] * w.Bt[row])  # expand: y_i += t_ij B_a[:, j]


def add_lora_segment_(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, w: SlotWeights) -> torch.Tensor:
    """Padding-free: tokens sorted by adapter, one (x A^T) B^T per adapter segment at its own rank."""
    order = torch.argsort(slot, stable=True)  # [N] tokens without adapter first
    counts = torch.bincount(slot + 1, minlength=len(w.ranks) + 1).tolist()  # [S + 1]
    start = counts[0]
    for s, (o, r) in enumerate(zip(w.offsets, w.ranks)):
        rows, start = order[start:start + counts[s + 1]], start + counts[s + 1]
        if r and len(rows):
            t = x[rows] @ w.A[o:o + r].T  # [n_s, r]
            y.index_add_(0, rows, (w.scales[s] * t) @ w.Bt[o:o + r])  # += [n_s, out]
    return y


def _build_triton_stacks(w: SlotWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [S, rmax, in] and B [S, out, rmax] zero-padded to the largest rank (one scatter each), and the
    ranks [S + 1] on the device (a trailing 0 for slot -1)."""
    S, rmax, dev = len(w.ranks), max(w.ranks), w.A.device
    rows = torch.cat([s * rmax + torch.arange(r) for s, r in enumerate(w.ranks)]).to(dev)  # [R] padded row of each
    A = w.A.new_zeros(S * rmax, w.A.shape[1]).index_copy_(0, rows, w.A).view(S, rmax, -1)
    Bt = w.Bt.new_zeros(S * rmax, w.Bt.shape[1]).index_copy_(0, rows, w.Bt).view(S, rmax, -1)
    return A, Bt.transpose(1, 2).contiguous(), torch.tensor(w.ranks + [0], device=dev)


_STEP_GROUPS: dict = {}  # the token grouping of the current step: {"slot": tensor, "version": int, pattern: ...}


def _step_groups(slot: torch.Tensor, w: SlotWeights, ranks: torch.Tensor):
    """Adapter index per token (-1: no adapter, or rank 0 in this layer) and the tokens grouped by adapter.
    Every layer of a step gets the same `slot` tensor, so this is computed once per step and per pattern
    of adapted slots (adapters may skip some layers), not once per layer."""
    from chapters.ch4_low_rank.kernels.multi_adapter import group_tokens

    if _STEP_GROUPS.get("slot") is not slot or _STEP_GROUPS.get("version") != slot._version:
        _STEP_GROUPS.clear()
        _STEP_GROUPS.update(slot=slot, version=slot._version)
    pattern = tuple(r > 0 for r in w.ranks)
    if pattern not in _STEP_GROUPS:
        idx = torch.where(ranks[slot] > 0, slot, -1)  # [N]
        _STEP_GROUPS[pattern] = (idx, group_tokens(idx, len(w.ranks)))
    return _STEP_GROUPS[pattern]


def add_lora_triton_(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, w: SlotWeights) -> torch.Tensor:
    """The Triton shrink/expand kernels (kernels/multi_adapter.py); a CUDA device, or TRITON_INTERPRET=1.

    The padded stacks are built once per SlotWeights (the server keeps one per layer for as long as the
    batch's adapters stay the same) and the token grouping once per step, so a layer call is the two
    kernel launches. Treat a SlotWeights as read-only once used here: the stacks are copies."""
    from chapters.ch4_low_rank.kernels.multi_adapter import add_multi_lora_

    hit = w.cache.get("triton")
    if hit is None or hit[0] is not w.A or hit[1] is not w.Bt:  # built for other tensors: rebuild
        hit = w.cache["triton"] = (w.A, w.Bt, _build_triton_stacks(w))
    A, B, ranks = hit[2]  # padded to the largest rank: the kernels multiply the zero rows like the others
    idx, groups = _step_groups(slot, w, ranks)
    return add_multi_lora_(y, x.contiguous(), A, B, idx, w.scales, groups=groups)


def add_lora_(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, w: SlotWeights, path: str = "segment"):
    """y[i] += s_a (x_i A_a^T) B_a^T for every token i with slot a = slot[i] >= 0, by one of PATHS."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    if x.dim() != 2 or y.shape != (x.shape[0], w.Bt.shape[1]) or slot.shape != (x.shape[0],):
        raise ValueError(f"expected x [N, in], y [N, out], slot [N]; got {list(x.shape)}, {list(y.shape)}, "
                         f"{list(slot.shape)}")
    if x.shape[1] != w.A.shape[1] or len(w.ranks) != len(w.scales) or sum(w.ranks) != w.A.shape[0]:
        raise ValueError("slot weights do not fit x (in features) or their own ranks")
    if max(w.ranks, default=0) == 0 or not bool((slot >= 0).any()):
        return y
    fn = {"bmm": add_lora_bmm_, "gather": add_lora_gather_, "segment": add_lora_segment_,
          "triton": add_lora_triton_}[path]
    return fn(y, x, slot.long(), w)


# ------------------------------------------------------------------------------------------ the server


@dataclass
class Request:
    rid: Hashable
    prompt: Sequence[int]
    adapter: str | None = None  # None: the base model alone
    max_new_tokens: int = 16


@dataclass
class ServeResult:
    outputs: dict  # rid -> generated token ids (the prompt excluded)
    admitted: list  # rids in admission order
    trace: list[dict] = field(default_factory=list)  # one record per iteration
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(v) for v in self.outputs.values())


@dataclass
class _Running:
    req: Request
    feed: list[int]  # tokens to run at the next step
    cache: list[KV] | None = None
    out: list[int] = field(default_factory=list)


class LoRAServer:
    """One frozen base GPT, adapters in host storage, a page pool on the model's device."""

    def __init__(self, model: GPT, pool_pages: int, targets: Iterable[str] = TARGETS, path: str = "auto") -> None:
        if path not in PATHS + ("auto",):
            raise ValueError(f"unknown path {path!r}; choose 'auto' or one of {PATHS}")
        self.model = model.eval()
        w = model.wte.weight
        triton = w.is_cuda and importlib.util.find_spec("triton") is not None
        self.path = ("triton" if triton else "auto") if path == "auto" else path
        self._weights: dict[str, SlotWeights] = {}  # this batch's adapters per layer, gathered from pages
        self._weights_key: tuple = ()
        self.pool = PagePool(pool_pages, model.config.n_embd, w.device, w.dtype)
        self.store = AdapterStore(self.pool, served_layers(model, targets))
        self.kv_per_token = 2 * model.config.n_layer  # a key page and a value page per layer

    def register(self, adapter: HostAdapter) -> None:
        self.store.register(adapter)

    # --------------------------------------------------------------- one packed step

    def _slot_weights(self, layer: str, residents: list[Resident]) -> SlotWeights:
        """Gather the batch's adapters for one layer from their pages: rows of A and of B^T."""
        n_out, n_in = self.store.layer_shapes[layer]
        tabs = [res.tables[layer] for res in residents if layer in res.tables]
        data = self.pool.data
        A = data[torch.cat([a.reshape(-1) for a, _ in tabs])].view(-1, n_in) if tabs else data.new_zeros(0, n_in)
        Bt = data[torch.cat([b.reshape(-1) for _, b in tabs])].view(-1, n_out) if tabs else data.new_zeros(0, n_out)
        ranks = [res.rank if layer in res.tables else 0 for res in residents]
        return SlotWeights(A, Bt, ranks, torch.tensor([r.scale for r in residents], device=data.device))

    def _linear(self, layer: str, x: torch.Tensor, plan: tuple | None) -> torch.Tensor:
        i, _, name = layer[2:].partition(".")
        y = self.model.h[int(i)].get_submodule(name)(x)  # [N, out] the base GEMM, once for all tokens
        if plan is not None:
            slot, residents, path = plan
            if layer not in self._weights:
                self._weights[layer] = self._slot_weights(layer, residents)
            add_lora_(y, x, slot, self._weights[layer], path)
        return y

    @torch.no_grad()
    def forward(self, chunks: list[torch.Tensor], adapters: list[str | None],
                caches: list[list[KV] | None]) -> tuple[torch.Tensor, list[list[KV]]]:
        """Requests' new tokens chunks[b] [T_b] after their caches -> last-token logits [B, V], new caches.

        All tokens go through every linear layer as one [N, d] matrix; attention is per request."""
        if not (len(chunks) == len(adapters) == len(caches)) or not chunks:
            raise ValueError(f"need one adapter and one cache per chunk, got {len(chunks)} chunks, "
                             f"{len(adapters)} adapters, {len(caches)} caches")
        lens = [len(c) for c in chunks]
        starts = [0 if c is None else c[0][0].shape[2] for c in caches]
        block = self.model.config.block_size
        if any(s + t > block for s, t in zip(starts, lens)) or min(lens) == 0:
            raise ValueError(f"every chunk needs >= 1 token and must end within block_size {block}")
        names = list(dict.fromkeys(a for a in adapters if a is not None))  # distinct, in order
        residents, pinned = [], []
        try:
            for n in names:  # page in, pinned so that a later load in this step cannot evict it
                residents.append(self.store.load(n))
                self.store.pin(n)
                pinned.append(n)
            return self._forward(chunks, adapters, caches, lens, starts, names, residents)
        finally:
            for n in pinned:
                self.store.unpin(n)

    def _forward(self, chunks, adapters, caches, lens, starts, names, residents):
        """The packed step itself (arguments checked and adapters paged in by `forward`)."""
        m, cfg = self.model, self.model.config
        H, d, dev = cfg.n_head, cfg.n_embd, m.wte.weight.device
        pos = torch.cat([torch.arange(s, s + t, device=dev) for s, t in zip(starts, lens)])  # [N]
        x = m.wte(torch.cat(chunks).to(dev)) + m.wpe(pos)  # [N, d]
        plan = None
        if names:
            per_req = torch.tensor([-1 if a is None else names.index(a) for a in adapters], device=dev)
            slot = torch.repeat_interleave(per_req, torch.tensor(lens, device=dev))  # [N] adapter slot per token
            path = self.path if self.path != "auto" else ("gather" if max(lens) == 1 else "segment")
            key = (tuple(names), self.store.loads, self.store.evictions)  # same adapters at the same pages
            if key != self._weights_key:
                self._weights, self._weights_key = {}, key
            plan = (slot, residents, path)
        new_caches: list[list[KV]] = [[] for _ in chunks]
        for i, block in enumerate(m.h):
            qkv = self._linear(f"h.{i}.attn.c_attn", block.ln_1(x), plan)  # [N, 3d]
            outs = []
            for b, (q, k, v) in enumerate(zip(*(t.split(lens) for t in qkv.split(d, dim=1)))):
                T = lens[b]
                q, k, v = (t.view(T, H, d // H).transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, hd]
                if caches[b] is not None:
                    k, v = torch.cat([caches[b][i][0], k], 2), torch.cat([caches[b][i][1], v], 2)  # [1, H, S, hd]
                new_caches[b].append((k, v))
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=dev).tril(k.shape[2] - T)  # [T, S]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [1, H, T, hd]
                outs.append(o[0].transpose(0, 1).reshape(T, d))
            x = x + block.attn_out(self._linear(f"h.{i}.attn.c_proj", torch.cat(outs), plan))
            h = F.gelu(self._linear(f"h.{i}.mlp.c_fc", block.ln_2(x), plan), approximate="tanh")  # [N, 4d]
            x = x + block.mlp_out(self._linear(f"h.{i}.mlp.c_proj", h, plan))
        last = torch.cumsum(torch.tensor(lens, device=dev), 0) - 1  # [B] each request's last token
        return m.ln_f(x[last]) @ m.wte.weight.T, new_caches  # [B, V]

    # --------------------------------------------------------------- the scheduler

    def _check(self, requests: list[Request], token_budget: int) -> None:
        seen = set()
        for r in requests:
            if r.rid in seen:
                raise ValueError(f"duplicate request id {r.rid!r}")
            seen.add(r.rid)
            if len(r.prompt) == 0 or r.max_new_tokens < 1:
                raise ValueError(f"request {r.rid!r}: needs a non-empty prompt and max_new_tokens >= 1")
            if len(r.prompt) + r.max_new_tokens > self.model.config.block_size:
                raise ValueError(f"request {r.rid!r}: prompt + max_new_tokens exceeds block_size "
                                 f"{self.model.config.block_size}")
            if len(r.prompt) > token_budget:
                raise ValueError(f"request {r.rid!r}: prompt of {len(r.prompt)} tokens > token_budget {token_budget}")
            need = self._kv_total(r) + (0 if r.adapter is None else self.store.pages_needed(r.adapter))
            if need > self.pool.capacity:
                raise ValueError(f"request {r.rid!r} needs {need} pages (adapter + KV), the pool has "
                                 f"{self.pool.capacity}")

    def _kv_total(self, r: Request) -> int:
        return self.kv_per_token * (len(r.prompt) + r.max_new_tokens - 1)  # the last token is never fed

    def serve(self, requests: Sequence[Request], max_batch: int = 8, token_budget: int = 512,
              stop_token: int | None = None) -> ServeResult:
        """Greedy generation for every request, continuous batching, FIFO admission (see the docstring)."""
        if max_batch < 1 or token_budget < 1:
            raise ValueError(f"max_batch and token_budget must be >= 1, got {max_batch}, {token_budget}")
        requests = list(requests)
        self._check(requests, token_budget)
        t0 = time.perf_counter()
        waiting, running = list(requests), []
        result = ServeResult({}, [])
        while waiting or running:
            tokens, decoding = len(running), len(running)  # every running request feeds one token
            while waiting and len(running) < max_batch and tokens + len(waiting[0].prompt) <= token_budget:
                if not self._fits(waiting[0], running):
                    break  # first in, first out: nobody overtakes the head of the queue
                req = waiting.pop(0)
                if req.adapter is not None:
                    self.store.load(req.adapter)
                    self.store.pin(req.adapter)
                running.append(_Running(req, [int(t) for t in req.prompt]))
                result.admitted.append(req.rid)
                tokens += len(req.prompt)
            for r in running:  # page the KV of the tokens about to be written
                n = self.kv_per_token * len(r.feed)
                self.store.make_room(n)  # never fails: admission reserved these pages
                self.pool.allocate(("kv", r.req.rid), n)
            logits, caches = self.forward([torch.tensor(r.feed) for r in running],
                                          [r.req.adapter for r in running], [r.cache for r in running])
            result.trace.append({"batch": len(running), "new": len(running) - decoding, "tokens": tokens,
                                 "adapters": len({r.req.adapter for r in running} - {None}), **self.pool.stats()})
            for r, nxt, cache in zip(running, logits.argmax(-1).tolist(), caches):
                r.out.append(nxt)
                r.feed, r.cache = [nxt], cache
            for r in [r for r in running if len(r.out) == r.req.max_new_tokens or r.out[-1] == stop_token]:
                running.remove(r)
                self.pool.release(("kv", r.req.rid))
                if r.req.adapter is not None:
                    self.store.unpin(r.req.adapter)  # stays resident until the LRU evicts it
                result.outputs[r.req.rid] = r.out
        result.seconds = time.perf_counter() - t0
        return result

    def _fits(self, req: Request, running: list[_Running]) -> bool:
        """Pinned adapters + KV allocated + KV reserved (to the end of every generation) + this request."""
        store = self.store
        pinned = sum(store.pages_needed(n) for n in {r.req.adapter for r in running} - {None})
        new_adapter = req.adapter is not None and req.adapter not in {r.req.adapter for r in running}
        need = self._kv_total(req) + (store.pages_needed(req.adapter) if new_adapter else 0)
        return pinned + sum(self._kv_total(r.req) for r in running) + need <= self.pool.capacity
