"""Setup shared by the S-LoRA tests: a merged reference model, a server with mixed-rank adapters, requests.

The merged reference uses lora.py's LoRALinear and peft-style unload (merge), none of which the batched
serving path uses, so comparing against it is an independent check.
"""

import copy

import torch

from chapters.ch4_low_rank.lora import LoRALinear
from chapters.ch4_low_rank.slora import LoRAServer, Request, random_adapter
from minimal.peft import replace_module, unload
from tests.helpers import tiny_gpt

RANKS = {"r1": 1, "r2": 2, "r4": 4, "r8": 8}


def merged_copy(base, adapter):
    """The base with `adapter` merged into its weights: LoRALinear around each layer, then unload (merge)."""
    model = copy.deepcopy(base)
    if adapter is None:
        return model
    for layer, (A, B) in adapter.weights.items():
        lora = LoRALinear(model.get_submodule(layer), r=adapter.rank, alpha=adapter.scale * adapter.rank)
        with torch.no_grad():
            lora.A.copy_(A)
            lora.B.copy_(B)
        replace_module(model, layer, lora)
    return unload(model).eval()


def make_server(pool_pages=4096, path="auto", seed=0):
    model = tiny_gpt(seed)
    server = LoRAServer(model, pool_pages, path=path)
    for k, (name, r) in enumerate(RANKS.items()):
        server.register(random_adapter(model, name, r, std=0.3, seed=k))
    # an adapter on the attention input projection only (the other layers get no update from it)
    server.register(random_adapter(model, "qkv_only", 3, targets=("attn.c_attn",), std=0.3, seed=9))
    return model, server


def mixed_requests(n=9, seed=0, new=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    names = [None, *RANKS, "qkv_only"]
    reqs = []
    for i in range(n):
        plen = int(torch.randint(1, 10, (1,), generator=g))
        reqs.append(Request(f"q{i}", torch.randint(0, 101, (plen,), generator=g).tolist(), names[i % len(names)],
                            int(torch.randint(new[0], new[1] + 1, (1,), generator=g))))
    return reqs
