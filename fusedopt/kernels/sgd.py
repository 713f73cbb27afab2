"""Multi-tensor SGD step (momentum, dampening, nesterov, L2 decay, maximize).

For each element (fp32 math, fp64 for fp64 params):

    g = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g = g + wd * p
    b = g                                  on the buffer's first step taken (its counter is 1)
    b = momentum * b + (1 - dampening) * g afterwards
    g = g + momentum * b (nesterov)  or  g = b
    p = p - lr * g

Bytes per element (fp32, momentum): read p, g, b and write p, b = 20 B (12 B without momentum).
When ``found_inf`` is non-zero nothing is read or written.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import address, fma, load_grad, locate_block, named, step_taken, to_storage

# The spec shared with the launcher (fusedopt.optim.sgd).
COLUMNS = ("param", "momentum_buffer")
SCALARS = ("lr", "momentum", "dampening", "weight_decay")
FLAGS = ("HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "HAS_WD")
PARAM, MOMENTUM_BUFFER = named(COLUMNS)
K = tl.constexpr(len(COLUMNS))
LR, MOMENTUM, DAMPENING, WEIGHT_DECAY = named(SCALARS)


@triton.jit
def _sgd_block(
    ptrs,
    grad_ptrs,
    scalars,
    taken,
    grad_scale,
    clip_coef,
    t,
    offs,
    mask,  # None for a full block
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p_ptr = address(ptrs, t, PARAM, K, DTYPE, ALIGNED) + offs
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs
    lr = tl.load(scalars + LR).to(COMPUTE)

    p = tl.load(p_ptr, mask=mask).to(COMPUTE)
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    # fma where torch's add(..., alpha=) rounds once, so fp32 results match torch bit for bit.
    if HAS_WD:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    if HAS_MOMENTUM:
        momentum = tl.load(scalars + MOMENTUM).to(COMPUTE)
        keep = (1.0 - tl.load(scalars + DAMPENING)).to(COMPUTE)
        b_ptr = address(ptrs, t, MOMENTUM_BUFFER, K, DTYPE, ALIGNED) + offs
        if tl.load(taken + t) == 1:  # the buffer's first step: it takes the grad
            b = g
        else:
            b = fma(g, keep, tl.load(b_ptr, mask=mask).to(COMPUTE) * momentum)
        tl.store(b_ptr, to_storage(b, DTYPE), mask=mask)
        if NESTEROV:
            g = fma(b, momentum, g)
        else:
            g = b
    p = fma(g, -lr, p)
    tl.store(p_ptr, to_storage(p, DTYPE), mask=mask)


@triton.jit
def sgd_kernel(
    ptrs,  # int64 [T, K]: COLUMNS (momentum_buffer is the param, never read, unless HAS_MOMENTUM)
    grad_ptrs,  # int64 [T, 1]: grad
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    scalars,  # float64 [len(SCALARS)]: SCALARS
    taken,  # float32 [T]: steps each momentum buffer has taken, this one included (read if HAS_MOMENTUM)
    grad_scale,  # float32 [1]: AMP scale the grads carry (read if HAS_GRAD_SCALE)
    found_inf,  # float32 [1]: non-zero skips the step (read if HAS_FOUND_INF)
    clip_coef,  # float32 [1]: min(1, max_grad_norm / (norm + 1e-6)) (read if HAS_CLIP)
    DTYPE: tl.constexpr,  # storage dtype of params and state
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 params
    BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
):
    t, offs, mask, full = locate_block(meta, owner, BLOCK)
    if step_taken(found_inf, HAS_FOUND_INF):
        if full:
            _sgd_block(ptrs, grad_ptrs, scalars, taken, grad_scale, clip_coef, t, offs, None, DTYPE, COMPUTE,
                       HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        else:
            _sgd_block(ptrs, grad_ptrs, scalars, taken, grad_scale, clip_coef, t, offs, mask, DTYPE, COMPUTE,
                       HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
