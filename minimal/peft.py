"""The small toolkit every PEFT method in this repo is built from.

- `freeze` / `unfreeze`: choose what trains (requires_grad), nothing else. `freeze_base`: what every
  `apply_*` calls once it has validated its arguments: the first method applied to a model freezes all
  of it; a second method stacked on top keeps what the first one trains.
- `find_linears` / `inject`: replace `nn.Linear` layers chosen by name with a module built from them
  (LoRA, IA3, DoRA, ... wrap the layer they replace). `inject` is atomic: it builds every new module
  (which validates the arguments against each layer) before it changes anything, so a failed call
  leaves the model as it was. Name matching follows Hugging Face `peft`:
  a string target is a regular expression that must match the whole module name; a list target
  matches a name equal to an entry or ending with "." + entry (so "c_proj" hits attn.c_proj and
  mlp.c_proj). A target that matches nothing is an error that lists the names that exist.
- `count_trainable`: trainable and total parameters, and the percentage.
- `save_adapter` / `load_adapter`: only the trained state (safetensors) plus a json config that also
  records each adapted module's class and hyperparameters (r, alpha, scale, ...) and each tensor's shape
  and dtype. Loading checks all of it against the model before any tensor is copied: a model of another
  shape, method, rank, alpha or dtype is an error that names the file, the tensor or module and the field.
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

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# module attributes that are state, not hyperparameters: they may differ between saving and loading
VOLATILE = ("training", "merged", "train_rank", "serve_rank")


# ------------------------------------------------------------------------------------------ trainable set


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


APPLIED = "peft_methods_applied"  # attribute set on a model by freeze_base: how many methods it carries


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze `model` for the method being applied; keep the trainables of a method applied before it.

    Call it after every argument has been validated and before the first change to the model, so that a
    failed apply leaves the model untouched. Stacking (a second method on the same model) then keeps the
    first method's parameters trainable instead of silently re-freezing them.
    """
    if not getattr(model, APPLIED, 0):
        freeze(model)
    setattr(model, APPLIED, getattr(model, APPLIED, 0) + 1)
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


def trained_before(model: nn.Module) -> set[str]:
    """The parameters that a method applied earlier to `model` trains (none on a fresh model).

    A selective method stacked on another one leaves those to it: it neither scores nor masks them, so
    they keep training as the first method set them up.
    """
    return set(trainable_names(model)) if getattr(model, APPLIED, 0) else set()


# ------------------------------------------------------------------------------------------ injection


def find_linears(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules selected by `targets` (see the module docstring for the rule)."""
    conv1d = next((n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"), None)
    if conv1d is not None:  # transformers' GPT-2 stores its projections as Conv1D ([in, out] weights)
        raise TypeError(f"{type(model).__name__} has transformers Conv1D layers ({conv1d}, ...), which the "
                        "methods here do not wrap; convert the model to our GPT with nn.Linear layers first: "
                        "chapters.ch5_applications.interop.from_hf(model)")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
        if not chosen:
            _refuse_wrapped(model, lambda n: re.fullmatch(targets, n) is not None, repr(targets))
            hint = (f"; a str target is a regular expression over the whole name: to match every layer "
                    f"named {targets!r} pass a list, targets=[{targets!r}]" if targets.isidentifier() else "")
            raise ValueError(f"target pattern {targets!r} matches no nn.Linear{hint}; available: {linears}")
        return chosen
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one linear layer")
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"each target must be a str (a module name or its last part), got {t!r}")
        if not any(n == t or n.endswith("." + t) for n in linears):
            _refuse_wrapped(model, lambda n, t=t: n == t or n.endswith("." + t), repr(t))
            raise ValueError(f"unknown target module {t!r}; available nn.Linear names: {linears}")
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]


def _refuse_wrapped(model: nn.Module, selects: Callable[[str], bool], target: str) -> None:
    """A target that names modules wrapping a linear (a method already applied) gets its own error."""
    wrapped = [(n, type(m).__name__) for n, m in model.named_modules()
               if selects(n) and not isinstance(m, nn.Linear) and isinstance(getattr(m, "base", None), nn.Linear)]
    if wrapped:
        raise ValueError(f"target {target} names layers that already have an adapter ({wrapped[0][1]} at "
                         f"{wrapped[0][0]}, {len(wrapped)} in all); apply a method to a fresh base model, or "
                         "remove the adapters first with minimal.peft.unload(model)")


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
    model: nn.Module, targets: str | Iterable[str], factory: Callable[[nn.Linear], nn.Module], freeze: bool = True
) -> list[str]:
    """Replace each selected nn.Linear by factory(linear); return the names that were replaced.

    Atomic: all the new modules are built first (a factory that raises, say for a rank too large for one
    of the layers, leaves the model unchanged); then `freeze_base(model)` unless freeze=False; then the
    new modules go in. The factory must not modify the linear it is given.
    """
    names = find_linears(model, targets)
    built = [(name, factory(model.get_submodule(name))) for name in names]
    if freeze:
        freeze_base(model)
    for name, module in built:
        replace_module(model, name, module)
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
    from safetensors.torch import save_file  # imported here: the rest of this file needs torch only

    save_file(state, str(directory / ADAPTER_WEIGHTS))
    modules = dict(model.named_modules())
    record = {"config": config, "shapes": {n: list(t.shape) for n, t in state.items()},
              "dtypes": {n: str(t.dtype).removeprefix("torch.") for n, t in state.items()},
              "modules": {o: module_record(modules[o]) for o in sorted({n.rpartition(".")[0] for n in state})}}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def module_record(module: nn.Module) -> dict:
    """A module's class and its scalar hyperparameters (r, alpha, scale, mode, ...), as saved beside an adapter."""
    scalars = {k: v for k, v in vars(module).items()
               if not k.startswith("_") and k not in VOLATILE and isinstance(v, (bool, int, float, str))}
    return {"class": type(module).__name__, **scalars}


def _read_record(directory: str | Path) -> dict:
    """adapter_config.json, parsed and checked for its fields: a ValueError names the file and the field."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory} (save it with minimal.peft.save_adapter)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid json ({e}); save the adapter again") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a json object with 'config' and 'shapes', got {type(record).__name__}")
    for key in ("config", "shapes"):
        if not isinstance(record.get(key), dict):
            raise ValueError(f"{path}: field {key!r} is missing or not an object; save the adapter again")
    for key in ("dtypes", "modules"):  # recorded since the adapter format checks hyperparameters
        if key in record and not isinstance(record[key], dict):
            raise ValueError(f"{path}: field {key!r} must be an object, got {type(record[key]).__name__}")
    return record


def read_adapter_config(directory: str | Path) -> dict:
    return _read_record(directory)["config"]


def load_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Copy a saved adapter into `model` (which already has the method applied); return its config.

    Everything is checked before the first tensor is copied, so on any error the model is unchanged:
    the json parses; every saved tensor exists in the model with the shape and dtype recorded in the json
    and in the model; each adapted module has the saved class and hyperparameters (r, alpha, scale, ...)
    and is not merged. A ValueError names the file and every tensor or field that does not fit.
    """
    record = _read_record(directory)
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    from safetensors.torch import load_file

    state = load_file(str(path))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    modules = dict(model.named_modules())
    wrong = [f"{n}: not in the model" for n in sorted(state) if n not in tensors]
    for n, t in sorted(state.items()):
        if list(t.shape) != record["shapes"].get(n):
            wrong.append(f"{n}: shape {tuple(t.shape)} in {ADAPTER_WEIGHTS}, {record['shapes'].get(n)} in "
                         f"{ADAPTER_CONFIG}")
        if n in tensors and t.shape != tensors[n].shape:
            wrong.append(f"{n}: saved {tuple(t.shape)} vs model {tuple(tensors[n].shape)}")
        if n in tensors and t.dtype != tensors[n].dtype:
            wrong.append(f"{n}: dtype saved {t.dtype} vs model {tensors[n].dtype} (cast the model with .to(dtype))")
    for name, saved in sorted(record.get("modules", {}).items()):
        module = modules.get(name)
        if module is None:
            continue  # its tensors are reported above
        if getattr(module, "merged", False):
            wrong.append(f"{name}: the module is merged; unmerge() before loading an adapter into it")
        have = module_record(module)
        for field_name, value in saved.items():
            if have.get(field_name) != value:
                wrong.append(f"{name}.{field_name}: saved {value!r} vs model {have.get(field_name)!r}")
    if wrong:
        raise ValueError(f"adapter in {directory} does not fit this model (saved for another base shape, method "
                         f"or setting?), nothing was copied: " + "; ".join(wrong))
    with torch.no_grad():
        for n, t in state.items():
            tensors[n].copy_(t)
    return record["config"]
