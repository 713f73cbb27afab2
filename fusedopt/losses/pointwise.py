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

Every launch is a 1-D grid of at most :data:`MAX_PROGRAMS` programs (:func:`grid`), each looping
over its work items: CUDA's limits (2^31 - 1 programs on axis 0, 65,535 on axes 1 and 2) hold
for any input size.

Under autocast (any device whose autocast is on) the four losses run in fp32, as torch's autocast
runs them: fp16/bf16 operands of one dtype are read as they are (the math is fp32 anyway), the
loss comes out fp32 and the gradient in the operands' dtype; other mixes are cast to fp32 first.

``create_graph=True`` (a backward that autograd records: double backward, Hessian-vector
products, MAML) takes a differentiable torch composition of the same loss
(:func:`differentiable_grads`), so second derivatives are torch's; the fused path is the
backward of every other call.

Under ``torch.compile`` the launchers run as custom ops (``fusedopt::mean``,
``fusedopt::pointwise_loss``, ``fusedopt::pointwise_loss_reduced``,
``fusedopt::pointwise_loss_backward``; see :func:`compilable`), and the backward of a reduced
loss writes ``g * grad_output`` as a new tensor (8 B per element instead of 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, float64_vector, tail_block
from fusedopt.kernels import losses as kernels
from fusedopt.losses import _common
from fusedopt.losses._common import compilable, differentiable_grads, scaled_copy


def _config(k: int) -> tuple[int, int, int]:
    """Block size, warps and the sub-block of a masked last block (``tail_block``), by a size
    rule (a short row gets a short block)."""
    block, warps = (4096, 8) if k >= 1 << 20 else (max(16, min(1024, triton.next_power_of_2(max(k, 1)))), 4)
    return block, warps, tail_block(block, warps)


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
    block, warps, tail = _config(k)
    p = -(-k // block)
    ct = compute_dtype(x.dtype if x.dtype == torch.float64 else out_dtype)
    partial = torch.empty((m, p), dtype=ct, device=x.device)
    out = torch.empty(m, dtype=out_dtype, device=x.device)
    scalars = float64_vector([param, scale], x.device)
    if p and m:
        kernels.pointwise_loss_kernel[_common.grid(p * m)](
            x,
            x if y is None else y,
            x if w is None else w,
            x,
            partial,
            x if grad is None else grad,
            scalars,
            k,
            p,
            p * m,
            LOSS=loss,
            COMPUTE=TL_DTYPE[ct],
            BLOCK=block,
            TAIL_BLOCK=tail,
            HAS_WEIGHT=w is not None,
            REDUCE=True,
            WRITE_GRAD=grad is not None,
            ONE_ROW=m == 1,
            num_warps=warps,
        )
    if m:
        kernels.sum_rows_kernel[_common.grid(m)](
            partial, out, scalars, m, p, COMPUTE=TL_DTYPE[ct], BLOCK=1024
        )
    return out


def _like_x(x: torch.Tensor, *args) -> torch.Tensor:
    """Fake of the ops whose output is a tensor like ``x``."""
    return torch.empty_like(x)


def _elementwise_fake(x, y, w, loss, param, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


@compilable("mean", lambda x, out_dtype: x.new_empty(x.shape[0], dtype=out_dtype))
def mean_rows(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The mean of each row of contiguous ``x`` [M, K], as [M] in ``out_dtype``."""
    k = x.shape[1]
    return reduce_rows(x, None, None, kernels.MEAN, 0.0, 1.0 / k if k else float("nan"), out_dtype, None)


@compilable("pointwise_loss", _elementwise_fake)
def elementwise(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, loss: int, param: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """The unreduced loss of contiguous tensors, in ``out_dtype``."""
    n = x.numel()
    out = torch.empty_like(x, dtype=out_dtype)
    block, warps, tail = _config(n)
    if n:
        blocks = -(-n // block)
        kernels.pointwise_loss_kernel[_common.grid(blocks)](
            x,
            y,
            x if w is None else w,
            out,
            out,
            out,
            float64_vector([param, 1.0], x.device),
            n,
            blocks,
            blocks,
            LOSS=loss,
            COMPUTE=TL_DTYPE[compute_dtype(x.dtype)],
            BLOCK=block,
            TAIL_BLOCK=tail,
            HAS_WEIGHT=w is not None,
            REDUCE=False,
            WRITE_GRAD=False,
            ONE_ROW=True,
            num_warps=warps,
        )
    return out


def _reduction_scale(
    x: torch.Tensor, w: torch.Tensor | None, reduction: str, mean_by_weight: bool
) -> float | torch.Tensor:
    """The factor of the summed loss: 1 for "sum", 1/N for "mean", 1/sum(w) (a float64 [1]
    device tensor) for "mean" when ``mean_by_weight``."""
    if reduction == "sum":
        return 1.0
    if mean_by_weight:
        return 1.0 / reduce_rows(w.reshape(1, -1), None, None, kernels.MEAN, 0.0, 1.0, torch.float64, None)
    n = x.numel()
    return 1.0 / n if n else float("nan")


def _reduced_fake(x, y, w, loss, param, reduction, mean_by_weight, want_grad, out_dtype):
    return x.new_empty((), dtype=out_dtype), torch.empty_like(x) if want_grad else x.new_empty(0)


@compilable("pointwise_loss_reduced", _reduced_fake)
def reduced_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    loss: int,
    param: float,
    reduction: str,
    mean_by_weight: bool,
    want_grad: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "mean" or "sum" loss of contiguous tensors (0-d, ``out_dtype``) and, if ``want_grad``,
    its gradient w.r.t. ``x`` (x's dtype) written in the same pass (else an empty tensor)."""
    grad = torch.empty_like(x) if want_grad else x.new_empty(0)
    scale = _reduction_scale(x, w, reduction, mean_by_weight)
    out = reduce_rows(
        x.reshape(1, -1), y.reshape(1, -1), w, loss, param, scale, out_dtype, grad if want_grad else None
    )
    return out.reshape(()), grad


@compilable(
    "pointwise_loss_backward",
    _like_x,
    schema="(Tensor x, Tensor y, Tensor? w, Tensor grad_output, int loss, float param) -> Tensor",
)
def pointwise_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    grad_output: torch.Tensor,
    loss: int,
    param: float,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``scale * dloss/dx * w * grad_output`` from the inputs (grad_output elementwise or 1-element)."""
    n = x.numel()
    grad = torch.empty_like(x)
    block, warps, tail = _config(n)
    go = grad_output.contiguous()
    if n:
        kernels.pointwise_loss_backward_kernel[_common.grid(-(-n // block))](
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
            TAIL_BLOCK=tail,
            HAS_WEIGHT=w is not None,
            num_warps=warps,
        )
    return grad


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply the gradient stored by forward by ``grad_output``, in place and without a host
    sync: the kernel reads ``grad_output`` on the device and every program returns at once
    when it is 1."""
    n = grad.numel()
    block, warps, tail = _config(n)
    if n:
        kernels.scale_grad_kernel[_common.grid(-(-n // block))](
            grad,
            grad_output,
            n,
            COMPUTE=TL_DTYPE[compute_dtype(grad.dtype)],
            BLOCK=block,
            TAIL_BLOCK=tail,
            num_warps=warps,
        )
    return grad


def torch_loss(x, y, w, loss: int, param: float, reduction: str) -> torch.Tensor:
    """The pointwise loss in plain torch, from the operands upcast to the kernels' arithmetic
    dtype (fp32, fp64 for fp64): the composition :func:`differentiable_grads` differentiates."""
    math = compute_dtype(x.dtype)
    x, y = x.to(math), y.to(math)
    weight = {} if w is None else {"weight": w.to(math)}
    if loss == int(kernels.MSE):
        return F.mse_loss(x, y, reduction=reduction, **weight)
    if loss == int(kernels.L1):
        return F.l1_loss(x, y, reduction=reduction, **weight)
    if loss == int(kernels.SMOOTH_L1):
        return F.smooth_l1_loss(x, y, reduction=reduction, beta=param)
    return F.huber_loss(x, y, reduction=reduction, delta=param, **weight)


class MeanFunction(torch.autograd.Function):
    """``mean`` of contiguous ``x`` [M, K] over K in one deterministic pass; backward returns
    ``grad_output / K`` expanded to the input's shape (no memory written), divided in the
    output's dtype and then cast to the input's, as torch's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: torch.Size, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.in_shape, ctx.dtype = x.shape, x.dtype
        return mean_rows(x, out_dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        m, k = ctx.in_shape
        g = (grad_output.reshape(m, 1) / k).to(ctx.dtype).expand(m, k)
        return g, None, None


class PointwiseLossFunction(torch.autograd.Function):
    """MSE / L1 / SmoothL1 / Huber of same-shape contiguous ``input`` and ``target`` (and an
    optional ``weight`` that does not require grad), the loss in ``out_dtype`` (fp32 under
    autocast for fp16/bf16 operands; their gradient keeps their dtype).

    For "mean"/"sum", forward writes the gradient w.r.t. ``input`` while it reduces (only if
    ``want_grad``), and the first backward scales that buffer in place (no work when
    grad_output is 1). A later backward of the same graph (``retain_graph=True``) recomputes
    the gradient from the saved inputs, as torch's own backward does every time. The mean
    divides by N, or by ``sum(weight)`` when ``mean_by_weight`` (torch's weighted MSE / L1).

    While torch.compile traces, the kernels run as ``torch.ops.fusedopt`` ops and the backward
    of "mean"/"sum" returns ``stored gradient * grad_output`` as a new tensor, every time.

    A backward that autograd records (``create_graph=True``) differentiates :func:`torch_loss`
    instead (:func:`differentiable_grads`): torch's second derivatives.
    """

    @staticmethod
    def forward(
        ctx, input, target, weight, loss: int, param: float, reduction: str, want_grad: bool, mean_by_weight,
        out_dtype: torch.dtype,
    ):  # fmt: skip
        ctx.loss, ctx.param, ctx.reduction, ctx.mean_by_weight = loss, param, reduction, mean_by_weight
        ctx.save_for_backward(input, target, weight)
        if reduction == "none":
            return elementwise(input, target, weight, loss, param, out_dtype)
        out, grad = reduced_loss(
            input, target, weight, loss, param, reduction, mean_by_weight, want_grad, out_dtype
        )
        ctx.grad = grad if want_grad else None
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, y, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            grads = differentiable_grads(
                lambda x, y: torch_loss(x, y, w, ctx.loss, ctx.param, ctx.reduction),
                (x, y),
                tuple(ctx.needs_input_grad[:2]),
                grad_output,
            )
            return *grads, None, None, None, None, None, None, None
        if ctx.reduction == "none":
            grad = pointwise_grad(x, y, w, grad_output, ctx.loss, ctx.param)
        elif ctx.grad is not None and torch.compiler.is_compiling():
            grad = scaled_copy(ctx.grad, grad_output)
        elif ctx.grad is not None:
            grad, ctx.grad = scale_saved_grad(ctx.grad, grad_output), None
        else:
            scale = _reduction_scale(x, w, ctx.reduction, ctx.mean_by_weight)
            grad = pointwise_grad(x, y, w, grad_output, ctx.loss, ctx.param, scale)
        grad_target = -grad if ctx.needs_input_grad[1] else None
        return (
            (grad if ctx.needs_input_grad[0] else None),
            grad_target,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
