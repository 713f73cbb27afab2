"""Multi-tensor RMSprop step (centered, momentum, L2 decay, maximize): one pass over memory, one
launch per device and dtype.

For each element (fp32 math, fp64 for fp64 params):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g  = g + wd * p
    v  = alpha * v + (1 - alpha) * g * g
    ga = lerp(ga, g, 1 - alpha)                   (centered)
    d  = sqrt(v - ga * ga) + eps  (centered)  |  d = sqrt(v) + eps
    b  = momentum * b + g / d;  p = p - lr * b   (momentum > 0)
    p  = p - lr * g / d                           (otherwise)

The update does not depend on the step count (the launcher advances the counters only).

Bytes per element (fp32): read p, g, v and write p, v = 20 B; 28 B with momentum or centered
(+ b or ga, read and written), 36 B with both. When ``found_inf`` is non-zero nothing is read
or written.

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import (
    address,
    div_ieee,
    fma,
    load_grad,
    load_param,
    load_state,
    locate_block,
    mul_ieee,
    named,
    random_bits,
    sqrt_ieee,
    step_taken,
    store_param,
    store_state,
)

# The spec shared with the launcher (fusedopt.optim.rmsprop): table columns (state keys), float64
# scalar slots, and the constexpr switches.
COLUMNS = ("param", "square_avg", "momentum_buffer", "grad_avg")
SCALARS = ("lr", "alpha", "eps", "weight_decay", "momentum")
FLAGS = ("CENTERED", "HAS_MOMENTUM", "MAXIMIZE", "HAS_WD")
NONNEGATIVE = ("square_avg",)  # state never below 0: the unsigned 8-bit code map
PARAM, SQUARE_AVG, MOMENTUM_BUFFER, GRAD_AVG = named(COLUMNS)
K = tl.constexpr(len(COLUMNS) + 1)  # and the precision column (a master or a compensation)
LR, ALPHA, EPS, WEIGHT_DECAY, MOMENTUM = named(SCALARS)


@triton.jit
def _rmsprop_block(
    ptrs,
    grad_ptrs,
    scalars,
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
    CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs

    lr = tl.load(scalars + LR).to(COMPUTE)
    alpha = tl.load(scalars + ALPHA)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    a = alpha.to(COMPUTE)
    w = (1.0 - alpha).to(COMPUTE)

    # Upcast right after loading (the interpreter computes low precision on raw bits).
    p = load_param(ptrs, t, offs, mask, K, DTYPE, COMPUTE, ALIGNED, MODE)
    r_p, r_v, r_b, r_ga = random_bits(seeds, t, offs, 4, DTYPE, SDTYPE, SR)
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    v = load_state(ptrs, absmax_ptrs, codebook, t, SQUARE_AVG, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
    # fma exactly where torch's add(alpha=) / addcmul / lerp round once, a separate rounding
    # where torch's mul_ / addcdiv do (CPU), so fp32 results follow torch's for-loop step.
    if HAS_WD:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    v = fma(w * g, g, v * a)
    store_state(
        ptrs, absmax_ptrs, codebook, t, SQUARE_AVG, offs, mask, v, r_v, K, SDTYPE, ALIGNED, SR, Q8, BLOCK
    )
    if CENTERED:
        ga = load_state(ptrs, absmax_ptrs, codebook, t, GRAD_AVG, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
        ga = tl.where(w < 0.5, fma(w, g - ga, ga), fma(w - 1.0, g - ga, g))
        store_state(
            ptrs, absmax_ptrs, codebook, t, GRAD_AVG, offs, mask, ga, r_ga, K, SDTYPE, ALIGNED, SR, Q8, BLOCK
        )
        avg = sqrt_ieee(fma(-ga, ga, v), COMPUTE) + eps
    else:
        avg = sqrt_ieee(v, COMPUTE) + eps
    if HAS_MOMENTUM:
        momentum = tl.load(scalars + MOMENTUM).to(COMPUTE)
        b = load_state(
            ptrs, absmax_ptrs, codebook, t, MOMENTUM_BUFFER, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8
        )
        b = mul_ieee(b, momentum) + div_ieee(g, avg, COMPUTE)
        store_state(ptrs, absmax_ptrs, codebook, t, MOMENTUM_BUFFER, offs, mask, b, r_b, K, SDTYPE, ALIGNED,
                    SR, Q8, BLOCK)  # fmt: skip
        p = fma(b, -lr, p)
    else:
        p = p + div_ieee(-lr * g, avg, COMPUTE)
    store_param(ptrs, t, offs, mask, p, r_p, K, DTYPE, ALIGNED, MODE, SR)


@triton.jit
def rmsprop_kernel(
    ptrs,  # int64 [T, K]: COLUMNS, then the precision column (absent operands: the param, never read)
    grad_ptrs,  # int64 [T, 1]: grad
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    scalars,  # float64 [len(SCALARS)]: SCALARS
    steps,  # float32 or float64 [T]: each tensor's step count (not read: the update ignores it)
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
    CENTERED: tl.constexpr,  # grad_avg is read and written
    HAS_MOMENTUM: tl.constexpr,  # momentum > 0: momentum_buffer is read and written
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
            _rmsprop_block(ptrs, grad_ptrs, scalars, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t, offs,
                           None, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, CENTERED, HAS_MOMENTUM, MAXIMIZE,
                           HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        else:
            _rmsprop_block(ptrs, grad_ptrs, scalars, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t, offs,
                           mask, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, CENTERED, HAS_MOMENTUM, MAXIMIZE,
                           HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
