"""Build the shipped tokenizer and base models from the offline corpus.

    python -m minimal.pretrain                 # tokenizer (if missing), then base and small
    python -m minimal.pretrain --model small   # one model
    python -m minimal.pretrain --tokenizer     # retrain the tokenizer too (then retrain both models)

Each model trains on the train split of the `docs` corpus (next-token prediction on random 128-token
windows) with the shared loop of minimal/train.py, and is written to data/NAME.safetensors with
data/NAME.json: its config and a training record (steps, tokens, seconds, final train loss, the
validation loss on a fixed slice that the tests reproduce, the loss curve, and the corpus hash).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from minimal.data import get_corpus, lm_batch
from minimal.gpt import GPT, GPTConfig
from minimal.pretrained import DATA
from minimal.tokenizer import DEFAULT_PATH, get_tokenizer, save_ranks, train_bpe
from minimal.train import TrainConfig, perplexity, train

CONFIGS = {
    "base": GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(vocab_size=2048, block_size=128, n_layer=2, n_head=2, n_embd=64),
}
SCHEDULES = {
    "base": TrainConfig(steps=1500, batch_size=32, lr=2e-3, warmup=100, weight_decay=0.1, log_every=100),
    "small": TrainConfig(steps=1500, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.1, log_every=100),
}
DROPOUT = 0.1  # used while pretraining only; the saved config has dropout 0 for deterministic fine-tuning
VAL_WINDOWS = 32  # the fixed validation slice: the first 32 windows of 128 tokens of the docs val split


def build_tokenizer(path: Path = DEFAULT_PATH) -> None:
    t0 = time.perf_counter()
    ranks = train_bpe([get_corpus("docs").text("train"), get_corpus("code").text("train")], verbose=True)
    save_ranks(ranks, path)
    get_tokenizer.cache_clear()
    print(f"tokenizer: {len(ranks)} ranks in {time.perf_counter() - t0:.1f}s -> {path}")


def validation_loss(model: GPT) -> float:
    tokens = get_corpus("docs").tokens("val")
    return float(torch.tensor(perplexity(model, tokens, model.config.block_size, VAL_WINDOWS)).log())


def pretrain(name: str, seed: int = 0, data_dir: Path = DATA, steps: int | None = None) -> dict:
    torch.manual_seed(seed)
    config = CONFIGS[name]
    cfg = replace(SCHEDULES[name], seed=seed, eval_every=250, **({"steps": steps} if steps else {}))
    model = GPT(replace(config, dropout=DROPOUT))
    train_tokens = get_corpus("docs").tokens("train")

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_batch(train_tokens, cfg.batch_size, config.block_size, gen)

    t0 = time.perf_counter()
    result = train(model, batch, cfg, eval_fn=lambda m: {"val_loss": validation_loss(m)}, desc=f"pretrain {name}")
    seconds = time.perf_counter() - t0
    model.eval()
    record = {
        "config": asdict(config),
        "training": {
            "command": f"python -m minimal.pretrain --model {name} --seed {seed} --threads {torch.get_num_threads()}",
            "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "tokens": cfg.steps * cfg.batch_size * config.block_size,
            "train_tokens_in_corpus": len(train_tokens),
            "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "final_train_loss": round(result.final_loss, 4),
            "val_loss": validation_loss(model), "val_windows": VAL_WINDOWS,
            "curve": [{"step": e["step"], "val_loss": round(e["val_loss"], 4),
                       "train_loss": round(sum(h["loss"] for h in result.history[max(0, e["step"] - 20):e["step"]])
                                           / min(20, e["step"]), 4)} for e in result.evals],
            "corpus_sha256": get_corpus("docs").sha256(),
            "n_params": config.n_params(),
        },
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(data_dir) / f"{name}.safetensors"))
    (Path(data_dir) / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{name}: val loss {record['training']['val_loss']:.4f} after {seconds:.0f}s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--tokenizer", action="store_true", help="retrain the tokenizer first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the schedule's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer or not DEFAULT_PATH.is_file():
        build_tokenizer()
    for name in CONFIGS if args.model == "all" else [args.model]:
        pretrain(name, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
