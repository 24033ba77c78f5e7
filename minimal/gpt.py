"""A GPT-2 language model in one readable file, built so that PEFT methods never have to edit it.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): token and
learned position embeddings, L pre-LayerNorm blocks

    x = x + attn(ln_1(x))        attn: causal multi-head self-attention
    x = x + mlp(ln_2(x))         mlp:  Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d)

a final LayerNorm, and logits = ln_f(x) @ wte.weight^T (the output head is tied to the input embedding).
Parameter names follow GPT-2 (`wte wpe h.N.ln_1 attn.c_attn attn.c_proj ln_2 mlp.c_fc mlp.c_proj ln_f`),
but every projection is an `nn.Linear` (weight [out, in]); `load_gpt2_state_dict` transposes GPT-2's
`Conv1D` weights ([in, out]) on the way in.

Extension points used by the methods (none of them edits this file):
- every projection is a submodule called by attribute, so a method can replace or wrap it by name
  (LoRA, IA3, DoRA, ...: see `minimal.peft.inject`);
- `forward(inputs_embeds=...)` takes embeddings instead of token ids (prompt tuning);
- `forward(prefix_kv=[(k, v), ...])` prepends per-layer keys/values to attention (prefix tuning).
  Position convention: the prefix has no position of its own; real tokens take positions
  `position_offset .. position_offset+T-1` (pass `position_offset=P` to match Hugging Face `peft`,
  where GPT-2 counts the P virtual tokens as past positions);
- `Block.attn_out` / `Block.mlp_out` are identity modules on each sublayer's output, ready to be
  replaced by an adapter (Houlsby, Pfeiffer, AdapterFusion), and `forward(output_hidden_states=True)`
  returns the residual stream after the embedding and after every block;
- the model is a plain `nn.Module`, so `torch.func.functional_call(model, params, (idx,))` runs it with
  any parameter dict (intrinsic dimension, LoraHub).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, H, S, hd]


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    block_size: int = 128  # the longest sequence (positions) the model can see
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def n_params(self) -> int:
        """Parameter count by formula: V d + T d + L (12 d^2 + 13 d) + 2 d (tied head, with biases)."""
        V, T, L, d = self.vocab_size, self.block_size, self.n_layer, self.n_embd
        return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> GPTConfig:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()  # no kernel launch when dropout is off


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q | k | v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = _dropout(config.dropout)
        self.fast = True  # scaled_dot_product_attention; False runs the readable manual path

    def forward(self, x: torch.Tensor, prefix: KV | None = None, cache: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x [B, T, d]. `prefix` and `cache` are keys/values [B, H, S, hd] placed before this chunk.

        Returns the output [B, T, d] and this chunk's (k, v) appended to `cache` (for the KV cache).
        """
        B, T, d = x.shape
        hd = d // self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)  # each [B, T, d]
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)  # [B, H, T, hd]
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)  # [B, H, T, hd]
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B, H, C+T, hd]
        new_cache = (k, v)
        if prefix is not None:
            pk, pv = (t.expand(B, -1, -1, -1) for t in prefix)  # a batch-1 prefix broadcasts
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)  # [B, H, S, hd]
        S = k.shape[2]
        # query i (absolute index S-T+i among the S keys) sees every key j <= S-T+i
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # [T, S]
        p = self.attn_dropout if self.training else 0.0
        if self.fast and S == T:  # plain causal attention: let the kernel build the mask itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, H, T, hd]
        elif self.fast:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, T, hd]
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # [B, H, T, S]
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            att = F.dropout(att, p=p, training=self.training)
            y = att @ v  # [B, H, T, hd]
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # [B, T, d]
        return self.resid_dropout(self.c_proj(y)), new_cache


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = _dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # [B, T, 4d]
        return self.dropout(self.c_proj(h))  # [B, T, d]


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)
        # identity hooks on the sublayer outputs: adapters replace these (x + adapter(sublayer(x)))
        self.attn_out: nn.Module = nn.Identity()
        self.mlp_out: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, prefix: KV | None = None, cache: KV | None = None) -> tuple[torch.Tensor, KV]:
        a, new_cache = self.attn(self.ln_1(x), prefix=prefix, cache=cache)
        x = x + self.attn_out(a)
        x = x + self.mlp_out(self.mlp(self.ln_2(x)))
        return x, new_cache


@dataclass
class GPTOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # mean cross-entropy over labels != -100
    hidden_states: list[torch.Tensor] | None = None  # L+1 tensors [B, T, d]: embeddings, then each block
    cache: list[KV] | None = None  # per layer (k, v) [B, H, C+T, hd], for generate()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = _dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_fast_attention(self, fast: bool) -> None:
        """Switch every layer between `scaled_dot_product_attention` and the manual softmax path."""
        for block in self.h:
            block.attn.fast = fast

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prefix_kv: list[KV] | None = None,
        position_offset: int = 0,
        cache: list[KV] | None = None,
        output_hidden_states: bool = False,
    ) -> GPTOutput:
        """Token ids idx [B, T] (or inputs_embeds [B, T, d]) -> GPTOutput with logits [B, T, V].

        labels [B, T]: the token each position should predict next is labels[:, t+1]; -100 is ignored.
        prefix_kv: per layer (k, v) of shape [B or 1, H, P, hd] that every query may attend to.
        cache: per layer (k, v) from an earlier call; positions continue after the cached length.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        if idx is not None and (idx.dim() != 2 or idx.dtype not in (torch.long, torch.int)):
            raise ValueError(f"idx must be integer token ids of shape [B, T], got {idx.dtype} of shape "
                             f"{tuple(idx.shape)}; for one sequence use idx[None] (or idx.unsqueeze(0))")
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must have shape [B, T, d], got {tuple(inputs_embeds.shape)}")
        x = self.wte(idx) if idx is not None else inputs_embeds  # [B, T, d]
        B, T, _ = x.shape
        start = position_offset + (cache[0][0].shape[2] if cache else 0)
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens at position {start} exceeds block_size {self.config.block_size}"
            )
        if prefix_kv is not None and len(prefix_kv) != len(self.h):
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model has {len(self.h)}")
        pos = torch.arange(start, start + T, device=x.device)  # [T]
        x = self.drop(x + self.wpe(pos))  # [B, T, d]
        hidden = [x] if output_hidden_states else None
        new_cache = []
        for i, block in enumerate(self.h):
            x, layer_cache = block(
                x, prefix=prefix_kv[i] if prefix_kv else None, cache=cache[i] if cache else None
            )
            new_cache.append(layer_cache)
            if hidden is not None:
                hidden.append(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # [B, T, V] (tied head)
        loss = None
        if labels is not None:
            # position t predicts labels[:, t+1]; shifting the labels (not the logits) avoids copying logits
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-100)
        return GPTOutput(logits=logits, loss=loss, hidden_states=hidden, cache=new_cache)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx [B, T] by up to max_new_tokens tokens. temperature 0 means greedy (argmax).

        With use_cache the prompt is run once and each new token costs one position (a key/value cache);
        without it every step re-runs the whole sequence. Both give the same tokens. Generation stops early
        when every row has produced `stop_token`.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty prompt idx of shape [B, T] with T >= 1, got shape "
                             f"{tuple(idx.shape)}; start an empty text with a token such as <|endoftext|>")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int (or None for no cut), got {top_k!r}")
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                f"{self.config.block_size}"
            )
        cache, step_input = None, idx
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_input, cache=cache)
                cache = out.cache
            else:
                out = self(idx)
            logits = out.logits[:, -1, :]  # [B, V]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # [B, 1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # [B, 1]
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
            if stop_token is not None:
                done |= nxt[:, 0] == stop_token
                if bool(done.all()):
                    break
        return idx


# ---------------------------------------------------------------------------------------------------
# GPT-2 checkpoints in the Hugging Face layout (transformer.h.0.attn.c_attn.weight [in, out], ...)

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; the tied head


def convert_gpt2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 names and Conv1D layout -> ours (drop `transformer.`, transpose Conv1D)."""
    out = {}
    for key, value in sd.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_IGNORED):
            continue
        out[name] = value.t().contiguous() if name.endswith(_CONV1D) else value
    return out


def to_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> the Hugging Face GPT2LMHeadModel layout (Conv1D weights transposed back)."""
    out = {}
    for name, value in model.state_dict().items():
        out["transformer." + name] = value.t().contiguous() if name.endswith(_CONV1D) else value.clone()
    out["lm_head.weight"] = model.wte.weight.detach().clone()
    return out


def load_gpt2_state_dict(model: GPT, source: str | Path | dict[str, torch.Tensor]) -> GPT:
    """Load a GPT-2 checkpoint (a safetensors file or a state dict in the HF layout) into `model`.

    Every tensor is checked by name and shape before anything is copied; a mismatch raises ValueError
    that names the offending tensors, so a checkpoint for another configuration never half-loads.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path} (expected a .safetensors file)")
        from safetensors.torch import load_file

        source = load_file(str(path))
    sd = convert_gpt2_state_dict(source)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise ValueError("checkpoint does not fit this GPTConfig: " + " | ".join(parts))
    model.load_state_dict(sd)
    return model


def gpt2_config(name: str = "gpt2") -> GPTConfig:
    """The published GPT-2 sizes (for a local checkpoint of real GPT-2 weights)."""
    sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
             "gpt2-xl": (48, 25, 1600)}
    if name not in sizes:
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {sorted(sizes)}")
    L, H, d = sizes[name]
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=L, n_head=H, n_embd=d)
