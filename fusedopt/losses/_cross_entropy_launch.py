"""Launchers of the fused cross-entropy (checks, allocation, grid), the layer under the autograd
Function of ``fusedopt.losses.cross_entropy``: torch's argument checks, the (N, S, C) views of the
logits, the row kernel's size rule, the forward, and the backward of ``mean``/``sum`` (the
stored gradient scaled in place).

A forward is three launches, no host sync and no float atomics:

1. ``cross_entropy_targets_kernel`` (one program): Σ weight[target] over the rows not ignored
   (the ``mean`` divisor, torch's definition), Σ weight, and a flag that every target is in
   ``[0, C)`` or ``ignore_index``; on CUDA the flag feeds ``torch._assert_async`` (a
   device-side assert, as torch's own CUDA kernels: no host sync); on CPU it is read at once
   (no device to wait for) and a target out of range raises torch's ``IndexError``.
2. ``cross_entropy_kernel`` (a tile of rows per program: one row of up to 4096-column blocks
   for vocabularies, many rows when C is small): online softmax over column blocks (pass 1),
   the row's loss and, when the input needs a gradient, the gradient of the reduced loss (pass
   2), already divided by the divisor of step 1, which it reads from device memory.
3. ``cross_entropy_sum_kernel`` (one program, fixed order, deterministic): the row losses
   summed, divided for ``mean``, written in the input's dtype (not for ``reduction="none"``).

Grids: launches 1 and 3 are one program; the row kernel's ``ceil(R / rows per program)``
programs, with ``rows per program * block >= MAX_TILE`` (halved for fp64) whenever there are that
many rows and ``block < 2 C``, number at most ``N S C / 1024 + 1``: under CUDA's 2^31 - 1 for
any tensor below 2^41 elements (:func:`checked_grid` refuses more rather than launching it).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import triton

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, launch_config, tail_block
from fusedopt.kernels import cross_entropy as kernels
from fusedopt.losses._common import checked_grid

# Row kernel size rule (both halved for fp64): columns per block (rows wider than this loop
# over blocks) and elements per tile (rows narrower than that share a program).
MAX_BLOCK = 4096
MAX_TILE = 4096


def _guard(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _small_block(n: int) -> int:
    """Block of the one-program reductions over rows or classes."""
    return min(4096, max(16, triton.next_power_of_2(n)))


def _row_tile(num_rows: int, num_classes: int, dtype: torch.dtype, narrow: int = 1) -> tuple[int, int, int]:
    """Rows per program, columns per block and warps of the row kernel, by a size rule (no
    autotuning): blocks of up to MAX_BLOCK columns, tiles of up to MAX_TILE elements (half of
    each for fp64; both divided by ``narrow`` for a kernel that holds more per element)."""
    half = (2 if dtype == torch.float64 else 1) * narrow
    block = min(triton.next_power_of_2(num_classes), MAX_BLOCK // half)
    rows = max(1, min(MAX_TILE // half // block, triton.next_power_of_2(num_rows)))
    return rows, block, min(8, max(1, rows * block // 256))


def _check(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
    logits_dtype: torch.dtype | None = None,
) -> tuple[int, int, int]:
    """Validate as torch does; return ``(N, S, C)``: batch, spatial size (product of d1, ...,
    1 without spatial dims) and classes. ``logits_dtype`` is the dtype the class weight must
    have: the logits' as cross-entropy sees them (fp32 under autocast; default the input's)."""
    logits_dtype = input.dtype if logits_dtype is None else logits_dtype
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
        if weight.dtype != logits_dtype:
            raise RuntimeError(
                f"expected scalar type {_scalar_name(logits_dtype)} but found {_scalar_name(weight.dtype)}"
            )
    same_device(input, target=target, weight=weight)
    return n, spatial, num_classes


def same_device(input: torch.Tensor, **others: torch.Tensor | None) -> None:
    """torch's error for a tensor argument on another device than ``input``."""
    for name, t in others.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but {name} is on {t.device} and input "
                f"on {input.device}"
            )


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
    col0: int = 0,
    classes: int | None = None,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> None:
    """One ``cross_entropy_kernel`` launch over every row: pass 1 if ``loss`` is given (else the
    log-sum-exp is read from ``lse``), pass 2 if ``grad_rows`` is given. Without ``loss`` the
    rows may be a window of the classes: ``classes`` in all, the rows' first being ``col0``.
    ``softcap`` > 0 caps every logit at it (``c tanh(z / c)``)."""
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
    kernels.cross_entropy_kernel[checked_grid(triton.cdiv(num_rows, tile_rows))](
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
        col0,
        classes if classes is not None else num_classes,
        *x_strides,
        *g_strides,
        target.stride(0),
        grad_output.stride(0) if grad_output is not None else 0,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        DTYPE=TL_DTYPE[rows.dtype],
        COMPUTE=TL_DTYPE[compute_dtype(rows.dtype)],
        LOSS_DTYPE=TL_DTYPE[loss.dtype if loss is not None else stats.dtype],
        ROWS=tile_rows,
        BLOCK=block,
        HAS_WEIGHT=weight is not None,
        SMOOTHING=label_smoothing > 0.0,
        Z_LOSS=z_loss > 0.0,
        SOFTCAP=softcap > 0.0,
        LOSS=loss is not None,
        SAVE_LSE=save_lse,
        GRAD=grad_rows is not None,
        DIVIDE_BY_TOTAL=divide_by_total,
        ROW_GRAD_OUTPUT=grad_output is not None,
        SAME_SPLIT=grad_rows is not None
        and x_strides == g_strides
        and (rows.data_ptr() - grad_rows.data_ptr()) % 16 == 0,
        num_warps=num_warps,
    )


def _targets(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    num_classes: int,
    ignore_index: int,
    compute: torch.dtype,
) -> torch.Tensor:
    """Launch 1 of a forward on the flat targets ``[R]``: the stats ``[3]`` (compute dtype) the
    row kernel reads, and the device-side check that every target is in range or ignored."""
    num_rows = target.numel()
    stats = torch.empty(3, dtype=compute, device=target.device)
    ok = torch.empty((), dtype=torch.int32, device=target.device)
    kernels.cross_entropy_targets_kernel[(1,)](
        target,
        weight if weight is not None else stats,
        stats,
        ok,
        num_rows,
        num_classes,
        target.stride(0) if num_rows else 1,
        ignore_index,
        COMPUTE=TL_DTYPE[compute],
        HAS_WEIGHT=weight is not None,
        BLOCK=_small_block(max(num_rows, num_classes if weight is not None else 0)),
        num_warps=4,
    )
    if target.device.type == "cpu":  # nothing to wait for: torch's error, at once
        if not ok.item():
            flat = target.long()
            bad = flat[(flat != ignore_index) & ((flat < 0) | (flat >= num_classes))]
            raise IndexError(f"Target {int(bad[0])} is out of bounds.")
    else:  # a device-side assert, as torch's CUDA kernels: no host sync
        torch._assert_async(
            ok,
            f"fusedopt.cross_entropy: target out of range: every target must be in [0, C) = "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})",
        )
    return stats


def _total(
    row_loss: torch.Tensor, stats: torch.Tensor, reduction: str, out_dtype: torch.dtype, shape: torch.Size
) -> torch.Tensor:
    """Launch 3 of a forward: the loss as torch returns it from the row losses ``[R]``:
    ``row_loss`` viewed as ``shape`` for ``none``, else their sum (or mean) in ``out_dtype``."""
    if reduction == "none":
        return row_loss.view(shape)
    loss = torch.empty((), dtype=out_dtype, device=row_loss.device)
    kernels.cross_entropy_sum_kernel[(1,)](
        row_loss,
        stats,
        loss,
        row_loss.numel(),
        DTYPE=TL_DTYPE[out_dtype],
        COMPUTE=TL_DTYPE[stats.dtype],
        MEAN=reduction == "mean",
        BLOCK=_small_block(row_loss.numel()),
        num_warps=4,
    )
    return loss


def _forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
    out_dtype: torch.dtype,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> _Forward:
    """Loss (as torch returns it) and, if ``need_grad``, what the backward needs. Arguments
    as ``fusedopt.losses.cross_entropy._cross_entropy`` leaves them (reduction a name, smoothing >= 0)."""
    n, spatial, num_classes = _check(input, target, weight, label_smoothing, out_dtype)
    device, compute = input.device, compute_dtype(input.dtype)
    rows = _rows(input, n, spatial, num_classes)
    flat_target = target.reshape(-1)
    num_rows = n * spatial
    with _guard(device):
        stats = _targets(flat_target, weight, num_classes, ignore_index, compute)
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
            z_loss=z_loss,
            softcap=softcap,
        )
        # the target's shape for none; () for 1-D input, as torch
        loss = _total(row_loss, stats, reduction, out_dtype, target.shape if input.dim() > 1 else ())
    return _Forward(loss, grad, rows, flat_target, stats, lse)


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
        kernels.cross_entropy_scale_kernel[checked_grid(triton.cdiv(numel, block))](
            grad,
            out,
            grad_output,
            applied,
            numel,
            DTYPE=TL_DTYPE[grad.dtype],
            COMPUTE=TL_DTYPE[applied.dtype],
            FIRST=first,
            BLOCK=block,
            TAIL_BLOCK=tail_block(block, num_warps),
            num_warps=num_warps,
        )
    return out
