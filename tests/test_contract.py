"""The method contract, checked for every registered method (a test matrix in the style of Hugging Face peft's).

Each test is parametrised over chapters.registry.METHODS and runs on a tiny GPT with the shipped
tokenizer's vocabulary (so that methods that read data can be given the sentiment task):

- identity at init: the logits right after apply equal the base model's (float64, so rounding is ~1e-15);
  methods flagged `exact_at_init=False` in the registry are skipped, each for the reason in NOT_EXACT;
- frozen entries stay bit-identical through a few steps of the shared loop; for gradient-masking methods
  (hooks.n_trainable set) at most n_trainable entries move;
- Mergeable modules: merge_all keeps the logits, unmerge_all restores every base weight (float64);
- save_adapter / load_adapter into a freshly applied model gives the trained model's logits;
- count_<name>(config, **hyperparameters) equals the trainable count after apply;
- every method applies and runs forward + backward on a bfloat16 and on a float64 GPT;
- one bad argument per method: apply raises and the model is exactly unchanged;
- a second method stacked on LoRA either keeps LoRA training or raises ValueError without changes;
- the inject methods work on a plain nn.Module with GPT-like layer names, and refuse transformers'
  Conv1D with a TypeError that names the converter.

A method is called as the leaderboard calls it: method.apply(model), or method.apply(model, task) when
needs_task. Methods that read data get a cheaper setting here (FAST: fewer samples, none of them counted).
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters import leaderboard
from chapters.registry import METHODS, Method
from minimal.data import Task, get_task, task_batch
from minimal.gpt import GPT, GPTConfig
from minimal.hooks import Hooks
from minimal.peft import Mergeable, count_trainable, load_adapter, merge_all, save_adapter, unmerge_all
from minimal.train import TrainConfig, train
from tests.helpers import assert_model_unchanged, model_snapshot

CONFIG = dict(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=32)  # the shipped vocabulary
ALL = sorted(METHODS)
TRAINS = sorted(n for n, m in METHODS.items() if m.trains)

# Why a method's function changes at apply (registry: exact_at_init=False), one line each.
NOT_EXACT = {
    "prompt-tuning": "the soft prompt is prepended to every sequence: attention sees n_tokens more positions",
    "prefix-tuning": "every layer attends to n_tokens extra key/value slots from the first step on",
    "mam-adapter": "its prefix adds n_tokens key/value slots to attention (the parallel adapter starts at zero)",
    "learned-masks": "initial_sparsity=0.05: 5% of the weights start masked out (initial_sparsity=0 is exact)",
    "houlsby": "init='near_identity' (the official code): both projections ~1e-3, the output moves a little",
    "pfeiffer": "init='near_identity' (the official code): both projections ~1e-3, the output moves a little",
    "sparse-adapter": "near-identity adapters (SNIP scores a zero W_up as zero): the output moves a little",
    "qlora": "the frozen base is stored in NF4: W changes by its quantisation error",
}
# Cheaper data settings for the methods that read the task in apply; none of these enters a count formula.
FAST = {"n_samples": 16, "max_batches": 2, "n_batches": 2, "full_steps": 3}
# Gradient-masking methods whose mask is drawn again every step: the entries moved over several steps are
# the union of several masks, more than one mask's n_trainable.
REDRAWN_MASK = {"child-tuning-f": "a new Bernoulli mask every step"}
# Methods that fold their update into the frozen base weights during training (by design).
MERGES_INTO_BASE = {"chain-of-lora": "a knot folds each link into W0 (links spread over cfg.steps)"}


def base_weights(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".base.weight")]


# Trained state that is not in requires_grad parameters, saved with save_adapter(extra=names(model)).
EXTRA = {"chain-of-lora": base_weights}  # the knots' merged W0
# Methods documented not to save with save_adapter, with the reason.
NO_SAVE: dict[str, str] = {}
# Parameters that may stay float32 on a bfloat16 / float64 model (documented: cast in forward).
FLOAT32_OK = {"prompt-tuning": ("soft_prompt",), "prefix-tuning": ("prefix_encoder",), "mam-adapter": ("prefix",)}

# One bad argument per method (several where an argument is checked late, e.g. only on a later layer).
BAD = {
    "prompt-tuning": [dict(n_tokens=0), dict(n_tokens=64), dict(init="nope")],
    "prefix-tuning": [dict(n_tokens=0), dict(hidden=0)],
    "houlsby": [dict(bottleneck=0), dict(init="nope")],
    "pfeiffer": [dict(bottleneck=0)],
    "ia3": [dict(attn="nope")],
    "fish-mask": [dict(fraction=2.0)],
    "fish-random": [dict(fraction=2.0), dict(score="nope")],
    "sparse-adapter": [dict(bottleneck=0), dict(fraction=2.0)],
    "bitfit": [dict(variant="nope")],
    "bitfit-subset": [dict(variant="nope")],
    "freeze-top2": [dict(k=99)],
    "child-tuning-f": [dict(fraction=2.0)],
    "child-tuning-d": [dict(fraction=2.0)],
    "learned-masks": [dict(targets=("c_attn", "nope"))],
    "sam": [dict(fraction=2.0)],
    "pafi": [dict(fraction=2.0)],
    "hiwi": [dict(r=0), dict(tensors=("mlp.c_fc.bias", "nope"))],
    "lt-sft": [dict(fraction=2.0)],
    "fish-dip": [dict(fraction=2.0), dict(period=0)],
    "lora": [dict(r=0), dict(targets=("c_attn", "nope"))],
    "dora": [dict(r=0), dict(targets=("nope",))],
    "pissa": [dict(r=0), dict(r=10_000)],
    "milora": [dict(r=0), dict(r=10_000)],
    "krona": [dict(targets=("nope",)), dict(scale=float("nan"))],
    "kadaptation": [dict(n=0), dict(r=0)],
    "mora": [dict(r=0), dict(kind="nope")],
    "mora-rotation": [dict(r=0)],
    "melora": [dict(n=0), dict(n=3)],
    "lotr": [dict(r=0)],
    "mam-adapter": [dict(n_tokens=0), dict(bottleneck=0)],
    "scaled-pa": [dict(bottleneck=0)],
    "intrinsic-dim": [dict(d=0), dict(projection="nope")],
    "galore": [dict(r=0), dict(period=0)],
    "relora": [dict(r=0), dict(period=0)],
    "chain-of-lora": [dict(r=0), dict(links=0)],
    "lisa": [dict(n_active=99), dict(period=0)],
    "sltrain": [dict(r=0), dict(fraction=2.0)],
    "adalora": [dict(init_r=0), dict(period=0)],
    "sora": [dict(r=0)],
    "dyna-dora": [dict(r=0), dict(period=0)],
    "dylora": [dict(r=0)],
    "lora-plus": [dict(r=0), dict(ratio=0.0)],
    "vera": [dict(r=0), dict(targets=("c_attn", "nope"))],
    "loha": [dict(r=0)],
    "qlora": [dict(r=0), dict(targets=("nope",))],
}
BAD_CASES = [pytest.param(n, kw, id=f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}")
             for n, kws in BAD.items() if n in METHODS for kw in kws]


# ------------------------------------------------------------------------------------------ helpers


@functools.cache
def task() -> Task:
    return get_task("sentiment")


def gpt(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG)).to(dtype).eval()


def apply(method: Method, model: nn.Module, seed: int = 1, **override) -> Hooks:
    """Apply a registered method as the leaderboard does, after torch.manual_seed(seed); `override` replaces
    registry keywords (every name must be one that apply takes)."""
    fn = method.apply
    params = inspect.signature(fn).parameters
    unknown = [k for k in override if k not in params]
    assert not unknown, f"{method.name}: apply takes no argument {unknown} (registry keywords / renames?)"
    fast = {k: v for k, v in FAST.items() if k in params and method.needs_task}
    torch.manual_seed(seed)
    hooks = leaderboard.apply_method(replace(method, apply=functools.partial(fn, **fast, **override)), model, task())
    assert isinstance(hooks, Hooks), f"{method.name}: apply returned {type(hooks).__name__}, not a Hooks"
    return hooks


def sampler(method: Method):
    block = CONFIG["block_size"] - method.reserved_positions
    return lambda g: task_batch(task(), 4, block, g)


def run(model: nn.Module, method: Method, hooks: Hooks, steps: int = 3):
    cfg = TrainConfig(steps=steps, warmup=0, lr=method.lr, progress=False, log_every=0)
    return train(model, sampler(method), cfg, hooks=hooks)


IDX = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    return model(IDX).logits


def call_parts(method: Method) -> tuple[object, dict]:
    """(apply function, registry keywords) of a registered method."""
    fn = method.apply
    if isinstance(fn, functools.partial):
        return fn.func, dict(fn.keywords)
    return fn, {}


def count_formula(method: Method) -> tuple[object, dict]:
    """count_<name> from apply_<name>'s module, and the registry keywords its signature names."""
    func, keywords = call_parts(method)
    assert func.__name__.startswith("apply_"), f"{method.name}: registered {func.__name__}, not an apply_* function"
    module = sys.modules[func.__module__]
    name = "count_" + func.__name__.removeprefix("apply_")
    count = getattr(module, name, None)
    assert callable(count), f"{method.name}: {module.__name__} has no {name}(config, ...)"
    params = inspect.signature(count).parameters
    return count, {k: v for k, v in keywords.items() if k in params}


def floating_tensors(model: nn.Module):
    yield from ((n, p) for n, p in model.named_parameters() if p.is_floating_point())
    yield from ((n, b) for n, b in model.named_buffers() if b.is_floating_point())


# ------------------------------------------------------------------------------------------ the matrix


def test_every_flag_and_table_names_registered_methods():
    flagged = {n for n, m in METHODS.items() if not m.exact_at_init}
    assert flagged == set(NOT_EXACT), "registry exact_at_init=False and NOT_EXACT (the reasons) must agree"
    for table in (BAD, REDRAWN_MASK, MERGES_INTO_BASE, EXTRA, NO_SAVE, FLOAT32_OK):
        assert set(table) <= set(METHODS), sorted(set(table) - set(METHODS))
    untested = [n for n in TRAINS if call_parts(METHODS[n])[1] and n not in BAD]
    assert not untested, f"add a bad argument for {untested} to BAD"


@pytest.mark.parametrize("name", ALL)
def test_identity_at_init(name):
    method = METHODS[name]
    if not method.exact_at_init:
        pytest.skip(NOT_EXACT[name])
    model = gpt(dtype=torch.float64)
    before = logits(model)
    apply(method, model)
    torch.testing.assert_close(logits(model), before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TRAINS)
def test_frozen_entries_stay_bit_identical(name):
    method = METHODS[name]
    model = gpt()
    hooks = apply(method, model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained, "apply left nothing trainable"
    result = run(model, method, hooks)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    params = dict(model.named_parameters())
    skip = ".base.weight" if name in MERGES_INTO_BASE else None
    moved = [n for n, t in frozen.items() if n in params and not (skip and n.endswith(skip))
             and (params[n].shape != t.shape or not torch.equal(params[n], t))]
    assert not moved, f"frozen parameters changed in training: {moved}"
    changed = sum(int((params[n] != t).sum()) for n, t in trained.items() if n in params and params[n].shape == t.shape)
    assert changed > 0, "no trainable entry moved in 3 steps"
    if hooks.n_trainable is not None and name not in REDRAWN_MASK:
        assert changed <= hooks.n_trainable, f"{changed} entries moved, the mask allows {hooks.n_trainable}"


@pytest.mark.parametrize("name", TRAINS)
def test_merge_keeps_logits_and_unmerge_restores_the_base(name):
    method = METHODS[name]
    model = gpt(dtype=torch.float64)
    hooks = apply(method, model)
    if not any(isinstance(m, Mergeable) for m in model.modules()):  # nothing to merge: merging must be a no-op
        before = logits(model)
        assert merge_all(model) == 0 and unmerge_all(model) == 0
        torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
        return
    run(model, method, hooks, steps=2)
    unmerged = logits(model)
    bases = {n: m.base.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Mergeable)}
    assert merge_all(model) == len(bases)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-9, atol=1e-9, msg=lambda e: f"merged: {e}")
    assert unmerge_all(model) == len(bases)
    for n, m in model.named_modules():
        if isinstance(m, Mergeable):
            torch.testing.assert_close(m.base.weight, bases[n], rtol=0, atol=1e-12,
                                       msg=lambda e, n=n: f"{n}: W0 not restored: {e}")
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", TRAINS)
def test_save_load_round_trip(name, tmp_path):
    method = METHODS[name]
    if name in NO_SAVE:
        pytest.skip(NO_SAVE[name])
    trained = gpt()
    run(trained, method, apply(method, trained), steps=2)
    extra = EXTRA[name](trained) if name in EXTRA else ()
    save_adapter(trained, tmp_path, {"method": name}, extra=extra)
    fresh = gpt()
    apply(method, fresh)
    untrained = logits(fresh)
    load_adapter(fresh, tmp_path)
    want, got = logits(trained), logits(fresh)
    assert not torch.allclose(untrained, want), "two steps did not change the logits: the round trip proves nothing"
    mine = fresh.state_dict()
    differ = [n for n, t in trained.state_dict().items() if n in mine and not torch.equal(t, mine[n])]
    torch.testing.assert_close(got, want, msg=lambda m: f"{m}\nstate not restored by the adapter: {differ}")


@pytest.mark.parametrize("name", ALL)
def test_count_formula_equals_the_trainable_count(name):
    method = METHODS[name]
    count, keywords = count_formula(method)
    model = gpt()
    hooks = apply(method, model)
    have = hooks.n_trainable if hooks.n_trainable is not None else count_trainable(model).trainable
    assert count(model.config, **keywords) == have


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("name", ALL)
def test_forward_and_backward_in_the_models_dtype(name, dtype):
    method = METHODS[name]
    model = gpt(dtype=dtype)
    hooks = apply(method, model)
    may_be_float32 = FLOAT32_OK.get(name, ())
    wrong = [f"{n}: {t.dtype}" for n, t in floating_tensors(model) if t.dtype != dtype
             and not (t.dtype == torch.float32 and n.startswith(may_be_float32))]
    assert not wrong, f"tensors not in the model's dtype {dtype}: {wrong}"
    model.train()
    idx, labels = sampler(method)(torch.Generator().manual_seed(0))
    loss = model(idx, labels=labels).loss
    extra = hooks.extra_loss(model)
    loss = loss if extra is None else loss + extra
    assert torch.isfinite(loss), loss
    if not method.trains:
        return
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable if p.grad.dtype != p.dtype or not torch.isfinite(p.grad).all()]
    assert not bad, f"gradients not finite or not in the parameter's dtype: {bad}"


@pytest.mark.parametrize("name, override", BAD_CASES)
def test_a_bad_argument_raises_and_leaves_the_model_unchanged(name, override):
    method = METHODS[name]
    model = gpt()
    before = model_snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        apply(method, model, **override)
    assert_model_unchanged(model, before)


SECOND = {"bitfit": {}, "ia3": {}, "dora": dict(targets=("c_fc",)), "prompt-tuning": {}}


@pytest.mark.parametrize("second", [s for s in SECOND if s in METHODS])
def test_a_method_stacked_on_lora_keeps_lora_training_or_refuses(second):
    model = gpt()
    apply(METHODS["lora"], model)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    n_lora = count_trainable(model).trainable
    before = model_snapshot(model)
    try:
        apply(METHODS[second], model, **SECOND[second])
    except ValueError:
        assert_model_unchanged(model, before)
        return
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in lora), "stacking froze LoRA's A and B"
    assert count_trainable(model).trainable > n_lora, "the second method added nothing trainable"
    model(IDX, labels=IDX).loss.backward()
    assert all(params[n].grad is not None for n in lora)


# ------------------------------------------------------------------------------------------ other models

INJECT = sorted(n for n in TRAINS if "targets" in call_parts(METHODS[n])[1] or n == "ia3")


class Block(nn.Module):
    """Not a transformer: layers named like GPT's (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, d: int, linear=nn.Linear) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_attn, self.attn.c_proj = linear(d, 3 * d), linear(d, d)
        self.mlp.c_fc, self.mlp.c_proj = linear(d, 4 * d), linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(x).chunk(3, dim=-1)
        x = x + self.attn.c_proj(q * torch.sigmoid(k) + v)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(x)))


class Plain(nn.Module):
    def __init__(self, d: int = 32, n_layer: int = 2, linear=nn.Linear) -> None:
        super().__init__()
        self.h = nn.ModuleList(Block(d, linear) for _ in range(n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return x


class Conv1D(nn.Module):
    """A stand-in for transformers' GPT-2 projection: weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.mark.parametrize("name", INJECT)
def test_inject_methods_work_on_a_plain_module(name):
    method = METHODS[name]
    torch.manual_seed(0)
    model = Plain()
    base = [n for n, _ in model.named_parameters()]
    hooks = apply(method, model)
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad for n in base if n in params), "a base parameter trains"
    assert count_trainable(model).trainable > 0
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    loss = model(x).square().mean()
    extra = hooks.extra_loss(model)
    (loss if extra is None else loss + extra).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", INJECT)
def test_a_conv1d_model_is_refused_with_the_converter_named(name):
    model = Plain(linear=Conv1D)
    before = model_snapshot(model)
    with pytest.raises(TypeError, match=r"chapters\.ch5_applications\.interop\.from_hf"):
        apply(METHODS[name], model)
    assert_model_unchanged(model, before)
