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
import triton
from torch.autograd.function import once_differentiable

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, float64_vector
from fusedopt.kernels import losses as kernels


def _config(k: int) -> tuple[int, int]:
    """Block size and warps, by a size rule (a short row gets a short block)."""
    if k >= 1 << 20:
        return 4096, 8
    return max(16, min(1024, triton.next_power_of_2(max(k, 1)))), 4


def reduce_rows(
    x: torch.Tensor,
    y: torch.Tensor | None,
    w: torch.Tensor | None,
    loss: int,
    param: float,
    scale: float | torch.Tensor,
    out_dtype: torch.dtype,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per row of contiguous ``x`` [M, K]: ``scale * sum(loss)`` as [M] in ``out_dtype``; when
    ``grad`` is given, also ``grad = scale * dloss/dx`` in the same pass. ``scale`` may be a
    1-element device tensor (read on the device)."""
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
            COMPUTE=TL_DTYPE[ct],
            BLOCK=block,
            HAS_WEIGHT=w is not None,
            REDUCE=True,
            WRITE_GRAD=grad is not None,
            num_warps=warps,
        )
    if m:
        kernels.sum_rows_kernel[(m,)](partial, out, scalars, p, COMPUTE=TL_DTYPE[ct], BLOCK=1024)
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
            COMPUTE=TL_DTYPE[compute_dtype(x.dtype)],
            BLOCK=block,
            HAS_WEIGHT=w is not None,
            REDUCE=False,
            WRITE_GRAD=False,
            num_warps=warps,
        )
    return out


def pointwise_grad(x, y, w, grad_output: torch.Tensor, loss: int, param: float, scale) -> torch.Tensor:
    """``scale * dloss/dx * w * grad_output`` from the inputs (grad_output elementwise or 1-element)."""
    n = x.numel()
    grad = torch.empty_like(x)
    block, warps = _config(n)
    go = grad_output.contiguous()
    if n:
        kernels.pointwise_loss_backward_kernel[(-(-n // block),)](
            x,
            y,
            x if w is None else w,
            go,
            grad,
            float64_vector([param, scale], x.device),
            n,
            1 if go.numel() == n else 0,
            LOSS=loss,
            COMPUTE=TL_DTYPE[compute_dtype(x.dtype)],
            BLOCK=block,
            HAS_WEIGHT=w is not None,
            num_warps=warps,
        )
    return grad


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply the gradient stored by forward by ``grad_output``, in place and without a host
    sync: the kernel reads ``grad_output`` on the device and every program returns at once
    when it is 1."""
    n = grad.numel()
    block, warps = _config(n)
    if n:
        kernels.scale_grad_kernel[(-(-n // block),)](
            grad, grad_output, n, COMPUTE=TL_DTYPE[compute_dtype(grad.dtype)], BLOCK=block, num_warps=warps
        )
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
    """MSE / L1 / SmoothL1 / Huber of same-shape contiguous ``input`` and ``target`` (and an
    optional ``weight`` that does not require grad).

    For "mean"/"sum", forward writes the gradient w.r.t. ``input`` while it reduces (only if
    ``want_grad``), and the first backward scales that buffer in place (no work when
    grad_output is 1). A later backward of the same graph (``retain_graph=True``) recomputes
    the gradient from the saved inputs, as torch's own backward does every time. The mean
    divides by N, or by ``sum(weight)`` when ``mean_by_weight`` (torch's weighted MSE / L1).
    """

    @staticmethod
    def forward(
        ctx, input, target, weight, loss: int, param: float, reduction: str, want_grad: bool, mean_by_weight
    ):
        ctx.loss, ctx.param, ctx.reduction = loss, param, reduction
        ctx.save_for_backward(input, target, weight)
        if reduction == "none":
            ctx.scale = 1.0
            return elementwise(input, target, weight, loss, param)
        n = input.numel()
        if reduction == "sum":
            scale = 1.0
        elif mean_by_weight:
            total = reduce_rows(
                weight.reshape(1, -1), None, None, kernels.MEAN, 0.0, 1.0, torch.float64, None
            )
            scale = 1.0 / total
        else:
            scale = 1.0 / n if n else float("nan")
        ctx.scale = scale
        ctx.grad = torch.empty_like(input) if want_grad else None
        return reduce_rows(
            input.reshape(1, -1), target.reshape(1, -1), weight, loss, param, scale, input.dtype, ctx.grad
        ).reshape(())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, y, w = ctx.saved_tensors
        if ctx.reduction != "none" and ctx.grad is not None:
            grad, ctx.grad = scale_saved_grad(ctx.grad, grad_output), None
        else:
            grad = pointwise_grad(x, y, w, grad_output, ctx.loss, ctx.param, ctx.scale)
        grad_target = -grad if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_target, None, None, None, None, None, None
