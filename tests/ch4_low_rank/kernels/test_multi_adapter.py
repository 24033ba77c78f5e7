"""Per-token adapters (S-LoRA / Punica style): the Triton shrink and expand against a gather reference."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from chapters.ch4_low_rank.kernels.multi_adapter import (  # noqa: E402
    INTERPRETER_MULTI,
    add_multi_lora_,
    group_tokens,
    multi_lora_expand_,
    multi_lora_reference,
    multi_lora_shrink,
)

T, K, N, L = 41, 70, 45, 4  # ragged against the 16 x 32 x 32 test tiles


def make(r, dtype, device, idx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    A = torch.randn(L, r, K, generator=g) / K**0.5
    B = torch.randn(L, N, r, generator=g) / r**0.5
    y = torch.randn(T, N, generator=g)  # the base output the LoRA term is added to
    scales = torch.tensor([0.5, 1.0, 2.0, -1.0])
    return [t.to(device=device, dtype=dtype) for t in (x, A, B, y)] + [scales.to(device), idx.to(device)]


def index_patterns():
    g = torch.Generator().manual_seed(1)
    return {
        "random_with_none": torch.randint(-1, L, (T,), generator=g),
        "adapter_2_unused": torch.tensor([0, 1, 3, -1] * 10 + [1]),
        "one_adapter": torch.full((T,), 2),
        "all_none": torch.full((T,), -1),
        "sorted_blocks": torch.arange(T) * L // T,  # long runs, as after prefill grouping
    }


def loop_reference(y, x, A, B, idx, scales):
    """The definition, one token at a time, in float64."""
    out = y.double().clone()
    for i in range(x.shape[0]):
        a = int(idx[i])
        if a >= 0:
            out[i] += scales[a].double() * (x[i].double() @ A[a].double().T) @ B[a].double().T
    return out


def test_gather_reference_matches_the_loop():
    x, A, B, y, scales, idx = make(8, torch.float64, "cpu", index_patterns()["random_with_none"])
    torch.testing.assert_close(
        multi_lora_reference(y, x, A, B, idx, scales).double(),
        loop_reference(y, x, A, B, idx, scales),
        rtol=1e-5,
        atol=1e-5,
    )


def test_group_tokens():
    idx = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    g = group_tokens(idx, num_adapters=4)
    assert g.counts.tolist() == [2, 0, 3, 0]
    for a in range(4):
        start, count = int(g.starts[a]), int(g.counts[a])
        members = g.tokens[start : start + count].tolist()
        assert sorted(members) == [i for i in range(len(idx)) if idx[i] == a]


# every rank and dtype on the mixed pattern; the special patterns once each (keeps CI fast)
CASES = [("random_with_none", r, dtype) for r in (4, 16, 64) for dtype in (torch.float32, torch.float16)]
CASES += [(pattern, 16, torch.float32) for pattern in index_patterns() if pattern != "random_with_none"]


@pytest.mark.parametrize("pattern,r,dtype", CASES)
def test_add_multi_lora(pattern, r, dtype, device, assert_rel_close):
    x, A, B, y, scales, idx = make(r, dtype, device, index_patterns()[pattern])
    ref = multi_lora_reference(y, x, A, B, idx, scales).cpu()
    out = add_multi_lora_(y.clone(), x, A, B, idx, scales, config=INTERPRETER_MULTI).cpu()
    none = (idx < 0).cpu()
    assert torch.equal(out[none], y.cpu()[none]), "tokens without adapter must keep the base output exactly"
    if (~none).any():
        assert (ref - y.cpu().float())[~none].abs().max() > 0.1, "the LoRA term must be visible"
    assert_rel_close(out, ref, dtype, f"{pattern} r={r}")


def test_shrink_and_expand_separately(device, assert_rel_close):
    x, A, B, y, scales, idx = make(16, torch.float32, device, index_patterns()["random_with_none"])
    t = multi_lora_shrink(x, A, idx, config=INTERPRETER_MULTI)  # [T, r]
    idx_cpu = idx.cpu()
    t_ref = torch.stack(
        [x[i].cpu() @ A[int(a)].cpu().T if a >= 0 else torch.zeros(16) for i, a in enumerate(idx_cpu)]
    )
    assert_rel_close(t.cpu(), t_ref, torch.float32, "shrink")
    out = multi_lora_expand_(y.clone(), t, B, idx, scales, config=INTERPRETER_MULTI)
    assert_rel_close(out.cpu(), multi_lora_reference(y, x, A, B, idx, scales).cpu(), torch.float32, "expand")


def test_scalar_scale(device, assert_rel_close):
    x, A, B, y, _, idx = make(8, torch.float32, device, index_patterns()["random_with_none"])
    out = add_multi_lora_(y.clone(), x, A, B, idx, 0.25, config=INTERPRETER_MULTI)
    assert_rel_close(
        out.cpu(), multi_lora_reference(y, x, A, B, idx, 0.25).cpu(), torch.float32, "scalar scale"
    )
