"""The hand-written LoRA backward: gradcheck in float64, agreement with autograd, no merged weight formed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chapters.ch4_low_rank.kernels.autograd import lora_linear

M, K, N, r = 6, 7, 5, 3


def make(requires_W=False, bias=True, dtype=torch.float64, lead=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, generator=g, dtype=dtype, requires_grad=requires_W)
    b = torch.randn(N, generator=g, dtype=dtype, requires_grad=True) if bias else None
    A = torch.randn(r, K, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(N, r, generator=g, dtype=dtype, requires_grad=True)
    return x, W, b, A, B


@pytest.mark.parametrize("requires_W", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(requires_W, bias):
    x, W, b, A, B = make(requires_W, bias)
    inputs = [t for t in (x, W, b, A, B) if t is not None]

    def f(*args):
        it = iter(args)
        xx, WW = next(it), next(it)
        bb = next(it) if bias else None
        return lora_linear(xx, WW, bb, next(it), next(it), 0.7)

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_with_separate_lora_input():
    """x_lora (e.g. x after LoRA dropout) feeds only the low-rank path."""
    x, W, b, A, B = make()
    x_lora = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *a: lora_linear(a[0], W, a[1], a[2], a[3], 0.7, x_lora=a[4]), (x, b, A, B, x_lora)
    )


def test_matches_autograd_of_the_eager_formula():
    x, W, b, A, B = make(requires_W=True, lead=(3, 2))
    g = torch.randn(3, 2, M, N, dtype=torch.float64)
    lora_linear(x, W, b, A, B, 1.5).backward(g)
    ours = [t.grad.clone() for t in (x, W, b, A, B)]
    for t in (x, W, b, A, B):
        t.grad = None
    (x @ W.T + b + 1.5 * (x @ A.T) @ B.T).backward(g)
    for name, mine, theirs in zip("x W b A B".split(), ours, (x.grad, W.grad, b.grad, A.grad, B.grad)):
        torch.testing.assert_close(mine, theirs, msg=f"grad {name}")


class RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_backward_never_forms_an_N_by_K_matrix():
    """With W frozen (as in LoRA), no [N, K]-shaped tensor may appear: not the merged weight W + s B A,
    nor B A, nor a gradient of W. Shapes are chosen so that [N, K] is unlike every other shape."""
    x, W, b, A, B = make(requires_W=False, lead=())
    y = lora_linear(x, W, b, A, B, 0.5)
    with RecordShapes() as rec:
        y.backward(torch.ones_like(y))
    assert rec.shapes, "the recorder saw nothing"
    offenders = [(f, s) for f, s in rec.shapes if s in ((N, K), (K, N))]
    assert not offenders, f"backward formed an [N, K] tensor: {offenders}"
    assert x.grad.shape == (M, K) and A.grad.shape == (r, K) and B.grad.shape == (N, r)


def test_the_recorder_catches_a_merged_weight():
    """Guard: the same check does fire on the eager formula that merges the weight."""
    x, W, b, A, B = make(requires_W=False, lead=())
    y = x @ (W + 0.5 * B @ A).T + b
    with RecordShapes() as rec:
        y.backward(torch.ones_like(y))
    assert any(s in ((N, K), (K, N)) for _, s in rec.shapes)


def test_dtypes_and_frozen_parts():
    """Half-precision activations with float32 adapters: gradients come back in each parameter's dtype."""
    x, W, b, A, B = make(dtype=torch.float32)
    x16 = x.detach().bfloat16().requires_grad_(True)
    y = lora_linear(x16, W.bfloat16(), b.detach().bfloat16(), A, B, 0.5)
    assert y.dtype == torch.bfloat16 and y.shape == (2, M, N)
    y.float().sum().backward()
    assert (
        A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16
    )
