"""The S-LoRA benchmark: merge-per-request, swap-per-batch and gathered serving generate the same tokens.

The merge reference is lora.py's LoRALinear (an independent forward of the same adapter), not merge_into_.
"""

import json

import pytest
import torch

from chapters.ch4_low_rank.lora import LoRALinear
from chapters.ch4_low_rank.slora_benchmark import benchmark, main, merge_into_, restore_, run_strategy, zipf_requests
from tests.ch4_low_rank.slora_setup import make_server, mixed_requests
from tests.helpers import tiny_gpt


def test_merge_into_equals_the_lora_forward_and_restore_is_exact():
    model, server = make_server()
    adapter = server.store.host["r4"]
    layer = "h.1.mlp.c_fc"
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    lora = LoRALinear(model.get_submodule(layer), r=4, alpha=adapter.scale * 4)
    with torch.no_grad():
        lora.A.copy_(adapter.weights[layer][0])
        lora.B.copy_(adapter.weights[layer][1])
        ref, base_out = lora(x), lora.base(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = merge_into_(model, adapter)
    assert set(saved) == set(adapter.weights)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(layer)(x), ref, atol=1e-5, rtol=0)
        assert (model.get_submodule(layer)(x) - base_out).abs().max() > 1e-2  # the merge changed W
    restore_(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ strategies, benchmark


def test_merge_swap_and_gathered_generate_the_same_tokens():
    model, server = make_server()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = mixed_requests(n=8, seed=3, new=(2, 4))
    outs = {s: run_strategy(server, reqs, s, max_batch=4)[1] for s in ("merge", "swap", "gathered")}
    assert outs["merge"] == outs["swap"] == outs["gathered"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # merges were undone
    with pytest.raises(ValueError, match="unknown strategy"):
        run_strategy(server, reqs, "vllm")


def test_zipf_requests_are_deterministic_and_skewed():
    names = [f"a{k}" for k in range(10)]
    a = zipf_requests(400, names, 1.0, (2, 5), 3, 101, seed=0)
    assert a == zipf_requests(400, names, 1.0, (2, 5), 3, 101, seed=0)
    assert a != zipf_requests(400, names, 1.0, (2, 5), 3, 101, seed=1)
    counts = [sum(r.adapter == n for r in a) for n in names]
    assert counts[0] > 2 * counts[4] > 0  # P(first) / P(fifth) = 5 under alpha = 1
    assert all(2 <= len(r.prompt) <= 5 for r in a)


def test_benchmark_small():
    res = benchmark(tiny_gpt(0), n_adapters=(1, 3), n_requests=6, prompt_len=(2, 4), max_new_tokens=2,
                    max_batch=4, pool_pages=2048, progress=False)
    assert res["n_adapters"] == [1, 3] and set(res["tokens_per_cpu_s"]) == {"merge", "swap", "gathered"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["tokens_per_cpu_s"].values())
    assert res["outputs_agree"] == [True, True]
    assert res["distinct_adapters_used"][0] == 1 and 1 <= res["distinct_adapters_used"][1] <= 3
    assert len(res["trace"]["kv_pages"]) == len(res["trace"]["batch"]) > 0


def test_main_writes_results(tmp_path, monkeypatch):
    import minimal.pretrained

    monkeypatch.setattr(minimal.pretrained, "check_corpus_hash", lambda recorded: True)  # skip a 10 s hash
    res = main(["--out", str(tmp_path), "--adapters", "1", "2", "--requests", "3", "--new-tokens", "2",
                "--no-progress"])
    saved = json.loads((tmp_path / "slora_cpu.json").read_text())
    assert saved["n_adapters"] == [1, 2] and saved["outputs_agree"] == res["outputs_agree"] == [True, True]
    md = (tmp_path / "slora_cpu.md").read_text()
    assert md.count("\n| ") == 2 and "gathered" in md
