"""Exercise checkers of ch4_beyond.ipynb (QLoRA, LoRA+, VeRA, LoHa): the reference solutions pass, typical
mistakes fail, and an unfilled stub reports "not implemented yet"."""

import torch

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def not_implemented(name, answer, capsys):
    assert not check(name, answer)
    assert "not implemented yet" in capsys.readouterr().out


def stub(*args):
    raise NotImplementedError


# ---------------------------------------------------------------------------- NF4 one block (implement)

def nf4_levels():
    delta = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).float()


def nf4_with(levels, absmax_of=lambda x: x.abs().max(), guard=True):
    def nf4_block(x):
        absmax = absmax_of(x)
        scaled = x / absmax.clamp(min=torch.finfo(x.dtype).tiny) if guard else x / absmax
        codes = (scaled[:, None] - levels[None, :]).abs().argmin(dim=1)  # [n]: the nearest level
        return codes, absmax, levels[codes] * absmax
    return nf4_block


def test_nf4_block_reference_passes(capsys):
    passes("ch4.beyond_nf4_block", nf4_with(nf4_levels()), capsys)
    not_implemented("ch4.beyond_nf4_block", stub, capsys)


def test_nf4_levels_here_are_the_library_code():
    from chapters.ch4_low_rank.qlora import nf4_code
    assert torch.equal(nf4_levels(), nf4_code())


def test_nf4_block_evenly_spaced_levels_fail(capsys):
    fails("ch4.beyond_nf4_block", nf4_with(torch.arange(-7, 8) / 7), capsys, "evenly spaced")


def test_nf4_block_max_instead_of_absmax_fails(capsys):
    fails("ch4.beyond_nf4_block", nf4_with(nf4_levels(), absmax_of=lambda x: x.max()), capsys, "absmax")


def test_nf4_block_dividing_by_a_zero_absmax_fails(capsys):
    fails("ch4.beyond_nf4_block", nf4_with(nf4_levels(), guard=False), capsys, "all-zero")


def test_nf4_block_x_hat_without_the_scale_fails(capsys):
    def unscaled(x):
        codes, absmax, _ = nf4_with(nf4_levels())(x)
        return codes, absmax, nf4_levels()[codes]
    fails("ch4.beyond_nf4_block", unscaled, capsys, "x_hat")


def test_nf4_block_codes_of_the_wrong_length_fail(capsys):
    def padded(x):
        codes, absmax, x_hat = nf4_with(nf4_levels())(x)
        return torch.cat([codes, codes[:1]]), absmax, x_hat
    fails("ch4.beyond_nf4_block", padded, capsys, "codes")


# ---------------------------------------------------------------------------- LoRA+ groups (implement)

def lora_plus_groups(model, lr, ratio):
    from chapters.ch4_low_rank.lora import LoRALinear
    fast = {id(m.B) for m in model.modules() if isinstance(m, LoRALinear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in fast], "lr": lr * ratio},
            {"params": [p for p in params if id(p) not in fast], "lr": lr}]


def test_lora_plus_groups_reference_passes(capsys):
    passes("ch4.beyond_lora_plus_groups", lora_plus_groups, capsys)
    not_implemented("ch4.beyond_lora_plus_groups", stub, capsys)


def test_the_library_lora_plus_groups_pass(capsys):  # the library's own rule, through make_optimizer's groups
    from types import SimpleNamespace

    from chapters.ch4_low_rank.lora import LoRALinear
    from chapters.ch4_low_rank.lora_plus import LoRAPlus

    def library(model, lr, ratio):
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        cfg = SimpleNamespace(lr=lr, weight_decay=0.0)
        return LoRAPlus(layers, ratio).param_groups([p for p in model.parameters() if p.requires_grad], cfg)
    passes("ch4.beyond_lora_plus_groups", library, capsys)


def test_lora_plus_groups_a_fast_instead_of_b_fails(capsys):
    def swapped(model, lr, ratio):
        from chapters.ch4_low_rank.lora import LoRALinear
        fast = {id(m.A) for m in model.modules() if isinstance(m, LoRALinear)}
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) in fast], "lr": lr * ratio},
                {"params": [p for p in params if id(p) not in fast], "lr": lr}]
    fails("ch4.beyond_lora_plus_groups", swapped, capsys, "B matrix")


def test_lora_plus_groups_one_rate_fails(capsys):
    fails("ch4.beyond_lora_plus_groups",
          lambda m, lr, ratio: [{"params": [p for p in m.parameters() if p.requires_grad]}], capsys, "lr * ratio")


def test_lora_plus_groups_with_frozen_tensors_fail(capsys):
    def everything(model, lr, ratio):
        groups = lora_plus_groups(model, lr, ratio)
        trained = {id(p) for g in groups for p in g["params"]}
        return groups + [{"params": [p for p in model.parameters() if id(p) not in trained], "lr": lr}]
    fails("ch4.beyond_lora_plus_groups", everything, capsys, "frozen")


def test_lora_plus_groups_of_a_and_b_only_miss_other_trainables(capsys):
    def by_name(model, lr, ratio):  # "c_proj.bias" does not end in ".B", but the biases are left out entirely
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if n.endswith(".B")], "lr": lr * ratio},
                {"params": [p for n, p in params if n.endswith(".A")], "lr": lr}]
    fails("ch4.beyond_lora_plus_groups", by_name, capsys, "in no group")


def test_lora_plus_groups_twice_the_same_tensor_fails(capsys):
    def twice(model, lr, ratio):
        groups = lora_plus_groups(model, lr, ratio)
        return groups + [{"params": groups[0]["params"][:1], "lr": lr}]
    fails("ch4.beyond_lora_plus_groups", twice, capsys, "AdamW")


# ---------------------------------------------------------------------------- VeRA count (predict)

def test_vera_count(capsys):
    L, d, r = 4, 128, 256  # base
    passes("ch4.beyond_vera_count", L * ((r + 3 * d) + (r + 4 * d)), capsys)
    fails("ch4.beyond_vera_count", L * r * ((d + 3 * d) + (d + 4 * d)), capsys, "LoRA's count")
    fails("ch4.beyond_vera_count", (r + 3 * d) + (r + 4 * d), capsys, "one block")
    fails("ch4.beyond_vera_count", L * (r + 3 * d), capsys, "c_attn alone")
    fails("ch4.beyond_vera_count", L * ((r + 3 * d) + (r + 4 * d)) + r * d + 4 * d * r, capsys, "frozen buffers")
    fails("ch4.beyond_vera_count", 5632.0, capsys, "an int")
    not_implemented("ch4.beyond_vera_count", None, capsys)


def test_the_library_vera_count_formula_agrees():
    from chapters.ch4_low_rank.vera import count_vera
    from minimal.pretrained import load_base
    assert count_vera(load_base("base").config, r=256, targets=("c_attn", "c_fc")) == 4 * ((256 + 384) + (256 + 512))


# ---------------------------------------------------------------------------- LoHa update (implement)

def loha_delta(layer):
    return layer.scale * (layer.B1 @ layer.A1) * (layer.B2 @ layer.A2)


def test_loha_delta_reference_passes(capsys):
    passes("ch4.beyond_loha_delta", loha_delta, capsys)
    passes("ch4.beyond_loha_delta", lambda layer: layer.delta_weight(), capsys)  # the library itself
    not_implemented("ch4.beyond_loha_delta", stub, capsys)


def test_loha_delta_checked_on_non_zero_factors():  # A2 = 0 at init would make every answer's update 0
    from chapters.exercises.ch4_beyond import LOHA_CASES, loha_layer
    for seed, case in enumerate(LOHA_CASES):
        layer = loha_layer(*case, seed=seed)
        assert all(p.abs().min() > 0 for p in (layer.B1, layer.A1, layer.B2, layer.A2))
        assert layer.scale != 1


def test_loha_delta_without_the_scale_fails(capsys):
    fails("ch4.beyond_loha_delta", lambda layer: (layer.B1 @ layer.A1) * (layer.B2 @ layer.A2), capsys,
          "without a scale")


def test_loha_delta_alpha_instead_of_the_scale_fails(capsys):
    fails("ch4.beyond_loha_delta", lambda layer: layer.alpha * (layer.B1 @ layer.A1) * (layer.B2 @ layer.A2),
          capsys, "alpha / r")


def test_loha_delta_matrix_product_fails(capsys):
    fails("ch4.beyond_loha_delta", lambda layer: layer.scale * (layer.B1 @ layer.A1) @ (layer.B2 @ layer.A2),
          capsys, "element-wise")


def test_loha_delta_transposed_fails(capsys):
    def transposed(layer):
        return layer.scale * (layer.A1.T @ layer.B1.T) * (layer.A2.T @ layer.B2.T)  # [in, out]
    fails("ch4.beyond_loha_delta", transposed, capsys, "transpose")


def test_loha_delta_crossed_pairs_fail(capsys):
    fails("ch4.beyond_loha_delta", lambda layer: layer.scale * (layer.B1 @ layer.A2) * (layer.B2 @ layer.A1),
          capsys, "B1 with A1")


def test_loha_delta_sum_instead_of_product_fails(capsys):
    fails("ch4.beyond_loha_delta", lambda layer: layer.scale * (layer.B1 @ layer.A1 + layer.B2 @ layer.A2),
          capsys, "adds the two products")


def test_loha_delta_changing_the_layer_fails(capsys):
    def in_place(layer):
        with torch.no_grad():
            layer.A2.mul_(layer.scale)
        return (layer.B1 @ layer.A1) * (layer.B2 @ layer.A2)
    fails("ch4.beyond_loha_delta", in_place, capsys, "changed the layer")
