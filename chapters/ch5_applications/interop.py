"""Interop: our GPT and adapters <-> Hugging Face `transformers` and `peft`.

Everything in this repo is written by hand, but a trained adapter is only useful if the rest of the
ecosystem can read it. This file converts in both directions, with no download:

    our GPT  <->  transformers.GPT2LMHeadModel        to_hf(model) / from_hf(hf_model)
    our LoRA / rsLoRA / (IA)^3  <->  a peft adapter    export_peft(model, dir) / import_peft(model, dir)

so that `PeftModel.from_pretrained(to_hf(base), dir)` reproduces our fine-tuned model's logits, and an
adapter trained with `peft` on a GPT-2-shaped model runs inside our GPT.

The base model. GPT-2 stores its projections as `Conv1D` with weight [in, out] (y = x W + b); ours are
nn.Linear with weight [out, in] (y = x W^T + b). `minimal.gpt` does the transposes; here we add the
config mapping (n_positions = block_size, resid/embd/attn dropout = dropout, GELU tanh = "gelu_new",
tied head) and refuse what GPT-2 cannot express (bias=False) or what our GPT does not implement
(another activation, an untied head, an inner size other than 4d, attention scaled by layer index).

The peft directory, as peft's `save_pretrained` writes it and `PeftModel.from_pretrained` reads it:

    adapter_config.json          the config dataclass as json: peft_type "LORA" | "IA3", task_type
                                 "CAUSAL_LM", target_modules, fan_in_fan_out=true (GPT-2's Conv1D), and
                                 r, lora_alpha, use_rslora, lora_dropout (LoRA) or feedforward_modules (IA3)
    adapter_model.safetensors    metadata {"format": "pt"}; keys are peft's module names without the
                                 adapter name "default":
        base_model.model.transformer.h.N.attn.c_attn.lora_A.weight   [r, in]    our A, unchanged
        base_model.model.transformer.h.N.attn.c_attn.lora_B.weight   [out, r]   our B, unchanged
        base_model.model.transformer.h.N.attn.c_attn.ia3_l           [out, 1]   output scale (attention)
        base_model.model.transformer.h.N.mlp.c_proj.ia3_l            [1, in]    input scale ("feedforward")

peft keeps nn.Linear's layout for lora_A / lora_B even on a Conv1D layer (only the base weight is
transposed, inside merge), so the LoRA factors copy across unchanged, and scale = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora) is the same formula on both sides. An (IA)^3 vector is the same
vector on both sides; only its stored shape (a column or a row) says whether it scales the outputs or
the inputs. Our paper-faithful attn="kv" (IA)^3 keeps the query third at 1: it is exported as peft's full
3d vector with ones in that third, which is exactly the same function; an imported peft vector scales all
3d outputs, so it is imported as our attn="qkv" form.

Checks on import (nothing is half-loaded, nothing silently ignored): the modules named by
`target_modules` (peft's matching rule) must be exactly the modules that have weights in the file; every
tensor must have the shape the config and our layer imply (r rows for lora_A, in/out of the layer);
peft features we do not implement (DoRA, bias training, rank/alpha patterns, modules_to_save, bases
modified at init such as PiSSA, ...) are errors that name the feature. Each imported tensor takes the
dtype and device of the layer it attaches to, as peft's loader does: a float64 adapter imported into a
float64 model is exact (a float64 file read into a float32 model is rounded to float32).

Dependencies: `transformers` is imported only by to_hf/from_hf; the peft format needs only safetensors
and json, so export/import work without `peft` installed. This file builds on two method files of other
chapters (chapters/ch4_low_rank/lora.py and chapters/ch2_additive/ia3.py).

Copy: minimal/gpt.py, minimal/hooks.py, minimal/peft.py, chapters/ch2_additive/ia3.py, chapters/ch4_low_rank/lora.py, chapters/ch5_applications/interop.py
"""  # noqa: E501

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from chapters.ch2_additive.ia3 import IA3Linear
from chapters.ch4_low_rank.lora import LoRALinear, apply_lora
from minimal.gpt import GPT, GPTConfig, load_gpt2_state_dict
from minimal.peft import inject, mergeable_modules

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model.transformer."  # peft's name for a GPT2LMHeadModel's decoder
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# peft config fields that change what the adapter computes and that this file does not implement
UNSUPPORTED_LORA = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, []),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
}
UNSUPPORTED_IA3 = {"modules_to_save": (None, []), "exclude_modules": (None, [])}
# init_lora_weights values with which peft changes the base weight, so the adapter alone is not the update
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


# ------------------------------------------------------------------------------------------ base model


def hf_config(config: GPTConfig, eos_token_id: int | None = None) -> Any:
    """The transformers.GPT2Config of the same architecture (dropout copied to all three GPT-2 dropouts).

    eos_token_id (also used as bos): GPT-2's 50256 when the vocabulary has it, else the last id.
    """
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("GPT-2 always has biases; a GPTConfig with bias=False cannot be converted")
    if eos_token_id is None:
        eos_token_id = 50256 if config.vocab_size > 50256 else config.vocab_size - 1
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_epsilon,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True,
    )


def base_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our plain-GPT state dict of `model`, also when adapters wrap its linears (their base weights only).

    A merged adapter has been folded into the base weights, so it is refused: unmerge first.
    """
    wrapped = mergeable_modules(model)
    merged = [n for n, m in wrapped if m.merged]
    if merged:
        raise ValueError(f"adapters are merged into the base weights of {merged}; unmerge() them first")
    out = {}
    for key, value in model.state_dict().items():
        owner = next((n for n, _ in wrapped if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + ".base."):
            out[owner + "." + key.removeprefix(owner + ".base.")] = value  # h.0.attn.c_attn.base.weight -> .weight
    return out


def to_hf(model: GPT, eos_token_id: int | None = None) -> Any:
    """A transformers GPT2LMHeadModel with the base weights of `model` (adapters, if any, are left out)."""
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT):
        raise TypeError(f"to_hf needs a minimal.gpt.GPT, got {type(model).__name__}")
    hf = GPT2LMHeadModel(hf_config(model.config, eos_token_id))
    sd = {}
    for name, value in base_state_dict(model).items():
        sd["transformer." + name] = value.t().contiguous() if name.endswith(CONV1D) else value.clone()  # [in, out]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    hf.load_state_dict(sd, strict=True)
    w = model.wte.weight
    return hf.to(device=w.device, dtype=w.dtype).train(model.training)


def from_hf(hf_model: Any) -> GPT:
    """Our GPT with the weights of a transformers GPT2LMHeadModel (which must be plain GPT-2)."""
    c = hf_model.config
    if getattr(c, "model_type", None) != "gpt2":
        raise TypeError(f"from_hf expects a GPT2LMHeadModel, got model_type {getattr(c, 'model_type', None)!r}")
    problems = []
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={c.activation_function!r} (ours is GELU tanh: 'gelu_new')")
    if c.n_inner not in (None, 4 * c.n_embd):
        problems.append(f"n_inner={c.n_inner} (ours is 4 * n_embd = {4 * c.n_embd})")
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if not c.tie_word_embeddings:
        problems.append("an untied lm_head (ours is tied to wte)")
    if len({c.resid_pdrop, c.embd_pdrop, c.attn_pdrop}) != 1:
        problems.append(f"different dropouts {c.resid_pdrop, c.embd_pdrop, c.attn_pdrop} (ours has one)")
    if problems:
        raise ValueError("this GPT-2 model cannot be expressed as our GPT: " + "; ".join(problems))
    config = GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, dropout=c.resid_pdrop, bias=True, layer_norm_epsilon=c.layer_norm_epsilon)
    w = hf_model.transformer.wte.weight
    model = GPT(config).to(device=w.device, dtype=w.dtype)
    return load_gpt2_state_dict(model, hf_model.state_dict()).train(hf_model.training)


# ------------------------------------------------------------------------------------------ export


def _collapse_targets(names: list[str], n_layer: int) -> list[str]:
    """Module names -> peft target_modules: "attn.c_attn" when every layer has it, else "h.N.attn.c_attn"."""
    by_suffix: dict[str, set[int]] = {}
    for name in names:
        m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"cannot export an adapter on {name!r}: only the blocks' linear layers are supported")
        by_suffix.setdefault(m.group(2), set()).add(int(m.group(1)))
    out = []
    for suffix, layers in sorted(by_suffix.items()):
        out += [suffix] if len(layers) == n_layer else [f"h.{i}.{suffix}" for i in sorted(layers)]
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(model: GPT, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write our LoRA / rsLoRA / (IA)^3 adapter as a peft adapter directory; return the directory.

    Load it with `PeftModel.from_pretrained(to_hf(model), directory)`. Every adapted layer must carry the
    same method with the same r, alpha and scaling (peft's rank_pattern is not written).
    """
    wrapped = mergeable_modules(model)
    if not wrapped:
        raise ValueError("the model has no adapter to export (apply LoRA or (IA)^3 first)")
    kinds = {type(m) for _, m in wrapped}
    if kinds - {LoRALinear, IA3Linear} or len(kinds) != 1:
        raise TypeError(
            "export_peft writes plain LoRA/rsLoRA or (IA)^3 adapters, one method at a time; the model has "
            f"{sorted(k.__name__ for k in kinds)}"
        )
    merged = [n for n, m in wrapped if m.merged]
    if merged:
        raise ValueError(f"adapters of {merged} are merged; unmerge() them before exporting")
    names = [n for n, _ in wrapped]
    targets = _collapse_targets(names, model.config.n_layer)
    common = {"task_type": "CAUSAL_LM", "target_modules": targets, "fan_in_fan_out": True, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path, "revision": None, "modules_to_save": None,
              "exclude_modules": None, "auto_mapping": None}
    tensors: dict[str, torch.Tensor] = {}
    if kinds == {LoRALinear}:
        settings = {(m.r, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0)) for _, m in wrapped}
        if len(settings) != 1:
            raise ValueError(f"export_peft needs one (r, alpha, rslora, dropout) for all layers, got {settings}")
        r, alpha, rslora, dropout = settings.pop()
        config = {"peft_type": "LORA", **common, "r": r, "lora_alpha": _number(alpha), "use_rslora": rslora,
                  "lora_dropout": dropout, "bias": "none", "lora_bias": False, "use_dora": False,
                  "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                  "layers_pattern": None}
        for name, m in wrapped:
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.A.detach()  # [r, in]
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.B.detach()  # [out, r]
    else:
        feedforward = [n for n, m in wrapped if m.mode == "input"]
        config = {"peft_type": "IA3", **common, "init_ia3_weights": True,
                  "feedforward_modules": _collapse_targets(feedforward, model.config.n_layer) if feedforward else []}
        for name, m in wrapped:
            vec = m.vector().detach()  # [out] or [in], with ones in any fixed (query) part
            tensors[f"{KEY_PREFIX}{name}.ia3_l"] = vec.unsqueeze(1) if m.mode == "output" else vec.unsqueeze(0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(directory / PEFT_WEIGHTS),
              metadata={"format": "pt"})
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


# ------------------------------------------------------------------------------------------ import


def read_peft_config(directory: str | Path) -> dict:
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {PEFT_CONFIG} in {directory} (is it a peft adapter directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid json ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a json object (peft's config), got {type(config).__name__}")
    return config


def _number_field(config: dict, key: str, kind: type, directory: str | Path, positive: bool = True) -> Any:
    """config[key] checked to be a number of `kind` (int: a whole number), > 0 when `positive`."""
    where = Path(directory) / PEFT_CONFIG
    if key not in config:
        raise ValueError(f"{where}: field {key!r} is missing; a peft LoRA config has r and lora_alpha")
    value = config[key]
    ok = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok:
        raise TypeError(f"{where}: field {key!r} must be a json number ({kind.__name__}), got {value!r} "
                        f"({type(value).__name__})")
    if positive and value <= 0:
        raise ValueError(f"{where}: field {key!r} must be > 0, got {value!r}")
    return value


def selected_by(targets: str | Iterable[str], names: list[str]) -> list[str]:
    """peft's target_modules rule over our linear names (peft sees them with a "transformer." prefix)."""
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, "transformer." + n) or re.fullmatch(targets, n)]
    targets = list(targets)
    return [n for n in names if any(t in (n, "transformer." + n) or n.endswith("." + t) for t in targets)]


def _modules_in_file(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Group the file's tensors by our module name; unknown keys are an error that names them."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key.removeprefix(KEY_PREFIX).removesuffix("." + suffix), {})[suffix] = value
    if unknown:
        raise ValueError(f"tensors this importer does not understand (expected {KEY_PREFIX}...{suffixes}): "
                         f"{sorted(unknown)[:8]}")
    return groups


def _check_supported(config: dict, unsupported: dict[str, tuple]) -> None:
    bad = [f"{k}={config[k]!r}" for k, allowed in unsupported.items() if k in config and config[k] not in allowed]
    if bad:
        raise ValueError(f"the adapter uses peft features this importer does not implement: {', '.join(bad)}")


def _check_targets(config: dict, linears: list[str], in_file: Iterable[str]) -> list[str]:
    if not config.get("target_modules"):
        raise ValueError("adapter_config.json has no target_modules; cannot tell which layers it adapts")
    chosen = selected_by(config["target_modules"], linears)
    if not chosen:
        raise ValueError(f"target_modules {config['target_modules']!r} match no linear layer of this model; "
                         f"available: {linears}")
    missing = sorted(set(chosen) - set(in_file))
    extra = sorted(set(in_file) - set(chosen))
    if missing or extra:
        raise ValueError(
            f"target_modules {config['target_modules']!r} and the saved tensors disagree: "
            f"targeted without weights {missing}; weights for modules not targeted (or not in this model) {extra}"
        )
    return chosen


def import_peft(model: GPT, directory: str | Path) -> dict:
    """Apply the method of a peft adapter directory (LoRA, rsLoRA or IA3) to `model` and copy its weights.

    `model` must be a plain GPT (no adapter yet) with the base the adapter was trained on (from_hf).
    Every check runs before the model is touched. Returns the adapter's config.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"import_peft needs a minimal.gpt.GPT, got {type(model).__name__}")
    if mergeable_modules(model):
        raise ValueError("the model already has adapters; import into a plain GPT (minimal.peft.unload first)")
    config = read_peft_config(directory)
    if config.get("peft_type") not in ("LORA", "IA3"):
        raise ValueError(f"{Path(directory) / PEFT_CONFIG}: peft_type {config.get('peft_type')!r} is not "
                         "imported here; supported: 'LORA' (incl. rsLoRA) and 'IA3'")
    if config.get("peft_type") == "LORA":
        _number_field(config, "r", int, directory)
        _number_field(config, "lora_alpha", float, directory)
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise TypeError(f"{Path(directory) / PEFT_CONFIG}: field 'target_modules' must be a str (a regular "
                        f"expression) or a list of module names, got {targets!r}")
    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {PEFT_WEIGHTS} in {directory} (adapter_model.bin is not read: use safetensors)")
    state = load_file(str(path))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kind = config.get("peft_type")
    if kind == "LORA":
        _import_lora(model, config, state, linears)
    elif kind == "IA3":
        _import_ia3(model, config, state, linears)
    else:
        raise ValueError(f"peft_type {kind!r} is not imported here; supported: 'LORA' (incl. rsLoRA) and 'IA3'")
    return config


def _import_lora(model: GPT, config: dict, state: dict[str, torch.Tensor], linears: list[str]) -> None:
    _check_supported(config, UNSUPPORTED_LORA)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise ValueError(f"init_lora_weights={init!r} changes the base weights, so this adapter only works with "
                         "that modified base; save it from peft with path_initial_model_for_weight_conversion")
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    groups = _modules_in_file(state, ("lora_A.weight", "lora_B.weight"))
    chosen = _check_targets(config, linears, groups)
    wrong = []
    for name in chosen:
        lin: nn.Linear = model.get_submodule(name)
        parts = groups[name]
        want = {"lora_A.weight": (r, lin.in_features), "lora_B.weight": (lin.out_features, r)}
        for part, shape in want.items():
            if part not in parts:
                wrong.append(f"{name}.{part}: missing")
            elif tuple(parts[part].shape) != shape:
                wrong.append(f"{name}.{part}: saved {tuple(parts[part].shape)}, expected {shape} (r={r}, layer "
                             f"[out={lin.out_features}, in={lin.in_features}])")
    if wrong:
        raise ValueError("adapter does not fit this model or its own r: " + "; ".join(wrong))
    apply_lora(model, r=r, alpha=alpha, targets=chosen, rslora=rslora, dropout=float(config.get("lora_dropout", 0)))
    with torch.no_grad():
        for name in chosen:
            m: LoRALinear = model.get_submodule(name)
            m.A.copy_(groups[name]["lora_A.weight"])  # [r, in], in the layer's dtype (exact when they agree)
            m.B.copy_(groups[name]["lora_B.weight"])  # [out, r]


def _import_ia3(model: GPT, config: dict, state: dict[str, torch.Tensor], linears: list[str]) -> None:
    _check_supported(config, UNSUPPORTED_IA3)
    groups = _modules_in_file(state, ("ia3_l",))
    chosen = _check_targets(config, linears, groups)
    feedforward = set(selected_by(config.get("feedforward_modules") or [], chosen))
    wrong = []
    for name in chosen:
        lin: nn.Linear = model.get_submodule(name)
        shape = (1, lin.in_features) if name in feedforward else (lin.out_features, 1)
        saved = tuple(groups[name]["ia3_l"].shape)
        if saved != shape:
            role = "feedforward: scales the input" if name in feedforward else "scales the output"
            wrong.append(f"{name}.ia3_l: saved {saved}, expected {shape} ({role})")
    if wrong:
        raise ValueError("adapter does not fit this model: " + "; ".join(wrong))
    built = {}  # id of each linear -> its IA3Linear, holding the file's vector in the layer's dtype
    for name in chosen:
        lin: nn.Linear = model.get_submodule(name)
        ia3 = IA3Linear(lin, "input" if name in feedforward else "output")
        w = lin.weight
        ia3.scale = nn.Parameter(groups[name]["ia3_l"].flatten().to(device=w.device, dtype=w.dtype))  # [out] or [in]
        built[id(lin)] = ia3
    inject(model, chosen, lambda lin: built[id(lin)])  # freezes the base, swaps every module in at once
