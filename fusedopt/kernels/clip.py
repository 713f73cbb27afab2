"""Global gradient norm over many tensors, and the in-place clip (``clip_grad_norm_``).

``norm_partials_kernel``: program ``b`` reduces block ``b`` of a multi-tensor layout (see
``fusedopt.kernels.common``) to one partial, with ``x = |g| / grad_scale``:

    ORD_TWO: sum x*x     ORD_ONE: sum x     ORD_INF: max x     ORD_P: sum x**P  (P > 0)

``norm_finish_kernel``: one program adds (or maxes) the partials in a fixed order and takes the
root. Deterministic (no atomics); the result stays on the device.

``scale_kernel``: ``g = g * coef`` in place, ``coef`` read on the device.

Bytes per fp32 element: the norm reads g once (4 B); the clip reads and writes it (8 B).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import address, locate_block, sqrt_ieee, to_storage

ORD_TWO, ORD_ONE, ORD_INF, ORD_P = (tl.constexpr(i) for i in range(4))


@triton.jit
def _max_keeping_nan(x):
    """max of non-negative ``x``, NaN if any is NaN (``tl.max`` drops NaNs; their sum keeps them)."""
    total = tl.sum(x, 0)
    return tl.where(total != total, total, tl.max(x, 0))


@triton.jit
def _reduce_block(x, ORD: tl.constexpr, P: tl.constexpr):
    if ORD == ORD_INF:
        return _max_keeping_nan(x)
    elif ORD == ORD_TWO:
        return tl.sum(x * x, 0)
    elif ORD == ORD_ONE:
        return tl.sum(x, 0)
    else:
        return tl.sum(tl.exp2(tl.log2(x) * P), 0)  # x = 0 gives exp2(-inf) = 0


@triton.jit
def norm_partials_kernel(
    grad_ptrs,  # int64 [T, G]: grad address in column 0
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    partials,  # float32 or float64 [B]: out, one per block
    grad_scale,  # float32 [1]: AMP scale the grads carry (read if HAS_GRAD_SCALE)
    G: tl.constexpr,  # width of the grads' table
    DTYPE: tl.constexpr,  # storage dtype of the grads
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    ORD: tl.constexpr,
    P: tl.constexpr,  # the norm's order when ORD == ORD_P
    HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, mask, full = locate_block(meta, owner, BLOCK)
    g_ptr = address(grad_ptrs, t, 0, G, DTYPE, ALIGNED) + offs
    if full:
        x = tl.abs(tl.load(g_ptr).to(COMPUTE))
    else:
        x = tl.abs(tl.load(g_ptr, mask=mask, other=0.0).to(COMPUTE))
    if HAS_GRAD_SCALE:
        x = x / tl.load(grad_scale).to(COMPUTE)
    tl.store(partials + tl.program_id(0), _reduce_block(x, ORD, P))


@triton.jit
def norm_finish_kernel(
    partials,  # float32 or float64 [N]: the partials of every launch on this device
    out,  # [1]: the total norm, in the result's dtype
    N,  # number of partials
    OUT_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    ORD: tl.constexpr,
    P: tl.constexpr,
):
    acc = tl.zeros([BLOCK], COMPUTE)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(partials + offs, mask=offs < N, other=0.0).to(COMPUTE)
        if ORD == ORD_INF:
            acc = tl.where((acc != acc) | (x != x), acc + x, tl.maximum(acc, x))  # NaN stays
        else:
            acc = acc + x
    if ORD == ORD_INF:
        total = _max_keeping_nan(acc)
    else:
        total = tl.sum(acc, 0)
    if ORD == ORD_TWO:
        total = sqrt_ieee(total, COMPUTE)
    elif ORD == ORD_P:
        total = tl.exp(tl.log(total.to(tl.float64)) / P).to(COMPUTE)
    tl.store(out, to_storage(total, OUT_DTYPE))


@triton.jit
def scale_kernel(
    grad_ptrs,  # int64 [T, G]: grad address in column 0
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    coef,  # [1]: the factor
    G: tl.constexpr,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, mask, full = locate_block(meta, owner, BLOCK)
    g_ptr = address(grad_ptrs, t, 0, G, DTYPE, ALIGNED) + offs
    c = tl.load(coef).to(COMPUTE)
    if full:
        tl.store(g_ptr, to_storage(tl.load(g_ptr).to(COMPUTE) * c, DTYPE))
    else:
        tl.store(g_ptr, to_storage(tl.load(g_ptr, mask=mask).to(COMPUTE) * c, DTYPE), mask=mask)
