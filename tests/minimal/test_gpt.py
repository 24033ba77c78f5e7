import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from minimal.gpt import GPT, GPTConfig, gpt2_config, load_gpt2_state_dict, to_gpt2_state_dict


def hf_tiny() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    return GPT2LMHeadModel(cfg).eval()


def test_param_count_formula(tiny_gpt):
    assert sum(p.numel() for p in tiny_gpt.parameters()) == tiny_gpt.config.n_params()
    assert GPTConfig().n_params() == sum(p.numel() for p in GPT(GPTConfig()).parameters())


def test_gpt2_names_and_linear_layers(tiny_gpt):
    names = {n for n, _ in tiny_gpt.named_parameters()}
    for n in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.bias",
              "h.1.ln_2.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "ln_f.weight"]:
        assert n in names
    assert isinstance(tiny_gpt.h[0].attn.c_attn, torch.nn.Linear)
    assert tiny_gpt.h[0].attn.c_attn.weight.shape == (192, 64)  # [out, in]


def test_logits_equal_transformers_gpt2():
    hf = hf_tiny()
    ours = load_gpt2_state_dict(GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)),
                                hf.state_dict()).eval()
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours(ids).logits, ref, atol=1e-5, rtol=0)
    ours.set_fast_attention(False)
    torch.testing.assert_close(ours(ids).logits, ref, atol=1e-5, rtol=0)


def test_round_trip_to_hf_layout(tiny_gpt):
    hf = hf_tiny()
    hf.load_state_dict(to_gpt2_state_dict(tiny_gpt), strict=False)
    ids = torch.randint(0, 101, (2, 10))
    torch.testing.assert_close(hf(input_ids=ids).logits, tiny_gpt(ids).logits, atol=1e-5, rtol=0)


def test_loader_reads_safetensors_and_rejects_mismatch(tmp_path, tiny_gpt):
    hf = hf_tiny()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, str(path))
    load_gpt2_state_dict(tiny_gpt, path)
    torch.testing.assert_close(tiny_gpt.wte.weight, hf.transformer.wte.weight)
    wider = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=128))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_gpt2_state_dict(wider, hf.state_dict())
    deeper = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=3, n_head=4, n_embd=64))
    with pytest.raises(ValueError, match="missing"):
        load_gpt2_state_dict(deeper, hf.state_dict())
    with pytest.raises(FileNotFoundError):
        load_gpt2_state_dict(tiny_gpt, tmp_path / "nope.safetensors")


def test_manual_and_fused_attention_agree(tiny_gpt):
    ids = torch.randint(0, 101, (2, 17))
    fast = tiny_gpt(ids).logits
    tiny_gpt.set_fast_attention(False)
    torch.testing.assert_close(tiny_gpt(ids).logits, fast, atol=1e-5, rtol=0)


def test_causality(tiny_gpt):
    ids = torch.randint(0, 101, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 101
    a, b = tiny_gpt(ids).logits, tiny_gpt(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_generation_equals_uncached(tiny_gpt):
    ids = torch.randint(0, 101, (2, 5))
    cached = tiny_gpt.generate(ids, 12, temperature=0)
    uncached = tiny_gpt.generate(ids, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = tiny_gpt.generate(ids, 12, temperature=0.8, top_k=5, generator=g1)
    s2 = tiny_gpt.generate(ids, 12, temperature=0.8, top_k=5, use_cache=False, generator=g2)
    assert torch.equal(s1, s2)


def test_top_k_one_is_greedy(tiny_gpt):
    ids = torch.randint(0, 101, (1, 4))
    assert torch.equal(tiny_gpt.generate(ids, 6, temperature=1.0, top_k=1), tiny_gpt.generate(ids, 6, temperature=0))


def test_inputs_embeds_equals_ids(tiny_gpt):
    ids = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(tiny_gpt(inputs_embeds=tiny_gpt.wte(ids)).logits, tiny_gpt(ids).logits)


def test_prefix_kv_from_real_tokens_reproduces_concatenation(tiny_gpt):
    """The keys/values of a real prefix, fed as prefix_kv with position_offset, give the same logits."""
    ids = torch.randint(0, 101, (1, 14))
    head, tail = ids[:, :6], ids[:, 6:]
    prefix = tiny_gpt(head).cache
    out = tiny_gpt(tail, prefix_kv=prefix, position_offset=6).logits
    torch.testing.assert_close(out, tiny_gpt(ids).logits[:, 6:], atol=1e-5, rtol=0)


def test_hidden_states_and_sublayer_hooks(tiny_gpt):
    ids = torch.randint(0, 101, (2, 7))
    out = tiny_gpt(ids, output_hidden_states=True)
    assert len(out.hidden_states) == tiny_gpt.config.n_layer + 1
    assert out.hidden_states[-1].shape == (2, 7, 64)
    tiny_gpt.h[0].mlp_out = torch.nn.Identity()  # the hook exists and an identity keeps the output
    torch.testing.assert_close(tiny_gpt(ids).logits, out.logits)


def test_functional_call(tiny_gpt):
    ids = torch.randint(0, 101, (1, 6))
    params = {n: p.detach().clone() for n, p in tiny_gpt.named_parameters()}
    params["ln_f.bias"] = params["ln_f.bias"] + 1.0
    shifted = torch.func.functional_call(tiny_gpt, params, (ids,)).logits
    assert not torch.allclose(shifted, tiny_gpt(ids).logits)
    with torch.no_grad():
        tiny_gpt.ln_f.bias += 1.0
    torch.testing.assert_close(shifted, tiny_gpt(ids).logits)


def test_loss_uses_shifted_labels_and_ignore_index(tiny_gpt):
    ids = torch.randint(0, 101, (2, 8))
    labels = ids.clone()
    labels[:, :5] = -100
    logits = tiny_gpt(ids).logits
    manual = torch.nn.functional.cross_entropy(logits[:, 4:-1].reshape(-1, 101), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(tiny_gpt(ids, labels=labels).loss, manual)


def test_bad_inputs(tiny_gpt):
    with pytest.raises(ValueError, match="exactly one"):
        tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt.generate(torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        gpt2_config("gpt5")
    assert gpt2_config("gpt2").n_params() == 124_439_808
