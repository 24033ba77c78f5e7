"""Interop with transformers and peft: base-model conversion both ways, adapters in peft's format both ways."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chapters.ch2_additive.ia3 import apply_ia3  # noqa: E402
from chapters.ch4_low_rank.lora import apply_lora  # noqa: E402
from chapters.ch5_applications.interop import (  # noqa: E402
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    base_state_dict,
    export_peft,
    from_hf,
    import_peft,
    to_hf,
)
from minimal.gpt import GPT, GPTConfig  # noqa: E402
from minimal.peft import merge_all, unmerge_all  # noqa: E402

V, D = 101, 64
CFG = GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=D)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: GPT, seed: int = 3) -> None:
    """Give every trainable adapter tensor non-trivial values (B = 0 / ones at init would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.dim() == 1 else
                        0.2 * torch.randn(p.shape, generator=g))


def ours(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


# ------------------------------------------------------------------------------------------ base model


def test_base_round_trip_and_logits() -> None:
    model = ours()
    hf = to_hf(model).eval()
    assert hf.config.n_positions == 32 and hf.config.n_embd == D and hf.config.vocab_size == V
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x).logits, rtol=0, atol=1e-5)
    back = from_hf(hf)
    assert back.config == CFG
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name  # bit-exact both ways
    # HF -> ours -> HF
    torch.manual_seed(5)
    hf2 = transformers.GPT2LMHeadModel(hf.config).eval()
    again = to_hf(from_hf(hf2))
    sd2, sd3 = hf2.state_dict(), again.state_dict()
    assert set(sd2) == set(sd3)
    assert all(torch.equal(sd2[k], sd3[k]) for k in sd2)


def test_base_conversion_refuses_what_gpt2_cannot_express() -> None:
    with pytest.raises(ValueError, match="bias=False"):
        to_hf(GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=4, n_embd=D, bias=False)))
    cfg = to_hf(ours()).config
    cfg.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function"):
        from_hf(transformers.GPT2LMHeadModel(cfg))


def test_to_hf_of_an_adapted_model_uses_the_base_weights_only() -> None:
    model = ours()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets=["c_attn", "mlp.c_fc"])
    randomize_adapters(model)
    sd = base_state_dict(model)
    assert set(sd) == set(plain) and all(torch.equal(sd[k], plain[k]) for k in plain)
    merge_all(model)
    with pytest.raises(ValueError, match="merged"):
        to_hf(model)


# ------------------------------------------------------------------------------------------ export: ours -> peft


@pytest.mark.parametrize("rslora", [False, True])
def test_exported_lora_loads_in_peft_with_equal_logits(tmp_path, rslora: bool) -> None:
    model = ours()
    apply_lora(model, r=4, alpha=12, targets=["c_attn", "c_proj"], rslora=rslora)
    randomize_adapters(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG).read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["use_rslora"] is rslora
    assert sorted(config["target_modules"]) == ["attn.c_attn", "attn.c_proj", "mlp.c_proj"]
    keys = load_file(str(tmp_path / PEFT_WEIGHTS))
    assert keys["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"].shape == (4, D)
    assert keys["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"].shape == (D, 4)

    pm = peft.PeftModel.from_pretrained(to_hf(model), str(tmp_path)).eval()
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert layer.scaling["default"] == pytest.approx(model.h[0].attn.c_attn.scale)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        assert (want - merge_copy_logits(model, x)).abs().max() < 1e-5  # sanity: our merge agrees
        torch.testing.assert_close(pm(input_ids=x).logits, want, rtol=0, atol=1e-5)
        with pm.disable_adapter():
            base = pm(input_ids=x).logits
    assert (base - want).abs().max() > 1e-3  # the adapter really changes the output


def merge_copy_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    merge_all(model)
    out = model(x).logits
    unmerge_all(model)
    return out


@pytest.mark.parametrize("attn", ["kv", "qkv"])
def test_exported_ia3_loads_in_peft_with_equal_logits(tmp_path, attn: str) -> None:
    model = ours()
    apply_ia3(model, attn=attn)
    randomize_adapters(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG).read_text(encoding="utf-8"))
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["mlp.c_proj"]
    saved = load_file(str(tmp_path / PEFT_WEIGHTS))
    attn_l = saved["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    assert attn_l.shape == (3 * D, 1) and saved["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 4 * D)
    assert torch.equal(attn_l[:D], torch.ones(D, 1)) == (attn == "kv")  # kv: the query third is exported as ones

    pm = peft.PeftModel.from_pretrained(to_hf(model), str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(pm(input_ids=x).logits, want, rtol=0, atol=1e-5)
        with pm.disable_adapter():
            assert (pm(input_ids=x).logits - want).abs().max() > 1e-3


def test_export_refuses_mixed_or_merged_or_missing_adapters(tmp_path) -> None:
    with pytest.raises(ValueError, match="no adapter"):
        export_peft(ours(), tmp_path)
    model = ours()
    apply_lora(model, r=4, targets=["c_attn"])
    merge_all(model)
    with pytest.raises(ValueError, match="merged"):
        export_peft(model, tmp_path)
    model = ours()
    apply_lora(model, r=4, targets=["c_attn"])
    apply_lora(model, r=2, targets=["mlp.c_fc"])  # one layer with another rank
    with pytest.raises(ValueError, match="one \\(r, alpha"):
        export_peft(model, tmp_path)


# ------------------------------------------------------------------------------------------ import: peft -> ours


def peft_adapter(tmp_path, config) -> tuple[torch.nn.Module, GPT]:
    """A peft model with random adapter weights saved to tmp_path, and our GPT on the same base."""
    hf = to_hf(ours()).eval()
    base = from_hf(hf).eval()
    torch.manual_seed(7)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(str(tmp_path))
    return pm, base


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_imports_with_equal_logits(tmp_path, rslora: bool) -> None:
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_fc"],
                             lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False, use_rslora=rslora)
    pm, model = peft_adapter(tmp_path, config)
    import_peft(model, tmp_path)
    m = model.h[1].mlp.c_fc
    assert m.r == 4 and m.rslora is rslora and torch.equal(m.A, pm.base_model.model.transformer.h[1].mlp.c_fc
                                                              .lora_A["default"].weight)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"h.{i}.{t}.{ab}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc") for ab in "AB")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pm(input_ids=x).logits, rtol=0, atol=1e-5)


def test_peft_ia3_imports_with_equal_logits(tmp_path) -> None:
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                            feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True, init_ia3_weights=False)
    pm, model = peft_adapter(tmp_path, config)
    import_peft(model, tmp_path)
    assert model.h[0].attn.c_attn.mode == "output" and model.h[0].mlp.c_proj.mode == "input"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pm(input_ids=x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_float64_peft_adapter_imports_exactly(tmp_path, kind: str) -> None:
    hf = to_hf(ours()).double().eval()
    model = from_hf(hf).eval()  # our float64 GPT on the same base
    config = (peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_fc"],
                              lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False) if kind == "lora" else
              peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                             feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True, init_ia3_weights=False))
    pm = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # float64 values that float32 cannot hold
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_((kind == "ia3") + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    pm.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / PEFT_WEIGHTS))
    assert {v.dtype for v in saved.values()} == {torch.float64}
    assert all(not torch.equal(v, v.float().double()) for v in saved.values())  # float32 would round them
    import_peft(model, tmp_path)
    params = dict(model.named_parameters())
    for key, value in saved.items():  # base_model.model.transformer.h.0.attn.c_attn.lora_A.weight -> h.0.attn.c_attn.A
        name = key.removeprefix("base_model.model.transformer.")
        name = name.replace(".lora_A.weight", ".A").replace(".lora_B.weight", ".B").replace(".ia3_l", ".scale")
        assert params[name].dtype == torch.float64 and torch.equal(params[name], value.flatten() if kind == "ia3"
                                                                   else value), name  # bit-exact
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pm(input_ids=x).logits, rtol=0, atol=1e-12)


def test_round_trip_ours_peft_ours(tmp_path) -> None:
    model = ours()
    apply_lora(model, r=3, alpha=6, targets=["attn.c_proj"])
    randomize_adapters(model)
    export_peft(model, tmp_path)
    fresh = from_hf(to_hf(model))
    import_peft(fresh, tmp_path)
    for i in range(2):
        assert torch.equal(fresh.h[i].attn.c_proj.A, model.h[i].attn.c_proj.A)
        assert torch.equal(fresh.h[i].attn.c_proj.B, model.h[i].attn.c_proj.B)


# ------------------------------------------------------------------------------------------ import errors


@pytest.fixture
def lora_dir(tmp_path):
    model = ours()
    apply_lora(model, r=4, alpha=8, targets=["c_attn"])
    randomize_adapters(model)
    return export_peft(model, tmp_path / "adapter")


def edit_config(directory, **changes) -> None:
    path = directory / PEFT_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config), encoding="utf-8")


def test_import_rank_mismatch_is_an_error_and_leaves_the_model_plain(lora_dir) -> None:
    edit_config(lora_dir, r=8)
    model = ours()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_A\.weight: saved \(4, 64\), expected \(8, 64\)"):
        import_peft(model, lora_dir)
    assert set(model.state_dict()) == set(before)  # nothing was applied
    assert all(p.requires_grad for p in model.parameters())


def test_import_target_mismatch_is_an_error(lora_dir) -> None:
    edit_config(lora_dir, target_modules=["c_attn", "c_fc"])
    with pytest.raises(ValueError, match=r"targeted without weights \['h\.0\.mlp\.c_fc', 'h\.1\.mlp\.c_fc'\]"):
        import_peft(ours(), lora_dir)
    edit_config(lora_dir, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="match no linear layer"):
        import_peft(ours(), lora_dir)


def test_import_into_another_base_shape_is_an_error(lora_dir) -> None:
    wider = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=96))
    with pytest.raises(ValueError, match=r"lora_A\.weight: saved \(4, 64\), expected \(4, 96\)"):
        import_peft(wider, lora_dir)
    deeper = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=3, n_head=4, n_embd=D))
    with pytest.raises(ValueError, match=r"targeted without weights \['h\.2\.attn\.c_attn'\]"):
        import_peft(deeper, lora_dir)


def test_import_refuses_unsupported_features_and_files(lora_dir) -> None:
    edit_config(lora_dir, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        import_peft(ours(), lora_dir)
    edit_config(lora_dir, use_dora=False, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="changes the base weights"):
        import_peft(ours(), lora_dir)
    edit_config(lora_dir, init_lora_weights=True, peft_type="LOHA")
    with pytest.raises(ValueError, match="'LOHA' is not imported"):
        import_peft(ours(), lora_dir)
    edit_config(lora_dir, peft_type="LORA")
    state = load_file(str(lora_dir / PEFT_WEIGHTS))
    state["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] = torch.ones(3 * D)
    save_file(state, str(lora_dir / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        import_peft(ours(), lora_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(ours(), lora_dir / "nowhere")
    model = ours()
    apply_lora(model, r=2)
    with pytest.raises(ValueError, match="already has adapters"):
        import_peft(model, lora_dir)


def test_import_ia3_orientation_mismatch_is_an_error(tmp_path) -> None:
    model = ours()
    apply_ia3(model, attn="qkv")
    randomize_adapters(model)
    export_peft(model, tmp_path)
    edit_config(tmp_path, feedforward_modules=[])  # now mlp.c_proj would be an output scale [64, 1]
    with pytest.raises(ValueError, match=r"mlp\.c_proj\.ia3_l: saved \(1, 256\), expected \(64, 1\)"):
        import_peft(ours(), tmp_path)
