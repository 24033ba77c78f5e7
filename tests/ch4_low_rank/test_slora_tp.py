"""S-LoRA tensor parallelism, emulated: sharded = unsharded, and the LoRA branch only communicates width r.

References are built without slora_tp.py: a float64 loop over tokens for one layer, and for a sublayer or
the whole GPT the unsharded model with the adapter merged (lora.py's LoRALinear, then peft's unload).
"""

import copy

import pytest
import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from chapters.ch4_low_rank.slora import random_adapter
from chapters.ch4_low_rank.slora_pool import HostAdapter
from chapters.ch4_low_rank.slora_tp import (
    Collective,
    ShardedBlock,
    ShardedGPT,
    all_gather,
    all_reduce,
    column_parallel,
    head_parts,
    ring_volume,
    row_parallel,
    shard_linear,
    shard_lora,
)
from tests.ch4_low_rank.slora_setup import merged_copy
from tests.helpers import tiny_config, tiny_gpt

D = 64  # tiny GPT width (4 heads)




def layer_setup(n_in=24, n_out=32, ranks=(3, 1, 5), N=19, seed=0):
    """A linear layer, LoRAs of mixed ranks, tokens with mixed slots, and the float64 per-token reference."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    loras = [(torch.randn(r, n_in, generator=g) / n_in**0.5, torch.randn(n_out, r, generator=g), 0.5 + s)
             for s, r in enumerate(ranks)]
    x = torch.randn(N, n_in, generator=g)
    slot = torch.randint(-1, len(ranks) + 1, (N,), generator=g)  # slot len(ranks): no LoRA on this layer
    slot[:len(ranks) + 2] = torch.arange(-1, len(ranks) + 1)  # every kind of token present
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    for i, s in enumerate(slot.tolist()):
        if 0 <= s < len(ranks):
            A, B, scale = loras[s]
            ref[i] += scale * (x[i].double() @ A.double().T) @ B.double().T
    return lin, loras, x, slot, ref


def sharded_loras(loras, layer):
    return [shard_lora(A, B, s, layer) for A, B, s in loras] + [None]  # the last slot adapts another layer


def lora_log(log):
    return [c for c in log if c.what == "lora"]


# ------------------------------------------------------------------------------------------ collectives


def test_collectives_compute_and_record_what_they_send():
    log = []
    parts = [torch.ones(3, 2), 2 * torch.ones(3, 1)]
    assert torch.equal(all_gather(parts, log, "lora", "L"), torch.tensor([[1.0, 1, 2]] * 3))
    assert torch.equal(all_reduce([torch.ones(3, 2), 2 * torch.ones(3, 2)], log, "base", "L"), 3 * torch.ones(3, 2))
    assert log == [Collective("all_gather", "lora", "L", [(3, 2), (3, 1)]),
                   Collective("all_reduce", "base", "L", [(3, 2), (3, 2)])]
    assert [c.numel for c in log] == [9, 6]
    # ring: all-gather sends (n-1)/n of the 9 numbers, all-reduce 2 (n-1)/n of the 6 (n = 2)
    assert ring_volume(log) == 4.5 + 6.0 and ring_volume(log, "lora") == 4.5 and ring_volume(log, "base") == 6.0
    with pytest.raises(ValueError, match="equal leading shapes"):
        all_gather([torch.ones(3, 2), torch.ones(4, 2)], log, "lora", "L")
    with pytest.raises(ValueError, match="one shape on every shard"):
        all_reduce([torch.ones(3, 2), torch.ones(3, 1)], log, "lora", "L")
    assert len(log) == 2  # a refused collective records nothing


# ------------------------------------------------------------------------------------------ one linear layer


@pytest.mark.parametrize("n", [2, 4])
def test_column_parallel_layer_equals_unsharded(n):
    lin, loras, x, slot, ref = layer_setup()
    layer = shard_linear(lin, "column", n)
    log = []
    ys = column_parallel(x, layer, sharded_loras(loras, layer), slot, log, "L")
    assert [tuple(y.shape) for y in ys] == [(len(x), 32 // n)] * n  # the output stays split by features
    torch.testing.assert_close(torch.cat(ys, 1).double(), ref, atol=1e-5, rtol=0)
    # only the LoRA intermediates travel: one all-gather per adapter group, width = that adapter's rank
    assert all(c.op == "all_gather" and c.what == "lora" for c in log) and len(log) == 3
    for s, c in enumerate(log):  # the groups in slot order
        r, n_s = loras[s][0].shape[0], int((slot == s).sum())
        assert len(c.shapes) == n and {shape[0] for shape in c.shapes} == {n_s}
        widths = [s[1] for s in c.shapes]
        assert sum(widths) == r and max(widths) - min(widths) <= 1  # the rank rows dealt evenly


@pytest.mark.parametrize("n", [2, 4])
def test_row_parallel_layer_equals_unsharded_with_one_fused_all_reduce(n):
    lin, loras, x, slot, ref = layer_setup()
    layer = shard_linear(lin, "row", n)
    xs = [x[:, p] for p in layer.parts]  # shard k holds its slice of the input
    log = []
    y = row_parallel(xs, layer, sharded_loras(loras, layer), slot, log, "L")
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    ranks = [A.shape[0] for A, _, _ in loras]
    counts = [int((slot == s).sum()) for s in range(len(loras))]
    assert [(c.op, c.what) for c in log] == [("all_reduce", "lora")] * 3 + [("all_reduce", "base")]
    assert [c.shapes for c in log[:3]] == [[(k, r)] * n for k, r in zip(counts, ranks)]  # width r, not out
    assert log[3].shapes == [(len(x), 32)] * n
    base_log = []
    row_parallel(xs, layer, [], torch.full((len(x),), -1), base_log, "L")
    assert base_log == log[3:]  # the LoRA output adds no collective of its own: it rides the base's


def test_every_weight_lives_on_exactly_one_shard():
    lin, loras, *_ = layer_setup()
    for kind in ("column", "row"):
        layer = shard_linear(lin, kind, 4)
        lo = shard_lora(*loras[2], layer)  # rank 5 over 4 shards
        if kind == "column":
            W = torch.zeros_like(lin.weight)
            for p, w in zip(layer.parts, layer.weight):
                W[p] += w
            assert torch.equal(torch.cat(lo.A), loras[2][0])  # A cut by rank rows
        else:
            W = torch.cat(layer.weight, 1)
            assert torch.equal(torch.cat(lo.A, 1), loras[2][0])  # A cut by input columns
        assert torch.equal(W, lin.weight) and sum(w.numel() for w in layer.weight) == lin.weight.numel()
        assert torch.equal(torch.cat(lo.B), loras[2][1])  # B cut by output rows, never replicated


# ------------------------------------------------------------------------------------------ sublayers, the GPT


def block_setup(seed=0):
    model = tiny_gpt(seed)
    adapters = [random_adapter(model, "a", 4, std=0.3, seed=1),
                random_adapter(model, "b", 2, targets=("mlp.c_fc", "attn.c_attn"), std=0.3, seed=2)]
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(seed))
    return model, adapters, x, torch.tensor([0, -1, 1])  # one adapter per sequence


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("sublayer", ["mlp", "attention"])
def test_sublayer_with_a_lora_on_each_matrix_equals_merged(n, sublayer):
    model, adapters, x, slot = block_setup()
    block = ShardedBlock(model.h[1], n, adapters, prefix="h.1")
    log = []
    out = getattr(block, sublayer)(x, slot, log)
    for b, s in enumerate(slot.tolist()):
        ref_block = merged_copy(model, adapters[s] if s >= 0 else None).h[1]
        ref = ref_block.mlp(x[b:b + 1]) if sublayer == "mlp" else ref_block.attn(x[b:b + 1])[0]
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=0)
        if s == 0:  # the adapter really changes the sublayer, so the equality is not vacuous
            base = model.h[1].mlp(x[b:b + 1]) if sublayer == "mlp" else model.h[1].attn(x[b:b + 1])[0]
            assert (out[b:b + 1] - base).abs().max() > 1e-2
    # one collective of width d (the base's all-reduce); every LoRA collective is as wide as a rank
    wide = [c for c in log if c.what == "base"]
    assert len(wide) == 1 and wide[0].op == "all_reduce" and wide[0].shapes == [(21, D)] * n
    assert all(c.shapes[0][-1] <= 4 for c in lora_log(log))


@pytest.mark.parametrize("n", [2, 4])
def test_mlp_lora_traffic_is_the_rank_wide_intermediates(n):
    model = tiny_gpt(0)
    r, N = 4, 2 * 5
    adapter = random_adapter(model, "a", r, targets=("mlp.c_fc", "mlp.c_proj"), seed=3)
    x = torch.randn(2, 5, D)
    log = []
    ShardedBlock(model.h[0], n, [adapter]).mlp(x, torch.tensor([0, 0]), log)
    assert [(c.op, c.what, c.layer, c.shapes) for c in log] == [
        ("all_gather", "lora", "h.0.mlp.c_fc", [(N, r // n)] * n),  # x A^T, cut by rank: gathered to [N, r]
        ("all_reduce", "lora", "h.0.mlp.c_proj", [(N, r)] * n),  # x_k A_k^T partial sums of [N, r]
        ("all_reduce", "base", "h.0.mlp.c_proj", [(N, D)] * n),  # the base's, carrying the LoRA output too
    ]
    # the paper's count: 3 (n-1)/n N r extra numbers per device, against 2 (n-1)/n N d for the base
    assert ring_volume(log, "lora") == pytest.approx(3 * (n - 1) / n * N * r)
    assert ring_volume(log, "base") == pytest.approx(2 * (n - 1) / n * N * D)
    base_log = []
    ShardedBlock(model.h[0], n, [adapter]).mlp(x, torch.tensor([-1, -1]), base_log)
    assert [(c.op, c.what) for c in base_log] == [("all_reduce", "base")]  # no adapter: Megatron's one


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_gpt_serves_mixed_adapters_like_each_merged(n):
    model = tiny_gpt(1)
    adapters = [random_adapter(model, f"r{r}", r, std=0.3, seed=r) for r in (1, 2, 8)]  # ranks below n too
    adapters.append(random_adapter(model, "qkv_only", 3, targets=("attn.c_attn",), std=0.3, seed=9))
    sharded = ShardedGPT(model, n, adapters)
    names = ["r8", None, "r1", "qkv_only", "r2", "r8"]
    idx = torch.randint(0, 101, (len(names), 9), generator=torch.Generator().manual_seed(0))
    log = []
    logits = sharded.forward(idx, names, log)
    for b, name in enumerate(names):
        ref_model = merged_copy(model, next((a for a in adapters if a.name == name), None))
        torch.testing.assert_close(logits[b], ref_model(idx[b:b + 1]).logits[0], atol=1e-5, rtol=0)
    # padding-free: the all-gathers of one column layer carry exactly sum over tokens of rank(a_i)
    rank = {a.name: a.rank for a in adapters}
    gathered = sum(c.numel for c in lora_log(log) if c.layer == "h.0.attn.c_attn")
    assert gathered == 9 * sum(rank[a] for a in names if a is not None)
    assert sum(c.what == "base" for c in log) == 2 * model.config.n_layer  # one all-reduce per sublayer


# ------------------------------------------------------------------------------------------ bad input


def test_shard_counts_that_do_not_divide_are_refused():
    model = tiny_gpt(0)  # 4 heads, width 64
    with pytest.raises(ValueError, match="do not divide n_head = 4"):
        ShardedGPT(model, 3)
    with pytest.raises(ValueError, match="do not divide n_head = 4"):
        ShardedBlock(model.h[0], 8)
    with pytest.raises(ValueError, match="do not divide n_head = 6"):
        head_parts(48, 6, 4)
    with pytest.raises(ValueError, match="do not divide out_features = 30"):
        shard_linear(nn.Linear(8, 30), "column", 4)
    with pytest.raises(ValueError, match="do not divide in_features = 30"):
        shard_linear(nn.Linear(30, 8), "row", 4)
    with pytest.raises(ValueError, match="do not divide out_features = 30"):
        shard_linear(nn.Linear(8, 30), "row", 4)  # the LoRA output of a row layer is cut by out columns
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="n_shards must be an int >= 1"):
            shard_linear(nn.Linear(8, 8), "column", bad)


def test_bad_input_is_refused():
    model, adapters, x, slot = block_setup()
    lin = nn.Linear(8, 16)
    layer = shard_linear(lin, "column", 2)
    with pytest.raises(ValueError, match=r"expected A \[r, 8\] and B \[16, r\]"):
        shard_lora(torch.randn(2, 8), torch.randn(16, 3), 1.0, layer)
    with pytest.raises(ValueError, match="kind must be"):
        shard_linear(lin, "diagonal", 2)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        shard_linear(LoRALinear(lin, r=2), "column", 2)
    with pytest.raises(ValueError, match="expected slot"):
        column_parallel(torch.randn(5, 8), layer, [None], torch.tensor([0, 1, 0, 0, 0]), [], "L")
    with pytest.raises(ValueError, match="column_parallel needs a column layer"):
        column_parallel(torch.randn(5, 7), layer, [], torch.full((5,), -1), [], "L")
    with pytest.raises(ValueError, match="row_parallel needs a row layer"):
        row_parallel([torch.randn(5, 8)], layer, [], torch.full((5,), -1), [], "L")
    sharded = ShardedGPT(model, 2, adapters)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        sharded.forward(torch.zeros(1, 3, dtype=torch.long), ["c"])
    with pytest.raises(ValueError, match=r"expected idx \[B, T\]"):
        sharded.forward(torch.zeros(2, 3, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="names must be unique"):
        ShardedGPT(model, 2, [adapters[0], adapters[0]])
    with pytest.raises(TypeError, match="HostAdapter"):
        ShardedGPT(model, 2, [{"name": "x"}])
    stray = HostAdapter("stray", 2, 1.0, {"h.5.mlp.c_fc": adapters[0].weights["h.0.mlp.c_fc"]})
    with pytest.raises(ValueError, match="not among the sharded layers"):
        ShardedGPT(model, 2, [stray])
    wrapped = copy.deepcopy(model)
    apply_lora(wrapped, r=2)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        ShardedGPT(wrapped, 2)
    other = tiny_gpt(0, tiny_config(n_embd=32))
    with pytest.raises(ValueError, match=r"expected A \[r, 32\]"):
        ShardedGPT(other, 2, adapters[:1])  # an adapter made for another width
