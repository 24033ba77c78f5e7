import pytest
import torch

from chapters.ch1_introduction.baselines import (
    apply_full,
    apply_last_block,
    apply_zero_shot,
    count_full,
    count_last_block,
    count_zero_shot,
)
from chapters.ch2_additive.ia3 import apply_ia3, count_ia3
from minimal.hooks import Hooks
from minimal.peft import count_trainable, trainable_names
from tests.helpers import tiny_config, tiny_gpt

CFG = tiny_config()


@pytest.mark.parametrize("bias", [True, False])
def test_counts_match_the_formulas(bias: bool):
    cfg = tiny_config(bias=bias)
    for apply, count in ((apply_zero_shot, count_zero_shot), (apply_full, count_full),
                         (apply_last_block, count_last_block)):
        model = tiny_gpt(config=cfg)
        assert isinstance(apply(model), Hooks)
        assert count_trainable(model).trainable == count(cfg)
    assert count_full(CFG) == CFG.n_params()
    d = CFG.n_embd
    assert count_last_block(CFG) == 12 * d * d + 13 * d + 2 * d


def test_last_block_trains_the_top_block_and_ln_f_only():
    model = tiny_gpt()
    apply_last_block(model)
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("h.") else "") for n in trainable_names(model)} \
        == {f"h.{CFG.n_layer - 1}", "ln_f"}


def test_a_stacked_method_keeps_the_first_ones_trainables():
    model = tiny_gpt()
    apply_full(model)
    apply_ia3(model)  # stacked: every weight keeps training, the vectors are added
    assert count_trainable(model).trainable == count_full(CFG) + count_ia3(CFG)
    model = tiny_gpt()
    apply_ia3(model)
    apply_last_block(model)
    assert count_trainable(model).trainable == count_last_block(CFG) + count_ia3(CFG)  # the top vectors included


def test_a_model_without_blocks_is_refused_unchanged():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="GPT"):
        apply_last_block(lin)
    assert all(p.requires_grad for p in lin.parameters())
    assert not hasattr(lin, "peft_methods_applied")
