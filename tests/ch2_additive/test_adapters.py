import pytest
import torch
import torch.nn.functional as F

from chapters.ch2_additive.adapters import (
    Adapter,
    apply_adapters,
    apply_houlsby,
    apply_pfeiffer,
    count_adapters,
    count_houlsby,
    count_pfeiffer,
    remove_adapters,
)
from chapters.ch2_additive.ia3 import apply_ia3, count_ia3
from minimal.peft import count_trainable, load_adapter, save_adapter, trainable_names
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
L, d, m = CFG.n_layer, CFG.n_embd, 8


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return token_batch(seed, B, T)


def test_trainable_counts_match_the_formulas():
    ln = 4 * L * d + 2 * d
    model = tiny_gpt()
    apply_houlsby(model, bottleneck=m)
    assert count_trainable(model).trainable == 2 * L * (2 * m * d + m + d) + ln == count_houlsby(CFG, m)
    assert {n.split(".")[-2] for n in trainable_names(model)} == {"down", "up", "ln_1", "ln_2", "ln_f"}
    model = tiny_gpt()
    apply_houlsby(model, bottleneck=m, train_layernorm=False)
    assert count_trainable(model).trainable == 2 * L * (2 * m * d + m + d) == count_houlsby(CFG, m, False)
    model = tiny_gpt()
    apply_pfeiffer(model, bottleneck=m)
    assert count_trainable(model).trainable == L * (2 * m * d + m + d) == count_pfeiffer(CFG, m)
    assert all(".mlp_out." in n for n in trainable_names(model))
    # L = 4, d = 128, m = 8 by hand: 2 * 4 * (2048 + 8 + 128) and half of it
    wide = tiny_config(n_layer=4, n_embd=128)
    assert count_houlsby(wide, 8, False) == 17_472 and count_pfeiffer(wide, 8) == 8_736
    nobias = tiny_config(bias=False)  # LayerNorms without beta: d per LayerNorm
    model = tiny_gpt(config=nobias)
    apply_houlsby(model, bottleneck=m)
    assert count_trainable(model).trainable == count_houlsby(nobias, m) == 2 * L * (2 * m * d + m + d) + (2 * L + 1) * d


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


def test_errors(refuses):
    for bad in (0, -1, d + 1, 2.5, True):
        refuses(tiny_gpt(), lambda model, bad=bad: apply_houlsby(model, bottleneck=bad), "bottleneck")
    refuses(tiny_gpt(), lambda model: apply_adapters(model, m, "parallel"), "unknown adapter placement")
    refuses(tiny_gpt(), lambda model: apply_houlsby(model, m, init="bert"), "unknown adapter init")
    refuses(tiny_gpt(), lambda model: apply_adapters(model, m, activation="swish"), "unknown activation")
    refuses(torch.nn.Linear(2, 2), apply_houlsby, "GPT", TypeError)
    model = tiny_gpt()
    apply_pfeiffer(model, m)
    refuses(model, lambda model: apply_houlsby(model, m), "already holds Adapter")
    with pytest.raises(ValueError, match="no adapters"):
        remove_adapters(tiny_gpt())
    with pytest.raises(ValueError, match="unknown adapter placement"):
        count_adapters(CFG, m, "both")


def test_dtype_follows_the_model_and_a_stacked_method_keeps_its_trainables():
    model = tiny_gpt().to(torch.bfloat16)
    apply_houlsby(model, bottleneck=m)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = tiny_gpt()
    apply_ia3(model)  # a first method: its vectors keep training under the adapters
    apply_pfeiffer(model, bottleneck=m)
    assert "h.0.mlp.c_proj.scale" in trainable_names(model)
    assert count_trainable(model).trainable == count_pfeiffer(CFG, m) + count_ia3(CFG)
