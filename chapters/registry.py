"""Every training method by name, for the leaderboard and the tests.

A method is a function `apply(model) -> Hooks` (or `apply(model, task)` when `needs_task`: data-driven
selection such as a Fisher mask): given the pretrained GPT it freezes what stays fixed,
inserts its modules or chooses its trainable entries, and returns the hooks it needs in the shared loop
(minimal/train.py). The leaderboard then trains and evaluates every method identically. Methods that
are not a training recipe (proxy-tuning, LoraHub, serving, ...) are plain functions in their chapter
and are not listed here.

A method with a schedule over the whole run (AdaLoRA's budget, ...) reads the run length, cfg.steps, in its
hooks' `setup(model, cfg, optimizer)`. Each chapter registers its methods below with the settings used on the
leaderboard.

The contract every registered method keeps (checked for all of them by tests/test_contract.py):
- `apply_<name>(model, **hyperparameters)` returns a `Hooks`; it validates everything before it changes the
  model (a failed apply leaves it exactly as it was), and its new tensors follow the model's dtype and device.
- its module exposes `count_<name>(config, **hyperparameters) -> int`, the trainable count right after apply
  (for gradient-masking methods the entries really updated, hooks.n_trainable) as a closed-form formula of
  the GPTConfig, taking only the hyperparameters that change the count, with apply_<name>'s names and defaults.
- one name per hyperparameter across the repo: rank `r`; a period in steps (refresh, reset, merge,
  re-draw, budget update) `period`; the fraction of entries that train or are kept `fraction`; the
  prompt or prefix length `n_tokens`. Other names (alpha, bottleneck, targets, ...) are each method's own.
- the module docstring ends with a `Copy:` line naming the files it needs (tests/test_copy.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from chapters.ch1_introduction import baselines
from chapters.ch2_additive import adapters, fish_mask, ia3, prefix_tuning, prompt_tuning, sparse_adapter
from chapters.ch3_selective import bitfit, child_tuning, fish_dip, freeze_layers, learned_masks, lt_sft, pafi_hiwi, sam
from chapters.ch4_low_rank import (
    adalora,
    chain_of_lora,
    dora,
    dylora,
    dyna_dora,
    galore,
    intrinsic_dimension,
    krona,
    lisa,
    loha,
    lora,
    lora_plus,
    lotr,
    melora,
    mora,
    pissa,
    qlora,
    relora,
    sltrain,
    sora,
    unified_view,
    vera,
)
from minimal.hooks import Hooks


@dataclass(frozen=True)
class Method:
    name: str
    chapter: str
    apply: Callable[..., Hooks]
    lr: float = 1e-3  # the leaderboard's learning rate for this method
    trains: bool = True  # False: evaluate the model as it is (zero-shot)
    reserved_positions: int = 0  # positions the method itself occupies (prompt/prefix tokens)
    needs_task: bool = False  # apply(model, task): the method looks at training data before training
    exact_at_init: bool = True  # right after apply the logits equal the base model's (up to float rounding)
    description: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


# chapter 1: the baselines
register(Method("zero-shot", "ch1", baselines.apply_zero_shot, trains=False, description="the base as it is"))
register(Method("full", "ch1", baselines.apply_full, lr=1e-3, description="full fine-tuning"))
register(Method("last-block", "ch1", baselines.apply_last_block, lr=3e-3, description="top block + ln_f"))

# chapter 2: additive methods
register(Method("prompt-tuning", "ch2", partial(prompt_tuning.apply_prompt_tuning, n_tokens=20, init="vocab"),
                lr=3e-2, reserved_positions=20, exact_at_init=False, description="20 soft prompt vectors"))
register(Method("prefix-tuning", "ch2", partial(prefix_tuning.apply_prefix_tuning, n_tokens=10, projection=True),
                lr=3e-3, reserved_positions=10, exact_at_init=False,
                description="10 key/value prefixes per layer, MLP reparameterised"))
register(Method("houlsby", "ch2", partial(adapters.apply_houlsby, bottleneck=8), lr=3e-3, exact_at_init=False,
                description="2 bottleneck adapters per block + LayerNorms"))
register(Method("pfeiffer", "ch2", partial(adapters.apply_pfeiffer, bottleneck=8), lr=3e-3, exact_at_init=False,
                description="1 bottleneck adapter per block, after the MLP"))
register(Method("ia3", "ch2", partial(ia3.apply_ia3, attn="kv"), lr=3e-2,
                description="(IA)^3 vectors on k, v and the MLP hidden"))
register(Method("fish-mask", "ch2", partial(fish_mask.apply_fish_mask, fraction=0.005, n_samples=256), lr=5e-3,
                needs_task=True, description="top-0.5% empirical-Fisher entries"))
register(Method("fish-random", "ch2", partial(fish_mask.apply_fish_mask, data=None, fraction=0.005, score="random"),
                lr=5e-3, description="random 0.5% entries (the FISH baseline)"))
register(Method("sparse-adapter", "ch2", partial(sparse_adapter.apply_sparse_adapter, bottleneck=16, fraction=0.5),
                lr=3e-3, exact_at_init=False,
                description="Pfeiffer m=16 SNIP-pruned to 50% at step 0 (counted dense; non-zeros = m=8)"))

# chapter 3: selective methods
register(Method("bitfit", "ch3", partial(bitfit.apply_bitfit, variant="all"), lr=3e-2, description="all biases"))
register(Method("bitfit-subset", "ch3", partial(bitfit.apply_bitfit, variant="subset"), lr=3e-2,
                description="query + MLP-inner biases"))
register(Method("freeze-top2", "ch3", partial(freeze_layers.apply_freeze_layers, k=2), lr=1e-3,
                description="top 2 blocks + ln_f"))
register(Method("child-tuning-f", "ch3", partial(child_tuning.apply_child_tuning_f, fraction=0.3), lr=1e-3,
                description="Bernoulli(0.3) gradient mask each step"))
register(Method("child-tuning-d", "ch3", partial(child_tuning.apply_child_tuning_d, fraction=0.3, max_batches=64),
                lr=1e-3, needs_task=True, description="Fisher-chosen child network, 30% of block entries"))
register(Method("learned-masks", "ch3", learned_masks.apply_learned_masks, lr=1e-3, exact_at_init=False,
                description="binary masks over block weights (straight-through)"))
register(Method("sam", "ch3", partial(sam.apply_sam, fraction=0.005, n_batches=32), lr=5e-3, needs_task=True,
                description="top 0.5% |summed burn-in gradient| per tensor"))
register(Method("pafi", "ch3", partial(pafi_hiwi.apply_pafi, fraction=0.005), lr=5e-3,
                description="smallest-|w| 0.5% of block weights, one mask for every task"))
register(Method("hiwi", "ch3", partial(pafi_hiwi.apply_hiwi, r=8), lr=1e-2,
                description="adapter on mlp.c_fc.bias, merged away (no latency)"))
register(Method("lt-sft", "ch3", partial(lt_sft.apply_lt_sft, fraction=0.005, full_steps=60), lr=2e-2,
                needs_task=True, description="top 0.5% most-moved entries after 60 full steps, rewound"))
register(Method("fish-dip", "ch3", partial(fish_dip.apply_fish_dip, fraction=0.005, period=50), lr=5e-3,
                needs_task=True, description="0.5% Fisher mask from the hardest samples, refreshed every 50 steps"))

# chapter 4: low-rank methods
register(Method("lora", "ch4", partial(lora.apply_lora, r=8, alpha=16, targets=("c_attn",)), lr=5e-3,
                description="LoRA r=8 alpha=16 on c_attn"))
register(Method("dora", "ch4", partial(dora.apply_dora, r=8, alpha=16, targets=("c_attn",)), lr=5e-3,
                description="DoRA (magnitude + LoRA direction) r=8 on c_attn"))
register(Method("pissa", "ch4", partial(pissa.apply_pissa, r=8, targets=("c_attn",)), lr=1e-3,
                description="PiSSA: principal singular components, residual frozen, r=8"))
register(Method("milora", "ch4", partial(pissa.apply_milora, r=8, targets=("c_attn",)), lr=1e-3,
                description="MiLoRA: minor singular components, residual frozen, r=8"))
register(Method("krona", "ch4", partial(krona.apply_krona, scale=4.0, targets=("c_attn",)), lr=1e-2,
                description="KronA: s*kron(A, B) on c_attn, near-square factors, s=4"))
register(Method("kadaptation", "ch4", partial(krona.apply_kadaptation, n=4, r=2, scale=4.0, targets=("c_attn",)),
                lr=1e-2, description="KAdaptation: sum of 4 kron(A_i shared, u_i v_i^T), r=2, on c_attn"))
register(Method("mora", "ch4", partial(mora.apply_mora, r=8, kind="sharing", targets=("c_attn",)), lr=2e-3,
                description="MoRA (sharing): square M at LoRA r=8's budget on c_attn"))
register(Method("mora-rotation", "ch4", partial(mora.apply_mora, r=8, kind="rotation", targets=("c_attn",)),
                lr=2e-3, description="MoRA (rotation): square M at LoRA r=8's budget on c_attn"))
register(Method("melora", "ch4", partial(melora.apply_melora, n=4, r=2, targets=("c_attn",)), lr=1e-2,
                description="MELoRA: 4 mini-LoRAs of rank 2 on c_attn (equivalent rank 8)"))
register(Method("lotr", "ch4", partial(lotr.apply_lotr, r=8, targets=("c_attn",)), lr=1e-2,
                description="LoTR: Tucker-2 on c_attn, U, V shared across layers, 8x8 core per layer"))
register(Method("mam-adapter", "ch4", partial(unified_view.apply_mam_adapter, n_tokens=10, bottleneck=16), lr=2e-3,
                reserved_positions=10, exact_at_init=False,
                description="MAM: 10-slot prefix + scaled parallel adapter on the MLP"))
register(Method("scaled-pa", "ch4", partial(unified_view.apply_scaled_parallel_adapter, bottleneck=16), lr=1e-3,
                description="scaled parallel adapter (r=16, s=4) beside every MLP"))
register(Method("intrinsic-dim", "ch4", partial(intrinsic_dimension.apply_intrinsic_dimension, d=1000,
                exclude=("wte", "wpe")), lr=3e-2, description="DID: 1000-dim Fastfood subspace, embeddings fixed"))
register(Method("galore", "ch4", partial(galore.apply_galore, r=16, period=50, alpha=0.25), lr=1e-3,
                description="all weights train; Adam in a rank-16 gradient projection, refreshed every 50 steps"))
register(Method("relora", "ch4", partial(relora.apply_relora, r=8, alpha=16, targets=("c_attn",), period=50,
                                         restart_warmup=5), lr=5e-3,
                description="LoRA r=8 on c_attn merged and restarted every 50 steps, state pruned, jagged lr"))
register(Method("chain-of-lora", "ch4", partial(chain_of_lora.apply_chain_of_lora, r=8, alpha=16,
                                                targets=("c_attn",), links=3), lr=5e-3,
                description="Chain of LoRA: 3 links (r=8, c_attn) merged in sequence"))
register(Method("lisa", "ch4", partial(lisa.apply_lisa, n_active=1, period=20), lr=1e-3,
                description="wte/wpe/ln_f + 1 random block, resampled every 20 steps"))
register(Method("sltrain", "ch4", partial(sltrain.apply_sltrain, r=8, alpha=16, fraction=0.03, targets=("c_attn",)),
                lr=5e-3, description="update = LoRA r=8 + 3% fixed random sparse entries on c_attn"))


# AdaLoRA's budget phases as fractions of the run: 10% warm-up at full rank, 30% at the final budget
register(Method("adalora", "ch4", partial(adalora.apply_adalora, init_r=12, target_r=8, alpha=16, targets=("c_attn",),
                                          t_init=0.1, t_final=0.3, period=5), lr=1e-2,
                description="AdaLoRA: SVD-form update, rank 12 -> average 8 on c_attn by importance, cubic budget"))
register(Method("sora", "ch4", partial(sora.apply_sora, r=8, alpha=16, targets=("c_attn",), xi=1e-4), lr=1e-2,
                description="SoRA: LoRA r_max=8 with a soft-thresholded gate between A and B"))
register(Method("dyna-dora", "ch4", partial(dyna_dora.apply_dyna_dora, r=8, alpha=16, targets=("c_attn",),
                                            period=10), lr=1e-2,
                description="dynamic-rank DoRA: 12 rank-1 components per matrix pruned to 8 on average"))
register(Method("dylora", "ch4", partial(dylora.apply_dylora, r=8, alpha=16, targets=("c_attn",)), lr=1e-2,
                description="DyLoRA: random rank 1..8 per step (frozen mode), served at rank 8"))
register(Method("lora-plus", "ch4", partial(lora_plus.apply_lora_plus, r=8, alpha=16, targets=("c_attn",),
                                            ratio=16.0), lr=2.5e-3,
                description="LoRA+: LoRA r=8 on c_attn, B at 16x the learning rate of A (A at half LoRA's)"))
register(Method("vera", "ch4", partial(vera.apply_vera, r=256, targets=("c_attn",)), lr=2e-2,
                description="VeRA: frozen random A, B shared by all c_attn, trained vectors d [256], b [out]"))
register(Method("loha", "ch4", partial(loha.apply_loha, r=4, alpha=8, targets=("c_attn",)), lr=2e-2,
                description="LoHa: (B1 A1) * (B2 A2) r=4 on c_attn (LoRA r=8's budget, rank up to 16)"))
register(Method("qlora", "ch4", partial(qlora.apply_qlora, r=8, alpha=16, targets=("c_attn",)), lr=5e-3,
                exact_at_init=False,
                description="QLoRA: every block linear in NF4 (double-quantised scales), LoRA r=8 on c_attn"))
