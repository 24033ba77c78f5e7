"""The main job: every registered method fine-tunes the same shipped base on the same tasks.

    python -m chapters.leaderboard                      # all methods, default tasks -> results/
    python -m chapters.leaderboard --methods full lora  # a subset -> runs/leaderboard/
    python -m chapters.leaderboard --steps 50 --out /tmp/lb   # a quick look
    python -m chapters.leaderboard --methods lora --applications # one method, then chapter 5's recipes

For each method and task: load `base`, apply the method, train with the shared loop (same steps, batch
size and seed for everyone; the learning rate is the method's own, from the registry), evaluate on the
task's test split. Writes results/leaderboard.md (method, trainable parameters and percent, the metric
per task, seconds per step, peak memory), results/leaderboard.json, and results/leaderboard.png
(metric against trainable parameters, log scale). With every method (or --applications), chapter 5's
training recipes follow: text-to-SQL and TabLLM -> results/applications.md and .json.
Only the full default run (every method, the default tasks, steps and seed) writes results/; any other
run writes runs/leaderboard/ unless --out names a folder, so a partial run never replaces the committed table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from chapters.registry import METHODS, Method, get_method
from minimal.data import Task, evaluation_subset, get_task, task_batch
from minimal.evaluate import evaluate_task
from minimal.hooks import Hooks
from minimal.peft import count_trainable
from minimal.pretrained import load_base, record
from minimal.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS, PARTIAL = ROOT / "results", ROOT / "runs" / "leaderboard"
DEFAULT_TASKS = ("sentiment", "family")  # --tasks camel kv_recall ... adds more
DEFAULT = TrainConfig(steps=150, batch_size=8, warmup=15, log_every=0)
MAX_TEST = 100  # test examples scored per task


def default_out(methods: list[str] | None, tasks: list[str], steps: int, seed: int) -> Path:
    """results/ for the full default run (every method, default tasks, steps and seed), else runs/leaderboard/."""
    full = methods is None and list(tasks) == list(DEFAULT_TASKS) and steps == DEFAULT.steps and seed == DEFAULT.seed
    return RESULTS if full else PARTIAL


def apply_method(method: Method, model: nn.Module, task: Task) -> Hooks:
    """Apply a registered method, with the task if it reads data (a schedule reads the run length in setup)."""
    return method.apply(model, task) if method.needs_task else method.apply(model)


def test_subset(task: Task, n: int = MAX_TEST) -> Task:
    """The task with at most n test examples, evenly spaced over the test split (the splits are ordered,
    by family for example, so the first n would leave whole classes out)."""
    return replace(task, splits={**task.splits, "test": evaluation_subset(task.splits["test"], n)})


def run_one(method: Method, task_name: str, cfg: TrainConfig, base: str = "base") -> dict:
    """Apply `method` to a fresh copy of the base, fine-tune on one task, evaluate on its test split."""
    torch.manual_seed(cfg.seed)
    model = load_base(base)
    task = get_task(task_name)
    hooks = apply_method(method, model, task)
    counts = count_trainable(model)
    trainable = hooks.n_trainable or counts.trainable  # gradient-masking methods state their own count
    row = {"method": method.name, "task": task_name, "trainable": trainable, "total": counts.total,
           "percent": 100 * trainable / counts.total, "seconds_per_step": None, "peak_memory_mb": None}
    block = model.config.block_size - method.reserved_positions  # room left for the task's tokens
    if method.trains:
        result = train(model, lambda g: task_batch(task, cfg.batch_size, block, g),
                       replace(cfg, lr=method.lr), hooks=hooks, desc=f"{method.name}/{task_name}")
        row.update(seconds_per_step=result.seconds_per_step, peak_memory_mb=result.peak_memory_bytes / 2**20,
                   final_loss=result.final_loss)
    metrics = evaluate_task(model, test_subset(task), "test", block_size=block)
    row["metric"], row["score"] = next(iter(metrics.items()))
    return row


def table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown: one line per method, one column per task."""
    head = "| method | chapter | trainable | % | " + " | ".join(tasks) + " | s/step | peak MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = {r["task"]: r for r in rows if r["method"] == name}
        first = next(iter(mine.values()))
        steps = [r["seconds_per_step"] for r in mine.values() if r["seconds_per_step"] is not None]
        mem = [r["peak_memory_mb"] for r in mine.values() if r["peak_memory_mb"] is not None]
        cells = [f"{mine[t]['score']:.3f}" if t in mine else "" for t in tasks]
        speed = f"{sum(steps) / len(steps):.3f} | {max(mem):.1f}" if steps else "- | -"
        lines.append(f"| {name} | {get_method(name).chapter} | {first['trainable']:,} | {first['percent']:.3f} | "
                     + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            x = max(r["trainable"], 1)
            ax.scatter(x, r["score"])
            ax.annotate(r["method"], (x, r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (zero-shot drawn at 1)")
        metric = next(r["metric"] for r in rows if r["task"] == task)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help=f"default: all of {sorted(METHODS)}")
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS))
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {RESULTS} for the full default run, {PARTIAL} for any other")
    parser.add_argument("--applications", action=argparse.BooleanOptionalAction, default=None,
                        help="also run chapter 5's recipes (text-to-SQL, TabLLM); default: only with all methods")
    args = parser.parse_args(argv)
    methods = [get_method(m) for m in (args.methods or METHODS)]
    for t in args.tasks:
        get_task(t)  # fail early on an unknown task name
    cfg = replace(DEFAULT, steps=args.steps, seed=args.seed, warmup=min(DEFAULT.warmup, args.steps))
    args.out = args.out or default_out(args.methods, args.tasks, args.steps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for i, method in enumerate(methods):
        for task in args.tasks:
            row = run_one(method, task, cfg)
            rows.append(row)
            print(f"[{i + 1}/{len(methods)}] {method.name:<16} {task:<10} {row['metric']} {row['score']:.3f} "
                  f"({row['trainable']:,} trainable, {time.perf_counter() - t0:.0f}s)", flush=True)
        write(rows, args.tasks, cfg, args.out, time.perf_counter() - t0)  # after every method: nothing is lost
    plot(rows, args.tasks, args.out / "leaderboard.png")
    print((args.out / "leaderboard.md").read_text(encoding="utf-8"))
    if args.applications or (args.applications is None and args.methods is None):
        print(applications(args.seed, args.out))


def applications(seed: int, out: Path, recipes: dict | None = None) -> str:
    """Chapter 5's training recipes, each a short end-to-end run -> results/applications.md and .json.

    recipes: name -> function(seed) returning a dict of metrics (possibly nested one level, per table);
    default: FinSQL-style text-to-SQL (execution accuracy, exact match) and TabLLM (AUC per table).
    """
    if recipes is None:
        from chapters.ch5_applications.finsql import finsql_recipe
        from chapters.ch5_applications.tabllm_recipe import tabllm_recipe

        recipes = {"text-to-SQL (finsql_recipe)": lambda s: finsql_recipe(seed=s),
                   "TabLLM (tabllm_recipe)": lambda s: tabllm_recipe(seed=s)}
    results, lines = {}, ["# Chapter 5 recipes", "", f"Written by `python -m chapters.leaderboard` (seed {seed}).", ""]
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        results[name] = recipe(seed)
        lines += [f"## {name} ({time.perf_counter() - t0:.0f} s)", "", "| what | value |", "|---|---|"]
        for key, value in results[name].items():
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in inner:
                label = key if sub is None else f"{key} / {sub}"
                lines.append(f"| {label} | {v:.4f} |" if isinstance(v, float) else f"| {label} | {v} |")
        lines.append("")
        (out / "applications.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / "applications.md").write_text("\n".join(lines), encoding="utf-8")
    return "\n".join(lines)


def write(rows: list[dict], tasks: list[str], cfg: TrainConfig, out: Path, seconds: float) -> None:
    md = (f"# Leaderboard\n\nEvery method fine-tunes the shipped `base` ({record('base')['training']['n_params']:,} "
          f"parameters) for "
          f"{cfg.steps} steps, batch {cfg.batch_size}, seed {cfg.seed}, on each task with its own learning rate "
          f"(chapters/registry.py); the score is the test metric on up to {MAX_TEST} examples (classification: "
          f"accuracy of the best-scoring choice; generation: exact match), evenly spaced over the test split.\n"
          f"Regenerate with `python -m chapters.leaderboard` ({seconds:.0f} s on the machine that wrote it).\n\n"
          + table(rows, tasks) + "\n")
    (out / "leaderboard.md").write_text(md, encoding="utf-8")
    (out / "leaderboard.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
