"""Launchers and autograd Functions of the fused mean and regression losses.

Bytes moved per element, fp32, reduction "mean" or "sum", input requiring grad, target not
(forward + backward; N elements; x input, y target, g gradient):

| op | stock eager torch | torch.compile | fusedopt |
|---|---|---|---|
| mean | 4 fwd + 4 bwd (backward materializes ``grad / N``) = 8 | 4 + 4 = 8 | 4 fwd + 0 bwd = 4 (backward returns ``grad / N`` expanded, no memory) |
| mse, l1, smooth_l1, huber | ~24 fwd (``x - y``, the loss tensor, the reduction) + 12 bwd = 36 | 8 fwd + 12 bwd (reads x, y again, writes g) = 20 | 12 fwd (reads x, y, writes g) + 0 bwd when grad_output is 1 (else 8: g scaled in place) = 12 |

A weight adds 4 B read per pass that reads it. With reduction "none" nothing is stored
ahead: forward reads x, y and writes the loss (12 B), backward reads x, y and grad_output and
writes g (16 B), as torch.compile does.
"""

from __future__ import annotations

import torch

from fusedopt._multi_tensor import compute_dtype, float64_vector
from fusedopt.kernels import losses as kernels

_TL = {torch.float32: "float32", torch.float64: "float64"}


def _config(k: int) -> tuple[int, int]:
    """Block size and warps, by a size rule."""
    return (4096, 8) if k >= 1 << 20 else (1024, 4)


def _tl_compute(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def reduce_rows(
    x: torch.Tensor,
    y: torch.Tensor | None,
    w: torch.Tensor | None,
    loss: int,
    param: float,
    scale: float,
    out_dtype: torch.dtype,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per row of contiguous ``x`` [M, K]: ``scale * sum(loss)`` as [M] in ``out_dtype``; when
    ``grad`` is given, also ``grad = scale * dloss/dx`` in the same pass."""
    m, k = x.shape
    block, warps = _config(k)
    p = -(-k // block)
    ct = compute_dtype(x.dtype if x.dtype == torch.float64 else out_dtype)
    partial = torch.empty((m, p), dtype=ct, device=x.device)
    out = torch.empty(m, dtype=out_dtype, device=x.device)
    scalars = float64_vector([param, scale], x.device)
    if p and m:
        kernels.pointwise_loss_kernel[(p, m)](
            x,
            x if y is None else y,
            x if w is None else w,
            x,
            partial,
            x if grad is None else grad,
            scalars,
            k,
            p,
            LOSS=loss,
            COMPUTE=_tl_compute(ct),
            BLOCK=block,
            HAS_WEIGHT=w is not None,
            REDUCE=True,
            WRITE_GRAD=grad is not None,
            num_warps=warps,
        )
    if m:
        kernels.sum_rows_kernel[(m,)](partial, out, scalars, p, COMPUTE=_tl_compute(ct), BLOCK=1024)
    return out


def elementwise(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, loss: int, param: float
) -> torch.Tensor:
    """The unreduced loss of contiguous tensors, in x's dtype."""
    n = x.numel()
    out = torch.empty_like(x)
    block, warps = _config(n)
    if n:
        kernels.pointwise_loss_kernel[(-(-n // block), 1)](
            x,
            y,
            x if w is None else w,
            out,
            out,
            out,
            float64_vector([param, 1.0], x.device),
            n,
            1,
            LOSS=loss,
            COMPUTE=_tl_compute(x.dtype),
            BLOCK=block,
            HAS_WEIGHT=w is not None,
            REDUCE=False,
            WRITE_GRAD=False,
            num_warps=warps,
        )
    return out


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
    """Multiply the gradient stored by forward by ``grad_output``, in place and without a host
    sync: the kernel reads ``grad_output`` on the device and does nothing when the factor still
    to apply (``grad_output / applied``) is 1. ``applied`` (1 after forward) then records
    ``grad_output``, so a second backward (``retain_graph=True``) rescales correctly."""
    n = grad.numel()
    block, warps = _config(n)
    if n:
        kernels.scale_grad_kernel[(-(-n // block),)](
            grad, grad_output, applied, n, COMPUTE=_tl_compute(applied.dtype), BLOCK=block, num_warps=warps
        )
    applied.copy_(grad_output.reshape(1))
    return grad


class MeanFunction(torch.autograd.Function):
    """``mean`` of contiguous ``x`` [M, K] over K in one deterministic pass; backward returns
    ``grad_output / K`` expanded to the input's shape (no memory written)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: torch.Size, out_dtype: torch.dtype) -> torch.Tensor:
        k = x.shape[1]
        ctx.in_shape, ctx.dtype = x.shape, x.dtype
        out = reduce_rows(x, None, None, kernels.MEAN, 0.0, 1.0 / k if k else float("nan"), out_dtype, None)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        m, k = ctx.in_shape
        g = (grad_output.reshape(m, 1).to(ctx.dtype) / k).expand(m, k)
        return g, None, None


class PointwiseLossFunction(torch.autograd.Function):
    """MSE / L1 / SmoothL1 / Huber of same-shape contiguous ``input`` and ``target`` (and
    optional ``weight``, not requiring grad). For "mean"/"sum" the forward writes the gradient
    w.r.t. ``input`` while it reduces (only if ``want_grad``); backward scales it in place."""

    @staticmethod
    def forward(ctx, input, target, weight, loss: int, param: float, reduction: str, want_grad: bool):
        ctx.loss, ctx.param, ctx.reduction = loss, param, reduction
        if reduction == "none":
            ctx.save_for_backward(input, target, weight)
            return elementwise(input, target, weight, loss, param)
        n = input.numel()
        scale = (1.0 / n if n else float("nan")) if reduction == "mean" else 1.0
        grad = torch.empty_like(input) if want_grad else None
        out = reduce_rows(
            input.reshape(1, -1), target.reshape(1, -1), weight, loss, param, scale, input.dtype, grad
        )
        if grad is not None:
            ctx.grad = grad
            ctx.applied = torch.ones(1, dtype=compute_dtype(input.dtype), device=input.device)
        return out.reshape(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.reduction == "none":
            x, y, w = ctx.saved_tensors
            grad = torch.empty_like(x)
            n = x.numel()
            block, warps = _config(n)
            if n:
                kernels.pointwise_loss_backward_kernel[(-(-n // block),)](
                    x,
                    y,
                    x if w is None else w,
                    grad_output.contiguous(),
                    grad,
                    float64_vector([ctx.param, 1.0], x.device),
                    n,
                    LOSS=ctx.loss,
                    COMPUTE=_tl_compute(x.dtype),
                    BLOCK=block,
                    HAS_WEIGHT=w is not None,
                    num_warps=warps,
                )
        else:
            grad = scale_saved_grad(ctx.grad, grad_output, ctx.applied)
        grad_target = -grad if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_target, None, None, None, None, None
