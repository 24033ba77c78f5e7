"""S-LoRA serving: heterogeneous batches equal one-request-at-a-time serving with the adapter merged.

The references are built here with lora.py's LoRALinear and peft's unload (merge), and with
GPT.generate, none of which slora.py uses for the batched path.
"""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels then run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from chapters.ch4_low_rank.slora import (
    LoRAServer,
    Request,
    SlotWeights,
    adapter_from_lora,
    add_lora_,
    random_adapter,
    served_layers,
)
from chapters.ch4_low_rank.slora_pool import HostAdapter
from tests.ch4_low_rank.slora_setup import make_server, merged_copy, mixed_requests
from tests.helpers import tiny_config, tiny_gpt

# ------------------------------------------------------------------------------------------ one forward


@pytest.mark.parametrize("path", ["auto", "bmm", "gather", "segment"])
def test_heterogeneous_forward_equals_each_request_merged(path):
    model, server = make_server(path=path)
    reqs = mixed_requests()
    logits, caches = server.forward([torch.tensor(r.prompt) for r in reqs], [r.adapter for r in reqs],
                                    [None] * len(reqs))
    assert logits.shape == (len(reqs), 101) and len(caches) == len(reqs)
    for b, r in enumerate(reqs):
        idx = torch.tensor([r.prompt])
        ref = merged_copy(model, server.store.host.get(r.adapter))(idx).logits[0, -1]
        torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=0)
        base = model(idx).logits[0, -1]
        if r.adapter is None:
            torch.testing.assert_close(logits[b], base, atol=1e-5, rtol=0)
        else:  # the adapter really changed this row (so the check above is not vacuous)
            assert (logits[b] - base).abs().max() > 1e-2


def test_forward_from_a_lora_trained_model():
    base = tiny_gpt(3)
    lora_model = copy.deepcopy(base)
    apply_lora(lora_model, r=4, alpha=8.0, targets=["c_attn", "c_fc"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(0.2 * torch.randn(m.B.shape, generator=g))  # as if trained
    adapter = adapter_from_lora(lora_model, "trained")
    assert adapter.rank == 4 and adapter.scale == 2.0 and set(adapter.weights) == {
        "h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc"}
    server = LoRAServer(base, 1024)
    server.register(adapter)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([1, 2])]
    logits, _ = server.forward(prompts, ["trained", None], [None, None])
    torch.testing.assert_close(logits[0], lora_model(prompts[0][None]).logits[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], base(prompts[1][None]).logits[0, -1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ the branch paths


def pad_bmm_reference(y, x, slot, A_list, Bt_list, scales):
    """Pad every adapter to the largest rank and multiply with torch.bmm, token by token (float64)."""
    rmax = max(a.shape[0] for a in A_list)
    A = torch.zeros(len(A_list), rmax, x.shape[1], dtype=torch.float64)
    Bt = torch.zeros(len(A_list), rmax, y.shape[1], dtype=torch.float64)
    for s, (a, bt) in enumerate(zip(A_list, Bt_list)):
        A[s, : a.shape[0]], Bt[s, : a.shape[0]] = a, bt
    out = y.double().clone()
    for i, s in enumerate(slot.tolist()):
        if s >= 0:
            t = torch.bmm(x[i].double()[None, None], A[s].T[None])  # [1, 1, rmax]
            out[i] += scales[s].double() * torch.bmm(t, Bt[s][None])[0, 0]
    return out


def random_slots(ranks, N=23, n_in=24, n_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    A_list = [torch.randn(r, n_in, generator=g) / n_in**0.5 for r in ranks]
    Bt_list = [torch.randn(r, n_out, generator=g) / max(r, 1) ** 0.5 for r in ranks]
    scales = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.25][: len(ranks)])
    w = SlotWeights(torch.cat(A_list), torch.cat(Bt_list), list(ranks), scales)
    x, y = torch.randn(N, n_in, generator=g), torch.randn(N, n_out, generator=g)
    slot = torch.randint(-1, len(ranks), (N,), generator=g)
    slot[:4] = torch.tensor([-1, 0, 1, len(ranks) - 1])  # every kind of row present
    return y, x, slot, w, A_list, Bt_list


@pytest.mark.parametrize("path", ["bmm", "gather", "segment"])
def test_paths_equal_the_pad_to_max_rank_bmm_reference(path):
    ranks = [3, 0, 5, 1, 8]  # mixed ranks, and a slot whose adapter skips this layer (rank 0)
    y, x, slot, w, A_list, Bt_list = random_slots(ranks)
    ref = pad_bmm_reference(y, x, slot, A_list, Bt_list, w.scales)
    out = add_lora_(y.clone(), x, slot, w, path)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    untouched = (slot < 0) | (slot == 1)  # no adapter, or rank 0 here: bit-identical to the base output
    assert torch.equal(out[untouched], y[untouched])
    assert not torch.allclose(out[~untouched], y[~untouched])


def test_gather_path_does_no_padding_work():
    """The padding-free gather makes exactly sum_i rank(a_i) dot products: count them through A's rows."""
    ranks = [1, 8]
    y, x, slot, w, *_ = random_slots(ranks)
    calls = []

    class Counting(torch.Tensor):
        def __getitem__(self, index):
            if self is w.A:  # only reads of A itself (results of ops on it are Counting too)
                calls.append(index.numel())
            return super().__getitem__(index)

    w.A = w.A.as_subclass(Counting)
    add_lora_(y, x, slot, w, "gather")
    assert calls == [sum(ranks[s] for s in slot.tolist() if s >= 0)]  # one A row per (token, rank) pair


def test_triton_path():
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    y, x, slot, w, A_list, Bt_list = random_slots([2, 0, 5], N=9, n_in=16, n_out=32, seed=1)
    ref = pad_bmm_reference(y, x, slot, A_list, Bt_list, w.scales)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU the kernels run in the interpreter
    w_dev = SlotWeights(w.A.to(dev), w.Bt.to(dev), w.ranks, w.scales.to(dev))
    out = add_lora_(y.clone().to(dev), x.to(dev), slot.to(dev), w_dev, "triton").cpu()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_triton_path_builds_its_stacks_once_and_groups_tokens_once_per_step(monkeypatch):
    """A decode step calls the branch for every adapted layer: the padded stacks must come from the
    SlotWeights' cache and the token sort from the step's cache, not be rebuilt on every call."""
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    import chapters.ch4_low_rank.kernels.multi_adapter as multi
    import chapters.ch4_low_rank.slora as slora

    builds, sorts = [], []
    build, sort = slora._build_triton_stacks, multi.group_tokens
    monkeypatch.setattr(slora, "_build_triton_stacks", lambda w: builds.append(1) or build(w))
    monkeypatch.setattr(multi, "group_tokens", lambda idx, n: sorts.append(1) or sort(idx, n))
    y, x, slot, w, A_list, Bt_list = random_slots([2, 0, 5], N=9, n_in=16, n_out=32, seed=1)
    w_other = SlotWeights(w.A.clone(), w.Bt.clone(), w.ranks, w.scales)  # a second layer, same adapters
    w_skip = SlotWeights(w.A[:2].clone(), w.Bt[:2].clone(), [2, 0, 0], w.scales)  # adapter 2 skips this layer
    ref = pad_bmm_reference(y, x, slot, A_list, Bt_list, w.scales)
    for _ in range(2):  # two "layers" of one step, twice
        for weights in (w, w_other):
            torch.testing.assert_close(add_lora_(y.clone(), x, slot, weights, "triton").double(), ref,
                                       atol=1e-5, rtol=0)
    assert len(builds) == 2 and len(sorts) == 1  # one build per SlotWeights, one sort for the step
    add_lora_(y.clone(), x, slot, w_skip, "triton")
    assert len(sorts) == 2  # another pattern of adapted slots needs its own grouping
    add_lora_(y.clone(), x, slot.clone(), w, "triton")  # the next step: a new slot tensor
    assert len(builds) == 3 and len(sorts) == 3


def test_server_on_the_triton_path_equals_each_request_merged():
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_gpt(0, tiny_config(n_layer=1, n_embd=32))  # tiny: the interpreter runs every program in Python
    adapters = [random_adapter(model, "a", 2, std=0.3, seed=1),
                random_adapter(model, "b", 5, targets=("attn.c_attn",), std=0.3, seed=2)]
    server = LoRAServer(copy.deepcopy(model).to(dev), 256, path="triton")
    for a in adapters:
        server.register(a)
    prompts, names = [[1, 2, 3], [4, 5], [6]], ["a", None, "b"]
    logits, _ = server.forward([torch.tensor(p) for p in prompts], names, [None] * 3)
    for b, (p, a) in enumerate(zip(prompts, names)):
        ref = merged_copy(model, server.store.host.get(a))(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[b].cpu(), ref, atol=1e-5, rtol=0)


def test_add_lora_bad_input():
    y, x, slot, w, *_ = random_slots([2, 3])
    with pytest.raises(ValueError, match="unknown path"):
        add_lora_(y, x, slot, w, "fast")
    with pytest.raises(ValueError, match=r"expected x \[N, in\]"):
        add_lora_(y[:-1], x, slot, w)
    with pytest.raises(ValueError, match="do not fit"):
        add_lora_(y, x[:, :-1], slot, w)


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("pool_pages", [4096, 500])  # 500: adapters are paged out and back in while serving
def test_scheduler_generation_equals_each_request_merged(pool_pages):
    model, server = make_server(pool_pages)
    reqs = mixed_requests(n=11, seed=1)
    result = server.serve(reqs, max_batch=3, token_budget=16)
    for r in reqs:
        ref_model = merged_copy(model, server.store.host.get(r.adapter))
        ref = ref_model.generate(torch.tensor([r.prompt]), r.max_new_tokens, temperature=0.0)
        assert result.outputs[r.rid] == ref[0, len(r.prompt):].tolist(), r.rid
    changed = [r for r in reqs if r.adapter is not None and result.outputs[r.rid] != model.generate(
        torch.tensor([r.prompt]), r.max_new_tokens, temperature=0.0)[0, len(r.prompt):].tolist()]
    assert changed  # the adapters change what is generated
    if pool_pages == 500:
        assert server.store.evictions > 0
    server.pool.check()
    assert server.pool.used_by("kv") == 0  # every KV page came back


def test_scheduler_serves_each_request_once_fifo_within_limits():
    model, server = make_server()
    reqs = mixed_requests(n=10, seed=2)
    result = server.serve(reqs, max_batch=3, token_budget=12)
    assert sorted(result.outputs) == sorted(r.rid for r in reqs)
    assert result.admitted == [r.rid for r in reqs]  # each once, first in first out
    assert all(len(result.outputs[r.rid]) == r.max_new_tokens for r in reqs)
    assert result.tokens == sum(r.max_new_tokens for r in reqs)
    assert max(t["batch"] for t in result.trace) == 3
    assert all(t["batch"] <= 3 and t["tokens"] <= 12 for t in result.trace)
    # continuous batching: requests join a batch that is already decoding
    assert any(t["new"] > 0 and t["batch"] > t["new"] for t in result.trace[1:])
    # steps = longest chain of work; far fewer than serving the requests one after another
    assert len(result.trace) < sum(r.max_new_tokens for r in reqs)


def test_kv_pages_follow_the_cache_length():
    model, server = make_server()
    L = model.config.n_layer
    req = Request("one", [3, 4, 5, 6, 7], "r2", max_new_tokens=4)
    trace = server.serve([req]).trace
    assert [t["kv_pages"] for t in trace] == [2 * L * (5 + i) for i in range(4)]  # a key and a value page per layer
    assert trace[0]["adapter_pages"] == 16 * 2 * L  # 16 r pages per block (width d) for r = 2
    assert server.pool.used_by("kv") == 0 and server.store.resident() == ["r2"]


def test_stop_token_ends_a_request():
    model, server = make_server()
    req = Request(0, [1, 2, 3], "r4", max_new_tokens=6)
    first = server.serve([req]).outputs[0]
    assert server.serve([req], stop_token=first[1]).outputs[0] == first[:2]


def test_admission_waits_for_pool_memory():
    model, server = make_server(pool_pages=400)
    # each request: 2 * L * (prompt + new - 1) = 4 * 23 = 92 KV pages, plus the r8 adapter (256 pages)
    reqs = [Request(i, list(range(1, 9)), "r8", max_new_tokens=16) for i in range(4)]
    result = server.serve(reqs, max_batch=4, token_budget=64)
    assert max(t["batch"] for t in result.trace) == 1  # 256 + 2 * 92 > 400: one at a time
    assert max(t["used"] for t in result.trace) <= 400
    assert result.admitted == [0, 1, 2, 3]


def test_serving_errors():
    model, server = make_server(pool_pages=300)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        server.serve([Request(0, [1, 2], "nope")])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        server.forward([torch.tensor([1])], ["nope"], [None])
    with pytest.raises(ValueError, match="duplicate request id"):
        server.serve([Request(0, [1], None), Request(0, [2], None)])
    with pytest.raises(ValueError, match="block_size"):
        server.serve([Request(0, list(range(30)), None, max_new_tokens=5)])
    with pytest.raises(ValueError, match="token_budget"):
        server.serve([Request(0, list(range(10)), None)], token_budget=8)
    with pytest.raises(ValueError, match="already registered"):
        server.register(random_adapter(model, "r1", 1))
    with pytest.raises(ValueError, match="rank mismatch"):
        bad = random_adapter(model, "bad", 2)
        A, B = bad.weights["h.0.mlp.c_fc"]
        bad.weights["h.0.mlp.c_fc"] = (A, B[:, :1])
        server.register(bad)
    with pytest.raises(ValueError, match="expected A"):
        other = random_adapter(tiny_gpt(0, tiny_config(n_embd=32)), "other", 2)  # made for another width
        server.register(other)
    with pytest.raises(ValueError, match="unknown path"):
        LoRAServer(model, 10, path="cuda")
    with pytest.raises(ValueError, match="unknown target"):
        random_adapter(model, "x", 2, targets=("wte",))
    wrapped = copy.deepcopy(model)
    apply_lora(wrapped, r=2)
    with pytest.raises(TypeError, match="plain base GPT"):
        served_layers(wrapped)
    with pytest.raises(ValueError, match="no LoRALinear"):
        adapter_from_lora(model, "plain")
    with pytest.raises(TypeError, match="HostAdapter"):
        server.register({"name": "dict"})
    assert isinstance(server.store.host["r1"], HostAdapter)


def test_request_bigger_than_the_pool_is_refused():
    model, server = make_server(pool_pages=270)
    # r8 needs 16 * 8 * 2 = 256 pages, and 2 * 2 * (2 + 4 - 1) = 20 KV pages: 276 > 270
    with pytest.raises(ValueError, match="needs 276 pages"):
        server.serve([Request(0, [1, 2], "r8", max_new_tokens=4)])
