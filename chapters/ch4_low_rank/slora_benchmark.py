"""S-LoRA's throughput question on our GPT: serve many adapters gathered, or merge them one at a time?

Paper: Ying Sheng, Shiyi Cao, Dacheng Li, Coleman Hooper, Nicholas Lee, Shuo Yang, Christopher Chou,
Banghua Zhu, Lianmin Zheng, Kurt Keutzer, Joseph E. Gonzalez, Ion Stoica, "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters", MLSys 2024, arXiv 2311.03285. The server is slora.py (with slora_pool.py);
this file only measures it. Copy the three files together.

Requests name their adapter; adapters are drawn with a Zipf popularity, P(k-th adapter) ~ 1 / k^alpha, so
a few adapters are hot and many are rare, as in the paper's workloads. Three ways to serve them:
(a) merge-per-request: W <- W0 + s B A for the request's adapter, serve the request alone, restore W0;
(b) swap-per-batch (peft-style, the paper's "HF PEFT" baseline): group requests by adapter, merge once per
    group, serve the group as one batch, restore;
(c) gathered (S-LoRA): every request in heterogeneous batches over the unmerged W0, nothing merged.
All three generate the same tokens (greedy); the benchmark checks it. It reports generated tokens per CPU
second against the number of adapters, the pool's page-ins and evictions, and the pool occupancy per step.

    python -m chapters.ch4_low_rank.slora_benchmark      writes results/slora_cpu.json and .md

Seconds are CPU seconds of this process on a CPU (steady on a shared machine), wall seconds on a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from chapters.ch4_low_rank.slora import LoRAServer, Request, random_adapter
from chapters.ch4_low_rank.slora_pool import HostAdapter
from minimal.benchmark import write_results
from minimal.gpt import GPT


@torch.no_grad()
def merge_into_(model: GPT, adapter: HostAdapter) -> dict[str, torch.Tensor]:
    """W <- W + s B A for every layer of the adapter; returns the original weights to restore later."""
    saved = {}
    for layer, (A, B) in adapter.weights.items():
        W = model.get_submodule(layer).weight
        saved[layer] = W.clone()
        W += adapter.scale * (B.to(W.device) @ A.to(W.device))  # [out, r] @ [r, in]
    return saved


@torch.no_grad()
def restore_(model: GPT, saved: dict[str, torch.Tensor]) -> None:
    for layer, W in saved.items():
        model.get_submodule(layer).weight.copy_(W)


def zipf_requests(n_requests: int, adapters: list[str], alpha: float, prompt_len: tuple[int, int],
                  max_new_tokens: int, vocab: int, seed: int) -> list[Request]:
    """Requests whose adapter is drawn with P(k-th adapter) proportional to 1 / k^alpha."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, len(adapters) + 1, dtype=torch.float64) ** alpha
    picks = torch.multinomial(p, n_requests, replacement=True, generator=g).tolist()
    lens = torch.randint(prompt_len[0], prompt_len[1] + 1, (n_requests,), generator=g).tolist()
    return [Request(i, torch.randint(0, vocab, (n,), generator=g).tolist(), adapters[k], max_new_tokens)
            for i, (k, n) in enumerate(zip(picks, lens))]


def _clock(device: torch.device) -> float:
    """CPU seconds of this process on a CPU (steady on a shared machine); wall seconds after a sync on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def run_strategy(server: LoRAServer, requests: list[Request], strategy: str, max_batch: int = 16,
                 token_budget: int = 512) -> tuple[float, dict]:
    """Serve `requests` one of three ways ("merge", "swap", "gathered"); returns (seconds, rid -> tokens)."""
    plain = lambda rs: [Request(r.rid, r.prompt, None, r.max_new_tokens) for r in rs]  # noqa: E731
    device = server.pool.data.device
    t0, outputs = _clock(device), {}
    if strategy == "gathered":
        outputs = server.serve(requests, max_batch, token_budget).outputs
    elif strategy in ("merge", "swap"):
        groups = ([[r] for r in requests] if strategy == "merge" else
                  [[r for r in requests if r.adapter == a] for a in dict.fromkeys(r.adapter for r in requests)])
        for group in groups:
            a = group[0].adapter
            saved = merge_into_(server.model, server.store.check_known(a)) if a is not None else {}
            outputs |= server.serve(plain(group), max_batch, token_budget).outputs
            restore_(server.model, saved)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose merge, swap or gathered")
    return _clock(device) - t0, outputs


def benchmark(model: GPT, n_adapters: Sequence[int] = (1, 4, 16, 64), n_requests: int = 48,
              ranks: Sequence[int] = (2, 4, 8, 16), zipf_alpha: float = 1.0, prompt_len: tuple[int, int] = (8, 24),
              max_new_tokens: int = 8, max_batch: int = 16, token_budget: int = 512, pool_pages: int = 12288,
              strategies: Sequence[str] = ("merge", "swap", "gathered"), seed: int = 0,
              progress: bool = True) -> dict:
    """Generated tokens per second of each strategy against the number of adapters.

    For each n: n random adapters (ranks cycling through `ranks`), `n_requests` requests whose adapter is
    drawn with Zipf popularity, served by every strategy on one server; seconds are CPU seconds on a CPU
    (see _clock). Also: how many distinct adapters the requests used, whether every strategy generated
    the same tokens, the pool's load/eviction counts, and the pool occupancy per step of a gathered run."""
    from tqdm import tqdm

    out = {"n_adapters": list(n_adapters), "tokens_per_cpu_s": {s: [] for s in strategies},
           "cpu_seconds": {s: [] for s in strategies}, "distinct_adapters_used": [], "outputs_agree": [],
           "pool": [], "trace": None}
    bar = tqdm(total=len(n_adapters) * len(strategies), disable=not progress, desc="S-LoRA benchmark")
    for n in n_adapters:
        server = LoRAServer(model, pool_pages)
        names = [f"adapter{k}" for k in range(n)]
        for k, name in enumerate(names):
            server.register(random_adapter(model, name, ranks[k % len(ranks)], seed=seed * 100003 + k))
        reqs = zipf_requests(n_requests, names, zipf_alpha, prompt_len, max_new_tokens,
                             model.config.vocab_size, seed)
        results = {}
        for s in strategies:
            sec, results[s] = run_strategy(server, reqs, s, max_batch, token_budget)
            out["cpu_seconds"][s].append(round(sec, 4))
            out["tokens_per_cpu_s"][s].append(round(sum(map(len, results[s].values())) / sec, 1))
            bar.update()
        out["distinct_adapters_used"].append(len({r.adapter for r in reqs}))
        out["outputs_agree"].append(all(len({tuple(results[s][r.rid]) for s in strategies}) == 1 for r in reqs))
        out["pool"].append({**server.store.stats(), "peak_used": server.pool.peak_used,
                            "capacity": server.pool.capacity})
    bar.close()
    if "gathered" in strategies:  # pool occupancy per step of one more gathered run (largest n)
        trace = server.serve(reqs, max_batch, token_budget).trace
        out["trace"] = {k: [t[k] for t in trace] for k in ("batch", "adapter_pages", "kv_pages", "free",
                                                            "fragmentation")}
    out["config"] = dict(n_requests=n_requests, ranks=list(ranks), zipf_alpha=zipf_alpha, prompt_len=list(prompt_len),
                         max_new_tokens=max_new_tokens, max_batch=max_batch, token_budget=token_budget,
                         pool_pages=pool_pages, seed=seed, path=server.path, threads=torch.get_num_threads(),
                         device=str(server.pool.data.device))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="S-LoRA throughput on CPU: merge vs swap vs gathered batching")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 100])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from minimal.pretrained import load_base

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    res = benchmark(load_base("base"), n_adapters=args.adapters, n_requests=args.requests,
                    max_new_tokens=args.new_tokens, seed=args.seed, progress=not args.no_progress)
    res["command"] = "python -m chapters.ch4_low_rank.slora_benchmark"
    strategies = list(res["tokens_per_cpu_s"])
    md = ("| adapters | distinct used | " + " | ".join(f"{s} (tok/CPU s)" for s in strategies)
          + " | gathered / swap | page-ins / evictions | outputs agree |\n|" + "---|" * (len(strategies) + 5) + "\n")
    for i, n in enumerate(res["n_adapters"]):
        tps = [res["tokens_per_cpu_s"][s][i] for s in strategies]
        ratio = res["tokens_per_cpu_s"]["gathered"][i] / res["tokens_per_cpu_s"]["swap"][i]
        pool = res["pool"][i]
        md += (f"| {n} | {res['distinct_adapters_used'][i]} | " + " | ".join(f"{v:,.0f}" for v in tps)
               + f" | {ratio:.2f}x | {pool['loads']} / {pool['evictions']} | {res['outputs_agree'][i]} |\n")
    c = res["config"]
    md += (f"\nbase model `base`, {c['n_requests']} requests, prompts {c['prompt_len'][0]}-{c['prompt_len'][1]} "
           f"tokens, {c['max_new_tokens']} new tokens each (greedy), ranks {c['ranks']}, Zipf alpha "
           f"{c['zipf_alpha']}, max batch {c['max_batch']}, pool {c['pool_pages']} pages of width d "
           f"(adapters and KV cache), path `{c['path']}`, {c['threads']} thread(s), "
           f"torch {torch.__version__}. merge = merge the request's adapter and serve it alone; swap = one "
           f"merge per adapter group, group served batched; gathered = heterogeneous batches, nothing merged.\n")
    write_results(args.out, "slora_cpu", res, md)
    return res


if __name__ == "__main__":
    main()
