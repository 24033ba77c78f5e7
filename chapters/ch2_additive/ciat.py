"""CIAT, the Counter-Interference Adapter: per-direction modules that undo multilingual interference.

Paper: Yaoming Zhu, Jiangtao Feng, Chengqi Zhao, Mingxuan Wang, Lei Li, "Counter-Interference Adapter for
Multilingual Machine Translation", Findings of EMNLP 2021, arXiv 2104.08154 (code: Yaoming95/CIAT,
TensorFlow / NeurST; an earlier arXiv version was titled "Serial or Parallel? Plug-able Adapter for
multilingual machine translation").

Idea: one model shared by many languages does worse than one model per language pair, because the
languages compete for the same embeddings and hidden states. Keep the multilingual model frozen and give
every translation direction its own small modules that pull the embeddings and hidden states back toward
what that direction needs; route each input to its direction's modules.

In this decoder-only GPT (the paper's model is an encoder-decoder Transformer), for the active direction j,
with a bottleneck A_j(z) = W_2 Dropout(ReLU(W_1 z + b_1)) + b_2, W_1 [m, d], W_2 [d, m], m = d/2:

    e  <- e + A^EA_j(LN^EA_j(e))             e = wte[x] + wpe: the embeddings, before the first block
    x  <- x + attn(ln_1(x)) + A^attn_j,l(ln_1(x))     parallel: the adapter reads the sublayer's own input
    x  <- x + mlp(ln_2(x))  + A^mlp_j,l(ln_2(x))
    h_L <- h_L + W^LHT_j h_L                 optional "linear hidden transformation" on the last block's output

What trains (stage 2, per direction): EA (LN 2d, 2dm + m + d) and 2L parallel adapters (2dm + m + d each):
d^2 + 3.5d + 2L(d^2 + 1.5d) numbers for m = d/2 (+ d^2 with the LHT). Everything of the base stays frozen.

Interpretations, labelled [I]: where the paper (an encoder-decoder, with TensorFlow code) does not say what
the GPT version should do, this is our choice; results that depend on one should say so:
- [I] decoder-only mapping: one embedding-alignment module on the (token + position) embeddings and one
  parallel adapter per self-attention and per MLP sublayer; the paper has separate encoder and decoder
  modules and no adapter on cross-attention, which this model does not have;
- [I] "linear hidden transformation": named for CIAT in the survey but not a separate module in the
  released code; here a zero-initialised direction-specific d x d map added residually to the last block's
  output (`lht=True`), off by default; report results that use it as an interpretation;
- [I] initialisation: the released code uses the framework's dense init (Glorot uniform, zero bias), so it
  does not start at the base; default here `init="zero"`: W_2 = b_2 = 0, so the model is exactly the base
  at init ("xavier" gives the released code's init);
- [I] routing: a direction is named "X_Y" (translate_X_Y in minimal.data); the tokens are read for the
  language tags <|lang_X|> ... <|lang_Y|> (first tag = source, second = target) and the batch is routed to
  direction X_Y; a batch mixing directions is an error; a call without tags (a cached generation step)
  keeps the current direction. `set_direction` chooses one by hand (None turns CIAT and its routing off);
- [I] stage 1 (training the multilingual base on all directions) is the base model's pretraining and is
  not part of this file; dropout inside the adapters equals the model's dropout.

The modules take the dtype and device of the model's embedding weight. `count_ciat` is the trainable count
as a formula of the GPTConfig. Imported only where they are used: the shipped tokenizer (minimal/tokenizer.py)
by `language_tag_ids`, the routing default when `tag_ids` is not given; the shared training loop
(minimal/train.py) by `measure_interference`; the toy tasks (minimal/data.py) by `translation_batches`.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch2_additive/ciat.py
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig
    from minimal.train import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (idx, labels), each [B, T]

INITS = ("zero", "xavier")


class Bottleneck(nn.Module):
    """A(z) = W_2 Dropout(ReLU(W_1 z + b_1)) + b_2: no skip and no LayerNorm inside (the caller adds it)."""

    def __init__(self, d: int, m: int, dropout: float, init: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, m)  # [m, d]
        self.drop = nn.Dropout(dropout)
        self.w2 = nn.Linear(m, d)  # [d, m]
        with torch.no_grad():
            nn.init.xavier_uniform_(self.w1.weight)
            nn.init.zeros_(self.w1.bias)
            nn.init.zeros_(self.w2.bias)
            if init == "zero":
                nn.init.zeros_(self.w2.weight)
            else:
                nn.init.xavier_uniform_(self.w2.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.w2(self.drop(torch.relu(self.w1(z))))  # [..., d]


class Direction(nn.Module):
    """Every module of one translation direction: EA, 2L parallel adapters, optional LHT."""

    def __init__(self, d: int, n_layer: int, m: int, dropout: float, init: str, lht: bool, eps: float) -> None:
        super().__init__()
        self.ea_ln = nn.LayerNorm(d, eps=eps)
        self.ea = Bottleneck(d, m, dropout, init)
        self.attn = nn.ModuleList(Bottleneck(d, m, dropout, init) for _ in range(n_layer))
        self.mlp = nn.ModuleList(Bottleneck(d, m, dropout, init) for _ in range(n_layer))
        self.lht = nn.Linear(d, d, bias=False) if lht else None
        if self.lht is not None:
            nn.init.zeros_(self.lht.weight)


class CIAT(nn.Module):
    """The per-direction modules (`directions`), the active direction and the routing table of tag ids."""

    def __init__(self, directions: dict[str, Direction], tag_ids: dict[str, int] | None) -> None:
        super().__init__()
        self.directions = nn.ModuleDict(directions)
        self.active: str | None = None
        self.tag_ids = tag_ids  # language -> token id of <|lang_X|>; None: no automatic routing
        self.handles: list = []

    def current(self) -> Direction | None:
        return None if self.active is None else self.directions[self.active]

    def route(self, idx: torch.Tensor) -> str | None:
        """The direction "X_Y" named by the language tags of every row of idx [B, T] (None: no tags)."""
        by_id = {i: lang for lang, i in self.tag_ids.items()}
        found = set()
        for row in idx.tolist():
            tags = [by_id[t] for t in row if t in by_id]
            if len(tags) >= 2:
                found.add(f"{tags[0]}_{tags[1]}")
        if len(found) > 1:
            raise ValueError(f"CIAT routes one direction per batch; this batch mixes {sorted(found)}")
        return found.pop() if found else None


def _ciat(model: GPT) -> CIAT:
    if not isinstance(getattr(model, "ciat", None), CIAT):
        raise ValueError("this model has no CIAT modules; call apply_ciat first")
    return model.ciat


def set_direction(model: GPT, direction: str | None) -> None:
    """Route every following call through `direction`'s modules.

    None turns CIAT off, automatic routing included: the plain base, until a direction is set again.
    """
    ciat = _ciat(model)
    if direction is not None and direction not in ciat.directions:
        raise ValueError(f"no CIAT modules for direction {direction!r}; this model has {list(ciat.directions)}")
    ciat.active = direction


def _install_hooks(model: GPT, ciat: CIAT) -> None:
    def route(module: nn.Module, args: tuple, kwargs: dict) -> None:
        idx = args[0] if args else kwargs.get("idx")
        if ciat.tag_ids is not None and ciat.active is not None and idx is not None:
            found = ciat.route(idx)
            if found is not None:
                set_direction(model, found)

    def align_embeddings(module: nn.Module, args: tuple) -> tuple | None:
        mods = ciat.current()
        if mods is None:
            return None
        e = args[0]  # [B, T, d] token + position embeddings
        return (e + mods.ea(mods.ea_ln(e)),) + args[1:]

    def parallel(kind: str, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, out):
            mods = ciat.current()
            if mods is None:
                return None
            delta = getattr(mods, kind)[layer](args[0])  # args[0] = ln(x) [B, T, d], the sublayer's own input
            return (out[0] + delta, out[1]) if kind == "attn" else out + delta
        return hook

    def transform_last(module: nn.Module, args: tuple, out: tuple):
        mods = ciat.current()
        if mods is None or mods.lht is None:
            return None
        return out[0] + mods.lht(out[0]), out[1]  # [B, T, d], the block's cache

    ciat.handles = [model.register_forward_pre_hook(route, with_kwargs=True),
                    model.h[0].register_forward_pre_hook(align_embeddings),
                    model.h[-1].register_forward_hook(transform_last)]
    for i, block in enumerate(model.h):
        ciat.handles.append(block.attn.register_forward_hook(parallel("attn", i)))
        ciat.handles.append(block.mlp.register_forward_hook(parallel("mlp", i)))


def language_tag_ids(languages: tuple[str, ...] = ("a", "b", "c", "d")) -> dict[str, int]:
    """Token ids of <|lang_X|> in the shipped tokenizer."""
    from minimal.tokenizer import get_tokenizer, special_id

    enc = get_tokenizer()
    return {lang: special_id(enc, f"<|lang_{lang}|>") for lang in languages}


def apply_ciat(
    model: GPT,
    directions: tuple[str, ...] | list[str] = ("a_b",),
    bottleneck: int | None = None,
    init: str = "zero",
    lht: bool = False,
    tag_ids: dict[str, int] | None = None,
    auto_route: bool = True,
) -> Hooks:
    """Freeze `model` and add CIAT modules for each direction ("X_Y"); the first direction starts active.

    bottleneck defaults to d/2. auto_route reads language tags (tag_ids, default: the shipped tokenizer's
    <|lang_X|> ids) to pick the direction of each batch.
    """
    if not hasattr(model, "config") or not hasattr(model, "h"):
        raise TypeError(f"CIAT needs a GPT (model.config and blocks model.h), got {type(model).__name__}")
    if hasattr(model, "ciat"):
        raise ValueError("this model already has CIAT modules; call remove_ciat(model) first")
    directions = list(directions)
    if not directions or len(set(directions)) != len(directions):
        raise ValueError(f"directions must be distinct names such as 'a_b', got {directions}")
    for name in directions:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"a direction is a name such as 'a_b' (no dots), got {name!r}")
    d, L = model.config.n_embd, model.config.n_layer
    m = d // 2 if bottleneck is None else bottleneck
    if not isinstance(m, int) or not 0 < m <= d:
        raise ValueError(f"bottleneck must be an int in [1, n_embd={d}], got {m!r}")
    if init not in INITS:
        raise ValueError(f"unknown CIAT init {init!r}; choose one of {INITS}")
    if auto_route and tag_ids is None:
        tag_ids = language_tag_ids()
    if auto_route and any(not 0 <= i < model.config.vocab_size for i in tag_ids.values()):
        raise ValueError(f"tag ids {tag_ids} are outside the model's vocabulary ({model.config.vocab_size})")
    cfg, w = model.config, model.wte.weight
    mods = {name: Direction(d, L, m, cfg.dropout, init, lht, cfg.layer_norm_epsilon) for name in directions}
    ciat = CIAT(mods, tag_ids if auto_route else None).to(w.device, w.dtype)
    freeze_base(model)
    model.ciat = ciat
    _install_hooks(model, model.ciat)
    set_direction(model, directions[0])
    return Hooks()


def remove_ciat(model: GPT) -> CIAT:
    """Take the hooks out and detach the modules; the model is the plain base again."""
    ciat = _ciat(model)
    for h in ciat.handles:
        h.remove()
    ciat.handles = []
    del model.ciat
    return ciat


def count_ciat(config: GPTConfig, directions: tuple[str, ...] | list[str] = ("a_b",), bottleneck: int | None = None,
               lht: bool = False) -> int:
    """Per direction: EA (2d + 2dm + m + d) + 2L (2dm + m + d) (+ d^2 for the LHT); times the directions.

    With m = d/2: d^2 + 3.5d + 2L(d^2 + 1.5d) per direction.
    """
    d, L = config.n_embd, config.n_layer
    m = d // 2 if bottleneck is None else bottleneck
    adapter = 2 * d * m + m + d
    return len(directions) * (2 * d + adapter + 2 * L * adapter + (d * d if lht else 0))


# ------------------------------------------------------------------------------------------ interference


@torch.no_grad()
def mean_loss(model: GPT, batches: list[Batch]) -> float:
    model.eval()
    device = model.wte.weight.device
    return sum(model(x.to(device), labels=y.to(device)).loss.item() for x, y in batches) / len(batches)


def measure_interference(
    model: GPT,
    train_batches: dict[str, Callable[[torch.Generator], Batch]],
    eval_batches: dict[str, list[Batch]],
    cfg: TrainConfig,
    bottleneck: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per-direction held-out loss of: the base; one SHARED set of CIAT modules trained on every direction
    (batches taking turns, len(directions) * cfg.steps steps); SEPARATE modules per direction (cfg.steps each,
    so every direction sees the same data in both). `model` is copied, never changed.

    Returns {"base": {dir: loss}, "shared": {...}, "separate": {...}}; interference = shared - separate.
    """
    from minimal.train import train  # the shared loop (tqdm): needed for this experiment only

    names = list(train_batches)
    if not names or set(names) != set(eval_batches):
        raise ValueError(f"train and eval batches must name the same directions, got {names} and "
                         f"{list(eval_batches)}")
    out: dict[str, dict[str, float]] = {"base": {n: mean_loss(model, eval_batches[n]) for n in names}}

    shared = copy.deepcopy(model)
    apply_ciat(shared, ["shared"], bottleneck, auto_route=False)
    turns = itertools.cycle(names)
    train(shared, lambda g: train_batches[next(turns)](g), replace(cfg, steps=cfg.steps * len(names)),
          desc="ciat/shared")
    out["shared"] = {n: mean_loss(shared, eval_batches[n]) for n in names}

    separate = copy.deepcopy(model)
    apply_ciat(separate, names, bottleneck, auto_route=False)
    out["separate"] = {}
    for n in names:
        set_direction(separate, n)
        train(separate, train_batches[n], cfg, desc=f"ciat/{n}")
        out["separate"][n] = mean_loss(separate, eval_batches[n])
    return out


def translation_batches(directions: list[str], batch_size: int, block_size: int, n_eval: int = 4,
                        seed: int = 0) -> tuple[dict[str, Callable[[torch.Generator], Batch]], dict[str, list[Batch]]]:
    """Training batch functions and fixed validation batches of the toy tasks translate_X_Y (minimal.data)."""
    from minimal.data import get_task, task_batch

    tasks = {n: get_task(f"translate_{n}") for n in directions}
    train_fns = {n: (lambda g, t=t: task_batch(t, batch_size, block_size, g)) for n, t in tasks.items()}
    gen = torch.Generator().manual_seed(seed)
    evals = {n: [task_batch(t, batch_size, block_size, gen, split="val") for _ in range(n_eval)]
             for n, t in tasks.items()}
    return train_fns, evals
