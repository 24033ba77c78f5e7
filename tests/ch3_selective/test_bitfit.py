import pytest
import torch

from chapters.ch3_selective.bitfit import apply_bitfit, bias_snapshot, count_bitfit, relative_bias_change
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, trainable_names
from minimal.train import TrainConfig, train
from tests.helpers import masked_batch, tiny_config, tiny_gpt

CFG = tiny_config()
TINY_S = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)


def tiny(cfg: GPTConfig = CFG) -> GPT:
    return tiny_gpt(0, cfg, eval_mode=False)


def effective_state(model):
    """Every weight and bias as the model uses it (a parametrised tensor is read through its module)."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)):
            out[f"{mname}.weight"] = m.weight.detach().clone()
            if getattr(m, "bias", None) is not None:
                out[f"{mname}.bias"] = m.bias.detach().clone()
    return out


def run(model, steps=8):
    idx, labels = masked_batch()
    return train(model, lambda gen: (idx, labels), TrainConfig(steps=steps, lr=3e-2, warmup=0, log_every=0))


@pytest.mark.parametrize("variant,expected", [("all", 5_760), ("subset", 2_560)])
def test_counts_match_the_formula_and_a_hand_count(variant, expected):
    model = tiny(TINY_S)  # L = 4, d = 128: 4 * 11 * 128 + 128 and 4 * 5 * 128
    apply_bitfit(model, variant)
    assert count_trainable(model).trainable == count_bitfit(TINY_S, variant) == expected


def test_all_biases_train():  # that nothing else moves is tests/test_contract.py's frozen-entries check
    model = tiny()
    L, d = CFG.n_layer, CFG.n_embd
    before = effective_state(model)
    apply_bitfit(model, "all")
    names = trainable_names(model)
    assert names == [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert "ln_f.bias" in names and "h.0.ln_1.bias" in names  # LayerNorm beta counts as a bias
    assert count_trainable(model).trainable == L * 11 * d + d
    res = run(model)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    after = effective_state(model)
    assert all(not torch.equal(t, before[n]) for n, t in after.items() if n.endswith(".bias"))


def test_subset_trains_query_and_mlp_biases_only():
    model = tiny()
    L, d = CFG.n_layer, CFG.n_embd
    before = effective_state(model)
    apply_bitfit(model, "subset")
    assert count_trainable(model).trainable == L * 5 * d
    run(model)
    after = effective_state(model)
    for n, t in after.items():
        if n.endswith("attn.c_attn.bias"):
            assert (t[:d] != before[n][:d]).all(), n  # b_q moved
            assert torch.equal(t[d:], before[n][d:]), n  # b_k, b_v bit-identical
        elif n.endswith("mlp.c_fc.bias"):
            assert not torch.equal(t, before[n]), n
        else:
            assert torch.equal(t, before[n]), n


def test_relative_bias_change_reports_the_trained_biases():
    model = tiny()
    apply_bitfit(model, "subset")
    snap = bias_snapshot(model)
    run(model, steps=3)
    change = relative_bias_change(model, snap)
    assert change["h.0.attn.c_attn.q"] > 0 and change["h.1.mlp.c_fc"] > 0
    assert change["h.0.attn.c_attn.k"] == 0 and change["h.0.attn.c_attn.v"] == 0 and change["ln_f"] == 0
    with pytest.raises(ValueError, match="other bias modules"):
        relative_bias_change(model, {"x": torch.zeros(3)})


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_bitfit(m, "some"), "unknown BitFit variant 'some'")
    nobias = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False))
    refuses(nobias, apply_bitfit, "bias=False")
    model = tiny()
    apply_bitfit(model, "subset")  # the query biases now carry sparse deltas: a second subset is refused
    refuses(model, lambda m: apply_bitfit(m, "subset"), "already adapts")
    with pytest.raises(ValueError, match="unknown BitFit variant"):
        count_bitfit(CFG, "some")


def test_stacked_on_another_method_keeps_its_trainables():
    model = tiny()
    apply_bitfit(model, "subset")
    apply_bitfit(model, "all")  # the second method adds the biases, the first one's deltas still train
    names = trainable_names(model)
    assert "h.0.attn.c_attn.parametrizations.bias.original" in names and "ln_f.bias" in names
