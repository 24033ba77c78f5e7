"""The small toolkit every PEFT method in this repo is built from.

- `freeze` / `unfreeze`: choose what trains (requires_grad), nothing else.
- `find_linears` / `inject`: replace `nn.Linear` layers chosen by name with a module built from them
  (LoRA, IA3, DoRA, ... wrap the layer they replace). Name matching follows Hugging Face `peft`:
  a string target is a regular expression that must match the whole module name; a list target
  matches a name equal to an entry or ending with "." + entry (so "c_proj" hits attn.c_proj and
  mlp.c_proj). A target that matches nothing is an error that lists the names that exist.
- `count_trainable`: trainable and total parameters, and the percentage.
- `save_adapter` / `load_adapter`: only the trained state (safetensors) plus a json config; loading into a
  model of another shape is an error that names every mismatched tensor.
- `Mergeable`: the merge/unmerge protocol. A wrapper around a base `nn.Linear` whose update is a weight
  delta implements `delta_weight()`; `merge()` adds it into the base weight, `unmerge()` subtracts it,
  and merging twice (or unmerging an unmerged layer) is an error. `merge_all` / `unload` act on a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------------------ trainable set


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, predicate: Callable[[str], bool]) -> list[str]:
    """Set requires_grad=True on every parameter whose name satisfies predicate; return those names."""
    names = [n for n, p in model.named_parameters() if predicate(n)]
    if not names:
        raise ValueError("unfreeze: the predicate selected no parameter")
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    return names


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({self.percent:.3f}%)"


def count_trainable(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (shared tensors, like a tied head, count once)."""
    params = list(model.parameters())  # nn.Module.parameters() already skips duplicates
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ injection


def find_linears(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules selected by `targets` (see the module docstring for the rule)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
        if not chosen:
            raise ValueError(f"target pattern {targets!r} matches no nn.Linear; available: {linears}")
        return chosen
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one linear layer")
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            raise ValueError(f"unknown target module {t!r}; available nn.Linear names: {linears}")
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` was; return the old module."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def inject(
    model: nn.Module, targets: str | Iterable[str], factory: Callable[[nn.Linear], nn.Module]
) -> list[str]:
    """Replace each selected nn.Linear by factory(linear); return the names that were replaced."""
    names = find_linears(model, targets)
    for name in names:
        replace_module(model, name, factory(model.get_submodule(name)))
    return names


# ------------------------------------------------------------------------------------------ merging


class Mergeable(nn.Module):
    """A wrapper around `self.base` (an nn.Linear) whose update can be folded into base.weight.

    Subclasses implement `delta_weight()` ([out, in]) and check `self.merged` in forward (when merged the
    forward is just `self.base(x)`). Methods whose merge is not additive override merge/unmerge.
    """

    base: nn.Linear

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError(f"{type(self).__name__} is already merged; unmerge() before merging again")
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("refusing to merge a non-finite weight update")
        self.base.weight += delta.to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


def mergeable_modules(model: nn.Module) -> list[tuple[str, Mergeable]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Mergeable)]


def merge_all(model: nn.Module) -> int:
    """Merge every Mergeable in the model; return how many were merged."""
    modules = mergeable_modules(model)
    for _, m in modules:
        m.merge()
    return len(modules)


def unmerge_all(model: nn.Module) -> int:
    modules = mergeable_modules(model)
    for _, m in modules:
        m.unmerge()
    return len(modules)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every Mergeable by its base nn.Linear (merged first unless merge=False): the plain model."""
    for name, m in mergeable_modules(model):
        if merge and not m.merged:
            m.merge()
        if not merge and m.merged:
            m.unmerge()
        replace_module(model, name, m.base)
    return model


# ------------------------------------------------------------------------------------------ save / load


def adapter_state_dict(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The trained state: every parameter with requires_grad, plus the named `extra` tensors (masks...)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    names = trainable_names(model) + [n for n in extra if n not in trainable_names(model)]
    for n in names:
        if n not in tensors:
            raise ValueError(f"adapter_state_dict: no parameter or buffer named {n!r}")
    return {n: tensors[n].detach().contiguous().clone() for n in names}


def save_adapter(
    model: nn.Module, directory: str | Path, config: dict, extra: Iterable[str] = ()
) -> Path:
    """Write adapter.safetensors (trained tensors only) and adapter_config.json (config + shapes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, extra)
    if not state:
        raise ValueError("save_adapter: the model has no trainable parameter; nothing to save")
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    record = {"config": config, "shapes": {n: list(t.shape) for n, t in state.items()}}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    return json.loads(path.read_text(encoding="utf-8"))["config"]


def load_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Copy a saved adapter into `model` (which already has the method applied); return its config.

    Every saved tensor must exist in the model with the same shape; otherwise a ValueError names all the
    tensors that do not fit, and nothing is copied.
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    state = load_file(str(path))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(n for n in state if n not in tensors)
    wrong = sorted(
        f"{n}: saved {tuple(t.shape)} vs model {tuple(tensors[n].shape)}"
        for n, t in state.items() if n in tensors and t.shape != tensors[n].shape
    )
    if missing or wrong:
        raise ValueError(
            "adapter does not fit this model (saved for another base shape or method?): "
            + "; ".join([f"{n}: not in the model" for n in missing] + wrong)
        )
    with torch.no_grad():
        for n, t in state.items():
            tensors[n].copy_(t)
    return read_adapter_config(directory)
