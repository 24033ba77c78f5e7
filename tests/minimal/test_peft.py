import pytest
import torch
import torch.nn as nn

from minimal.gpt import GPT, GPTConfig
from minimal.peft import (
    Mergeable,
    count_trainable,
    find_linears,
    freeze,
    inject,
    load_adapter,
    merge_all,
    save_adapter,
    unfreeze,
    unload,
    unmerge_all,
)


class Scaled(Mergeable):
    """A test-only wrapper: y = base(x) + x (D)^T with a trainable dense delta D (a mergeable update)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.delta = nn.Parameter(torch.randn_like(base.weight) * 0.01)

    def delta_weight(self) -> torch.Tensor:
        return self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + x @ self.delta.T


def test_freeze_unfreeze_and_count(tiny_gpt):
    freeze(tiny_gpt)
    assert count_trainable(tiny_gpt).trainable == 0
    names = unfreeze(tiny_gpt, lambda n: n.endswith(".bias"))
    expected = sum(p.numel() for n, p in tiny_gpt.named_parameters() if n.endswith(".bias"))
    c = count_trainable(tiny_gpt)
    assert c.trainable == expected and c.total == tiny_gpt.config.n_params()
    assert c.percent == pytest.approx(100 * expected / c.total)
    assert all(n.endswith(".bias") for n in names)
    with pytest.raises(ValueError, match="selected no parameter"):
        unfreeze(tiny_gpt, lambda n: False)


def test_target_matching_follows_peft_rules(tiny_gpt):
    assert find_linears(tiny_gpt, ["c_attn"]) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert find_linears(tiny_gpt, ["c_proj"]) == ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj",
                                                  "h.1.mlp.c_proj"]
    assert find_linears(tiny_gpt, ["mlp.c_proj"]) == ["h.0.mlp.c_proj", "h.1.mlp.c_proj"]
    assert find_linears(tiny_gpt, r"h\.1\..*c_fc") == ["h.1.mlp.c_fc"]
    with pytest.raises(ValueError, match="unknown target module 'q_proj'.*available.*c_attn"):
        find_linears(tiny_gpt, ["q_proj"])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        find_linears(tiny_gpt, r"nothing")
    with pytest.raises(ValueError, match="empty"):
        find_linears(tiny_gpt, [])


def test_inject_merge_unmerge_unload(tiny_gpt):
    ids = torch.randint(0, 101, (2, 9))
    freeze(tiny_gpt)
    names = inject(tiny_gpt, ["c_fc"], Scaled)
    assert names == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    assert count_trainable(tiny_gpt).trainable == 2 * 256 * 64
    unmerged = tiny_gpt(ids).logits
    assert merge_all(tiny_gpt) == 2
    torch.testing.assert_close(tiny_gpt(ids).logits, unmerged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        tiny_gpt.h[0].mlp.c_fc.merge()
    unmerge_all(tiny_gpt)
    with pytest.raises(ValueError, match="not merged"):
        tiny_gpt.h[0].mlp.c_fc.unmerge()
    torch.testing.assert_close(tiny_gpt(ids).logits, unmerged, atol=1e-5, rtol=0)
    unload(tiny_gpt)
    assert all(type(m) is nn.Linear for n, m in tiny_gpt.named_modules() if n.endswith("c_fc"))
    torch.testing.assert_close(tiny_gpt(ids).logits, unmerged, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        Scaled(nn.Conv1d(2, 2, 1))


def test_save_load_round_trip_is_bit_exact(tiny_gpt, tmp_path):
    freeze(tiny_gpt)
    inject(tiny_gpt, ["c_attn"], Scaled)
    save_adapter(tiny_gpt, tmp_path / "ad", {"method": "scaled"})
    torch.manual_seed(5)
    other = GPT(tiny_gpt.config)
    freeze(other)
    inject(other, ["c_attn"], Scaled)
    assert not torch.equal(other.h[0].attn.c_attn.delta, tiny_gpt.h[0].attn.c_attn.delta)
    config = load_adapter(other, tmp_path / "ad")
    assert config == {"method": "scaled"}
    for n, p in tiny_gpt.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(other.named_parameters())[n])


def test_loading_into_another_shape_names_the_tensors(tiny_gpt, tmp_path):
    freeze(tiny_gpt)
    inject(tiny_gpt, ["c_attn"], Scaled)
    save_adapter(tiny_gpt, tmp_path / "ad", {})
    wide = GPT(GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32))
    freeze(wide)
    inject(wide, ["c_attn"], Scaled)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.delta: saved \(192, 64\) vs model \(96, 32\)"):
        load_adapter(wide, tmp_path / "ad")
    plain = GPT(tiny_gpt.config)
    with pytest.raises(ValueError, match="not in the model"):
        load_adapter(plain, tmp_path / "ad")
    with pytest.raises(FileNotFoundError):
        load_adapter(plain, tmp_path / "missing")
    freeze(plain)
    with pytest.raises(ValueError, match="nothing to save"):
        save_adapter(plain, tmp_path / "empty", {})
