"""Benchmark (not a test): a training step of our GPT against Hugging Face `GPT2LMHeadModel`.

    python -m minimal.benchmark            # writes results/benchmark_cpu.json and .md

Both models get the configuration of `base`, the same weights, the same batch, and AdamW; the two are
timed in alternation (so background load hits both alike), and the median step time of each gives
tokens per second. The goal is ours >= 1.25x the tokens per second of `transformers`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from minimal.gpt import GPT, GPTConfig, to_gpt2_state_dict

ROOT = Path(__file__).resolve().parent.parent


def hf_model(config: GPTConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                     n_layer=config.n_layer, n_head=config.n_head, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def step_fn(model, idx: torch.Tensor, ours: bool):
    """A closure doing one timed training step: forward, backward, AdamW over the trainable tensors.

    `ours` picks the call convention: our GPT takes (idx, labels=...), `transformers` (input_ids=..., labels=...).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        out = model(idx, labels=idx) if ours else model(input_ids=idx, labels=idx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def time_alternating(steps: dict, rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each closure in `steps`, called in alternation (a, b, a, b, ...) so that
    background load hits every side alike; the first `warmup` rounds are not counted."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(rounds + warmup):
        for name, step in steps.items():
            t = step()
            if i >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def write_results(out: Path, stem: str, result: dict, md: str) -> None:
    """results/<stem>.json (the numbers) and results/<stem>.md (the table), and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    print(md)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    config = GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    ours = GPT(config).train()
    theirs = hf_model(config).train()
    theirs.load_state_dict(to_gpt2_state_dict(ours), strict=False)
    idx = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size))
    steps = {"ours": step_fn(ours, idx, True), "transformers": step_fn(theirs, idx, False)}
    median = time_alternating(steps, args.steps)
    tokens = args.batch_size * config.block_size
    tps = {k: tokens / median[k] for k in steps}
    result = {
        "config": config.__dict__, "batch_size": args.batch_size, "steps_timed": args.steps,
        "median_step_ms": {k: 1000 * median[k] for k in steps},
        "tokens_per_second": tps, "ratio_ours_over_transformers": tps["ours"] / tps["transformers"],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "command": "python -m minimal.benchmark",
    }
    md = ("| model | median step (ms) | tokens/s |\n|---|---|---|\n"
          + "".join(f"| {k} | {result['median_step_ms'][k]:.1f} | {tps[k]:,.0f} |\n" for k in steps)
          + f"\nratio ours / transformers: **{result['ratio_ours_over_transformers']:.2f}x** "
          f"(training step: forward, backward, AdamW; batch {args.batch_size} x {config.block_size} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})\n")
    write_results(args.out, "benchmark_cpu", result, md)
    return result


if __name__ == "__main__":
    main()
