"""Build the shipped tokenizer and base models from the offline corpus.

    python -m minimal.pretrain                       # base and small -> runs/pretrain/
    python -m minimal.pretrain --model small --steps 100   # one model, a short run
    python -m minimal.pretrain --tokenizer           # a new tokenizer, then both models on it -> runs/pretrain/
    python -m minimal.pretrain --tokenizer --out data --force   # replace the shipped files in data/

Each model trains on the train split of the `docs` corpus (next-token prediction on random 128-token
windows) with the shared loop of minimal/train.py, and is written to OUT/NAME.safetensors with
OUT/NAME.json: its config and a training record (steps, tokens, seconds, final train loss, the
validation loss on a fixed slice that the tests reproduce, the loss curve, and the corpus hash).
`minimal.pretrained.load_base(name, data_dir=OUT)` loads the result.

Nothing in data/ is replaced unless asked: the default OUT is runs/pretrain/, and OUT = data/ needs
--force. Without --tokenizer the models use the shipped tokenizer (data/tokenizer.tiktoken); with it, a
new tokenizer is trained into OUT/tokenizer.tiktoken and both models are trained on it (a model on a new
tokenizer alongside the other on the old one would not share a vocabulary, so --tokenizer with one
--model is refused).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import save_file

from minimal.data import get_corpus, lm_batch
from minimal.evaluate import perplexity
from minimal.gpt import GPT, GPTConfig
from minimal.pretrained import DATA
from minimal.tokenizer import DEFAULT_PATH, get_tokenizer, make_encoding, save_ranks, train_bpe
from minimal.train import TrainConfig, train

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


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "runs" / "pretrain"


def build_tokenizer(path: Path = DEFAULT_PATH) -> tiktoken.Encoding:
    """Train the BPE on the docs and code train splits, write it to `path`, return its encoding."""
    t0 = time.perf_counter()
    ranks = train_bpe([get_corpus("docs").text("train"), get_corpus("code").text("train")], verbose=True)
    save_ranks(ranks, path)
    get_tokenizer.cache_clear()
    print(f"tokenizer: {len(ranks)} ranks in {time.perf_counter() - t0:.1f}s -> {path}")
    return make_encoding(ranks)


def docs_tokens(split: str, enc: tiktoken.Encoding | None = None) -> torch.Tensor:
    """The docs corpus of `split` as tokens: the shipped tokenizer's cached stream, or encoded with `enc`."""
    if enc is None:
        return get_corpus("docs").tokens(split)
    return torch.tensor(enc.encode(get_corpus("docs").text(split), allowed_special={"<|endoftext|>"}))


def validation_loss(model: GPT, enc: tiktoken.Encoding | None = None) -> float:
    tokens = docs_tokens("val", enc)
    return float(torch.tensor(perplexity(model, tokens, model.config.block_size, VAL_WINDOWS)).log())


def pretrain(name: str, seed: int = 0, data_dir: Path = DEFAULT_OUT, steps: int | None = None,
             enc: tiktoken.Encoding | None = None) -> dict:
    """Train model `name` on the docs corpus (tokenized by `enc`, default the shipped tokenizer) -> data_dir."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int (or None for the schedule's {SCHEDULES[name].steps}), "
                         f"got {steps!r}")
    torch.manual_seed(seed)
    config = CONFIGS[name]
    n = steps or SCHEDULES[name].steps
    # a short run keeps the schedule's shape: warmup is at most a tenth of the steps
    cfg = replace(SCHEDULES[name], steps=n, seed=seed, eval_every=250, warmup=min(SCHEDULES[name].warmup, n // 10))
    model = GPT(replace(config, dropout=DROPOUT))
    train_tokens = docs_tokens("train", enc)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_batch(train_tokens, cfg.batch_size, config.block_size, gen)

    t0 = time.perf_counter()
    result = train(model, batch, cfg, eval_fn=lambda m: {"val_loss": validation_loss(m, enc)}, desc=f"pretrain {name}")
    seconds = time.perf_counter() - t0
    model.eval()
    record = {
        "config": asdict(config),
        "training": {
            "command": f"python -m minimal.pretrain --model {name} --seed {seed} --threads {torch.get_num_threads()}"
                       + (f" --steps {steps}" if steps else ""),
            "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "tokens": cfg.steps * cfg.batch_size * config.block_size,
            "train_tokens_in_corpus": len(train_tokens),
            "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "final_train_loss": round(result.final_loss, 4),
            "val_loss": validation_loss(model, enc), "val_windows": VAL_WINDOWS,
            "curve": [{"step": e["step"], "val_loss": round(e["val_loss"], 4),
                       "train_loss": round(sum(h["loss"] for h in result.history[max(0, e["step"] - 20):e["step"]])
                                           / min(20, e["step"]), 4)} for e in result.evals],
            "corpus_sha256": get_corpus("docs").sha256(),
            "n_params": config.n_params(),
        },
    }
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(data_dir) / f"{name}.safetensors"))
    (Path(data_dir) / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{name}: val loss {record['training']['val_loss']:.4f} after {seconds:.0f}s")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--tokenizer", action="store_true", help="train a new tokenizer first (needs --model all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the schedule's step count (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="allow --out data, replacing the shipped files")
    args = parser.parse_args(argv)
    if args.out.resolve() == DATA.resolve() and not args.force:
        parser.error(f"--out {args.out} would replace the shipped tokenizer and models in {DATA}; add --force "
                     f"to do that on purpose, or leave --out at its default {DEFAULT_OUT}")
    if args.tokenizer and args.model != "all":
        parser.error("--tokenizer changes the vocabulary, so it retrains both models: drop --model, or drop "
                     "--tokenizer to retrain one model on the shipped tokenizer")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.tokenizer and not DEFAULT_PATH.is_file():
        parser.error(f"no tokenizer at {DEFAULT_PATH}; add --tokenizer to train one (into --out) first")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    enc = build_tokenizer(args.out / DEFAULT_PATH.name) if args.tokenizer else None
    for name in CONFIGS if args.model == "all" else [args.model]:
        pretrain(name, seed=args.seed, data_dir=args.out, steps=args.steps, enc=enc)


if __name__ == "__main__":
    main()
