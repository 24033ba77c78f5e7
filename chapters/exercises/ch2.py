"""Checkers for chapter 2's exercises in `ch2_additive.ipynb` (counts, the prefix layout, (IA)^3 merge, proxy-tuning).

The experiments notebook's checkers are in `ch2_experiments.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, run, tiny_gpt

# (n_layer, n_embd, n_head) of the small random GPTs the checkers build
SHAPES = ((2, 16, 2), (3, 24, 4), (1, 8, 1))


def as_tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise Mismatch(f"{what} should be a tensor, got {type(x).__name__}")
    return x.detach()


# ----------------------------------------------------------------------------------- parameter counts

COUNT_KEYS = {
    "prompt": "prompt tuning, P = 20 vectors",
    "prefix": "prefix tuning while training, P = 10 with the MLP (mid = d)",
    "prefix_stored": "prefix tuning after consolidate_prefix (the stored table)",
    "houlsby": "Houlsby adapters m = 8, LayerNorms included",
}
COUNT_HINTS = {
    "prompt": "one d-vector per virtual token",
    "prefix": "E [P, d], then Linear(d, mid) and Linear(mid, 2Ld), biases included",
    "prefix_stored": "a key and a value of width d per layer and per virtual token",
    "houlsby": "two adapters per block (down and up with biases), plus gamma and beta of ln_1, ln_2 and ln_f",
}


def library_counts() -> dict[str, int]:
    """What the library's methods train on the shipped `small` model, counted from the tensors."""
    from chapters.ch2_additive import adapters, prefix_tuning, prompt_tuning
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    out = {}
    m = load_base("small")
    prompt_tuning.apply_prompt_tuning(m, n_tokens=20, init="vocab", seed=0)
    out["prompt"] = count_trainable(m).trainable
    m = load_base("small")
    prefix_tuning.apply_prefix_tuning(m, n_tokens=10, projection=True, seed=0)
    out["prefix"] = count_trainable(m).trainable
    prefix_tuning.consolidate_prefix(m)
    out["prefix_stored"] = count_trainable(m).trainable
    m = load_base("small")
    adapters.apply_houlsby(m, bottleneck=8)
    out["houlsby"] = count_trainable(m).trainable
    return out


@checker("ch2.count_small")
def check_count_small(answer: Any) -> None:
    """A dict of predicted trainable counts on `small` (L = 2, d = 64), keys as in COUNT_KEYS."""
    if answer is None or (isinstance(answer, dict) and any(v is None or v is ... for v in answer.values())):
        raise NotImplementedError
    if not isinstance(answer, dict) or set(answer) != set(COUNT_KEYS):
        raise Mismatch(f"the answer should be a dict with the keys {sorted(COUNT_KEYS)}")
    for key, v in answer.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise Mismatch(f"{key!r} should be an int (a number of parameters), got {v!r}")
    want = library_counts()
    wrong = [k for k in COUNT_KEYS if answer[k] != want[k]]
    if wrong:
        k = wrong[0]
        raise Mismatch(f"{COUNT_KEYS[k]}: you predicted {answer[k]:,}, the model trains {want[k]:,} "
                       f"(count {COUNT_HINTS[k]})" + (f"; also wrong: {wrong[1:]}" if len(wrong) > 1 else ""))


# ----------------------------------------------------------------------------------- prefix layout


@checker("ch2.prefix_flat")
def check_prefix_flat(prefix_flat: Callable[[list], torch.Tensor]) -> None:
    """prefix_flat(cache) -> [P, 2Ld]: per-layer (k, v) [1, H, P, hd] in prefix_tuning.py's flat layout."""
    from chapters.ch2_additive.prefix_tuning import PrefixEncoder, prefix_from_tokens
    from minimal.gpt import GPT

    for i, shape in enumerate(SHAPES):
        L, d, H = shape
        model = tiny_gpt(shape, seed=i)
        for P in (1, 5):
            ids = torch.randint(0, 40, (P,), generator=torch.Generator().manual_seed(10 * i + P))
            with torch.no_grad():
                cache = GPT.forward(model, ids.unsqueeze(0)).cache
            where = f"L={L}, H={H}, d={d}, P={P}"
            got = as_tensor(run(prefix_flat, [(k.clone(), v.clone()) for k, v in cache],
                                what=f"prefix_flat(cache) ({where})"), "prefix_flat(cache)")
            want = prefix_from_tokens(model, ids)  # [P, 2Ld]
            if got.shape != want.shape:
                raise Mismatch(f"{where}: shape {tuple(got.shape)}, expected [P, 2Ld] = {tuple(want.shape)}")
            if not torch.allclose(got, want, atol=1e-6):
                enc = PrefixEncoder(P, L, H, d, projection=False)
                with torch.no_grad():
                    enc.prefix.copy_(got)
                back = enc.kv()  # what the library reads out of your table
                for layer, ((k, v), (bk, bv)) in enumerate(zip(cache, back, strict=True)):
                    for name, a, b in (("key", k, bk), ("value", v, bv)):
                        if not torch.allclose(a, b, atol=1e-6):
                            raise Mismatch(f"{where}: PrefixEncoder.kv() reads your table back, and layer "
                                           f"{layer}'s {name} comes out wrong (a row is one virtual token: "
                                           "layer by layer, key then value, head by head)")
                close(got, want, f"{where}: the flat prefix")


# ----------------------------------------------------------------------------------- (IA)^3 merge


@checker("ch2.ia3_merge")
def check_ia3_merge(ia3_merge: Callable[..., tuple]) -> None:
    """ia3_merge(weight, bias, vec, mode) -> (weight', bias'): the layer that computes IA3Linear's output."""
    from chapters.ch2_additive.ia3 import IA3Linear

    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((6, 4), (5, 9), (8, 8)):
        for mode in ("output", "input"):
            for bias in (True, False):
                lin = torch.nn.Linear(in_f, out_f, bias=bias)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
                    if bias:
                        lin.bias.copy_(torch.randn(out_f, generator=g))
                lib = IA3Linear(torch.nn.Linear(in_f, out_f, bias=bias), mode)
                lib.base.load_state_dict(lin.state_dict())
                with torch.no_grad():
                    lib.scale.copy_(0.5 + torch.rand(lib.scale.shape, generator=g))  # entries in [0.5, 1.5)
                vec = lib.scale.detach().clone()
                x = torch.randn(3, in_f, generator=g)
                with torch.no_grad():
                    y = lib(x)  # the unmerged forward
                    lib.merge()
                where = f"mode={mode!r}, Linear({in_f}, {out_f}, bias={bias})"
                got = run(ia3_merge, lin.weight.detach().clone(), lin.bias.detach().clone() if bias else None,
                          vec.clone(), mode, what=f"ia3_merge(weight, bias, vec, {mode!r}) ({where})")
                if not isinstance(got, tuple) or len(got) != 2:
                    raise Mismatch(f"{where}: return the pair (weight, bias), got {type(got).__name__}")
                w, b = got
                close(as_tensor(w, "weight"), lib.base.weight.detach(), f"{where}: merged weight")
                if bias:
                    close(as_tensor(b, "bias"), lib.base.bias.detach(), f"{where}: merged bias")
                elif b is not None:
                    raise Mismatch(f"{where}: the layer has no bias, so the merged bias should be None")
                close(torch.nn.functional.linear(x, w, b), y, f"{where}: output of the merged layer")


# ----------------------------------------------------------------------------------- proxy-tuning


@checker("ch2.proxy_combine")
def check_proxy_combine(proxy_combine: Callable[..., torch.Tensor]) -> None:
    """proxy_combine(s_base, s_expert, s_anti, alpha) -> z: ProxyTuned.combine on the same logits."""
    from chapters.ch2_additive.proxy_tuning import ProxyTuned

    g = torch.Generator().manual_seed(0)
    for shape in ((7,), (2, 3, 11), (4, 5)):
        for alpha in (1.0, 0.5, 2.0):
            # each model's logits carry its own offset, as real models' do (log_softmax removes it)
            s = [torch.randn(shape, generator=g) * 2 + off for off in (3.0, -1.0, 5.0)]
            want = ProxyTuned.combine(SimpleNamespace(vocab_size=shape[-1], alpha=alpha), *s)
            got = as_tensor(run(proxy_combine, *(t.clone() for t in s), alpha,
                                what=f"proxy_combine(..., alpha={alpha})"), "z")
            close(got, want, f"logits of shape {shape}, alpha={alpha}: z")
