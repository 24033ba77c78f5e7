import pytest
import torch

from chapters.ch2_additive.ciat import (
    apply_ciat,
    count_ciat,
    measure_interference,
    remove_ciat,
    set_direction,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
L, d = CFG.n_layer, CFG.n_embd
TAGS = {"a": 96, "b": 97, "c": 98}  # stand-ins for <|lang_a|> ... in this tiny vocabulary


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def pair_batch(src: str, tgt: str, B: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """<src> 5 tokens <tgt> 5 tokens, with the loss on the target side."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 90, (B, 12), generator=g)
    x[:, 0], x[:, 6] = TAGS[src], TAGS[tgt]
    labels = x.clone()
    labels[:, :7] = -100
    return x, labels


def make(directions=("a_b", "a_c"), **kw) -> GPT:
    model = tiny()
    apply_ciat(model, directions, tag_ids=TAGS, **kw)
    return model


def visible(model: GPT) -> None:
    """Give the zero-initialised output projections random values, so every module acts."""
    with torch.no_grad():
        for n, p in model.ciat.named_parameters():
            if ".w2." in n or "lht" in n:
                p.normal_(0, 0.05)


def test_parameter_count_per_direction_matches_the_formula():
    model = make(("a_b",))
    assert count_trainable(model).trainable == d * d + 3.5 * d + 2 * L * (d * d + 1.5 * d) == count_ciat(CFG)
    model = make(("a_b", "a_c", "b_c"))
    assert count_trainable(model).trainable == 3 * count_ciat(CFG) == count_ciat(CFG, ("a_b", "a_c", "b_c"))
    assert count_trainable(make(("a_b",), lht=True)).trainable == count_ciat(CFG, lht=True) == count_ciat(CFG) + d * d
    assert count_trainable(make(("a_b",), bottleneck=8)).trainable == count_ciat(CFG, bottleneck=8) \
        == 2 * d + (2 * d * 8 + 8 + d) * (1 + 2 * L)
    # by hand for L = 4, d = 128 and L = 6, d = 256 (m = d/2): d^2 + 3.5 d + 2 L (d^2 + 1.5 d)
    wide, wider = GPTConfig(n_layer=4, n_embd=128), GPTConfig(n_layer=6, n_embd=256)
    assert count_ciat(wide) == 149_440 and count_ciat(wider) == 857_472


def test_zero_init_is_the_base_exactly_and_off_is_the_base():
    x = pair_batch("a", "b")[0]
    base = tiny()(x).logits
    model = make(lht=True)
    assert torch.equal(model(x).logits, base)
    visible(model)
    assert (model(x).logits - base).abs().max() > 1e-3
    set_direction(model, None)
    assert torch.equal(model(x).logits, base)
    xavier = make(init="xavier")
    assert (xavier(x).logits - base).abs().max() > 1e-3  # the released code's init does not start at the base
    remove_ciat(model)
    assert torch.equal(model(x).logits, base) and not hasattr(model, "ciat")


def test_routing_by_tags_selects_the_direction_and_only_it_gets_gradients():
    model = make(("a_b", "a_c", "b_c"), lht=True)
    visible(model)
    x, y = pair_batch("a", "c")
    model(x, labels=y).loss.backward()
    assert model.ciat.active == "a_c"
    for n, p in model.ciat.named_parameters():
        if n.startswith("directions.a_c."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    # the router picks the modules named by the tags: same logits as choosing that direction by hand
    manual = make(("a_b", "a_c", "b_c"), lht=True, auto_route=False)
    manual.ciat.load_state_dict(model.ciat.state_dict())
    for name in ("a_b", "a_c", "b_c"):
        xb = pair_batch(name[0], name[2])[0]
        set_direction(manual, name)
        assert torch.equal(model(xb).logits, manual(xb).logits) and model.ciat.active == name
    set_direction(manual, "a_b")
    other = manual(x).logits
    set_direction(manual, "a_c")
    assert (manual(x).logits - other).abs().max() > 1e-3  # the directions really are different modules


def test_adapters_run_in_parallel_on_the_sublayer_input():
    model = make(("a_b",))
    visible(model)
    seen = {}
    blk = model.h[1]
    blk.ln_1.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_1", o))
    blk.ln_2.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_2", o))
    model.ciat.directions["a_b"].attn[1].register_forward_hook(lambda m, a, o: seen.__setitem__("A_attn", a[0]))
    model.ciat.directions["a_b"].mlp[1].register_forward_hook(lambda m, a, o: seen.__setitem__("A_mlp", a[0]))
    x = pair_batch("a", "b")[0]
    out = model(x, output_hidden_states=True)
    assert torch.equal(seen["A_attn"], seen["ln_1"]) and torch.equal(seen["A_mlp"], seen["ln_2"])
    # the block equations, by hand
    mods, h = model.ciat.directions["a_b"], out.hidden_states[1]
    z = blk.ln_1(h)
    h1 = h + blk.attn.forward(z)[0] + mods.attn[1](z)  # .forward: without the CIAT hook
    z2 = blk.ln_2(h1)
    torch.testing.assert_close(out.hidden_states[2], h1 + blk.mlp.forward(z2) + mods.mlp[1](z2), rtol=0, atol=1e-5)
    # the embedding alignment acts on token + position embeddings, before the first block
    e = model.wte(x) + model.wpe(torch.arange(x.shape[1]))
    block0_in = {}
    model.h[0].register_forward_pre_hook(lambda m, a: block0_in.__setitem__("x", a[0]))  # runs after CIAT's
    model(x)
    torch.testing.assert_close(block0_in["x"], e + mods.ea(mods.ea_ln(e)), rtol=0, atol=1e-6)
    assert (block0_in["x"] - e).abs().max() > 1e-3


def test_training_one_direction_learns_and_leaves_everything_else_bit_identical():
    model = make(("a_b", "a_c"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = pair_batch("a", "b", B=8, seed=3)
    res = train(model, lambda g: (x, y), TrainConfig(steps=25, batch_size=8, lr=1e-2, warmup=0, progress=False,
                                                     log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.1
    for n, p in model.named_parameters():
        if n.startswith("ciat.directions.a_b."):
            continue
        assert torch.equal(p, before[n]), n  # backbone and the other direction untouched


def test_measure_interference_mechanics():
    train_fns = {"a_b": lambda g: pair_batch("a", "b", seed=3), "a_c": lambda g: pair_batch("a", "c", seed=4)}
    evals = {"a_b": [pair_batch("a", "b", seed=3)], "a_c": [pair_batch("a", "c", seed=4)]}
    base = tiny()
    snapshot = {n: p.detach().clone() for n, p in base.named_parameters()}
    out = measure_interference(base, train_fns, evals,
                               TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup=0, progress=False, log_every=0))
    assert set(out) == {"base", "shared", "separate"} and all(set(v) == {"a_b", "a_c"} for v in out.values())
    assert all(out[k][n] < out["base"][n] for k in ("shared", "separate") for n in ("a_b", "a_c"))
    assert all(torch.equal(p, snapshot[n]) for n, p in base.named_parameters()) and not hasattr(base, "ciat")
    with pytest.raises(ValueError, match="same directions"):
        measure_interference(base, train_fns, {"a_b": evals["a_b"]}, TrainConfig(steps=1, warmup=0))


def test_errors(refuses):
    with pytest.raises(ValueError, match="mixes"):
        model = make()
        x = torch.cat([pair_batch("a", "b")[0][:2], pair_batch("a", "c")[0][:2]])
        model(x)
    with pytest.raises(ValueError, match="no CIAT modules for direction 'b_c'"):
        make()(pair_batch("b", "c")[0])
    with pytest.raises(ValueError, match="no CIAT modules for direction"):
        set_direction(make(), "c_a")
    model = make()
    refuses(model, lambda m: apply_ciat(m, ("a_b",), tag_ids=TAGS), "already has CIAT")
    refuses(tiny(), lambda m: apply_ciat(m, ("a_b", "a_b"), tag_ids=TAGS), "distinct")
    refuses(tiny(), lambda m: apply_ciat(m, bottleneck=0, tag_ids=TAGS), "bottleneck")
    refuses(tiny(), lambda m: apply_ciat(m, init="glorot", tag_ids=TAGS), "unknown CIAT init")
    refuses(tiny(), lambda m: apply_ciat(m, tag_ids={"a": 500, "b": 501}), "outside the model's vocabulary")
    with pytest.raises(ValueError, match="no CIAT modules; call apply_ciat"):
        set_direction(tiny(), "a_b")
    refuses(torch.nn.Linear(2, 2), apply_ciat, "GPT", TypeError)


def test_dtype_follows_the_model():
    model = tiny().to(torch.bfloat16)
    apply_ciat(model, ("a_b",), tag_ids=TAGS)
    visible(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x, labels = pair_batch("a", "b")
    model(x, labels=labels).loss.backward()


def test_linear_hidden_transformation_acts_on_the_last_block_output_only():
    model = make(("a_b",), lht=True)
    visible(model)
    lht = model.ciat.directions["a_b"].lht
    x = pair_batch("a", "b")[0]
    with torch.no_grad():
        with_lht = model(x, output_hidden_states=True).hidden_states
        saved = [p.clone() for p in lht.parameters()]
        for p in lht.parameters():
            p.zero_()
        without = model(x, output_hidden_states=True).hidden_states
        for p, s in zip(lht.parameters(), saved):
            p.copy_(s)
        for i in range(L):  # the embeddings and every block but the last are untouched
            assert torch.equal(with_lht[i], without[i])
        torch.testing.assert_close(with_lht[L], without[L] + lht(without[L]), rtol=0, atol=1e-6)
        assert (with_lht[L] - without[L]).abs().max() > 1e-3
