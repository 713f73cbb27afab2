"""Mean and pointwise regression losses with their gradient in the same pass.

Input viewed as ``[M, K]`` (M = 1 for a full reduction), in ``P`` blocks per row: work item
``i`` is block ``i % P`` of row ``i // P``. Every kernel runs on a 1-D grid of at most
``fusedopt.losses._common.MAX_PROGRAMS`` programs and program ``p`` takes the items ``p, p + grid,
...`` (one each unless the input is huge), so no input size asks CUDA for more programs than it
launches. For each element, with ``d = x - y``:

    MEAN      l = x
    MSE       l = d*d                                     dl/dx = 2 d
    L1        l = |d|                                     dl/dx = sign(d)
    SMOOTH_L1 l = 0.5 d*d / beta if |d| < beta else |d| - 0.5 beta    dl/dx = clamp(d / beta, -1, 1)
    HUBER     l = 0.5 d*d if |d| < delta else delta (|d| - 0.5 delta)  dl/dx = clamp(d, -delta, delta)

times ``w`` when weighted. A NaN ``d`` has torch's slope: NaN (the clamps are comparisons,
which a NaN fails, not min/max, which would drop it), 0 for L1 (torch's sign of NaN). A reducing
launch stores each work item's fp32 (fp64) partial sum; ``sum_rows_kernel`` adds the partials
of each row in a fixed order (deterministic, no atomics)
and ``WRITE_GRAD`` stores ``scale * dl/dx`` (scale = 1/N for a mean) in the input's dtype,
so that backward has nothing left to compute.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import to_storage

MEAN, MSE, L1, SMOOTH_L1, HUBER = (tl.constexpr(i) for i in range(5))
# Scalars vector layout, float64.
PARAM, SCALE = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _loss_and_slope(d, param, LOSS: tl.constexpr):
    """Elementwise loss of the difference ``d`` and its derivative."""
    if LOSS == MSE:
        return d * d, 2.0 * d
    elif LOSS == L1:
        return tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    elif LOSS == SMOOTH_L1:
        ad = tl.abs(d)
        small = ad < param
        loss = tl.where(small, 0.5 * d * d / param, ad - 0.5 * param)
        return loss, tl.where(d < -param, -1.0, tl.where(d > param, 1.0, d / param)).to(d.dtype)
    else:  # HUBER
        ad = tl.abs(d)
        loss = tl.where(ad < param, 0.5 * d * d, param * (ad - 0.5 * param))
        return loss, tl.where(d < -param, -param, tl.where(d > param, param, d))


@triton.jit
def _load(ptr, mask, COMPUTE: tl.constexpr):
    """Load in COMPUTE: unmasked (vector accesses where the address allows) for a full block
    (``mask`` None), else 0 outside ``mask``."""
    if mask is None:
        return tl.load(ptr).to(COMPUTE)
    else:
        return tl.load(ptr, mask=mask, other=0).to(COMPUTE)


@triton.jit
def _pointwise_block(x_ptr, y_ptr, w_ptr, out_ptr, grad_ptr, scalars, param, offs, mask,
                     LOSS: tl.constexpr, COMPUTE: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
                     WRITE_GRAD: tl.constexpr):  # fmt: skip
    """One block of ``pointwise_loss_kernel`` (``mask``: None for a full block): its losses
    (0 outside ``mask``) when REDUCE, else stored."""
    x = _load(x_ptr + offs, mask, COMPUTE)
    if LOSS == MEAN:
        loss = x
        slope = tl.full(x.shape, 1.0, COMPUTE)
    else:
        d = x - _load(y_ptr + offs, mask, COMPUTE)
        loss, slope = _loss_and_slope(d, param, LOSS)
    if HAS_WEIGHT:
        w = _load(w_ptr + offs, mask, COMPUTE)
        loss = loss * w
        slope = slope * w
    if WRITE_GRAD:
        grad = slope * tl.load(scalars + SCALE).to(COMPUTE)
        tl.store(grad_ptr + offs, to_storage(grad, grad_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        if mask is not None:
            loss = tl.where(mask, loss, 0.0)
    else:
        tl.store(out_ptr + offs, to_storage(loss, out_ptr.dtype.element_ty), mask=mask)
    return loss


@triton.jit
def pointwise_loss_kernel(
    x_ptr,  # [M, K] input, contiguous
    y_ptr,  # [M, K] target (read unless LOSS == MEAN)
    w_ptr,  # [M, K] weight (read if HAS_WEIGHT)
    out_ptr,  # [M, K] elementwise loss (written unless REDUCE)
    partial_ptr,  # COMPUTE [M, P]: each program's sum of losses (written if REDUCE)
    grad_ptr,  # [M, K] scale * dl/dx in the input's dtype (written if WRITE_GRAD)
    scalars,  # float64 [2]: loss parameter (beta, delta), gradient scale
    K,  # elements per row
    P,  # blocks per row
    ITEMS,  # M * P work items: block i % P of row i // P
    LOSS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,  # the last block of a row runs in sub-blocks of this many elements
    HAS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ONE_ROW: tl.constexpr,  # M == 1: blocks start at multiples of BLOCK (vector accesses at any K)
):
    """A full block runs unmasked (128-bit accesses where its start allows); the last block of a
    row, masked, in sub-blocks of TAIL_BLOCK (its code does not grow with BLOCK), summed lane by
    lane before one reduction."""
    param = tl.load(scalars + PARAM).to(COMPUTE)
    for item in range(tl.program_id(0).to(tl.int64), ITEMS, tl.num_programs(0)):
        if ONE_ROW:
            start = item * BLOCK
            row_start = 0
        else:
            row = item // P
            start = (item - row * P) * BLOCK
            row_start = row * K
        if start + BLOCK <= K:  # a full block: unmasked
            offs = row_start + start + tl.arange(0, BLOCK)
            loss = _pointwise_block(x_ptr, y_ptr, w_ptr, out_ptr, grad_ptr, scalars, param, offs, None,
                                    LOSS, COMPUTE, HAS_WEIGHT, REDUCE, WRITE_GRAD)  # fmt: skip
            if REDUCE:
                tl.store(partial_ptr + item, tl.sum(loss, axis=0))
        else:
            acc = tl.zeros([TAIL_BLOCK], COMPUTE)
            for sub in range(start, K, TAIL_BLOCK):
                cols = sub + tl.arange(0, TAIL_BLOCK)
                acc += _pointwise_block(x_ptr, y_ptr, w_ptr, out_ptr, grad_ptr, scalars, param, row_start + cols,
                                        cols < K, LOSS, COMPUTE, HAS_WEIGHT, REDUCE, WRITE_GRAD)  # fmt: skip
            if REDUCE:
                tl.store(partial_ptr + item, tl.sum(acc, axis=0))


@triton.jit
def sum_rows_kernel(
    partial_ptr,  # COMPUTE [M, P]: partial sums
    out_ptr,  # [M] result, in the output dtype
    scalars,  # float64 [2]: SCALE multiplies each row's sum (1/N for a mean)
    M,
    P,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[r] = scale * sum(partial[r, :]), summed in a fixed order; one row per work item."""
    scale = tl.load(scalars + SCALE).to(COMPUTE)
    for row in range(tl.program_id(0).to(tl.int64), M, tl.num_programs(0)):
        acc = tl.zeros([BLOCK], COMPUTE)
        for start in range(0, P, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + row * P + idx, mask=idx < P, other=0).to(COMPUTE)
        total = tl.sum(acc, axis=0) * scale
        if out_ptr.dtype.element_ty == tl.bfloat16:
            total = total.to(tl.float32)  # an fp64 mean: to_storage rounds fp32 to bf16
        tl.store(out_ptr + row, to_storage(total, out_ptr.dtype.element_ty))


@triton.jit
def _backward_block(x_ptr, y_ptr, w_ptr, grad_output_ptr, grad_ptr, param, scale, offs, mask, go_stride,
                    LOSS: tl.constexpr, COMPUTE: tl.constexpr, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """One block of ``pointwise_loss_backward_kernel`` (``mask``: None for a full block)."""
    d = _load(x_ptr + offs, mask, COMPUTE) - _load(y_ptr + offs, mask, COMPUTE)
    _, slope = _loss_and_slope(d, param, LOSS)
    if go_stride == 1:  # Triton specializes a 1: an elementwise grad_output read as the others
        go = _load(grad_output_ptr + offs, mask, COMPUTE)
    else:  # one value for all, in d's shape (the branches' types must agree)
        go = tl.zeros_like(d) + tl.load(grad_output_ptr).to(COMPUTE)
    slope = slope * go * scale
    if HAS_WEIGHT:
        slope = slope * _load(w_ptr + offs, mask, COMPUTE)
    tl.store(grad_ptr + offs, to_storage(slope, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pointwise_loss_backward_kernel(
    x_ptr,  # [N] input
    y_ptr,  # [N] target
    w_ptr,  # [N] weight (read if HAS_WEIGHT)
    grad_output_ptr,  # [N] upstream gradient, or [1] with go_stride 0 (a reduced loss)
    grad_ptr,  # [N] written: scale * dl/dx * w * grad_output, in the input's dtype
    scalars,  # float64 [2]: loss parameter, scale (1/N or 1/sum(w) for a mean, else 1)
    N,
    go_stride,  # 1: elementwise grad_output; 0: one value for all
    LOSS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,  # the last block runs in sub-blocks of this many elements
    HAS_WEIGHT: tl.constexpr,
):
    """Full blocks unmasked, the last one masked in sub-blocks of TAIL_BLOCK."""
    param = tl.load(scalars + PARAM).to(COMPUTE)
    scale = tl.load(scalars + SCALE).to(COMPUTE)
    for block in range(tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK), tl.num_programs(0)):
        start = block * BLOCK
        if start + BLOCK <= N:
            _backward_block(x_ptr, y_ptr, w_ptr, grad_output_ptr, grad_ptr, param, scale,
                            start + tl.arange(0, BLOCK), None, go_stride, LOSS, COMPUTE, HAS_WEIGHT)  # fmt: skip
        else:
            for sub in range(start, N, TAIL_BLOCK):
                offs = sub + tl.arange(0, TAIL_BLOCK)
                _backward_block(x_ptr, y_ptr, w_ptr, grad_output_ptr, grad_ptr, param, scale,
                                offs, offs < N, go_stride, LOSS, COMPUTE, HAS_WEIGHT)  # fmt: skip


@triton.jit
def scale_grad_kernel(
    grad_ptr,  # [N] gradient stored by forward, scaled in place
    grad_output_ptr,  # [1] upstream gradient of the reduced loss
    N,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,  # the last block runs in sub-blocks of this many elements
):
    """grad *= grad_output; every program returns at once when grad_output is 1. Full blocks
    unmasked, the last one masked in sub-blocks of TAIL_BLOCK."""
    go = tl.load(grad_output_ptr).to(COMPUTE)
    if go != 1.0:
        for block in range(tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK), tl.num_programs(0)):
            start = block * BLOCK
            if start + BLOCK <= N:
                offs = start + tl.arange(0, BLOCK)
                g = tl.load(grad_ptr + offs).to(COMPUTE)
                tl.store(grad_ptr + offs, to_storage(g * go, grad_ptr.dtype.element_ty))
            else:
                for sub in range(start, N, TAIL_BLOCK):
                    offs = sub + tl.arange(0, TAIL_BLOCK)
                    g = tl.load(grad_ptr + offs, mask=offs < N, other=0).to(COMPUTE)
                    tl.store(grad_ptr + offs, to_storage(g * go, grad_ptr.dtype.element_ty), mask=offs < N)
