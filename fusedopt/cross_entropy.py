"""Fused cross-entropy: ``torch.nn.functional.cross_entropy`` whose forward also writes the
gradient of the logits, so the backward moves no bytes when ``grad_output`` is 1.

Layers: ``fusedopt.kernels.cross_entropy`` (``@triton.jit``) → launchers here (checks,
allocation, grid) → :class:`CrossEntropyFunction` → :func:`cross_entropy`.

Under ``torch.compile`` the launchers run as the custom ops ``fusedopt::cross_entropy``
(forward) and ``fusedopt::cross_entropy_backward`` (``none``), which dynamo records instead of
breaking the graph; eager calls the launchers directly (no dispatcher). The compiled backward of
``mean``/``sum`` is ``stored gradient * grad_output`` as a new tensor (8 B per element, where
eager moves none for a ``grad_output`` of 1).

A forward is three launches, no host sync and no float atomics:

1. ``cross_entropy_targets_kernel`` (one program): Σ weight[target] over the rows not ignored
   (the ``mean`` divisor, torch's definition), Σ weight, and a flag that every target is in
   ``[0, C)`` or ``ignore_index``; the flag feeds ``torch._assert_async`` (a device-side
   assert on CUDA, as torch's own CUDA kernels; a ``RuntimeError`` at once on CPU).
2. ``cross_entropy_kernel`` (a tile of rows per program: one row of up to 4096-column blocks
   for vocabularies, many rows when C is small): online softmax over column blocks (pass 1),
   the row's loss and, when the input needs a gradient, the gradient of the reduced loss (pass
   2), already divided by the divisor of step 1, which it reads from device memory.
3. ``cross_entropy_sum_kernel`` (one program, fixed order, deterministic): the row losses
   summed, divided for ``mean``, written in the input's dtype (not for ``reduction="none"``).

Backward (``mean``/``sum``): one launch that loads ``grad_output`` and returns at once when it
is 1; otherwise it scales the stored gradient in place. ``reduction="none"`` recomputes
instead: the forward reads the logits once and keeps each row's log-sum-exp, the backward
reads the logits again and writes the gradient times each row's ``grad_output`` (12 B per
element in all, against 20 B for storing the gradient in the forward and scaling its rows).

Bytes moved per logit element, fp32, ``reduction="mean"``, input requires grad (the per-row
and scalar traffic is negligible for any useful ``C``):

=====================  ==============================================  ===================  =====
path                   forward                                         backward             total
=====================  ==============================================  ===================  =====
eager torch            log_softmax reads z (4), writes log p (4);      nll backward writes  24
                       nll reads N values                              a zero (N, C) grad
                                                                       (4); log_softmax
                                                                       backward reads it
                                                                       and log p (8), writes
                                                                       dz (4)
torch.compile          one reduction kernel reads z (4, 8 if the max   reads z (4), writes  12-16
(inductor)             and the sum are two loops), keeps max/lse       dz (4)
                       per row
fusedopt               reads z twice (8; the second read often hits    0 when grad_output   12
                       L2), writes dz (4)                              is 1 (else reads and
                                                                       writes dz: 8)
fusedopt, ``none``     reads z (4), keeps lse per row                  reads z (4), writes  12
                                                                       dz (4)
=====================  ==============================================  ===================  =====

Eager numbers are floors: for wide rows (C > 1024) torch's CUDA softmax kernels read their
input two or three times, and label smoothing adds a weighted sum over log p in both
directions (8+ B more). Memory held from forward to backward: eager keeps log p (N×C),
fusedopt (``mean``/``sum``) keeps the gradient (N×C, input dtype) instead of the logits;
torch.compile and fusedopt's ``none`` keep the logits.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
from torch.autograd.function import once_differentiable
from torch.nn import _reduction

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, launch_config, runs_triton
from fusedopt.kernels import cross_entropy as kernels
from fusedopt.losses import compilable, scaled_copy

# Row kernel size rule (both halved for fp64): columns per block (rows wider than this loop
# over blocks) and elements per tile (rows narrower than that share a program).
MAX_BLOCK = 4096
MAX_TILE = 4096
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # torch's Reduction enum


def _guard(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _small_block(n: int) -> int:
    """Block of the one-program reductions over rows or classes."""
    return min(4096, max(16, triton.next_power_of_2(n)))


def _row_tile(num_rows: int, num_classes: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Rows per program, columns per block and warps of the row kernel, by a size rule (no
    autotuning): blocks of up to MAX_BLOCK columns, tiles of up to MAX_TILE elements (half of
    each for fp64)."""
    half = 2 if dtype == torch.float64 else 1
    block = min(triton.next_power_of_2(num_classes), MAX_BLOCK // half)
    rows = max(1, min(MAX_TILE // half // block, triton.next_power_of_2(num_rows)))
    return rows, block, min(8, max(1, rows * block // 256))


def _check(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
) -> tuple[int, int, int]:
    """Validate as torch does; return ``(N, S, C)``: batch, spatial size (product of d1, ...,
    1 without spatial dims) and classes."""
    if input.dim() == 0:
        raise RuntimeError("fusedopt.cross_entropy: input must have at least 1 dimension (classes), got 0-d")
    if target.is_floating_point() and target.shape == input.shape:
        raise NotImplementedError(
            "fusedopt.cross_entropy does not support class-probability targets (a floating-point target "
            "of the input's shape); use torch.nn.functional.cross_entropy for them"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_scalar_name(target.dtype)}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"
            )
        n, spatial, num_classes = 1, 1, input.shape[0]
    else:
        n, num_classes = input.shape[0], input.shape[1]
        if target.dim() == 0 or target.shape[0] != n:
            got = target.shape[0] if target.dim() else 0
            raise ValueError(f"Expected input batch_size ({n}) to match target batch_size ({got}).")
        expected = (n, *input.shape[2:])
        if tuple(target.shape) != expected:
            if input.dim() == 2:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
            raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
        spatial = math.prod(input.shape[2:])
    if num_classes == 0:
        raise RuntimeError("fusedopt.cross_entropy: input has no classes (its class dimension is 0)")
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {num_classes} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype:
            raise RuntimeError(
                f"expected scalar type {_scalar_name(input.dtype)} but found {_scalar_name(weight.dtype)}"
            )
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but {name} is on {t.device} and input "
                f"on {input.device}"
            )
    return n, spatial, num_classes


_SCALAR_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool",
}  # fmt: skip


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype, as its error messages print it."""
    return _SCALAR_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _rows_view(t: torch.Tensor, n: int, spatial: int, num_classes: int) -> torch.Tensor | None:
    """``t`` (the input's shape) as an (N, S, C) view with classes last, or None if no view exists."""
    if t.dim() == 1:
        return t.view(1, 1, num_classes)
    if t.dim() == 2:
        return t.unsqueeze(1)
    try:
        return t.movedim(1, -1).view(n, spatial, num_classes)
    except RuntimeError:
        return None


def _rows(input: torch.Tensor, n: int, spatial: int, num_classes: int) -> torch.Tensor:
    """The logits as (N, S, C). A view for 1-D, 2-D (any strides) and dense spatial inputs; a
    copy only when the spatial dims of a strided input cannot be merged (rare)."""
    view = _rows_view(input, n, spatial, num_classes)
    return view if view is not None else input.movedim(1, -1).reshape(n, spatial, num_classes)


def _empty_grad(input: torch.Tensor, n: int, spatial: int, num_classes: int):
    """An uninitialized gradient of the input's shape (its layout when dense) and its (N, S, C) view."""
    grad = torch.empty_like(input)
    rows = _rows_view(grad, n, spatial, num_classes)
    if rows is None:
        rows = torch.empty((n, spatial, num_classes), dtype=input.dtype, device=input.device)
        grad = rows.view(n, *input.shape[2:], num_classes).movedim(-1, 1)
    return grad, rows


class _Forward(NamedTuple):
    loss: torch.Tensor
    grad: torch.Tensor | None  # d(loss)/d(input) for grad_output 1 (mean/sum, when asked)
    rows: torch.Tensor  # logits as (N, S, C)
    target: torch.Tensor  # (R,)
    stats: torch.Tensor  # compute dtype [3]: Σ weight[target] over kept rows, Σ weight, 1 / the first
    lse: torch.Tensor | None  # compute dtype [R] (none, when a gradient is asked)


def _launch_rows(
    rows: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    *,
    lse: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    grad_rows: torch.Tensor | None = None,
    grad_output: torch.Tensor | None = None,
    save_lse: bool = False,
    divide_by_total: bool = False,
) -> None:
    """One ``cross_entropy_kernel`` launch over every row: pass 1 if ``loss`` is given (else the
    log-sum-exp is read from ``lse``), pass 2 if ``grad_rows`` is given."""
    n, spatial, num_classes = rows.shape
    num_rows = n * spatial
    if num_rows == 0:
        return
    tile_rows, block, num_warps = _row_tile(num_rows, num_classes, rows.dtype)
    unused = stats  # any tensor: pointers of switched-off operands are never dereferenced
    g = grad_rows if grad_rows is not None else unused
    x_strides = list(rows.stride())
    g_strides = list(grad_rows.stride()) if grad_rows is not None else [0, 0, 0]
    if spatial == 1:  # no spatial dims: stride 0 lets the compiler see aligned rows
        x_strides[1] = g_strides[1] = 0
    kernels.cross_entropy_kernel[(triton.cdiv(num_rows, tile_rows),)](
        rows,
        target,
        weight if weight is not None else unused,
        stats,
        lse if lse is not None else unused,
        loss if loss is not None else unused,
        g,
        grad_output if grad_output is not None else unused,
        num_rows,
        spatial,
        num_classes,
        *x_strides,
        *g_strides,
        target.stride(0),
        grad_output.stride(0) if grad_output is not None else 0,
        ignore_index,
        label_smoothing,
        DTYPE=TL_DTYPE[rows.dtype],
        COMPUTE=TL_DTYPE[compute_dtype(rows.dtype)],
        LOSS_DTYPE=TL_DTYPE[loss.dtype if loss is not None else stats.dtype],
        ROWS=tile_rows,
        BLOCK=block,
        HAS_WEIGHT=weight is not None,
        SMOOTHING=label_smoothing > 0.0,
        LOSS=loss is not None,
        SAVE_LSE=save_lse,
        GRAD=grad_rows is not None,
        DIVIDE_BY_TOTAL=divide_by_total,
        ROW_GRAD_OUTPUT=grad_output is not None,
        num_warps=num_warps,
    )


def _forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
    out_dtype: torch.dtype,
) -> _Forward:
    """Loss (as torch returns it) and, if ``need_grad``, what the backward needs. Arguments
    as :func:`_cross_entropy` leaves them (reduction a name, smoothing >= 0)."""
    n, spatial, num_classes = _check(input, target, weight, label_smoothing)
    device, compute = input.device, compute_dtype(input.dtype)
    rows = _rows(input, n, spatial, num_classes)
    flat_target = target.reshape(-1)
    num_rows = n * spatial
    stats = torch.empty(3, dtype=compute, device=device)
    ok = torch.empty((), dtype=torch.int32, device=device)
    with _guard(device):
        kernels.cross_entropy_targets_kernel[(1,)](
            flat_target,
            weight if weight is not None else stats,
            stats,
            ok,
            num_rows,
            num_classes,
            flat_target.stride(0) if num_rows else 1,
            ignore_index,
            COMPUTE=TL_DTYPE[compute],
            HAS_WEIGHT=weight is not None,
            BLOCK=_small_block(max(num_rows, num_classes if weight is not None else 0)),
            num_warps=4,
        )
        torch._assert_async(
            ok,
            f"fusedopt.cross_entropy: target out of range: every target must be in [0, C) = "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})",
        )
        grad = grad_rows = lse = None
        if need_grad and reduction != "none":
            grad, grad_rows = _empty_grad(input, n, spatial, num_classes)
        if need_grad and reduction == "none":
            lse = torch.empty(num_rows, dtype=compute, device=device)
        row_loss = torch.empty(num_rows, dtype=out_dtype if reduction == "none" else compute, device=device)
        _launch_rows(
            rows,
            flat_target,
            weight,
            stats,
            ignore_index,
            label_smoothing,
            lse=lse,
            loss=row_loss,
            grad_rows=grad_rows,
            save_lse=lse is not None,
            divide_by_total=reduction == "mean",
        )
        if reduction == "none":  # the target's shape; () for 1-D input, as torch
            loss = row_loss.view(target.shape if input.dim() > 1 else ())
        else:
            loss = torch.empty((), dtype=out_dtype, device=device)
            kernels.cross_entropy_sum_kernel[(1,)](
                row_loss,
                stats,
                loss,
                num_rows,
                DTYPE=TL_DTYPE[out_dtype],
                COMPUTE=TL_DTYPE[compute],
                MEAN=reduction == "mean",
                BLOCK=_small_block(num_rows),
                num_warps=4,
            )
    return _Forward(loss, grad, rows, flat_target, stats, lse)


def _forward_fake(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype):
    n, spatial, num_classes = _check(input, target, weight, label_smoothing)
    compute, none = compute_dtype(input.dtype), reduction == "none"
    loss = input.new_empty(target.shape if none and input.dim() > 1 else (), dtype=out_dtype)
    grad = _empty_grad(input, n, spatial, num_classes)[0] if need_grad and not none else input.new_empty(0)
    lse = input.new_empty(n * spatial if need_grad and none else 0, dtype=compute)
    return loss, grad, input.new_empty(3, dtype=compute), lse


@torch.library.custom_op("fusedopt::cross_entropy", mutates_args=())
def _forward_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward` as the op torch.compile records: ``(loss, grad, stats, lse)``, empty
    tensors for a gradient or log-sum-exp not computed (an op returns no None)."""
    out = _forward(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype)
    grad = out.grad if out.grad is not None else input.new_empty(0)
    return out.loss, grad, out.stats, out.lse if out.lse is not None else out.stats.new_empty(0)


_forward_op.register_fake(_forward_fake)


def _forward_traced(
    input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype
) -> _Forward:
    """:func:`_forward` while torch.compile traces: the kernels run in the op
    ``fusedopt::cross_entropy``; the views of the inputs (an op's outputs cannot alias its
    inputs) are taken outside it."""
    n, spatial, num_classes = _check(input, target, weight, label_smoothing)  # torch's errors, here
    loss, grad, stats, lse = _forward_op(
        input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype
    )
    return _Forward(loss, grad, _rows(input, n, spatial, num_classes), target.reshape(-1), stats, lse)


def _scale_grad(
    grad: torch.Tensor, grad_output: torch.Tensor, applied: torch.Tensor, first: bool
) -> torch.Tensor:
    """``grad * grad_output / applied``: in place the first time (``applied`` then receives
    ``grad_output``), into a new tensor afterwards, so a gradient already handed out never
    changes. ``grad`` is dense (its memory is exactly its elements)."""
    out = grad if first else torch.empty_like(grad)
    numel = grad.numel()
    if numel == 0:
        return out
    block, num_warps = launch_config(numel)
    with _guard(grad.device):
        kernels.cross_entropy_scale_kernel[(triton.cdiv(numel, block),)](
            grad,
            out,
            grad_output,
            applied,
            numel,
            DTYPE=TL_DTYPE[grad.dtype],
            COMPUTE=TL_DTYPE[applied.dtype],
            FIRST=first,
            BLOCK=block,
            num_warps=num_warps,
        )
    return out


@compilable("cross_entropy_backward", lambda input, rows, *args: _empty_grad(input, *rows.shape)[0])
def _backward_none(
    input: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """The gradient of ``reduction="none"``, recomputed from the logits ``rows`` (N, S, C) and
    each row's log-sum-exp, times each row's ``grad_output``; the input's shape."""
    n, spatial, num_classes = rows.shape
    grad, grad_rows = _empty_grad(input, n, spatial, num_classes)
    with _guard(input.device):
        _launch_rows(
            rows,
            target,
            weight,
            stats,
            ignore_index,
            label_smoothing,
            lse=lse,
            grad_rows=grad_rows,
            grad_output=grad_output.reshape(-1),
        )
    return grad


class _CrossEntropy(torch.autograd.Function):
    """Forward and backward of :class:`CrossEntropyFunction`, with the arguments as
    :func:`_cross_entropy` leaves them and ``out_dtype`` last. While torch.compile traces, the
    kernels run as ``torch.ops.fusedopt`` ops and the backward of ``mean``/``sum`` returns
    ``stored * grad_output`` as a new tensor, every time (a compiled backward cannot keep the
    first-backward state)."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, out_dtype):
        forward = _forward_traced if torch.compiler.is_compiling() else _forward
        out = forward(input, target, weight, ignore_index, reduction, label_smoothing, True, out_dtype)
        ctx.reduction = reduction
        if reduction == "none":
            ctx.save_for_backward(input, out.rows, out.target, weight, out.stats, out.lse)
            ctx.ignore_index = ignore_index
            ctx.label_smoothing = label_smoothing
        else:
            ctx.grad = out.grad
            ctx.applied = torch.empty((), dtype=out.stats.dtype, device=input.device)
            ctx.first = True
        return out.loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            grad = _backward_none(*ctx.saved_tensors, grad_output, ctx.ignore_index, ctx.label_smoothing)
        elif torch.compiler.is_compiling():
            grad = scaled_copy(ctx.grad, grad_output)
        else:
            grad = _scale_grad(ctx.grad, grad_output, ctx.applied, ctx.first)
            ctx.first = False
        return grad, None, None, None, None, None, None


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing) -> torch.Tensor:
    """torch's handling of the arguments, then the autograd Function when autograd records
    (grad mode on and ``input.requires_grad``), else the forward alone (no gradient buffer).

    A function rather than an override of ``apply``: dynamo calls an autograd Function's own
    ``apply`` and never an override."""
    reduction = REDUCTIONS[_reduction.get_enum(reduction)]  # torch's check and message
    ignore_index = int(ignore_index)
    # as torch: smoothing only when > 0 (negative or NaN is none); > 1 raises in _check
    label_smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise RuntimeError(
            "fusedopt.cross_entropy is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )
    # Under autocast torch computes cross-entropy in fp32 and returns an fp32 loss; the math
    # here is fp32 anyway, so only the loss's dtype changes (the gradient keeps the logits').
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        out_dtype = torch.float32
    args = (input, target, weight, ignore_index, reduction, label_smoothing)
    if torch.is_grad_enabled() and input.requires_grad:
        return _CrossEntropy.apply(*args, out_dtype)
    forward = _forward_traced if torch.compiler.is_compiling() else _forward
    return forward(*args, False, out_dtype).loss


class CrossEntropyFunction(_CrossEntropy):
    """``torch.nn.functional.cross_entropy`` for class-index targets, on Triton kernels.

    ``apply(input, target, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0)`` returns what torch returns (value, dtype, shape): input (C,), (N, C)
    or (N, C, d1, ...) (classes in dim 1, any strides), target (), (N,) or (N, d1, ...) of
    int64 or uint8, weight (C,) or None.

    The gradient is computed by the forward kernel only when autograd records (grad mode on
    and ``input.requires_grad``); :meth:`apply` decides this, because inside ``forward`` grad
    mode is always off. Otherwise no gradient buffer is allocated.

    Backward for ``mean``/``sum``: the stored gradient times ``grad_output``, no host sync; no
    work when ``grad_output`` is 1. A second backward of the same graph (``retain_graph=True``)
    returns a new tensor ``stored * grad_output / applied``, where ``applied`` (a device
    scalar) is the first backward's ``grad_output``: correct unless that was 0 or non-finite
    (then the stored gradient is lost and the result is NaN). ``none`` recomputes from the
    logits and each row's log-sum-exp, any number of times.

    Under ``torch.compile`` call :func:`cross_entropy` (or the ``fusedopt.functional`` and
    ``fusedopt.nn`` faces): dynamo traces an autograd Function's own ``apply``, never this one.
    """

    @classmethod
    def apply(cls, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between logits and class-index targets, as
    ``torch.nn.functional.cross_entropy`` (same value, dtype, shape and errors).

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...); classes in dim 1; fp32, fp64, fp16, bf16.
        target: class indices (), (N,) or (N, d1, ...), int64 or uint8. Class-probability
            targets raise ``NotImplementedError``.
        weight: (C,) class weights, the input's dtype, or None.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: ``"none"`` (loss per target element), ``"mean"`` (divided by the sum of the
            weights of the targets not ignored) or ``"sum"``.
        label_smoothing: ε in ``(1 - ε) onehot + ε / C``; torch applies it only when ε > 0.

    Targets outside ``[0, C)`` that are not ``ignore_index`` raise a ``RuntimeError`` (CPU) or
    trigger a device-side assert (CUDA), without a host sync. Tensors on devices the Triton
    kernels do not run on (CPU without ``TRITON_INTERPRET=1``), and dtypes they do not
    support, go to torch's own implementation.
    """
    if not runs_triton(input.device) or input.dtype not in TL_DTYPE:
        return F.cross_entropy(
            input,
            target,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
