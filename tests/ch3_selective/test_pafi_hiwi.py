import pytest
import torch

from chapters.ch3_selective.pafi_hiwi import (
    WeightAdapter,
    apply_hiwi,
    apply_pafi,
    count_hiwi,
    count_pafi,
    hiwi_tensors,
    merge_hiwi,
    pafi_eligible,
    pafi_mask,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable
from minimal.sparse import delta_masks, mask_count, merge_sparse_deltas
from minimal.train import TrainConfig, train
from tests.helpers import effective_params, masked_batch, tiny_config, tiny_gpt

CFG = tiny_config(n_embd=32)
D, L = CFG.n_embd, CFG.n_layer


def tiny(seed=0) -> GPT:
    return tiny_gpt(seed, CFG, eval_mode=False)


def batch(seed=1):
    return masked_batch(seed, b=8, t=12, prompt=5)


def run(model, seed=1, steps=10, lr=1e-2):
    idx, labels = batch(seed)
    return train(model, lambda g: (idx, labels), TrainConfig(steps=steps, lr=lr, warmup=0, log_every=0))


def effective(model):
    return effective_params(model, tiny())


def assert_base_architecture(model):
    """Same module types in the same places, same parameter names and shapes, as a fresh GPT."""
    fresh = GPT(CFG)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    shapes = {n: p.shape for n, p in model.named_parameters()}  # (parametrize may re-register in another order)
    assert shapes == {n: p.shape for n, p in fresh.named_parameters()}
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in fresh.named_buffers()]
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


# ------------------------------------------------------------------------------------------ PaFi


def test_pafi_mask_is_the_bottom_k_by_magnitude():
    model = tiny()
    fraction = 0.01
    mask = pafi_mask(model, fraction)
    k = int(fraction * CFG.n_params())
    assert mask_count(mask) == k
    assert set(mask) == {f"h.{i}.{s}" for i in range(L) for s in
                         ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    params = dict(model.named_parameters())
    chosen = torch.cat([params[n].detach().abs()[m] for n, m in mask.items()])
    rest = torch.cat([params[n].detach().abs()[~m] for n, m in mask.items()])
    assert chosen.max() <= rest.min()
    every = torch.cat([params[n].detach().abs().reshape(-1) for n in mask])
    assert torch.equal(chosen.sort().values, every.sort().values[:k])  # brute force: the k smallest


def test_pafi_ties_go_to_the_lower_index_and_biases_are_optional():
    model = tiny()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in pafi_eligible(model, include_biases=True):
                p.fill_(1.0)  # every eligible magnitude ties
    k = int(0.01 * CFG.n_params())
    mask = pafi_mask(model, 0.01)
    first = pafi_eligible(model)[0]  # h.0.attn.c_attn.weight, the first eligible tensor in model order
    assert mask[first].reshape(-1)[:k].all() and mask_count(mask) == k
    with_biases = pafi_mask(model, 0.01, include_biases=True)
    assert "h.0.attn.c_attn.bias" in with_biases and "h.0.attn.c_attn.bias" not in mask


def test_pafi_one_mask_for_every_task_count_learns_and_keeps_the_rest_bitwise():
    theta0 = effective(tiny())
    a, b = tiny(), tiny()
    apply_pafi(a, 0.01)
    apply_pafi(b, 0.01)
    k = int(0.01 * CFG.n_params())
    assert count_trainable(a).trainable == k == count_pafi(CFG, 0.01)
    res = run(a, seed=1)
    run(b, seed=2)  # another "task"
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    ma, mb = delta_masks(a), delta_masks(b)
    assert set(ma) == set(mb) and all(torch.equal(ma[n], mb[n]) for n in ma)  # the same shared mask
    ea, eb = effective(a), effective(b)
    for n, t in ea.items():
        m = ma.get(n, torch.zeros_like(t, dtype=torch.bool))
        assert torch.equal(t[~m], theta0[n][~m]), n
    assert any(not torch.equal(ea[n][m], eb[n][m]) for n, m in ma.items())  # different values per task


def test_pafi_merges_to_the_base_architecture_with_equal_outputs():
    model = tiny()
    apply_pafi(model, 0.01)
    run(model, steps=5)
    idx, _ = batch()
    model.eval()
    before = model(idx).logits
    merge_sparse_deltas(model)
    plain = assert_base_architecture(model).eval()
    assert torch.allclose(model(idx).logits, before, atol=1e-6)
    assert torch.equal(plain(idx).logits, model(idx).logits)


def test_pafi_errors(refuses):
    model = tiny()
    refuses(model, lambda m: apply_pafi(m, 0.9), "eligible")
    refuses(model, lambda m: apply_pafi(m, 0.0), "fraction")
    apply_pafi(model, 0.01)
    refuses(model, lambda m: apply_pafi(m, 0.01), "already has sparse deltas")


# ------------------------------------------------------------------------------------------ HiWi


def test_hiwi_trains_only_its_adapters_and_counts_them():  # identity at init: tests/test_contract.py
    model = tiny()
    r = 4
    apply_hiwi(model, r=r)
    n = 4 * D  # mlp.c_fc.bias
    assert count_trainable(model).trainable == L * (2 * r * n + r + n) == count_hiwi(CFG, r)
    assert all(("adapter" in name or "parametrizations" in name) and "original" not in name
               for name, p in model.named_parameters() if p.requires_grad)


def test_hiwi_learns_through_the_adapter_and_base_tensors_stay_frozen():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_hiwi(model, r=4)
    res = run(model, steps=15, lr=5e-2)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    params = dict(model.named_parameters())
    for n, t in before.items():
        stored = n.replace("mlp.c_fc.bias", "mlp.c_fc.parametrizations.bias.original")
        assert torch.equal(params[stored], t), n  # every base tensor, the adapted bias included
    stored = hiwi_tensors(model)
    assert sorted(stored) == [f"h.{i}.mlp.c_fc.bias" for i in range(L)]
    assert sum(t.numel() for t in stored.values()) == L * 4 * D  # storage: the adapted bias, whatever r is
    assert not torch.equal(stored["h.0.mlp.c_fc.bias"], before["h.0.mlp.c_fc.bias"])


@pytest.mark.parametrize("tensors,axis", [(("mlp.c_fc.bias",), "row"), (("mlp.c_fc.weight", "mlp.c_proj.bias"), "row"),
                                          (("mlp.c_fc.weight",), "col"), (("mlp.c_proj.weight",), "row")])
def test_hiwi_merges_to_the_base_architecture_with_equal_outputs(tensors, axis):
    model = tiny()
    apply_hiwi(model, r=4, tensors=tensors, axis=axis)
    assert count_trainable(model).trainable == count_hiwi(CFG, 4, tensors, axis)
    run(model, steps=5)
    idx, _ = batch()
    model.eval()
    unmerged = model(idx).logits
    stored = hiwi_tensors(model)
    assert merge_hiwi(model) == L * len(tensors)
    plain = assert_base_architecture(model).eval()
    assert torch.equal(model(idx).logits, unmerged)
    assert torch.equal(plain(idx).logits, unmerged)  # a plain GPT with the stored tensors: no adapter needed
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in stored.items())
    assert count_trainable(model).trainable == 0


def test_weight_adapter_row_and_column_lengths():
    w = torch.randn(12, 5)
    row, col = WeightAdapter(w.shape, 3, "row"), WeightAdapter(w.shape, 3, "col")
    assert row.down.in_features == 5 and col.down.in_features == 12
    assert torch.equal(row(w), w) and torch.equal(col(w), w)  # zero-initialised up projection
    torch.nn.init.normal_(col.up.weight)
    expected = (w.T + col.up(torch.relu(col.down(w.T)))).T  # each column is one adapter input
    assert torch.allclose(col(w), expected)


def test_hiwi_errors(refuses):
    model = tiny()
    refuses(model, lambda m: apply_hiwi(m, r=0), "bottleneck r")
    refuses(model, lambda m: apply_hiwi(m, r=D + 1, tensors=("mlp.c_fc.weight",)), "bottleneck r")  # rows: length d
    refuses(model, lambda m: apply_hiwi(m, tensors=("attn.c_attn.bias",)), "unknown HiWi tensors")
    refuses(model, lambda m: apply_hiwi(m, tensors="mlp.c_fc.bias"), "tuple", TypeError)
    refuses(model, lambda m: apply_hiwi(m, tensors=("mlp.c_fc.weight",), axis="diag"), "axis")
    nobias = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=False))
    refuses(nobias, apply_hiwi, "without biases")
    apply_hiwi(model, r=4)
    refuses(model, lambda m: apply_hiwi(m, r=4), "already has HiWi")


def test_pafi_then_hiwi_stack_and_keep_the_first_trainables():
    model = tiny()
    apply_pafi(model, 0.01)
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    apply_hiwi(model, r=4)
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert first <= now and count_trainable(model).trainable == count_pafi(CFG, 0.01) + count_hiwi(CFG, 4)
