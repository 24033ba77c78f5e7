"""S-LoRA's unified page pool and the adapter store: accounting, ownership, LRU paging, clear errors."""

import pytest
import torch

from chapters.ch4_low_rank.slora_pool import AdapterStore, HostAdapter, PagePool, PoolFullError, pages_for

D = 8  # page size in the small hand-made cases
SHAPES = {"l0": (3 * D, D), "l1": (D, 4 * D)}  # (out, in): like c_attn and mlp.c_proj


def adapter(name, r, seed=0, layers=("l0", "l1"), scale=0.5):
    g = torch.Generator().manual_seed(seed)
    w = {k: (torch.randn(r, SHAPES[k][1], generator=g), torch.randn(SHAPES[k][0], r, generator=g)) for k in layers}
    return HostAdapter(name, r, scale, w)


def owned_sets(pool):
    return {o: set(pool.pages_of(o)) for o in pool.owners()}


def test_allocate_release_accounting():
    pool = PagePool(20, D)
    a = pool.allocate(("kv", 0), 5)
    b = pool.allocate(("adapter", "x"), 7)
    assert a.tolist() == [0, 1, 2, 3, 4] and b.tolist() == list(range(5, 12))  # lowest ids first
    assert (pool.used, pool.free) == (12, 8)
    pool.allocate(("kv", 0), 2)  # a KV cache grows: the same owner gets more pages
    assert pool.pages_of(("kv", 0)) == [0, 1, 2, 3, 4, 12, 13]
    assert pool.used_by("kv") == 7 and pool.used_by("adapter") == 7
    assert pool.release(("kv", 0)) == 7
    assert (pool.used, pool.free) == (7, 13) and pool.used + pool.free == pool.capacity
    pool.release(("adapter", "x"))
    assert pool.free == pool.capacity and pool.owners() == []
    assert pool.largest_free_run() == 20 and pool.fragmentation() == 0.0
    assert pool.peak_used == 14
    pool.check()


def test_no_page_owned_twice_through_random_traffic():
    pool = PagePool(64, D)
    g = torch.Generator().manual_seed(0)
    live = []
    for step in range(200):
        if live and (pool.free < 8 or torch.rand(1, generator=g).item() < 0.4):
            pool.release(live.pop(int(torch.randint(len(live), (1,), generator=g))))
        else:
            owner = ("kv", step)
            pool.allocate(owner, int(torch.randint(1, 8, (1,), generator=g)))
            live.append(owner)
        sets = list(owned_sets(pool).values())
        assert sum(map(len, sets)) == len(set().union(*sets)) == pool.used  # pairwise disjoint
        assert pool.used + pool.free == pool.capacity
        pool.check()
    for owner in live:
        pool.release(owner)
    assert pool.free == pool.capacity


def test_check_catches_a_page_owned_twice():
    pool = PagePool(8, D)
    pool.allocate("a", 3)
    pool.allocate("b", 3)
    pool._pages["b"].append(0)  # corrupt: page 0 now listed for both owners
    with pytest.raises(RuntimeError, match="owned twice"):
        pool.check()


def test_fragmentation_metric():
    pool = PagePool(16, D)
    for owner in "abcd":
        pool.allocate(owner, 4)  # a: 0-3, b: 4-7, c: 8-11, d: 12-15
    assert pool.free == 0 and pool.fragmentation() == 0.0
    pool.release("b")
    pool.release("d")  # free pages 4-7 and 12-15: two runs of 4
    assert pool.largest_free_run() == 4
    assert pool.fragmentation() == pytest.approx(1 - 4 / 8)
    pool.release("c")  # 4-15 now one run
    assert pool.largest_free_run() == 12 and pool.fragmentation() == 0.0


def test_pool_errors():
    with pytest.raises(ValueError, match="capacity"):
        PagePool(0, D)
    pool = PagePool(10, D)
    with pytest.raises(ValueError, match="only 10 in all"):
        pool.allocate("big", 11)
    pool.allocate("a", 8)
    with pytest.raises(PoolFullError, match="only 2 of 10"):
        pool.allocate("b", 3)
    with pytest.raises(KeyError):
        pool.release("nobody")


def test_pages_per_adapter():
    # rank r costs r * (in + out) / d pages per layer: l0 (3d x d) -> 4r, l1 (d x 4d) -> 5r
    assert pages_for(3, SHAPES, D) == 3 * 4 + 3 * 5
    store = AdapterStore(PagePool(200, D), SHAPES)
    store.register(adapter("a", 2, layers=("l1",)))
    assert store.pages_needed("a") == 2 * 5


def test_weights_live_in_pages_and_survive_eviction():
    pool = PagePool(2 * 27, D)  # room for exactly two rank-3 adapters (27 pages each)
    store = AdapterStore(pool, SHAPES)
    for i, name in enumerate("abc"):
        store.register(adapter(name, 3, seed=i))
    store.load("a")
    store.load("b")
    store.load("c")  # full: the least recently used, a, is paged out
    assert store.resident() == ["b", "c"] and store.evictions == 1
    res = store.load("a")  # back in, at other pages (b is now LRU and leaves)
    assert store.resident() == ["c", "a"]
    for layer, (A, B) in store.host["a"].weights.items():
        a_pages, b_pages = res.tables[layer]
        assert torch.equal(pool.data[a_pages].reshape(A.shape), A)  # rows of A, read from the pool
        assert torch.equal(pool.data[b_pages].reshape(B.T.shape), B.T)  # columns of B
    pool.check()
    assert pool.used_by("adapter") == 54 and pool.free == 0


def test_lru_order_follows_use():
    store = AdapterStore(PagePool(2 * 27, D), SHAPES)
    for i, name in enumerate("abc"):
        store.register(adapter(name, 3, seed=i))
    store.load("a")
    store.load("b")
    store.load("a")  # a hit: a becomes the most recent
    assert store.hits == 1
    store.load("c")  # evicts b, not a
    assert store.resident() == ["a", "c"]


def test_pinned_adapters_are_not_evicted():
    store = AdapterStore(PagePool(2 * 27, D), SHAPES)
    for i, name in enumerate("abc"):
        store.register(adapter(name, 3, seed=i))
    store.load("a")
    store.pin("a")
    store.load("b")
    store.pin("b")
    with pytest.raises(PoolFullError, match="pinned"):
        store.load("c")
    with pytest.raises(ValueError, match="pinned"):
        store.evict("a")
    store.unpin("a")
    store.load("c")
    assert store.resident() == ["b", "c"]
    store.pool.check()


def test_adapter_larger_than_the_pool_is_a_clear_error():
    store = AdapterStore(PagePool(20, D), SHAPES)
    store.register(adapter("huge", 3))  # needs 27 pages
    with pytest.raises(ValueError, match="needs 27 pages but the pool holds only 20"):
        store.load("huge")
    assert store.pool.free == 20  # nothing was allocated or evicted


def test_registry_errors():
    store = AdapterStore(PagePool(100, D), SHAPES)
    store.register(adapter("a", 2))
    with pytest.raises(ValueError, match="already registered"):
        store.register(adapter("a", 2))
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        store.load("zzz")
    bad = adapter("r", 2)
    bad.weights["l0"] = (bad.weights["l0"][0], torch.randn(3 * D, 3))  # B of rank 3 in a rank-2 adapter
    with pytest.raises(ValueError, match="rank mismatch"):
        store.register(bad)
    wrong = adapter("w", 2)
    wrong.weights["l1"] = (torch.randn(2, D), torch.randn(D, 2))  # A built for in=d, the layer has in=4d
    with pytest.raises(ValueError, match=r"expected A \[2, 32\]"):
        store.register(wrong)
    with pytest.raises(ValueError, match="unknown layer"):
        store.register(HostAdapter("u", 1, 1.0, {"l9": (torch.zeros(1, D), torch.zeros(D, 1))}))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        store.register(HostAdapter("z", 0, 1.0, {"l0": (torch.zeros(0, D), torch.zeros(3 * D, 0))}))
    with pytest.raises(ValueError, match="multiples of the page size"):
        AdapterStore(PagePool(10, D), {"odd": (D + 1, D)})
    assert sorted(store.host) == ["a"]  # the bad ones were not stored
