"""Multi-tensor Adam / AdamW step: one pass over memory, one launch per device and dtype.

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    p  = p * (1 - lr * wd)                 (decoupled, AdamW)   |  g = g + wd * p   (L2)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    vm = max(vm, v)                        (amsgrad; the denominator then uses vm)
    p  = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The bias corrections are computed in the kernel from each tensor's step count (in fp64), so a
step reads nothing from the host: it can be captured in a CUDA graph.

Bytes per element (fp32, no amsgrad): read p, g, m, v and write p, m, v = 28 B.
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
    named,
    random_bits,
    sqrt_ieee,
    step_taken,
    store_param,
    store_state,
)

# The spec shared with the launcher (fusedopt.optim.adam): table columns (state keys), float64
# scalar slots, and the constexpr switches.
COLUMNS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay")
FLAGS = ("AMSGRAD", "MAXIMIZE", "DECOUPLED", "HAS_WD")
NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")  # state never below 0: the unsigned 8-bit code map
PARAM, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = named(COLUMNS)
K = tl.constexpr(len(COLUMNS) + 1)  # and the precision column (a master or a compensation)
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = named(SCALARS)


@triton.jit
def _adam_block(
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
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs

    lr = tl.load(scalars + LR)
    beta1 = tl.load(scalars + BETA1)
    beta2 = tl.load(scalars + BETA2)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    wd = tl.load(scalars + WEIGHT_DECAY)
    # 1 - beta**step in fp64 (as torch's Python-float arithmetic); exp(step * log(beta)) agrees
    # with Python's pow to ~1e-15, far below fp32 rounding.
    step = tl.load(steps + t).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2))).to(COMPUTE)
    step_size = (lr / bias_correction1).to(COMPUTE)
    w1 = (1.0 - beta1).to(COMPUTE)
    b2 = beta2.to(COMPUTE)
    w2 = (1.0 - beta2).to(COMPUTE)

    # Upcast right after loading (the interpreter computes low precision on raw bits).
    p = load_param(ptrs, t, offs, mask, K, DTYPE, COMPUTE, ALIGNED, MODE)
    r_p, r_m, r_v, r_vm = random_bits(seeds, t, offs, 4, DTYPE, SDTYPE, SR)
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    m = load_state(ptrs, absmax_ptrs, codebook, t, EXP_AVG, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
    v = load_state(ptrs, absmax_ptrs, codebook, t, EXP_AVG_SQ, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
    if HAS_WD:
        if DECOUPLED:
            p = p * (1.0 - lr * wd).to(COMPUTE)
        else:
            g = fma(p, wd.to(COMPUTE), g)
    # fma exactly where torch's lerp / add(alpha=) / addcmul round once (CPU and CUDA), so fp32
    # results match torch's for-loop step bit for bit on CPU.
    m = tl.where(w1 < 0.5, fma(w1, g - m, m), fma(w1 - 1.0, g - m, g))
    v = fma(w2 * g, g, v * b2)
    if AMSGRAD:
        vm = load_state(
            ptrs, absmax_ptrs, codebook, t, MAX_EXP_AVG_SQ, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8
        )
        vm = tl.where((vm != vm) | (v != v), vm + v, tl.maximum(vm, v))  # NaN stays, as torch.maximum
        store_state(ptrs, absmax_ptrs, codebook, t, MAX_EXP_AVG_SQ, offs, mask, vm, r_vm, K, SDTYPE, ALIGNED,
                    SR, Q8, BLOCK)  # fmt: skip
        denom = div_ieee(sqrt_ieee(vm, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    else:
        denom = div_ieee(sqrt_ieee(v, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    p = p + div_ieee(-step_size * m, denom, COMPUTE)
    store_param(ptrs, t, offs, mask, p, r_p, K, DTYPE, ALIGNED, MODE, SR)
    store_state(
        ptrs, absmax_ptrs, codebook, t, EXP_AVG, offs, mask, m, r_m, K, SDTYPE, ALIGNED, SR, Q8, BLOCK
    )
    store_state(
        ptrs, absmax_ptrs, codebook, t, EXP_AVG_SQ, offs, mask, v, r_v, K, SDTYPE, ALIGNED, SR, Q8, BLOCK
    )


@triton.jit
def adam_kernel(
    ptrs,  # int64 [T, K]: COLUMNS, then the precision column (absent operands: the param, never read)
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
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
):
    t, offs, mask, full = locate_block(meta, owner, BLOCK)
    if step_taken(found_inf, HAS_FOUND_INF):
        if full:
            _adam_block(ptrs, grad_ptrs, scalars, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef,
                        t, offs, None, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, AMSGRAD, MAXIMIZE, DECOUPLED,
                        HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
        else:
            _adam_block(ptrs, grad_ptrs, scalars, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef,
                        t, offs, mask, DTYPE, SDTYPE, COMPUTE, MODE, SR, Q8, BLOCK, AMSGRAD, MAXIMIZE, DECOUPLED,
                        HAS_WD, HAS_GRAD_SCALE, HAS_CLIP, ALIGNED)  # fmt: skip
