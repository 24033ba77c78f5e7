"""Benchmark (not a test): a LoRA training step of our GPT + `lora.py` against `transformers` + `peft`.

    python -m chapters.ch4_low_rank.lora_speed      # writes results/lora_speed_cpu.json and .md

Both sides get the same GPT-2 configuration (that of `base`: 4 layers, width 128, context 128, vocabulary
2048), the same base weights, the same LoRA weights (rank 8, alpha 16, on `c_attn`, `c_proj` and `c_fc`),
the same batch and AdamW over the LoRA parameters only. `lora_pair` checks that the two compute the same
logits before anything is timed, so the comparison is between two implementations of one function.

The steps are timed in alternation (ours, theirs, ours, ...) so that background load hits both alike; the
median step time of each side gives tokens per second. Goal (issue 6): ours no slower than `peft`.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import apply_lora
from minimal.benchmark import hf_model, step_fn, time_alternating, write_results
from minimal.gpt import GPT, GPTConfig, load_gpt2_state_dict
from minimal.peft import count_trainable

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["c_attn", "c_proj", "c_fc"]


def lora_pair(config: GPTConfig, r: int = 8, alpha: float = 16.0, targets: list[str] = TARGETS,
              seed: int = 0) -> tuple[nn.Module, GPT]:
    """(peft model, our model): one random GPT-2 of `config`, LoRA on `targets` in both, equal weights.

    The LoRA B matrices are random (not zero) so that the equality check below also covers the branch.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft

    torch.manual_seed(seed)
    hf = hf_model(config)
    ours = GPT(config)
    load_gpt2_state_dict(ours, hf.state_dict())
    theirs = peft.get_peft_model(hf, peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=True,
        init_lora_weights=False,  # random A and B
    ))
    apply_lora(ours, r=r, alpha=alpha, targets=targets)
    copied = 0
    for name, module in theirs.base_model.model.transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            mine = ours.get_submodule(name)
            with torch.no_grad():
                mine.A.copy_(module.lora_A["default"].weight)  # [r, in] in both
                mine.B.copy_(module.lora_B["default"].weight)  # [out, r] in both
            copied += 1
    n_layers = len([m for m in ours.modules() if hasattr(m, "A") and hasattr(m, "B")])
    if copied != n_layers or copied == 0:
        raise RuntimeError(f"copied {copied} LoRA layers from peft but ours has {n_layers}")
    ours.eval(), theirs.eval()
    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        gap = (ours(idx).logits - theirs(input_ids=idx).logits).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"our LoRA model and peft's disagree by {gap:.2e} on the same weights")
    if count_trainable(ours).trainable != count_trainable(theirs).trainable:
        raise RuntimeError("our LoRA model and peft's train different numbers of parameters")
    return theirs.train(), ours.train()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0:
        parser.error("--batch-size and --steps must be positive")
    config = GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128)
    theirs, ours = lora_pair(config, r=args.rank)
    idx = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size),
                        generator=torch.Generator().manual_seed(0))
    steps = {"ours": step_fn(ours, idx, True), "peft": step_fn(theirs, idx, False)}
    median = time_alternating(steps, args.steps)
    tokens = args.batch_size * config.block_size
    tps = {k: tokens / median[k] for k in steps}
    ratio = tps["ours"] / tps["peft"]
    result = {
        "config": config.__dict__, "rank": args.rank, "targets": TARGETS, "batch_size": args.batch_size,
        "steps_timed": args.steps, "trainable": count_trainable(ours).trainable,
        "median_step_ms": {k: 1000 * median[k] for k in steps},
        "tokens_per_second": tps, "ratio_ours_over_peft": ratio,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "command": "python -m chapters.ch4_low_rank.lora_speed",
    }
    md = ("| LoRA training step | median step (ms) | tokens/s |\n|---|---|---|\n"
          + "".join(f"| {k} | {result['median_step_ms'][k]:.1f} | {tps[k]:,.0f} |\n" for k in steps)
          + f"\nratio ours / peft: **{ratio:.2f}x** (rank {args.rank} on {', '.join(TARGETS)}; "
          f"{result['trainable']:,} trainable parameters; batch {args.batch_size} x {config.block_size} tokens; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}). Goal: ours no slower (>= 1.00x).\n")
    write_results(args.out, "lora_speed_cpu", result, md)
    return result


if __name__ == "__main__":
    main()
