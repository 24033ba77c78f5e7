"""LoRA as one torch.autograd.Function with a hand-written backward (the unsloth idea, in our own words).

Forward, for x [M, K] (any leading dims are flattened into M), W [N, K], A [r, K], B [N, r]:

    t = x_l A^T                  [M, r]   (x_l is x, or a dropped-out copy of x for the low-rank path)
    y = x W^T + bias + s t B^T   [M, N]   (the last term added inside the GEMM epilogue: addmm_)

Backward, given g = dL/dy [M, N]. Autograd on the eager expression computes the same products, but it
first scales g by s (one more [M, N] pass), adds the two parts of dx as separate [M, K] tensors, and
keeps what every eager op saved. Written out by hand, s is applied to [M, r] or [N, r] products only,
the second part of dx is accumulated in the GEMM epilogue, and every product has a small side:

    dB  = s g^T t                [N, r]
    dt  = s g B                  [M, r]
    dA  = dt^T x_l               [r, K]
    dx  = g W  (+ dt A if x_l is x)       [M, K]
    dx_l = dt A                  [M, K]   (only when a separate x_l was given)
    dW  = g^T x                  [N, K]   (only if W requires grad; frozen in LoRA)
    dbias = sum over rows of g   [N]

No [N, K] matrix is formed unless W itself needs a gradient: in particular the merged weight
W + s B A never appears. Only t [M, r] is saved besides the inputs (r is tiny), trading M r floats of
memory for not recomputing x A^T in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s (x_l A^T) B^T. Call through `lora_linear`."""

    @staticmethod
    def forward(
        ctx, x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, s: float, x_lora: Tensor | None
    ) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])  # [M, K]
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        y = x2 @ W.T if bias is None else torch.addmm(bias.to(x.dtype), x2, W.T)  # [M, N]
        t = xl2 @ A_.T  # [M, r]
        y.addmm_(t, B_.T, alpha=s)  # [M, N]  y += s t B^T, no [M, N] temporary
        ctx.save_for_backward(x2, xl2 if x_lora is not None else None, W, A_, B_, t)
        ctx.s = s
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.meta = (lead, A.dtype, B.dtype, bias is not None)
        return y.reshape(*lead, W.shape[0])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2, xl2, W, A, B, t = ctx.saved_tensors
        s = ctx.s
        lead, a_dtype, b_dtype, has_bias = ctx.meta
        need_x, need_W, need_bias, need_A, need_B, _, need_xl = ctx.needs_input_grad
        xl = x2 if xl2 is None else xl2
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [M, N]

        grad_x = grad_W = grad_bias = grad_A = grad_B = grad_xl = None
        dt = (g @ B) * s if (need_A or need_x or need_xl) else None  # [M, r]
        if need_B:
            grad_B = (torch.mm(g.T, t) * s).to(b_dtype)  # [N, r]
        if need_A:
            grad_A = torch.mm(dt.T, xl).to(a_dtype)  # [r, K]
        if need_x:
            grad_x = g @ W  # [M, K]
            if xl2 is None:
                grad_x.addmm_(dt, A)  # [M, K]  += dt A, in the GEMM epilogue
            grad_x = grad_x.reshape(*lead, -1)
        if need_xl:
            grad_xl = (dt @ A).reshape(*lead, -1)  # [M, K]
        if need_W:
            grad_W = g.T @ x2  # [N, K]
        if need_bias and has_bias:
            grad_bias = g.sum(0).to(ctx.bias_dtype)  # [N]
        return grad_x, grad_W, grad_bias, grad_A, grad_B, None, grad_xl


def lora_linear(
    x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, s: float, x_lora: Tensor | None = None
) -> Tensor:
    """LoRA linear layer forward with the hand-written backward above.

    x [..., K], W [N, K], bias [N] or None, A [r, K], B [N, r]. `x_lora` (same shape as x) is the input of
    the low-rank path when it differs from x, e.g. after LoRA dropout; by default it is x itself.
    Returns y [..., N] in x.dtype; the gradients of A and B come back in their own dtypes.
    """
    if x_lora is not None:
        assert x_lora.shape == x.shape, "x_lora must have the shape of x"
    return LoRALinearFunction.apply(x, W, bias, A, B, float(s), x_lora)
