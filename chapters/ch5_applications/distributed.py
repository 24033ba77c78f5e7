"""Distributed LoRA fine-tuning with torch.distributed: one replica per process, gradients averaged (DDP).

Run (two processes on one machine; CPU uses the gloo backend, CUDA uses nccl with one GPU per process):

    torchrun --standalone --nproc_per_node 2 -m chapters.ch5_applications.distributed \
        --task sentiment --steps 200 --out runs/lora_ddp
    python -m chapters.ch5_applications.distributed --tiny --steps 20    # no torchrun: one process
    torchrun --standalone --nproc_per_node 2 -m chapters.ch5_applications.distributed --tiny --steps 20

`torchrun` starts N copies of this program and tells each its RANK, LOCAL_RANK and WORLD_SIZE (and where
to meet: MASTER_ADDR/PORT, localhost with --standalone). Each process then:

1. builds the same model (same seed) and applies LoRA (chapters/ch4_low_rank/lora.py), so only A and B
   require grad; wrapping it in DistributedDataParallel also broadcasts rank 0's weights to everyone;
2. draws its own shard of the data: rank r's batches come from Generator(seed + r);
3. runs the shared training loop (minimal/train.py) on the DDP-wrapped model. During backward, DDP sums
   each gradient over the ranks and divides by N (all-reduce), so every rank holds the same averaged
   gradient, clips it the same way and takes the same AdamW step: the replicas stay bit-identical;
4. rank 0 prints the losses (averaged over ranks) and saves the adapter with minimal.peft.save_adapter.

Why this is the right gradient. With per-rank mean losses l_r over b examples each,

    (1/N) sum_r grad l_r = grad [ (1/(N b)) sum over all N b examples ]

when every rank's loss averages the same number of tokens (language modelling windows): N processes with
batch b train exactly like one process with batch N b, up to float summation order (the test checks it).
For task batches whose answers have different lengths, DDP weights every rank equally rather than every
token, a small and standard difference.

What travels. DDP only registers parameters with requires_grad, so only LoRA's gradients are all-reduced:
sum over adapted layers of r (in + out) numbers per step, a fraction of a percent of the base. The frozen
base never moves, which is why DDP + LoRA scales well as long as one full copy of the base (plus its
activations) fits on each device.

FSDP: when the base does not fit one GPU (documented here, not implemented)
--------------------------------------------------------------------------
DDP keeps a whole replica per device. Fully Sharded Data Parallel instead splits every parameter into N
shards, one per rank; just before a block runs forward (and again in backward) its full weights are
all-gathered, used, and freed, and gradients are reduce-scattered so each rank keeps only its shard of
gradients and optimizer state. Memory per device becomes roughly (base / N) + one block's full weights +
activations. The recipe for this model, after apply_lora and before building the optimizer:

    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy        # FSDP2, torch >= 2.6
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mp_policy=mp)       # one all-gather unit per transformer block
    fully_shard(model, mp_policy=mp)           # the root: wte (also the tied head), wpe, ln_f

Points that matter for PEFT:
- FSDP2 shards each parameter separately (as a DTensor), so frozen base weights and trainable A, B can
  live in the same block. The older FullyShardedDataParallel flattens a unit's parameters into one
  tensor, which must then be all-frozen or all-trainable unless you pass use_orig_params=True
  (wrap with auto_wrap_policy=ModuleWrapPolicy({Block})).
- The tied embedding is used at both ends of the network; keep wte in the root unit, not in a block.
- Communication is now dominated by the base: every step all-gathers all base weights (forward, and again
  in backward unless reshard_after_forward=False), although only LoRA's gradients are reduce-scattered.
- Saving: the adapter is sharded too. Gather it on rank 0 with
  torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
  full_state_dict=True, cpu_offload=True)), keep the trainable names, and write them as save_adapter does.
- Cheaper first steps before sharding: activation checkpointing, a bf16 base, or a quantised frozen base
  (QLoRA); FSDP is for when the weights themselves are too big.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from chapters.ch4_low_rank.lora import apply_lora
from minimal.gpt import GPT, GPTConfig
from minimal.peft import adapter_state_dict, count_trainable, save_adapter
from minimal.train import Batch, TrainConfig, TrainResult, train

TINY = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning with DDP (run under torchrun, or alone)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="per process; the global batch is N times this")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    # not "--r": torchrun's own parser would read it as an abbreviation of its --rdzv-* options
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--targets", default="c_attn", help="comma-separated module names (peft rule)")
    p.add_argument("--task", default="sentiment", help="a task of minimal.data, or 'docs' for language modelling")
    p.add_argument("--base", default="base", help="shipped base model (ignored with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny random GPT on a synthetic stream: no files needed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="rank 0 saves the adapter here")
    p.add_argument("--dump-rank-weights", action="store_true",
                   help="every rank also writes OUT/rankN.safetensors (to check that replicas agree)")
    args = p.parse_args(argv)
    if args.dump_rank_weights and args.out is None:
        p.error("--dump-rank-weights needs --out")
    return args


# ------------------------------------------------------------------------------------------ process group


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: join the group (nccl on CUDA, gloo on CPU); alone: (0, 1)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


# ------------------------------------------------------------------------------------------ model and data


def tiny_tokens(seed: int = 0) -> torch.Tensor:
    """A synthetic, learnable stream for --tiny: one random sequence of 61 tokens repeated."""
    period = torch.randint(0, TINY.vocab_size, (61,), generator=torch.Generator().manual_seed(seed))
    return period.repeat(40)  # [2440]


def build_model(args: argparse.Namespace) -> GPT:
    """The same model on every rank: the tiny random GPT or a shipped base, with LoRA applied."""
    torch.manual_seed(args.seed)
    if args.tiny:
        model = GPT(TINY)
    else:
        from minimal.pretrained import load_base

        model = load_base(args.base)
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.targets.split(","), rslora=args.rslora)
    return model


def make_get_batch(args: argparse.Namespace, block_size: int) -> Callable[[torch.Generator], Batch]:
    """get_batch(gen) -> (idx, labels) for the chosen data; the generator decides the shard."""
    from minimal.data import get_corpus, get_task, lm_batch, task_batch

    if args.tiny:
        tokens = tiny_tokens()
        return lambda gen: lm_batch(tokens, args.batch_size, block_size, gen)
    if args.task == "docs":
        tokens = get_corpus("docs").tokens("train")
        return lambda gen: lm_batch(tokens, args.batch_size, block_size, gen)
    task = get_task(args.task)
    return lambda gen: task_batch(task, args.batch_size, block_size, gen)


def train_config(args: argparse.Namespace, rank: int) -> TrainConfig:
    """The loop's settings; rank r seeds its data generator with seed + r (its shard)."""
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps),
                       seed=args.seed + rank, log_every=args.log_every if rank == 0 else 0,
                       progress=None if rank == 0 else False)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    try:
        model = build_model(args).to(device)
        if rank == 0:
            print(f"world size {world} on {device}; LoRA r={args.lora_r} on {args.targets}: {count_trainable(model)}")
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        get_batch = make_get_batch(args, model.config.block_size)
        result = train(wrapped, get_batch, train_config(args, rank), desc=f"rank {rank}")
        losses = torch.tensor([h["loss"] for h in result.history], device=device)  # [steps], this rank's
        if dist.is_initialized():
            dist.all_reduce(losses)  # sum over ranks
            losses /= world
        if args.dump_rank_weights:
            args.out.mkdir(parents=True, exist_ok=True)
            state = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
            save_file(state, str(args.out / f"rank{rank}.safetensors"))
        if rank == 0:
            for step in range(0, args.steps, args.log_every) if args.log_every > 0 else []:
                print(f"step {step + 1}: loss {losses[step].item():.4f} (mean over {world} ranks)")
            print(f"final loss {losses[-1].item():.4f}")
            if args.out is not None:
                config = {"method": "lora", "r": args.lora_r, "alpha": args.lora_alpha, "rslora": args.rslora,
                          "targets": args.targets.split(","), "world_size": world, "steps": args.steps,
                          "batch_size_per_rank": args.batch_size, "seed": args.seed, "tiny": args.tiny,
                          "base": None if args.tiny else args.base, "losses": [round(x, 5) for x in losses.tolist()]}
                save_adapter(model, args.out, config)
                print(f"saved the adapter to {args.out}")
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
