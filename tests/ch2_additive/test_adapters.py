import pytest
import torch
import torch.nn.functional as F

from chapters.ch2_additive.adapters import (
    Adapter,
    apply_adapters,
    apply_houlsby,
    apply_pfeiffer,
    n_adapter_params,
    remove_adapters,
)
from minimal.peft import count_trainable, load_adapter, save_adapter, trainable_names
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
L, d, m = CFG.n_layer, CFG.n_embd, 8


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return token_batch(seed, B, T)


def test_trainable_counts_match_the_formulas():
    ln = 4 * L * d + 2 * d
    model = tiny_gpt()
    apply_houlsby(model, bottleneck=m)
    assert count_trainable(model).trainable == 2 * L * (2 * m * d + m + d) + ln == n_adapter_params(L, d, m) + ln
    assert {n.split(".")[-2] for n in trainable_names(model)} == {"down", "up", "ln_1", "ln_2", "ln_f"}
    model = tiny_gpt()
    apply_houlsby(model, bottleneck=m, train_layernorm=False)
    assert count_trainable(model).trainable == 2 * L * (2 * m * d + m + d)
    model = tiny_gpt()
    apply_pfeiffer(model, bottleneck=m)
    assert count_trainable(model).trainable == L * (2 * m * d + m + d) == n_adapter_params(L, d, m, "pfeiffer")
    assert all(".mlp_out." in n for n in trainable_names(model))
    # the spec's TINY-S numbers
    assert n_adapter_params(4, 128, 8) == 17_472 and n_adapter_params(4, 128, 8, "pfeiffer") == 8_736


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_identity_at_init(placement: str):
    base, x = tiny_gpt(), ids()
    model = tiny_gpt()
    apply_adapters(model, m, placement, init="zero")
    assert torch.equal(model(x).logits, base(x).logits)  # W_up = 0: exactly the base
    model = tiny_gpt()
    apply_adapters(model, m, placement, init="near_identity")
    diff = (model(x).logits - base(x).logits).abs().max()
    assert 0 < diff < 1e-2  # near-identity: moves, but barely
    w = model.h[0].mlp_out.up.weight
    assert w.abs().max() <= 2e-3 and w.std() > 1e-4


def test_placement_matches_the_block_equations():
    model = tiny_gpt()
    apply_houlsby(model, bottleneck=m)
    with torch.no_grad():  # make the adapters do something visible
        for n, p in model.named_parameters():
            if ".down." in n or ".up." in n:
                p.normal_(0, 0.3)
    x = ids()
    out = model(x, output_hidden_states=True)
    blk, h = model.h[0], out.hidden_states[0]

    def adapter(a: Adapter, v: torch.Tensor, act) -> torch.Tensor:
        return v + a.up(act(a.down(v)))

    gelu = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
    a, _ = blk.attn(blk.ln_1(h))
    h1 = h + adapter(blk.attn_out, a, gelu)
    f = blk.mlp(blk.ln_2(h1))
    h2 = h1 + adapter(blk.mlp_out, f, gelu)
    assert (adapter(blk.mlp_out, f, gelu) - f).abs().max() > 1e-2
    torch.testing.assert_close(out.hidden_states[1], h2, rtol=0, atol=1e-5)

    model = tiny_gpt()
    apply_pfeiffer(model, bottleneck=m)
    assert isinstance(model.h[0].attn_out, torch.nn.Identity) and isinstance(model.h[0].mlp_out, Adapter)
    assert isinstance(model.h[0].mlp_out.act, torch.nn.ReLU)


def test_frozen_backbone_bit_identical_layernorms_train_and_loss_goes_down():
    model = tiny_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_houlsby(model, bottleneck=m, init="zero")
    x = ids(B=4, T=10, seed=3)
    res = train(model, lambda gen: (x, x),
                TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup=0, progress=False, log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    params = dict(model.named_parameters())
    for n, p in frozen.items():
        if "ln_" in n:
            assert not torch.equal(params[n], p), n  # the LayerNorms trained
        else:
            assert torch.equal(params[n], p), n
            assert params[n].grad is None
    assert model.h[0].mlp_out.up.weight.abs().max() > 0  # the zero up-projection learned


def test_remove_restores_base_and_saved_sets_swap(tmp_path):
    base, x = tiny_gpt(), ids()
    model = tiny_gpt()
    apply_pfeiffer(model, bottleneck=m)
    sets = {}
    for task, seed in (("a", 5), ("b", 6)):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        sets[task] = model(x).logits.detach()
        save_adapter(model, tmp_path / task, {"method": "pfeiffer", "bottleneck": m})
    assert (sets["a"] - sets["b"]).abs().max() > 1e-3
    for task in ("a", "b", "a"):
        load_adapter(model, tmp_path / task)
        assert torch.equal(model(x).logits, sets[task])
    removed = remove_adapters(model)
    assert sorted(removed) == ["h.0.mlp_out", "h.1.mlp_out"]
    assert torch.equal(model(x).logits, base(x).logits)


def test_errors():
    for bad in (0, -1, d + 1, 2.5):
        with pytest.raises(ValueError, match="bottleneck"):
            apply_houlsby(tiny_gpt(), bottleneck=bad)
    with pytest.raises(ValueError, match="unknown adapter placement"):
        apply_adapters(tiny_gpt(), m, "parallel")
    with pytest.raises(ValueError, match="unknown adapter init"):
        apply_houlsby(tiny_gpt(), m, init="bert")
    with pytest.raises(ValueError, match="unknown activation"):
        apply_adapters(tiny_gpt(), m, activation="swish")
    with pytest.raises(TypeError, match="GPT"):
        apply_houlsby(torch.nn.Linear(2, 2))
    model = tiny_gpt()
    apply_pfeiffer(model, m)
    with pytest.raises(ValueError, match="already holds Adapter"):
        apply_houlsby(model, m)
    with pytest.raises(ValueError, match="no adapters"):
        remove_adapters(tiny_gpt())
    with pytest.raises(ValueError, match="unknown adapter placement"):
        n_adapter_params(L, d, m, "both")
