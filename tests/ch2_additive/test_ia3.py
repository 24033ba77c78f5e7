import pytest
import torch
import torch.nn.functional as F

from chapters.ch2_additive.ia3 import IA3Linear, apply_ia3, count_ia3
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, merge_all, trainable_names, unload, unmerge_all

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
L, d = CFG.n_layer, CFG.n_embd


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model: GPT, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.scale.copy_(1 + 0.5 * torch.randn(m.scale.shape, generator=gen))


@pytest.mark.parametrize("attn", ["kv", "qkv"])
def test_trainable_count(attn: str):
    model = tiny()
    apply_ia3(model, attn=attn)
    per_layer = (2 * d if attn == "kv" else 3 * d) + 4 * d
    assert count_trainable(model).trainable == L * per_layer == count_ia3(CFG, attn)
    assert sorted({n.split(".", 2)[2] for n in trainable_names(model)}) == ["attn.c_attn.scale", "mlp.c_proj.scale"]


def test_mechanism_scales_k_v_and_the_mlp_hidden():
    model = tiny()
    apply_ia3(model, attn="kv")
    perturb(model)
    c_attn, c_proj = model.h[0].attn.c_attn, model.h[0].mlp.c_proj
    h = torch.randn(3, d)
    q, k, v = c_attn.base(h).split(d, dim=-1)
    lk, lv = c_attn.scale[:d], c_attn.scale[d:]
    torch.testing.assert_close(c_attn(h), torch.cat([q, lk * k, lv * v], dim=-1))  # queries untouched
    g = F.gelu(torch.randn(3, 4 * d), approximate="tanh")
    torch.testing.assert_close(c_proj(g), c_proj.base(c_proj.scale * g))


@pytest.mark.parametrize("attn", ["kv", "qkv"])
def test_merge_unmerge_and_unload(attn: str):
    model, x = tiny(), ids()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_ia3(model, attn=attn)
    perturb(model)
    want = model(x).logits
    assert (want - tiny()(x).logits).abs().max() > 1e-3
    assert merge_all(model) == 2 * L
    torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)
    if attn == "kv":  # the query rows of c_attn are untouched by the merge
        w = model.h[0].attn.c_attn.base.weight
        assert torch.equal(w[:d], originals["h.0.attn.c_attn.weight"][:d])
    with pytest.raises(ValueError, match="already merged"):
        model.h[0].attn.c_attn.merge()
    unmerge_all(model)
    for n, p in model.named_parameters():
        if not n.endswith(".scale"):
            torch.testing.assert_close(p, originals[n.replace(".base.", ".")], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not merged"):
        model.h[0].attn.c_attn.unmerge()
    unload(model)  # merge for good: a plain GPT again
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)


def test_vectors_take_the_weight_dtype_and_unmerge_is_exact_in_float64():
    model, x = tiny().double(), ids()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_ia3(model, attn="qkv")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    perturb(model)
    want = model(x).logits
    merge_all(model)
    torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-12)
    unmerge_all(model)  # W * l / l: one rounding each way in float64 (float32 vectors left errors near 1e-8)
    for n, p in model.named_parameters():
        if not n.endswith(".scale"):
            torch.testing.assert_close(p, originals[n.replace(".base.", ".")], rtol=1e-15, atol=0)
    bf16 = tiny().to(torch.bfloat16)
    apply_ia3(bf16)
    assert bf16.h[0].attn.c_attn.scale.dtype == torch.bfloat16


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_ia3(m, attn="q"), "attn must be")
    with pytest.raises(ValueError, match="attn must be"):
        count_ia3(CFG, "v")
    refuses(torch.nn.Linear(2, 2), apply_ia3, "unknown target module 'attn.c_attn'")
    model = tiny()
    apply_ia3(model)
    refuses(model, apply_ia3, "already has")
    missing = tiny()
    for block in missing.h:  # the second target is missing: the first may not be wrapped either
        block.mlp.c_proj = torch.nn.Identity()
    refuses(missing, apply_ia3, "unknown target module 'mlp.c_proj'")
    with pytest.raises(ValueError, match="mode"):
        IA3Linear(torch.nn.Linear(4, 4), mode="both")
    with pytest.raises(ValueError, match="fixed"):
        IA3Linear(torch.nn.Linear(4, 4), mode="output", fixed=4)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        IA3Linear(torch.nn.Conv1d(4, 4, 1))
    layer = model.h[0].mlp.c_proj
    with torch.no_grad():
        layer.scale[3] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="scale entry is 0"):
        layer.unmerge()
