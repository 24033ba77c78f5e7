"""S-LoRA's unified memory pool: adapter weights and the KV cache share one set of fixed-size pages.

Paper: Ying Sheng, Shiyi Cao, Dacheng Li, Coleman Hooper, Nicholas Lee, Shuo Yang, Christopher Chou,
Banghua Zhu, Lianmin Zheng, Kurt Keutzer, Joseph E. Gonzalez, Ion Stoica, "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters", MLSys 2024, arXiv 2311.03285. The serving side (batching, scheduler) is in
slora.py; this file is the memory side.

Idea ("unified paging"): a server holds thousands of adapters in host memory but only the ones the running
batch needs on the accelerator. Adapters come in different ranks and the KV cache grows one token at a
time, so both are cut into pages of one shape, a vector of n_embd numbers, and drawn from one pool:

    pool.data  [capacity, d]                      every page is one row, owned by at most one owner
    LoRA factor of a layer W [out, in], rank r:   A [r, in]  -> r * in / d pages   (row i of A)
                                                  B^T [r, out] -> r * out / d pages (column i of B)
    KV cache:                                     2 * n_layer pages per token (its key and its value)

so an adapter of rank r costs r * (in + out) / d pages per adapted matrix (4r for GPT-2's c_attn, 3d x d),
16 r per block when c_attn, attn.c_proj, c_fc and mlp.c_proj are all adapted. A page need not sit next to
its neighbours: an adapter's rows are gathered through a page table, and that is what lets adapters of
any rank and KV caches of any length share the pool without holes that nobody can use.

Two classes:
- `PagePool`: allocate / free pages for an owner, with the accounting (used + free == capacity, no page
  owned twice, `check()` verifies both) and a fragmentation figure (largest run of free pages / free).
  Pages are handed out lowest id first, so runs form and breaking them up shows in the figure.
- `AdapterStore`: the adapters in host memory (a dict of CPU tensors) and the ones resident in the pool,
  paged in on demand and paged out least recently used first. Adapters in use by a running request are
  pinned and never evicted; an adapter bigger than the whole pool is a ValueError, a pool too full of
  pinned pages is a `PoolFullError`.

The weights really live in `pool.data` (slora.py's batched computation reads them from there); the KV cache
is only accounted here (pages allocated and freed per token), the keys and values themselves stay in the
attention cache tensors of slora.py's forward.

Copy: chapters/ch4_low_rank/slora_pool.py
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

Owner = Hashable  # ("adapter", name) or ("kv", request id): anything hashable


class PoolFullError(RuntimeError):
    """The pool has not enough free pages right now (it might after something is freed)."""


class PagePool:
    """`capacity` pages of `page_size` numbers each, on `device`; pages are owned by hashable owners."""

    def __init__(self, capacity: int, page_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("capacity", capacity), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PagePool {name} must be a positive int, got {value!r}")
        self.capacity, self.page_size = capacity, page_size
        self.data = torch.zeros(capacity, page_size, device=device, dtype=dtype)  # [capacity, d]
        self._owner: list[Owner | None] = [None] * capacity  # page id -> owner
        self._pages: dict[Owner, list[int]] = {}  # owner -> its page ids, in allocation order
        self._free = list(range(capacity))  # a min-heap of free page ids
        self._free_mask = torch.ones(capacity, dtype=torch.bool)  # the same set, for the run lengths
        self.peak_used = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def owners(self) -> list[Owner]:
        return list(self._pages)

    def pages_of(self, owner: Owner) -> list[int]:
        if owner not in self._pages:
            raise KeyError(f"{owner!r} owns no pages in this pool")
        return list(self._pages[owner])

    def allocate(self, owner: Owner, n: int) -> torch.Tensor:
        """Give `owner` n more pages (lowest free ids first); returns their ids [n] (int64)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"number of pages must be an int >= 0, got {n!r}")
        if n > self.capacity:
            raise ValueError(f"{owner!r} asks for {n} pages but the pool has only {self.capacity} in all")
        if n > self.free:
            raise PoolFullError(f"{owner!r} asks for {n} pages, only {self.free} of {self.capacity} are free")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        for p in ids:
            self._owner[p] = owner
        self._free_mask[ids] = False
        self._pages.setdefault(owner, []).extend(ids)
        self.peak_used = max(self.peak_used, self.used)
        return torch.tensor(ids, dtype=torch.long)

    def release(self, owner: Owner) -> int:
        """Free every page of `owner`; returns how many. Unknown owners are a KeyError."""
        if owner not in self._pages:
            raise KeyError(f"{owner!r} owns no pages in this pool")
        ids = self._pages.pop(owner)
        for p in ids:
            self._owner[p] = None
            heapq.heappush(self._free, p)
        self._free_mask[ids] = True
        return len(ids)

    def largest_free_run(self) -> int:
        edges = torch.diff(torch.nn.functional.pad(self._free_mask.int(), (1, 1)))  # +1 run starts, -1 ends
        starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
        return int((ends - starts).max()) if len(starts) else 0

    def fragmentation(self) -> float:
        """1 - (largest run of consecutive free pages) / (free pages): 0 when the free space is one run."""
        return 0.0 if self.free == 0 else 1.0 - self.largest_free_run() / self.free

    def used_by(self, kind: str) -> int:
        """Pages held by owners whose key is a tuple starting with `kind` ("adapter", "kv")."""
        return sum(len(v) for k, v in self._pages.items() if isinstance(k, tuple) and k and k[0] == kind)

    def check(self) -> None:
        """Verify the accounting; raise RuntimeError naming the first broken invariant."""
        seen: dict[int, Owner] = {}
        for owner, ids in self._pages.items():
            for p in ids:
                if p in seen:
                    raise RuntimeError(f"page {p} is owned twice: by {seen[p]!r} and {owner!r}")
                if self._owner[p] != owner:
                    raise RuntimeError(f"page {p} is listed for {owner!r} but marked {self._owner[p]!r}")
                seen[p] = owner
        if len(set(self._free)) != len(self._free) or set(self._free) & set(seen):
            raise RuntimeError("a page is both free and owned, or free twice")
        if sorted(self._free) != self._free_mask.nonzero().squeeze(1).tolist():
            raise RuntimeError("the free-page mask disagrees with the free list")
        if len(seen) + len(self._free) != self.capacity:
            raise RuntimeError(f"used {len(seen)} + free {len(self._free)} != capacity {self.capacity}")

    def stats(self) -> dict:
        return {"capacity": self.capacity, "used": self.used, "free": self.free,
                "adapter_pages": self.used_by("adapter"), "kv_pages": self.used_by("kv"),
                "fragmentation": round(self.fragmentation(), 4), "peak_used": self.peak_used}


@dataclass
class HostAdapter:
    """A LoRA adapter in host memory: for each adapted layer, A [r, in] and B [out, r] (CPU tensors)."""

    name: str
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Resident:
    """Where an adapter's rows sit in the pool: layer -> (A pages [r, in/d], B^T pages [r, out/d])."""

    name: str
    rank: int
    scale: float
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
    n_pages: int


def pages_for(rank: int, shapes: dict[str, tuple[int, int]], page_size: int) -> int:
    """Pages of a rank-`rank` adapter over layers of these (out, in) shapes: r (in + out) / d per layer."""
    return sum(rank * (n_in + n_out) // page_size for n_out, n_in in shapes.values())


class AdapterStore:
    """Adapters in host memory, paged into `pool` on demand and out least-recently-used first.

    layer_shapes: the layers an adapter may touch, name -> (out, in) of the base weight; every in and out
    must be a multiple of the page size.
    """

    def __init__(self, pool: PagePool, layer_shapes: dict[str, tuple[int, int]]) -> None:
        d = pool.page_size
        for name, (n_out, n_in) in layer_shapes.items():
            if n_out % d or n_in % d:
                raise ValueError(f"layer {name} [{n_out}, {n_in}]: in and out must be multiples of the "
                                 f"page size {d} to be stored in pages")
        self.pool, self.layer_shapes = pool, dict(layer_shapes)
        self.host: dict[str, HostAdapter] = {}
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self.loads = self.evictions = self.hits = 0

    # ------------------------------------------------------------------ host side: the registry

    def register(self, adapter: HostAdapter) -> None:
        """Add an adapter to host storage after checking its name, rank and every shape."""
        if not isinstance(adapter, HostAdapter):
            raise TypeError(f"register expects a HostAdapter, got {type(adapter).__name__}")
        if not isinstance(adapter.name, str) or not adapter.name:
            raise ValueError(f"an adapter needs a non-empty string name, got {adapter.name!r}")
        if adapter.name in self.host:
            raise ValueError(f"an adapter named {adapter.name!r} is already registered")
        r = adapter.rank
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"adapter {adapter.name!r}: rank must be a positive int, got {r!r}")
        if not adapter.weights:
            raise ValueError(f"adapter {adapter.name!r} adapts no layer")
        weights = {}
        for layer, (A, B) in adapter.weights.items():
            if layer not in self.layer_shapes:
                raise ValueError(f"adapter {adapter.name!r}: unknown layer {layer!r}; the served layers are "
                                 f"{sorted(self.layer_shapes)}")
            n_out, n_in = self.layer_shapes[layer]
            if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
                raise ValueError(
                    f"adapter {adapter.name!r}, layer {layer}: expected A [{r}, {n_in}] and B [{n_out}, {r}] "
                    f"for rank {r}, got A {list(A.shape)} and B {list(B.shape)} (rank mismatch or wrong layer?)")
            weights[layer] = (A.detach().to("cpu", self.pool.data.dtype).clone(),
                              B.detach().to("cpu", self.pool.data.dtype).clone())
        self.host[adapter.name] = HostAdapter(adapter.name, r, float(adapter.scale), weights)

    def check_known(self, name: str) -> HostAdapter:
        if name not in self.host:
            raise ValueError(f"unknown adapter {name!r}; registered adapters: {sorted(self.host)[:10]}"
                           f"{' ...' if len(self.host) > 10 else ''}")
        return self.host[name]

    def pages_needed(self, name: str) -> int:
        h = self.check_known(name)
        return pages_for(h.rank, {k: self.layer_shapes[k] for k in h.weights}, self.pool.page_size)

    # ------------------------------------------------------------------ device side: residency

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def evictable_pages(self, keep: str | None = None) -> int:
        """Pages that evicting every unpinned resident adapter (except `keep`) would free."""
        return sum(res.n_pages for n, res in self._resident.items() if not self._pins.get(n) and n != keep)

    def make_room(self, n: int, keep: str | None = None) -> None:
        """Evict unpinned adapters, least recently used first, until n pages are free."""
        if n > self.pool.capacity:
            raise ValueError(f"{n} pages asked for but the pool has only {self.pool.capacity} in all")
        for name in list(self._resident):
            if self.pool.free >= n:
                break
            if not self._pins.get(name) and name != keep:
                self.evict(name)
        if self.pool.free < n:
            raise PoolFullError(f"need {n} free pages, only {self.pool.free} free after evicting every "
                                f"unpinned adapter (pinned: {sorted(k for k, v in self._pins.items() if v)})")

    def load(self, name: str) -> Resident:
        """The adapter's pool record, paging it in (after LRU evictions) if needed; marks it most recent."""
        h = self.check_known(name)
        if name in self._resident:
            self.hits += 1
            self._resident.move_to_end(name)
            return self._resident[name]
        need = self.pages_needed(name)
        if need > self.pool.capacity:
            raise ValueError(f"adapter {name!r} needs {need} pages but the pool holds only "
                             f"{self.pool.capacity}; use a bigger pool or a smaller rank")
        self.make_room(need, keep=name)
        d, owner = self.pool.page_size, ("adapter", name)
        ids = self.pool.allocate(owner, need)  # [need]
        tables, used = {}, 0
        for layer, (A, B) in h.weights.items():
            tabs = []
            for M in (A, B.T):  # rows of A [r, in] and of B^T [r, out], each cut into pages of width d
                n = M.numel() // d
                table = ids[used:used + n].view(h.rank, -1)  # [r, width / d]
                self.pool.data[table.reshape(-1).to(self.pool.data.device)] = M.reshape(n, d).to(
                    self.pool.data.device)  # host -> device copy
                tabs.append(table.to(self.pool.data.device))
                used += n
            tables[layer] = (tabs[0], tabs[1])
        self.loads += 1
        self._resident[name] = Resident(name, h.rank, h.scale, tables, need)
        return self._resident[name]

    def evict(self, name: str) -> None:
        if name not in self._resident:
            raise KeyError(f"adapter {name!r} is not resident")
        if self._pins.get(name):
            raise ValueError(f"adapter {name!r} is pinned by {self._pins[name]} running request(s)")
        self.pool.release(("adapter", name))
        del self._resident[name]
        self.evictions += 1

    def pin(self, name: str) -> None:
        if name not in self._resident:
            raise KeyError(f"adapter {name!r} must be loaded before it is pinned")
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        if not self._pins.get(name):
            raise ValueError(f"adapter {name!r} is not pinned")
        self._pins[name] -= 1

    def stats(self) -> dict:
        return {"registered": len(self.host), "resident": len(self._resident), "loads": self.loads,
                "hits": self.hits, "evictions": self.evictions}
