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

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import (
    address,
    fma,
    load_grad,
    load_param,
    load_state,
    locate_block,
    named,
    random_bits,
    step_taken,
    store_param,
    store_state,
)

# The spec shared with the launcher (fusedopt.optim.sgd).
COLUMNS = ("param", "momentum_buffer")
SCALARS = ("lr", "momentum", "dampening", "weight_decay")
FLAGS = ("HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "HAS_WD")
NONNEGATIVE = ()  # state never below 0 (the unsigned 8-bit code map): none
PARAM, MOMENTUM_BUFFER = named(COLUMNS)
K = tl.constexpr(len(COLUMNS) + 1)  # and the precision column (a master or a compensation)
LR, MOMENTUM, DAMPENING, WEIGHT_DECAY = named(SCALARS)


@triton.jit
def _sgd_block(
    ptrs,
    grad_ptrs,
    scalars,
    taken,
    seeds,
    absmax_ptrs,
    codebook,
    grad_scale,
    clip_coef,
    t,
    offs,
    mask,  # None for a full block
    DTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    MODE: tl.constexpr,
    SR: tl.constexpr,
    Q8: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs
    lr = tl.load(scalars + LR).to(COMPUTE)

    p = load_param(ptrs, t, offs, mask, K, DTYPE, COMPUTE, ALIGNED, MODE)
    r_p, r_b, _, _ = random_bits(seeds, t, offs, 2, DTYPE, SDTYPE, SR)
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    # fma where torch's add(..., alpha=) rounds once, so fp32 results match torch bit for bit.
    if HAS_WD:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    if HAS_MOMENTUM:
        momentum = tl.load(scalars + MOMENTUM).to(COMPUTE)
        keep = (1.0 - tl.load(scalars + DAMPENING)).to(COMPUTE)
        if tl.load(taken + t) == 1:  # the buffer's first step: it takes the grad
            b = g
        else:
            b = load_state(ptrs, absmax_ptrs, codebook, t, MOMENTUM_BUFFER, offs, mask, K, SDTYPE, COMPUTE,
                           ALIGNED, Q8)  # fmt: skip
            b = fma(g, keep, b * momentum)
        store_state(ptrs, absmax_ptrs, codebook, t, MOMENTUM_BUFFER, offs, mask, b, r_b, K, SDTYPE, ALIGNED, SR,
                    Q8, BLOCK)  # fmt: skip
        if NESTEROV:
            g = fma(b, momentum, g)
        else:
            g = b
    p = fma(g, -lr, p)
    store_param(ptrs, t, offs, mask, p, r_p, K, DTYPE, ALIGNED, MODE, SR)


@triton.jit
def sgd_kernel(
    ptrs,  # int64 [T, K]: COLUMNS, then the precision column (absent operands: the param, never read)
    grad_ptrs,  # int64 [T, 1]: grad
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    scalars,  # float64 [len(SCALARS)]: SCALARS
    taken,  # float32 [T]: steps each momentum buffer has taken, this one included (read if HAS_MOMENTUM)
    seeds,  # int64 [T]: each tensor's stochastic-rounding seed (read if SR)
    absmax_ptrs,  # int64 [T, K - 2]: address of each state column's absmax, 0: fp32 state (read if Q8)
    codebook,  # float32 [K - 2, BOOK]: each state column's code map and bucket starts (read if Q8)
    grad_scale,  # float32 [1]: AMP scale the grads carry (read if HAS_GRAD_SCALE)
    found_inf,  # float32 [1]: non-zero skips the step (read if HAS_FOUND_INF)
    clip_coef,  # float32 [1]: min(1, max_grad_norm / (norm + 1e-6)) (read if HAS_CLIP)
    DTYPE: tl.constexpr,  # storage dtype of params and grads
    SDTYPE: tl.constexpr,  # storage dtype of the state
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 params
    MODE: tl.constexpr,  # MODE_PLAIN, MODE_MASTER or MODE_KAHAN (fusedopt.kernels.common)
    SR: tl.constexpr,  # stochastic rounding of low-precision stores
    Q8: tl.constexpr,  # state columns may be 8-bit (per tensor: absmax_ptrs); SDTYPE is then fp32
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
            _sgd_block(ptrs, grad_ptrs, scalars, taken, seeds, absmax_ptrs, codebook, grad_scale, clip_coef,
                       t, offs, None, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, HAS_MOMENTUM, NESTEROV,
                       MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        else:
            _sgd_block(ptrs, grad_ptrs, scalars, taken, seeds, absmax_ptrs, codebook, grad_scale, clip_coef,
                       t, offs, mask, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, HAS_MOMENTUM, NESTEROV,
                       MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
