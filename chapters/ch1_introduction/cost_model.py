"""What full fine-tuning costs, by formula: parameters, training memory and per-task storage.

Why parameter-efficient fine-tuning exists. Full fine-tuning with Adam/AdamW keeps, for every one of the
Phi parameters, the weight, its gradient and two moment estimates; a fine-tuned copy of the whole model is
then stored per task. A PEFT method trains Phi_t << Phi parameters: the frozen weights are still held (to
run the forward and backward passes), but gradients, optimizer state and the per-task checkpoint shrink to
the trainable part.

Model states in bytes (the accounting of ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054):

    fp32:             weights 4 Phi  + gradients 4 Phi_t + Adam m, v 8 Phi_t                    = 4 Phi + 12 Phi_t
    mixed precision:  16-bit weights 2 Phi + 16-bit gradients 2 Phi_t
                      + fp32 master weights 4 Phi_t + fp32 m, v 8 Phi_t                          = 2 Phi + 14 Phi_t

so full fine-tuning (Phi_t = Phi) costs 16 Phi bytes either way: 112 GB for a 7B model before activations.

Activations (stated approximation): the estimate of Korthikanti et al. 2022 (arXiv 2205.05198) for one
GPT block with 16-bit activations, dropout masks, no recomputation and no tensor/sequence parallelism:

    bytes per layer = s b d (34 + 5 H s / d)         s sequence length, b batch, d width, H heads

times the number of layers (embeddings, the final norm and the logits are left out). It is derived for a
GPT-2 block (4d MLP, multi-head attention) and applied unchanged to the Llama rows as an order of magnitude;
an fp32 run doubles it. Most PEFT methods do not reduce it: prompts, prefixes, adapters in every layer,
BitFit and sparse masks all back-propagate through the whole network.

Per-task storage: bytes_per_param * Phi for a full fine-tuned checkpoint (2 in bf16) versus
bytes_per_param * Phi_t for a PEFT checkpoint, plus the index of each entry for sparse methods.

Parameter counts (`param_counts`) follow the architectures exactly and match the published sizes: GPT-2
(learned positions, LayerNorm with bias, biases on every linear, 4d MLP, tied head) and Llama 2 (rotary
positions so no position table, RMSNorm, no biases, gated SiLU MLP, untied head, grouped-query attention
with 8 key/value heads in the 70B model).
"""

from __future__ import annotations

from dataclasses import dataclass

from minimal.gpt import GPTConfig

GB = 1e9  # decimal gigabytes, as in the papers' "112 GB for 7B"


@dataclass(frozen=True)
class ModelShape:
    """The few numbers that decide a decoder-only transformer's size."""

    name: str
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int  # hidden width of the MLP (4 d in GPT-2; 11008 in Llama-2 7B)
    context: int  # the longest sequence it is trained on
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (ordinary multi-head)
    learned_positions: bool = True  # a position table of context x d (GPT-2); False for rotary (Llama)
    tied_embeddings: bool = True  # the output head is the input embedding
    gated_mlp: bool = False  # down(act(gate(x)) * up(x)): three matrices instead of two
    bias: bool = True  # biases on the linears and the norms
    norm: str = "layernorm"  # "layernorm" (weight + bias) or "rmsnorm" (weight only)

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "context"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelShape.{field} must be positive, got {getattr(self, field)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def d_kv(self) -> int:
        """Width of the key (and of the value) projection: kv_heads * head size."""
        return self.kv_heads * (self.d_model // self.n_head)


def from_gpt_config(config: GPTConfig, name: str = "minimal GPT") -> ModelShape:
    """The shape of our own GPT (minimal/gpt.py)."""
    return ModelShape(name, config.vocab_size, config.n_embd, config.n_layer, config.n_head, 4 * config.n_embd,
                      context=config.block_size, bias=config.bias)


GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}  # name -> (layers, heads, d)


def gpt2_shape(name: str = "gpt2") -> ModelShape:
    if name not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {sorted(GPT2_SIZES)}")
    L, H, d = GPT2_SIZES[name]
    return ModelShape(name, 50257, d, L, H, 4 * d, context=1024)


LLAMA2_SIZES = {"llama-2-7b": (32, 32, 4096, 11008, 32), "llama-2-13b": (40, 40, 5120, 13824, 40),
                "llama-2-70b": (80, 64, 8192, 28672, 8)}  # name -> (layers, heads, d, d_ff, kv heads)


def llama2_shape(name: str = "llama-2-7b") -> ModelShape:
    if name not in LLAMA2_SIZES:
        raise ValueError(f"unknown Llama 2 size {name!r}; choose one of {sorted(LLAMA2_SIZES)}")
    L, H, d, ff, kv = LLAMA2_SIZES[name]
    return ModelShape(name, 32000, d, L, H, ff, context=4096, n_kv_head=kv, learned_positions=False,
                      tied_embeddings=False, gated_mlp=True, bias=False, norm="rmsnorm")


# ------------------------------------------------------------------------------------------ parameters


def param_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters by part: embeddings, positions, attention, mlp, norms, head (0 when tied)."""
    d, L, b = shape.d_model, shape.n_layer, int(shape.bias)
    norm = d * (2 if shape.norm == "layernorm" and shape.bias else 1)  # one norm layer
    # q (d -> d), k and v (d -> d_kv), output (d -> d), each with a bias of its output width
    attn = d * d + 2 * d * shape.d_kv + d * d + b * (d + 2 * shape.d_kv + d)
    n_in = 2 if shape.gated_mlp else 1  # gate and up, or one up-projection
    mlp = n_in * d * shape.d_ff + shape.d_ff * d + b * (n_in * shape.d_ff + d)
    return {
        "embeddings": shape.vocab_size * d,
        "positions": shape.context * d if shape.learned_positions else 0,
        "attention": L * attn,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * norm,  # two per block and a final one
        "head": 0 if shape.tied_embeddings else shape.vocab_size * d,
    }


def param_count(shape: ModelShape) -> int:
    return sum(param_counts(shape).values())


def lora_param_count(shape: ModelShape, rank: int = 8) -> int:
    """LoRA of rank r on the query and value projections of every layer: L r (d + d) + L r (d + d_kv).

    The setting of the LoRA paper's GPT-3 and of most Llama recipes (4,194,304 for Llama-2 7B at r = 8);
    used in `cost_table` as a concrete PEFT budget.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    d = shape.d_model
    return shape.n_layer * rank * ((d + d) + (d + shape.d_kv))


# ------------------------------------------------------------------------------------------ memory


@dataclass(frozen=True)
class Memory:
    """Bytes held during training, by kind."""

    weights: int  # the model as it runs (16-bit in mixed precision)
    gradients: int
    master_weights: int  # fp32 copy of the trainable weights (mixed precision only)
    optimizer: int  # Adam's m and v in fp32
    activations: int

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations


PRECISIONS = ("fp32", "mixed")


def model_state_bytes(n_params: int, n_trainable: int, precision: str = "fp32") -> Memory:
    """Weights, gradients, master weights and AdamW state for Phi parameters of which Phi_t train.

    fp32: 4 Phi + 4 Phi_t + 8 Phi_t. mixed: 2 Phi + 2 Phi_t + 4 Phi_t + 8 Phi_t. Full fine-tuning: 16 Phi.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if n_params <= 0 or not 0 <= n_trainable <= n_params:
        raise ValueError(f"need 0 <= n_trainable <= n_params and n_params > 0, got {n_trainable}, {n_params}")
    if precision == "fp32":
        return Memory(4 * n_params, 4 * n_trainable, 0, 8 * n_trainable, 0)
    return Memory(2 * n_params, 2 * n_trainable, 4 * n_trainable, 8 * n_trainable, 0)


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, precision: str = "mixed") -> int:
    """L s b d (34 + 5 H s / d) bytes with 16-bit activations (Korthikanti et al. 2022); doubled for fp32."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    s, b, d, H = seq_len, batch_size, shape.d_model, shape.n_head
    per_layer = s * b * (34 * d + 5 * H * s)  # = s b d (34 + 5 H s / d), kept in integers
    return shape.n_layer * per_layer * (2 if precision == "fp32" else 1)


def training_memory(shape: ModelShape, n_trainable: int | None = None, precision: str = "mixed",
                    batch_size: int = 1, seq_len: int | None = None) -> Memory:
    """Training memory of `shape` when n_trainable parameters train (None: full fine-tuning)."""
    n_params = param_count(shape)
    n_trainable = n_params if n_trainable is None else n_trainable
    states = model_state_bytes(n_params, n_trainable, precision)
    act = activation_bytes(shape, batch_size, seq_len or shape.context, precision)
    return Memory(states.weights, states.gradients, states.master_weights, states.optimizer, act)


def checkpoint_bytes(n_stored: int, bytes_per_param: int = 2, index_bytes: int = 0) -> int:
    """Per-task storage: each stored value, plus its position for a sparse delta (e.g. 4 for int32)."""
    if n_stored < 0 or bytes_per_param <= 0 or index_bytes < 0:
        raise ValueError(f"invalid storage arguments: {n_stored}, {bytes_per_param}, {index_bytes}")
    return n_stored * (bytes_per_param + index_bytes)


# ------------------------------------------------------------------------------------------ table


def table_shapes() -> list[ModelShape]:
    return [gpt2_shape(n) for n in GPT2_SIZES] + [llama2_shape(n) for n in LLAMA2_SIZES]


def cost_table(shapes: list[ModelShape] | None = None, lora_rank: int = 8, batch_size: int = 1,
               seq_len: int | None = None) -> list[dict[str, float | int | str]]:
    """One row per model: parameters and GB of full fine-tuning vs LoRA (q, v; rank r) in mixed precision.

    Activations use each model's own context unless seq_len is given; they are the same for both columns.
    """
    rows = []
    for shape in shapes or table_shapes():
        n = param_count(shape)
        n_t = lora_param_count(shape, lora_rank)
        s = seq_len or shape.context
        full = training_memory(shape, None, "mixed", batch_size, s)
        peft = training_memory(shape, n_t, "mixed", batch_size, s)
        rows.append({
            "model": shape.name,
            "params": n,
            "lora_params": n_t,
            "lora_percent": 100 * n_t / n,
            "batch_size": batch_size,
            "seq_len": s,
            "full_fp32_states_gb": model_state_bytes(n, n, "fp32").model_states / GB,
            "full_mixed_states_gb": full.model_states / GB,
            "activations_gb": full.activations / GB,
            "lora_mixed_states_gb": peft.model_states / GB,
            "full_checkpoint_gb": checkpoint_bytes(n) / GB,
            "lora_checkpoint_mb": checkpoint_bytes(n_t) / 1e6,
        })
    return rows


def format_table(rows: list[dict[str, float | int | str]]) -> str:
    """A markdown table of `cost_table` rows (parameters in millions, memory in GB)."""
    head = ("| model | params | LoRA params (%) | full FT states GB | LoRA states GB | activations GB "
            "| checkpoint full GB | checkpoint LoRA MB |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['lora_params'] / 1e6:.2f}M ({r['lora_percent']:.3f}%) "
            f"| {r['full_mixed_states_gb']:,.1f} | {r['lora_mixed_states_gb']:,.1f} "
            f"| {r['activations_gb']:,.1f} (b={r['batch_size']}, s={r['seq_len']}) | {r['full_checkpoint_gb']:,.2f} "
            f"| {r['lora_checkpoint_mb']:,.1f} |")
    return "\n".join(lines)
