"""Setup shared by many test files: a tiny random GPT, token batches, a hand-written Adam, an HF twin.

Plain functions (not fixtures) so that a test can build several models with different seeds or configs.
The defaults are the tiny config of conftest.py: vocab 101, block 32, 2 layers, 4 heads, width 64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

from minimal.gpt import GPT, GPTConfig, load_gpt2_state_dict

TINY = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


def tiny_config(**overrides) -> GPTConfig:
    """The tiny config, with any field overridden (e.g. tiny_config(n_layer=3, n_embd=32))."""
    return GPTConfig(**{**TINY, **overrides})


def tiny_gpt(seed: int = 0, config: GPTConfig | None = None, *, eval_mode: bool = True) -> GPT:
    """A random GPT of `config` (the tiny config by default), built after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    model = GPT(config if config is not None else tiny_config())
    return model.eval() if eval_mode else model


def token_batch(seed: int = 1, b: int = 4, t: int = 16, vocab_size: int = 101) -> torch.Tensor:
    """[b, t] random token ids from their own generator (the global RNG is left alone)."""
    return torch.randint(0, vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def masked_batch(seed: int = 1, b: int = 4, t: int = 16, prompt: int = 6, vocab_size: int = 101,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, labels): random ids, labels = ids with the first `prompt` positions set to -100."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (b, t), generator=g)
    labels = idx.clone()
    labels[:, :prompt] = -100
    return idx, labels


def masked_batches(n: int = 3, seed: int = 1, b: int = 4, t: int = 12, prompt: int = 5,
                   vocab_size: int = 101) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n masked batches drawn one after another from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [masked_batch(b=b, t=t, prompt=prompt, vocab_size=vocab_size, generator=g) for _ in range(n)]


def adam_steps(model: nn.Module, idx: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """Adam written out (torch.optim's first step imports torch._dynamo: seconds on a busy CPU).

    Trains the parameters with requires_grad on the LM loss of `idx` (labels = idx); returns the losses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    losses = []
    for t in range(1, steps + 1):
        loss = model(idx, labels=idx).loss
        loss.backward()
        with torch.no_grad():
            for p, m, v in zip(params, m1, m2):
                m.lerp_(p.grad, 0.1)
                v.lerp_(p.grad.square(), 0.001)
                p.sub_(lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))
                p.grad = None
        losses.append(loss.item())
    return losses


def adamw_steps(model: nn.Module, idx: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """`steps` steps of torch.optim.AdamW on the trainable parameters, LM loss of `idx` (labels = idx)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(idx, labels=idx).loss.backward()
        opt.step()


def hf_tiny_pair(seed: int = 0):
    """A random transformers GPT2LMHeadModel (made after torch.manual_seed(seed), no dropout) and our GPT
    of the tiny config with the same weights; both in eval mode. Returns (hf, ours). Needs transformers
    (the calling file guards it with pytest.importorskip)."""
    import transformers

    hf_cfg = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(tiny_config()).eval()
    load_gpt2_state_dict(ours, hf.state_dict())
    return hf, ours


def effective_params(model: nn.Module, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor of `model` under the parameter names of `reference` (an untouched
    model of the same architecture), each read through its module, so through any parametrisation."""
    out = {}
    for name in [n for n, _ in reference.named_parameters()]:
        module, attr = name.rsplit(".", 1)
        out[name] = getattr(model.get_submodule(module), attr).detach().clone()
    return out


def check_passes(name: str, answer, capsys) -> str:
    """An exercise checker accepts `answer`; returns what it printed."""
    from chapters.exercises import check

    ok = check(name, answer)
    out = capsys.readouterr().out
    assert ok, out
    return out


def check_fails(name: str, answer, capsys, match: str = "") -> str:
    """An exercise checker rejects `answer` with a 'not yet' message containing `match`."""
    from chapters.exercises import check

    ok = check(name, answer)
    out = capsys.readouterr().out
    assert not ok and "not yet" in out, out
    assert match in out, out
    return out


def model_snapshot(model: nn.Module) -> dict:
    """Everything a failed apply must leave alone: module classes by name, requires_grad flags, every
    state_dict tensor (cloned), the forward/backward hooks on each module, and the model's public attributes."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "state": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()],
        "attributes": sorted(k for k in vars(model) if not k.startswith("_")),
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    """`model` is exactly as `model_snapshot` saw it: same modules, flags, hooks, keys, and values bitwise."""
    after = model_snapshot(model)
    for key in ("modules", "requires_grad", "hooks", "attributes"):
        changed = [(a, b) for a, b in zip(before[key], after[key]) if a != b] or (before[key], after[key])
        assert after[key] == before[key], f"{key} changed: {changed[:3]}"
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    moved = [n for n, t in after["state"].items()
             if t.dtype != before["state"][n].dtype or not torch.equal(t, before["state"][n])]
    assert not moved, f"values changed: {moved}"


def assert_refuses(model: nn.Module, apply: Callable[[nn.Module], object], match: str,
                   error: type[Exception] = ValueError) -> None:
    """apply(model) raises `error` matching `match`; modules, flags, hooks, attributes and values are unchanged."""
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        apply(model)
    assert_model_unchanged(model, before)


class Wrapped(nn.Module):
    """A causal LM that is not our GPT class, so code with a GPT fast path (a shared prompt cache) takes its
    generic path."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx: torch.Tensor):
        return self.model(idx)
