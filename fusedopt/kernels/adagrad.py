"""Multi-tensor Adagrad step (learning-rate decay, L2 decay, maximize): one pass over memory, one
launch per device and dtype.

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g   = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g   = g + wd * p
    clr = lr / (1 + (t - 1) * lr_decay)           (in fp64, as torch's Python floats)
    s   = s + g * g
    p   = p - clr * g / (sqrt(s) + eps)

The decayed learning rate is computed in the kernel from each tensor's step count, so a step
reads nothing from the host: it can be captured in a CUDA graph.

Bytes per element (fp32): read p, g, s and write p, s = 20 B.
When ``found_inf`` is non-zero nothing is read or written.

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

# The spec shared with the launcher (fusedopt.optim.adagrad): table columns (state keys), float64
# scalar slots, and the constexpr switches.
COLUMNS = ("param", "sum")
SCALARS = ("lr", "lr_decay", "weight_decay", "eps")
FLAGS = ("MAXIMIZE", "HAS_WD")
# State never below 0 (with initial_accumulator_value >= 0): the unsigned 8-bit code map.
NONNEGATIVE = ("sum",)
PARAM, SUM = named(COLUMNS)
K = tl.constexpr(len(COLUMNS) + 1)  # and the precision column (a master or a compensation)
LR, LR_DECAY, WEIGHT_DECAY, EPS = named(SCALARS)


@triton.jit
def _adagrad_block(
    ptrs,
    grad_ptrs,
    scalars,
    steps,
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
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs

    # clr in fp64, rounded as torch's Python floats: (t - 1) * lr_decay, then 1 + that, then lr / it.
    step = tl.load(steps + t).to(tl.float64)
    clr = tl.load(scalars + LR) / (1.0 + mul_ieee(step - 1.0, tl.load(scalars + LR_DECAY)))
    minus_clr = (-clr).to(COMPUTE)
    eps = tl.load(scalars + EPS).to(COMPUTE)

    # Upcast right after loading (the interpreter computes low precision on raw bits).
    p = load_param(ptrs, t, offs, mask, K, DTYPE, COMPUTE, ALIGNED, MODE)
    r_p, r_s, _, _ = random_bits(seeds, t, offs, 2, DTYPE, SDTYPE, SR)
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    s = load_state(ptrs, absmax_ptrs, codebook, t, SUM, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
    # fma exactly where torch's add(alpha=) / addcmul round once; addcdiv divides (IEEE) and
    # adds with separate roundings (CPU), so fp32 results follow torch's for-loop step.
    if HAS_WD:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    s = fma(g, g, s)
    std = sqrt_ieee(s, COMPUTE) + eps
    p = p + div_ieee(minus_clr * g, std, COMPUTE)
    store_param(ptrs, t, offs, mask, p, r_p, K, DTYPE, ALIGNED, MODE, SR)
    store_state(ptrs, absmax_ptrs, codebook, t, SUM, offs, mask, s, r_s, K, SDTYPE, ALIGNED, SR, Q8, BLOCK)


@triton.jit
def adagrad_kernel(
    ptrs,  # int64 [T, K]: COLUMNS, then the precision column (absent: the param, never read)
    grad_ptrs,  # int64 [T, 1]: grad
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    scalars,  # float64 [len(SCALARS)]: SCALARS
    steps,  # float32 or float64 [T]: each tensor's step count, this step included
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
            _adagrad_block(ptrs, grad_ptrs, scalars, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t,
                           offs, None, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, MAXIMIZE, HAS_WD,
                           HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        else:
            _adagrad_block(ptrs, grad_ptrs, scalars, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t,
                           offs, mask, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, MAXIMIZE, HAS_WD,
                           HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
