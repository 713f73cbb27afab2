"""Adam / AdamW: the update and per-tensor values of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    p  = p * (1 - lr * wd)                 (decoupled, AdamW)   |  g = g + wd * p   (L2)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    vm = max(vm, v)                        (amsgrad; the denominator then uses vm)
    p  = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The bias corrections are computed on the device from each tensor's step count (in fp64, once per
tensor and step: ``prepare``), so a step reads nothing from the host: it can be captured in a
CUDA graph.

Bytes per element (fp32, no amsgrad): read p, g, m, v and write p, m, v = 28 B.
When ``found_inf`` is non-zero nothing is read or written.

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import decay, div_ieee, fma, lerp, maximum, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.adam): table columns (state keys), float64
# scalar slots, per-tensor values, the constexpr switches, and the state columns a switch adds.
COLUMNS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay")
PREPARED = ("step_size", "bias_correction2_sqrt")
FLAGS = ("AMSGRAD", "MAXIMIZE", "DECOUPLED", "HAS_WD")
REQUIRES = {"max_exp_avg_sq": "AMSGRAD"}
NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")  # state never below 0: the unsigned 8-bit code map
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = named(SCALARS)
STEP_SIZE, BIAS_CORRECTION2_SQRT = named(PREPARED)
AMSGRAD, MAXIMIZE, DECOUPLED, HAS_WD = bits(FLAGS)


@triton.jit
def prepare(scalars, step, out, mask, COMPUTE: tl.constexpr):
    """``lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)`` of each tensor's step ``t``."""
    # 1 - beta**step in fp64 (as torch's Python-float arithmetic); exp(step * log(beta)) agrees
    # with Python's pow to ~1e-15, far below fp32 rounding.
    bias_correction1 = 1.0 - tl.exp(step * tl.log(tl.load(scalars + BETA1)))
    bias_correction2 = 1.0 - tl.exp(step * tl.log(tl.load(scalars + BETA2)))
    tl.store(out + STEP_SIZE, (tl.load(scalars + LR) / bias_correction1).to(COMPUTE), mask=mask)
    tl.store(out + BIAS_CORRECTION2_SQRT, tl.sqrt(bias_correction2).to(COMPUTE), mask=mask)


@triton.jit
def update(p, g, m, v, vm, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    lr = tl.load(scalars + LR)
    beta1 = tl.load(scalars + BETA1)
    beta2 = tl.load(scalars + BETA2)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    wd = tl.load(scalars + WEIGHT_DECAY)
    step_size = tl.load(prepared + STEP_SIZE)
    bias_correction2_sqrt = tl.load(prepared + BIAS_CORRECTION2_SQRT)
    w1 = (1.0 - beta1).to(COMPUTE)
    b2 = beta2.to(COMPUTE)
    w2 = (1.0 - beta2).to(COMPUTE)
    if HAS_WD & SWITCHES:
        p, g = decay(p, g, lr, wd, DECOUPLED & SWITCHES, COMPUTE)
    # fma exactly where torch's lerp / add(alpha=) / addcmul round once (CPU and CUDA), so fp32
    # results match torch's for-loop step bit for bit on CPU.
    m = lerp(m, g, w1)
    v = fma(w2 * g, g, v * b2)
    if AMSGRAD & SWITCHES:
        vm = maximum(vm, v)
        denom = div_ieee(sqrt_ieee(vm, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    else:
        denom = div_ieee(sqrt_ieee(v, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    p = p + div_ieee(-step_size * m, denom, COMPUTE)
    return p, m, v, vm
