"""The LoRA speed benchmark compares two implementations of one function: check the pairing, not the time."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from chapters.ch4_low_rank import lora_speed  # noqa: E402
from minimal.gpt import GPTConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
CONFIG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


def test_pair_has_equal_logits_losses_and_gradients() -> None:
    theirs, ours = lora_speed.lora_pair(CONFIG, r=4)
    idx = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(5))
    a, b = ours(idx, labels=idx), theirs(input_ids=idx, labels=idx)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(mine) == len(peft_grads) == 2 * 2 * 4  # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj x 2 blocks
    for name, grad in mine.items():
        assert grad.abs().max() > 0, name


def test_pair_trains_only_lora() -> None:
    theirs, ours = lora_speed.lora_pair(CONFIG, r=4)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    # c_attn 64->192, c_proj 64->64, c_fc 64->256, mlp c_proj 256->64, r=4, two blocks
    assert sum(p.numel() for n, p in ours.named_parameters() if p.requires_grad) == 2 * 4 * (
        (64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))


def test_main_writes_results(tmp_path) -> None:
    result = lora_speed.main(["--batch-size", "1", "--steps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "lora_speed_cpu.json").exists() and (tmp_path / "lora_speed_cpu.md").exists()
    assert result["ratio_ours_over_peft"] > 0
    assert "ratio ours / peft" in (tmp_path / "lora_speed_cpu.md").read_text(encoding="utf-8")


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        lora_speed.main(["--steps", "0", "--out", str(tmp_path)])
