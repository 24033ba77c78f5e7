"""Cost model: parameter counts against published sizes and real modules, memory against measured tensors."""

from __future__ import annotations

import math

import pytest
import torch

from chapters.ch1_introduction.cost_model import (
    ModelShape,
    activation_bytes,
    checkpoint_bytes,
    cost_table,
    format_table,
    from_gpt_config,
    gpt2_shape,
    llama2_shape,
    lora_param_count,
    model_state_bytes,
    param_count,
    param_counts,
    training_memory,
)
from minimal.gpt import GPT, GPTConfig
from minimal.peft import freeze, unfreeze
from minimal.train import tensor_bytes


def sig3(x: float) -> float:
    """x rounded to three significant figures."""
    return float(f"{x:.3g}")


# Published sizes: GPT-2 model card / Hugging Face (124M, 355M, 774M, 1.5B -> 1.56B counted with the tied
# head once), Llama 2 paper and model cards (6.74B, 13.0B, 69.0B as reported by Hugging Face transformers).
PUBLISHED = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
             "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published_size(name: str) -> None:
    shape = gpt2_shape(name) if name.startswith("gpt2") else llama2_shape(name)
    assert sig3(param_count(shape)) == PUBLISHED[name]


def test_exact_counts_of_known_checkpoints() -> None:
    # the exact numbers Hugging Face reports for GPT2LMHeadModel("gpt2") and LlamaForCausalLM (7B)
    assert param_count(gpt2_shape("gpt2")) == 124_439_808
    assert param_count(llama2_shape("llama-2-7b")) == 6_738_415_616
    assert param_count(llama2_shape("llama-2-70b")) == 68_976_648_192


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [(101, 32, 2, 4, 64), (2048, 128, 4, 4, 128), (50, 7, 3, 2, 6)])
def test_formula_equals_real_minimal_gpt(dims: tuple[int, ...], bias: bool) -> None:
    V, T, L, H, d = dims
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=d, bias=bias)
    real = sum(p.numel() for p in GPT(cfg).parameters())
    assert param_count(from_gpt_config(cfg)) == real
    if bias:
        assert real == cfg.n_params()  # and the closed form V d + T d + L (12 d^2 + 13 d) + 2 d


def test_two_reference_configs_by_hand() -> None:
    # V d + T d + L (12 d^2 + 13 d) + 2 d for (V, T, L, d) = (256, 128, 4, 128) and (512, 256, 6, 256)
    assert param_count(from_gpt_config(GPTConfig(256, 128, 4, 4, 128))) == 842_496
    assert param_count(from_gpt_config(GPTConfig(512, 256, 6, 8, 256))) == 4_935_680


def test_llama_parts_follow_the_architecture() -> None:
    parts = param_counts(llama2_shape("llama-2-70b"))
    d, L, ff, d_kv = 8192, 80, 28672, 8 * 128  # 8 key/value heads of size 128
    assert parts["attention"] == L * (2 * d * d + 2 * d * d_kv)
    assert parts["mlp"] == L * 3 * d * ff
    assert parts["norms"] == (2 * L + 1) * d
    assert parts["head"] == parts["embeddings"] == 32000 * d
    assert parts["positions"] == 0


def test_lora_count_on_llama_7b() -> None:
    # the widely quoted 4,194,304 trainable parameters for r = 8 on q and v: 32 layers * 8 * (2*4096 + 2*4096)
    assert lora_param_count(llama2_shape("llama-2-7b"), 8) == 32 * 8 * 4 * 4096 == 4_194_304
    # grouped-query attention shrinks the value projection: 80 * 8 * ((8192 + 8192) + (8192 + 1024))
    assert lora_param_count(llama2_shape("llama-2-70b"), 8) == 80 * 8 * (16384 + 9216)


def test_model_state_formulas() -> None:
    n, t = 1000, 10
    assert model_state_bytes(n, n, "fp32").model_states == 16 * n
    assert model_state_bytes(n, n, "mixed").model_states == 16 * n
    assert model_state_bytes(n, t, "fp32").model_states == 4 * n + 12 * t
    assert model_state_bytes(n, t, "mixed").model_states == 2 * n + 14 * t
    assert model_state_bytes(n, 0, "mixed").model_states == 2 * n  # inference-only weights
    # worked example: the second config above with BitFit (L 11 d + d = 17,152 biases) in fp32
    # = 4 (Phi - Phi_t) + 16 Phi_t ~ 19.95 MB
    phi = 4_935_680
    assert model_state_bytes(phi, 17_152, "fp32").model_states == 4 * (phi - 17_152) + 16 * 17_152
    assert round(model_state_bytes(phi, 17_152, "fp32").model_states / 1e6, 2) == 19.95


def test_seven_billion_needs_16_bytes_per_parameter() -> None:
    mem = training_memory(llama2_shape("llama-2-7b"), precision="mixed")
    assert mem.model_states == 16 * 6_738_415_616
    assert mem.total == mem.model_states + mem.activations


def test_activation_formula_and_scaling() -> None:
    shape = gpt2_shape("gpt2")
    s, b, d, H, L = 1024, 2, 768, 12, 12
    assert activation_bytes(shape, b, s) == L * s * b * d * (34 + 5 * H * s / d)
    assert activation_bytes(shape, 2 * b, s) == 2 * activation_bytes(shape, b, s)  # linear in batch
    assert activation_bytes(shape, b, 2 * s) > 2 * activation_bytes(shape, b, s)  # attention: quadratic in s
    assert activation_bytes(shape, b, s, "fp32") == 2 * activation_bytes(shape, b, s)
    # PEFT keeps the activations of full fine-tuning (most methods back-propagate through every layer)
    peft, full = training_memory(shape, 1000, "mixed", b, s), training_memory(shape, None, "mixed", b, s)
    assert peft.activations == full.activations


def test_checkpoint_bytes() -> None:
    assert checkpoint_bytes(1000) == 2000  # bf16
    assert checkpoint_bytes(1000, 4) == 4000  # fp32
    assert checkpoint_bytes(1000, 2, index_bytes=4) == 6000  # sparse delta: value + int32 position


def _one_adamw_step(model: GPT) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, labels=idx).loss.backward()
    opt.step()
    return opt


def test_predicted_bytes_match_measured_full_finetuning() -> None:
    cfg = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = _one_adamw_step(model)
    measured = tensor_bytes(model, opt)
    n = param_count(from_gpt_config(cfg))
    predicted = model_state_bytes(n, n, "fp32").model_states
    assert predicted == 16 * n
    assert math.isclose(measured, predicted, rel_tol=0.05), (measured, predicted)


def test_predicted_bytes_match_measured_peft() -> None:
    cfg = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    freeze(model)
    unfreeze(model, lambda name: name.endswith(".bias"))  # BitFit-like: every bias trains
    n = param_count(from_gpt_config(cfg))
    n_t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_t == cfg.n_layer * 11 * cfg.n_embd + cfg.n_embd  # L (9 d linear + 2 d LayerNorm biases) + d (ln_f)
    opt = _one_adamw_step(model)
    measured = tensor_bytes(model, opt)
    predicted = model_state_bytes(n, n_t, "fp32").model_states
    assert predicted == 4 * n + 12 * n_t
    assert math.isclose(measured, predicted, rel_tol=0.05), (measured, predicted)
    assert measured < 0.5 * model_state_bytes(n, n, "fp32").model_states  # far below full fine-tuning


def test_table_rows_and_text() -> None:
    rows = cost_table()
    assert [r["model"] for r in rows] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b",
                                         "llama-2-13b", "llama-2-70b"]
    for r in rows:
        assert r["full_mixed_states_gb"] == pytest.approx(16 * r["params"] / 1e9)
        assert r["lora_mixed_states_gb"] < r["full_mixed_states_gb"] / 6
        assert r["lora_percent"] < 1
    text = format_table(rows)
    assert text.count("\n") == len(rows) + 1 and "llama-2-70b" in text


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelShape("x", 10, 10, 1, 3, 40, 8)
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelShape("x", 10, 12, 1, 4, 48, 8, n_kv_head=3)
    with pytest.raises(ValueError, match="norm"):
        ModelShape("x", 10, 12, 1, 4, 48, 8, norm="batchnorm")
    with pytest.raises(ValueError, match="precision"):
        model_state_bytes(10, 1, "fp8")
    with pytest.raises(ValueError, match="n_trainable"):
        model_state_bytes(10, 11)
    with pytest.raises(ValueError, match="rank"):
        lora_param_count(gpt2_shape(), 0)
    with pytest.raises(ValueError, match="unknown GPT-2"):
        gpt2_shape("gpt3")
