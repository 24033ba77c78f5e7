"""QLoRA measured on the shipped `base`: weight bytes, quantisation error per layer, the loss before and after
quantisation, and a short LoRA fine-tune from the 4-bit base against the same fine-tune from the float base.

    python -m chapters.ch4_low_rank.qlora_measure                 # -> runs/qlora/qlora.md and qlora.json
    python -m chapters.ch4_low_rank.qlora_measure --out results   # the committed results/qlora.md and .json
    python -m chapters.ch4_low_rank.qlora_measure --steps 0       # no fine-tune (memory, error, loss only)

1. Bytes of the block linears' weights (what QLoRA quantises; the embeddings stay in float): float32,
   bfloat16, NF4 with float32 scales, NF4 with double-quantised scales (chapters/ch4_low_rank/qlora.py).
2. Per layer, the relative error ||W - W~||_F / ||W||_F of NF4 with double quantisation, of NF4 with exact
   scales, and of 4-bit integers (15 evenly spaced levels in [-1, 1], the same block-wise absmax scaling):
   NF4 spends its levels where normally distributed weights lie.
3. Next-token loss and perplexity on the docs corpus' validation tokens (every window of block_size) of
   the float base, the NF4 base (the real QuantLinear layers) and the two other 4-bit variants.
4. Unless --steps 0: the leaderboard's recipe (chapters.leaderboard.run_one: its steps, batch, seed and each
   method's registry learning rate) on one task, for `lora` on the float base and `qlora` on the NF4 base,
   and both bases zero-shot. One seed by default: differences of a few points are within seed noise.

The default run took 182 s on one thread of this project's 2-core machine (--threads; longer on a busy one).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from chapters.ch4_low_rank.qlora import QuantLinear, dequantize_blockwise, nf4_code, quantize_blockwise
from minimal.hooks import Hooks
from minimal.peft import freeze, replace_module

ROOT = Path(__file__).resolve().parents[2]
INT4 = torch.arange(-7, 8) / 7  # 4-bit integers with absmax scaling: 15 evenly spaced levels


def fake_quant(w: torch.Tensor, code: torch.Tensor, block: int = 64) -> torch.Tensor:
    """w rounded block-wise to `code` with exact (float32) scales, back in w's shape and dtype."""
    codes, absmax = quantize_blockwise(w.float(), code, block)
    return dequantize_blockwise(codes, absmax, code)[: w.numel()].view_as(w).to(w.dtype)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("h.")}


def quantize_only(model: nn.Module) -> Hooks:
    """Every block linear becomes a QuantLinear (NF4 + double quant), no LoRA: the 4-bit base itself."""
    for name, lin in block_linears(model).items():
        replace_module(model, name, QuantLinear(lin))
    freeze(model)
    return Hooks()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the tied embedding once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((w - w_hat).norm() / w.norm()).item()


def memory_and_error(base: nn.Module) -> tuple[dict, list[dict]]:
    """Weight bytes of the block linears in each format, and each layer's quantisation error."""
    rows, nbytes = [], {"float32": 0, "bfloat16": 0, "nf4 (float32 scales)": 0, "nf4 + double quant": 0}
    for name, lin in block_linears(base).items():
        w = lin.weight.detach()
        q = QuantLinear(lin)
        n = w.numel()
        nbytes["float32"] += 4 * n
        nbytes["bfloat16"] += 2 * n
        nbytes["nf4 (float32 scales)"] += n // 2 + 4 * math.ceil(n / 64)
        nbytes["nf4 + double quant"] += q.weight_bytes()
        w_nf4 = q.dequantize()
        rows.append({"layer": name, "shape": list(w.shape), "bits_per_weight": 8 * q.weight_bytes() / n,
                     "nf4_dq": rel_error(w, w_nf4), "nf4": rel_error(w, fake_quant(w, nf4_code())),
                     "int4": rel_error(w, fake_quant(w, INT4)), "nf4_dq_max_abs": (w - w_nf4).abs().max().item(),
                     "weight_std": w.std().item()})
    n_weights = sum(lin.weight.numel() for lin in block_linears(base).values())
    quantized = copy.deepcopy(base)
    quantize_only(quantized)
    memory = {"n_weights": n_weights, "bytes": nbytes,
              "bits_per_weight": {k: 8 * v / n_weights for k, v in nbytes.items()},
              "model_bytes": {"float32": model_bytes(base), "bfloat16": model_bytes(copy.deepcopy(base).bfloat16()),
                              "nf4 block linears, rest float32": model_bytes(quantized)}}
    return memory, rows


def losses(tokens: torch.Tensor) -> dict[str, dict]:
    """Loss and perplexity of the float base and of its 4-bit versions on `tokens` (every full window)."""
    from minimal.evaluate import perplexity
    from minimal.pretrained import load_base

    out = {}
    for name in ("float32", "nf4 + double quant (QuantLinear)", "nf4 (float32 scales)", "int4 (float32 scales)"):
        model = load_base("base")
        if name.startswith("nf4 + double"):
            quantize_only(model)
        elif name != "float32":
            code = nf4_code() if name.startswith("nf4") else INT4
            with torch.no_grad():
                for lin in block_linears(model).values():
                    lin.weight.copy_(fake_quant(lin.weight, code))
        ppl = perplexity(model, tokens, model.config.block_size, max_windows=len(tokens))
        out[name] = {"loss": math.log(ppl), "perplexity": ppl}
        print(f"{name:<36} loss {math.log(ppl):.4f}  perplexity {ppl:.3f}", flush=True)
    return out


def finetune(task: str, steps: int, seed: int) -> list[dict]:
    """The leaderboard's run for lora (float base), qlora (NF4 base), and both bases zero-shot."""
    from chapters.leaderboard import DEFAULT, run_one
    from chapters.registry import Method, get_method

    cfg = replace(DEFAULT, steps=steps, seed=seed, warmup=min(DEFAULT.warmup, steps))
    nf4_zero_shot = Method("nf4 base, zero-shot", "ch4", quantize_only, trains=False)
    rows = []
    for method in (get_method("zero-shot"), nf4_zero_shot, get_method("lora"), get_method("qlora")):
        t0 = time.perf_counter()
        row = run_one(method, task, cfg)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{method.name:<20} {task} {row['metric']} {row['score']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return rows


def markdown(result: dict) -> str:
    mem, lines = result["memory"], ["# QLoRA on the shipped base", ""]
    lines += [f"Written by `{result['command']}` ({result['seconds']:.0f} s, {result['threads']} thread(s), "
              f"torch {result['torch']}).", "",
              f"## Weight memory of the block linears ({mem['n_weights']:,} weights; embeddings stay float)", "",
              "| format | bytes | bits per weight | vs float32 |", "|---|---|---|---|"]
    for k, v in mem["bytes"].items():
        lines.append(f"| {k} | {v:,} | {mem['bits_per_weight'][k]:.3f} | {mem['bytes']['float32'] / v:.2f}x |")
    lines += ["", "The whole model (embeddings, LayerNorms and biases included): "
              + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in mem["model_bytes"].items()) + "."]
    lines += ["", "## Quantisation error per layer: ||W - W~||_F / ||W||_F", "",
              "| layer | shape | bits/weight | NF4 + double quant | NF4 | int4 | max abs error (NF4 + DQ) |",
              "|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits_per_weight']:.3f} | "
                     f"{r['nf4_dq']:.4f} | {r['nf4']:.4f} | {r['int4']:.4f} | {r['nf4_dq_max_abs']:.4f} |")
    lines += ["", f"## Loss on the docs corpus' validation tokens ({result['val_tokens']:,} tokens)", "",
              "| base | loss | perplexity |", "|---|---|---|"]
    lines += [f"| {k} | {v['loss']:.4f} | {v['perplexity']:.3f} |" for k, v in result["loss"].items()]
    if result["finetune"]:
        ft = result["finetune"]
        lines += ["", f"## Fine-tuning on `{ft[0]['task']}` (the leaderboard's recipe, {result['steps']} steps, "
                  f"seed {result['seed']})", "", f"| run | trainable | test {ft[0]['metric']} | final train loss "
                  "| s/step |", "|---|---|---|---|---|"]
        for r in ft:
            loss = f"{r['final_loss']:.3f}" if "final_loss" in r else "-"
            step = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] is not None else "-"
            lines.append(f"| {r['method']} | {r['trainable']:,} | {r['score']:.3f} | {loss} | {step} |")
        lines += ["", "One seed: differences of a few points are within seed noise."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="family")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps; 0 skips the fine-tune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "qlora")
    args = parser.parse_args(argv)
    if args.steps < 0 or args.threads <= 0:
        parser.error("--steps must be >= 0 and --threads positive")
    torch.set_num_threads(args.threads)
    from minimal.data import get_corpus
    from minimal.pretrained import load_base

    t0 = time.perf_counter()
    memory, layers = memory_and_error(load_base("base"))
    tokens = get_corpus("docs").tokens("val")
    result = {"memory": memory, "layers": layers, "val_tokens": len(tokens), "loss": losses(tokens),
              "finetune": finetune(args.task, args.steps, args.seed) if args.steps else [],
              "steps": args.steps, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.machine(), "command": "python -m chapters.ch4_low_rank.qlora_measure"}
    result["seconds"] = time.perf_counter() - t0
    md = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "qlora.md").write_text(md, encoding="utf-8")
    print(md)
    return result


if __name__ == "__main__":
    main()
